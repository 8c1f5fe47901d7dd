/** The agent's log lines in both --log-format values (the agent's own stderr: scripts/bundle.test.ts). */
import { describe, expect, it } from 'vitest';
import { formatLog } from './log.ts';

const AT = new Date('2026-12-07T08:09:10.123Z');

describe('formatLog', () => {
  it('text: the time, the prefix, the level\'s tag; continuation lines carry both and are indented', () => {
    expect(formatLog('text', 'xmasq-agent:', 'info', 'ready: 2 pod(s)', AT)).toBe('2026-12-07T08:09:10.123Z xmasq-agent: ready: 2 pod(s)\n');
    expect(formatLog('text', 'xmasq-agent:', 'warn', 'a\nb', AT)).toBe('2026-12-07T08:09:10.123Z xmasq-agent: warning: a\n2026-12-07T08:09:10.123Z xmasq-agent:   b\n');
    expect(formatLog('text', 'xmasq-agent:', 'error', 'boom', AT)).toBe('2026-12-07T08:09:10.123Z xmasq-agent: error: boom\n');
  });

  it('json: one line per message, whatever it holds, that parses back to time, level, logger and msg', () => {
    const msg = 'node set: - 192.168.77.4\n  + "10.0.0.1" \\ tab\there';
    for (const level of ['info', 'warn', 'error', 'debug'] as const) {
      const line = formatLog('json', 'xmasq-agent:', level, msg, AT);
      expect(line.endsWith('\n')).toBe(true);
      expect(line.slice(0, -1)).not.toContain('\n');
      expect(JSON.parse(line)).toEqual({ time: '2026-12-07T08:09:10.123Z', level, logger: 'xmasq-agent', msg });
    }
  });
});
