/**
 * stderr lines of the agent (--log-format): `text`, each line with its time (UTC, ms)
 * and one prefix so they stand out in a journal or a test log, or `json`, one object per
 * message for log pipelines: {"time","level","logger","msg"}.
 */
export const PREFIX = 'xmasq-agent:';

export const LOG_FORMATS = ['text', 'json'] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

export type LogLevel = 'info' | 'warn' | 'error' | 'debug';

export interface Log {
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
  debug(msg: string): void;
}

const TEXT_TAG: Record<LogLevel, string> = { info: '', warn: 'warning: ', error: 'error: ', debug: '' };

/**
 * One message as it is written, newline included: in text, every line of a
 * multi-line message carries the time and the prefix (its continuation lines
 * indented instead of tagged); in json, one line whatever the message holds.
 */
export function formatLog(format: LogFormat, prefix: string, level: LogLevel, msg: string, now: Date): string {
  const time = now.toISOString();
  if (format === 'json') return `${JSON.stringify({ time, level, logger: prefix.replace(/:$/, ''), msg })}\n`;
  return `${msg.split('\n').map((l, i) => `${time} ${prefix} ${i === 0 ? TEXT_TAG[level] : '  '}${l}`).join('\n')}\n`;
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

export function stderrLog(verbose = false, prefix = PREFIX, format: LogFormat = 'text'): Log {
  guardStderr();
  const line = (level: LogLevel, msg: string) => {
    if (stderrGone) return;
    // One write per message, so lines of concurrent writers never interleave mid-line.
    process.stderr.write(formatLog(format, prefix, level, msg, new Date()));
  };
  return {
    info: (m) => line('info', m),
    warn: (m) => line('warn', m),
    error: (m) => line('error', m),
    debug: (m) => {
      if (verbose) line('debug', m);
    },
  };
}
