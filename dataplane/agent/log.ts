/** stderr lines of the agent, each with one prefix so they stand out in a journal or a test log. */
export const PREFIX = 'xmasq-agent:';

export interface Log {
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
  debug(msg: string): void;
}

/*
 * A write to a closed stderr (the supervisor or the terminal went away) fails
 * asynchronously with EPIPE, as an 'error' event. Unhandled, that event is an
 * uncaught exception, whose handler logs it, which fails again: a loop that
 * keeps a core busy forever. The agent's job is the datapath, not its log, so
 * once stderr is gone it stops writing and goes on serving.
 */
let stderrGone = false;
let guarded = false;
function guardStderr(): void {
  if (guarded) return;
  guarded = true;
  process.stderr.on('error', () => {
    stderrGone = true;
  });
}

export function stderrLog(verbose = false, prefix = PREFIX): Log {
  guardStderr();
  const line = (tag: string, msg: string) => {
    if (stderrGone) return;
    // One write per message, so lines of concurrent writers never interleave mid-line.
    process.stderr.write(msg.split('\n').map((l, i) => `${prefix} ${i === 0 ? tag : '  '}${l}`).join('\n') + '\n');
  };
  return {
    info: (m) => line('', m),
    warn: (m) => line('warning: ', m),
    error: (m) => line('error: ', m),
    debug: (m) => {
      if (verbose) line('', m);
    },
  };
}
