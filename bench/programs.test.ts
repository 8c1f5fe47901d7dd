/**
 * Smoke test of npm run bench:prog: the same code with few packets. runBench
 * throws on any row whose single run, big run or counters do not show the path
 * the row names, so getting a report at all is the correctness check; timings
 * are not asserted (CI machines are too noisy for that).
 */
import { createHash } from 'node:crypto';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { BENCH_OBJECT, ROW_NAMES, formatTable, main, runBench, type BenchReport } from './programs.ts';

// The smoke run measures a copy of the bench build elsewhere, as --object does for a
// side-by-side run, so that the report must name the object it measured.
const dir = mkdtempSync(join(tmpdir(), 'xmasq-bench-prog-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const copy = join(dir, 'other.bench.bpf.o');
copyFileSync(BENCH_OBJECT, copy);

// Shared by the tests; a guard's error then fails each of them with its own message.
let cached: BenchReport | undefined;
const COLD = { loads: 2, rounds: 20, pages: 256 };
const report = () => (cached ??= runBench({ repeat: 1000, runs: 1, log: () => {}, cold: COLD, objectPath: copy }));

/** bench:prog's command line: its exit code and what it wrote to stderr. */
async function cli(args: string[]): Promise<{ code: number; stderr: string }> {
  let stderr = '';
  const spy = vi.spyOn(process.stderr, 'write').mockImplementation((chunk: string | Uint8Array) => {
    stderr += String(chunk);
    return true;
  });
  try {
    return { code: await main(args), stderr };
  } finally {
    spy.mockRestore();
  }
}

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

  it('--object: the report names the object it measured, by path and SHA-256', () => {
    const r = report();
    expect(r.object.path).toBe(copy);
    expect(r.object.sha256).toBe(createHash('sha256').update(readFileSync(BENCH_OBJECT)).digest('hex'));
    expect(formatTable(r)).toContain(`object: ${copy} (sha256 ${r.object.sha256.slice(0, 12)}`);
  });

  it('--object: what is not a bench build is refused before anything loads, in one line', async () => {
    const notElf = join(dir, 'not-an-object.o');
    writeFileSync(notElf, 'this is not an ELF file\n');
    const cases: Array<[string, RegExp]> = [
      [join(dir, 'missing.o'), /missing\.o \(--object\) does not exist/],
      [notElf, /cannot be opened as a BPF object: .*not a BPF ELF object/],
      // The production and test builds have no bench_* wrappers.
      [BENCH_OBJECT.replace('xmasq.bench.bpf.o', 'xmasq.bpf.o'), /is not a bench build .*it lacks map bench_packet, program bench_empty/],
      [BENCH_OBJECT.replace('xmasq.bench.bpf.o', 'xmasq.test.bpf.o'), /is not a bench build .*program bench_masq/],
    ];
    for (const [object, want] of cases) {
      const { code, stderr } = await cli(['--runs', '1', '--repeat', '10', '--object', object]);
      expect(code, object).toBe(1);
      expect(stderr, object).toMatch(want);
      expect(stderr.trim().split('\n'), object).toHaveLength(1);
      expect(stderr, object).toMatch(/^bench:prog: /);
      expect(stderr, object).not.toMatch(/\n\s+at /);
    }
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
