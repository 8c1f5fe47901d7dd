/**
 * Smoke test of npm run bench:prog: the same code with few packets. runBench
 * throws on any row whose single run, big run or counters do not show the path
 * the row names, so getting a report at all is the correctness check; timings
 * are not asserted (CI machines are too noisy for that).
 */
import { describe, expect, it } from 'vitest';
import { ROW_NAMES, formatTable, runBench, type BenchReport } from './programs.ts';

// Shared by both tests; a guard's error then fails each of them with its own message.
let cached: BenchReport | undefined;
const COLD = { loads: 2, rounds: 20, pages: 256 };
const report = () => (cached ??= runBench({ repeat: 1000, runs: 1, log: () => {}, cold: COLD }));

describe('bench:prog', () => {
  it('runs every row through its correctness guards', () => {
    expect(report().rows.map((r) => r.name)).toEqual(ROW_NAMES);
  });

  it('reports positive numbers for every row, in the JSON shape', () => {
    const json = JSON.parse(JSON.stringify(report())) as BenchReport;
    expect(json.repeat).toBe(1000);
    expect(json.runs).toBe(1);
    expect(json.machine.cores).toBeGreaterThan(0);
    expect(json.machine.cpu).not.toBe('');
    expect(json.machine.kernel).not.toBe('');
    expect(Number.isNaN(Date.parse(json.date))).toBe(false);
    const kinds = new Set(json.rows.map((r) => r.kind));
    expect(kinds).toEqual(new Set(['baseline', 'full', 'pass', 'policy']));
    for (const r of json.rows) {
      const where = `row "${r.name}"`;
      expect(r.ns.min, where).toBeGreaterThan(0);
      expect(r.ns.median, where).toBeGreaterThanOrEqual(r.ns.min);
      expect(r.ns.max, where).toBeGreaterThanOrEqual(r.ns.median);
      expect(r.ratio, where).toBeGreaterThan(0);
      if (r.kind === 'full') expect(r.net_ns, where).toBeGreaterThan(0);
      else expect(r.net_ns, where).toBeUndefined();
      if (r.kind === 'baseline') {
        expect(r.goal, where).toBeNull();
        expect(r.met, where).toBeNull();
      } else {
        expect(r.goal, where).toBeGreaterThan(0);
        expect(r.met, where).toBe(r.ratio <= r.goal!);
      }
    }
    const table = formatTable(report());
    for (const name of ROW_NAMES) expect(table).toContain(name);
  });

  it('--cold: every row of the base state one packet at a time, on every load', () => {
    const json = JSON.parse(JSON.stringify(report())) as BenchReport;
    expect(json.cold).toEqual(COLD);
    const cold = json.rows.filter((r) => r.cold);
    // The rows measured cold are those whose maps hold only the learned pair: the baselines,
    // the three full paths and the Services', every pass-through but the stale bit's.
    expect(cold.map((r) => r.name)).toEqual(expect.arrayContaining(['empty', 'reset', 'init (learn, known key)',
      'restore (masqueraded → pod)', 'masq (pod → NIC)', 'masq pass (no egress entry)']));
    expect(cold.some((r) => r.name.includes('policy: 1000'))).toBe(false);
    for (const r of cold) {
      const c = r.cold!;
      const where = `row "${r.name}"`;
      for (const s of [c.alone, c.evicted]) {
        expect(s.min, where).toBeLessThanOrEqual(s.median);
        expect(s.median, where).toBeLessThanOrEqual(s.max);
      }
      if (r.kind === 'baseline') expect(c.alone.min, where).toBeGreaterThan(0);
      if (r.kind === 'full') expect(c.evicted_x_hot, where).toBeCloseTo(c.evicted.median / r.net_ns!, 6);
      else expect(c.evicted_x_hot, where).toBeNull();
      // A full path does more than the reset it is net of, however cold.
      if (r.kind === 'full') expect(c.evicted.median, where).toBeGreaterThan(0);
    }
    expect(formatTable(report())).toContain('evicted × hot');
  });
});
