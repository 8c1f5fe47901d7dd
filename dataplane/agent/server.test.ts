/**
 * The agent socket's bounds, in-process: what no real request can provoke
 * (a handler that throws) and the nesting scan against an independent
 * measure. agent.test.ts attacks the real agent.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createConnection } from 'node:net';
import { afterAll, describe, expect, it } from 'vitest';
import { until } from '../../testing/until.ts';
import type { Log } from './log.ts';
import { AgentClient, AgentError } from './protocol.ts';
import { SocketServer, nestedDeeperThan } from './server.ts';

/** Nesting of a parsed value, counted by walking it: a measure that shares no code with the scan. */
function depthOf(v: unknown): number {
  if (Array.isArray(v)) return 1 + Math.max(0, ...v.map(depthOf));
  if (v && typeof v === 'object') return 1 + Math.max(0, ...Object.values(v).map(depthOf));
  return 0;
}

/** Random JSON with strings full of what could fool a scan: brackets, quotes and backslashes. */
function randomJson(next: () => number, depth: number): unknown {
  const r = next();
  if (depth <= 0 || r < 0.3) {
    const pick = Math.floor(next() * 4);
    if (pick === 0) return Math.floor(next() * 1000);
    if (pick === 1) return null;
    return Array.from({ length: Math.floor(next() * 6) }, () => '[]{}"\\\\x'[Math.floor(next() * 9)]).join('');
  }
  const n = 1 + Math.floor(next() * 3);
  if (r < 0.65) return Array.from({ length: n }, () => randomJson(next, depth - 1));
  return Object.fromEntries(Array.from({ length: n }, (_, i) => [`k${i}]"{\\`, randomJson(next, depth - 1)]));
}

describe('nestedDeeperThan', () => {
  it('agrees with the depth of the parsed value, whatever the strings hold', () => {
    let x = 12345;
    const next = () => {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      return x / 2 ** 32;
    };
    let deepest = 0;
    for (let i = 0; i < 2000; i++) {
      const text = JSON.stringify(randomJson(next, 8));
      const d = depthOf(JSON.parse(text));
      deepest = Math.max(deepest, d);
      expect(nestedDeeperThan(text, d), text).toBe(false);
      if (d > 0) expect(nestedDeeperThan(text, d - 1), text).toBe(true);
    }
    expect(deepest).toBeGreaterThanOrEqual(6); // the generator did nest
  });

  it('finds 10,000 levels without recursion', () => {
    expect(nestedDeeperThan(`{"seq":${'['.repeat(10_000)}${']'.repeat(10_000)}}`, 32)).toBe(true);
    expect(nestedDeeperThan(`{"s":"${'['.repeat(10_000)}"}`, 32)).toBe(false); // inside a string: not nesting
  });
});

describe('SocketServer', () => {
  const dir = mkdtempSync('/tmp/xmasq-server-test-');
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const logged: string[] = [];
  const log: Log = { info: (m) => logged.push(m), warn: (m) => logged.push(m), error: (m) => logged.push(m), debug: () => {} };

  it('answers a handler that throws with an error reply and goes on serving the connection', async () => {
    const path = `${dir}/s.sock`;
    const srv = await SocketServer.listen(path, (line) => {
      if (line.includes('boom')) throw new RangeError('Maximum call stack size exceeded');
      return JSON.stringify({ ok: true, echo: line });
    }, log, { maxLineBytes: 64, maxDepth: 4, maxConnections: 4, idleSeconds: 5 });
    try {
      const text = await new Promise<string>((resolve, reject) => {
        const c = createConnection(path);
        let got = '';
        c.setEncoding('utf8');
        c.on('data', (d: string) => {
          got += d;
          if (got.split('\n').length > 4) {
            c.destroy();
            resolve(got);
          }
        });
        c.on('error', reject);
        c.write('"boom"\n"after"\n[[[[[1]]]]]\n[[[[1]]]]\n');
      });
      const replies = text.trim().split('\n').map((l) => JSON.parse(l) as { ok: boolean; error?: string; echo?: string });
      expect(replies[0].ok).toBe(false);
      expect(replies[0].error).toContain('Maximum call stack size exceeded');
      expect(replies[1]).toEqual({ ok: true, echo: '"after"' });
      expect(replies[2].error).toMatch(/^request nested deeper than 4 levels/);
      expect(replies[3]).toEqual({ ok: true, echo: '[[[[1]]]]' });
      expect(logged.join('\n')).toContain('a request failed unexpectedly');
      expect(srv.stats().refused).toMatchObject({ handler: 1, depth: 1 });
    } finally {
      await srv.close();
    }
  });

  /*
   * A connection past --socket-max-conns is refused before the agent reads
   * anything: the refusal line may reach the client before or after it
   * writes its request. Either way AgentClient (the CLI, the CNI plugin) must
   * report the refusal, never "write EPIPE".
   */
  it('a connection past the bound: the client reports the refusal, whether it wrote its request before or after the refusal came', async () => {
    const path = `${dir}/max.sock`;
    const srv = await SocketServer.listen(path, () => JSON.stringify({ ok: true }), log, { maxLineBytes: 64, maxDepth: 4, maxConnections: 1, idleSeconds: 30 });
    const held = createConnection(path);
    const refusal = 'the agent serves at most 1 connections at once (--socket-max-conns): close idle ones, or retry in a moment';
    const refusals = () => srv.stats().refused.connections;
    try {
      await new Promise((r) => held.once('connect', r));
      await until('the held connection to be served', () => srv.stats().connections === 1);
      // Written at once, as the CLI and the plugin do: the request races the refusal.
      for (let i = 0; i < 20; i++) {
        const err = await AgentClient.request(path, { op: 'status' }, { timeoutMs: 5000 }).then(() => undefined, (e: Error) => e);
        expect(err, `request ${i}`).toBeInstanceOf(AgentError);
        expect(err!.message).toBe(refusal);
      }
      // Written after the refusal came: an agent that closed at once made this write fail (EPIPE).
      const c = await AgentClient.connect(path, { timeoutMs: 5000 });
      try {
        await until('the refusal', () => refusals() === 21);
        // Time for the refusal to reach the client (and, closing at once, for an agent to close).
        await new Promise((r) => setTimeout(r, 300));
        const err = await c.status().then(() => undefined, (e: Error) => e);
        expect(err).toBeInstanceOf(AgentError);
        expect(err!.message).toBe(refusal);
      } finally {
        c.close();
      }
      expect(refusals()).toBe(21);
    } finally {
      held.destroy();
      await srv.close();
    }
  });
});
