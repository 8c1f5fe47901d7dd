/** stderr lines of the agent, each with one prefix so they stand out in a journal or a test log. */
export const PREFIX = 'xmasq-agent:';

export interface Log {
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
  debug(msg: string): void;
}

export function stderrLog(verbose = false, prefix = PREFIX): Log {
  const line = (tag: string, msg: string) => {
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
