/**
 * The demo end to end: `--quick` in a real lab must produce every path, mode and metric as a
 * positive number, with the xmasq numbers taken on the fast path, and leave nothing behind,
 * also when interrupted. No timing is asserted: a VM's numbers move; the goals are only
 * reported.
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ROOT } from '../testing/root.ts';
import { removeStaleLabs } from './demo.ts';
import { parseArgs } from './main.ts';
import { METRICS, MODES, PATHS, goals, median, renderSvg, renderTable, summarize, type DemoReport, type Sample } from './report.ts';

const isRoot = process.getuid?.() === 0;
const tmp = mkdtempSync(join(tmpdir(), 'xmasq-demo-test-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** node --import tsx rather than the tsx CLI, so a signal reaches the demo itself. */
function demo(args: string[]) {
  const child = spawn(process.execPath, ['--import', 'tsx', `${ROOT}demo/main.ts`, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  child.stdout.on('data', (d) => { out += d; });
  child.stderr.on('data', (d) => { err += d; });
  const done = new Promise<{ code: number | null; out: string; err: string }>((r) => child.once('close', (code) => r({ code, out, err })));
  return { child, done, err: () => err };
}

/** The lab a run brought up, from its progress line. */
const labOf = (err: string) => /bringing up lab (\w+)/.exec(err)?.[1];

function leftovers(lab: string): string[] {
  const netns = execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' }).split('\n').filter((l) => l.startsWith(`${lab}-`));
  const pins = ['h1', 'h2'].map((h) => `/sys/fs/bpf/${lab}-${h}`).filter(existsSync);
  const state = [`/run/xmasq-lab/${lab}`, `/run/xmasq-demo-${lab}`].filter(existsSync);
  return [...netns, ...pins, ...state];
}

describe('demo arguments and rendering', () => {
  it('parses the defaults, --quick and explicit values; rejects bad ones', () => {
    expect(parseArgs([])).toMatchObject({ rounds: 3, durationS: 5, quick: false, modes: ['pinned', 'unpinned'], nice: -20 });
    expect(parseArgs(['--nice', '0'])).toMatchObject({ nice: 0 });
    expect(() => parseArgs(['--nice', '-21'])).toThrow(/-20\.\.19/);
    expect(parseArgs(['--quick'])).toMatchObject({ rounds: 1, durationS: 1, quick: true });
    expect(parseArgs(['--quick', '--rounds', '2', '--duration=3', '--pinned-only', '--json', 'x.json'])).toMatchObject({ rounds: 2, durationS: 3, modes: ['pinned'], json: 'x.json' });
    expect(() => parseArgs(['--rounds', '0'])).toThrow(/--rounds/);
    expect(() => parseArgs(['--rounds', '1.5'])).toThrow(/integer/);
    expect(() => parseArgs(['--duration'])).toThrow(/needs a value/);
    expect(() => parseArgs(['--fast'])).toThrow(/unknown argument/);
  });

  it('summarizes rounds as median/min/max and judges the goals on the pinned medians', () => {
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 2, 3])).toBe(2.5);
    const s = (tput: number, rr: number): Sample => ({ throughput_gbps: tput, throughput4_gbps: tput, rr_tps: rr, rr_p50_us: 1e6 / rr, rr_p99_us: 2e6 / rr, cpu_per_gbps: 100 / tput });
    const report: DemoReport = {
      machine: { cpu: 'test', cores: 2, kernel: '6.18' }, date: '2026-01-01T00:00:00.000Z', rounds: 2, duration_s: 1,
      paths: {
        host: { pinned: summarize([s(10, 40000), s(12, 42000)]) },
        route: { pinned: summarize([s(9, 30000), s(9, 30000)]) },
        overlay: { pinned: summarize([s(7, 26000), s(7, 26000)]) },
        xmasq: { pinned: summarize([s(10.5, 40000), s(10.7, 41000)]) },
      },
    };
    expect(report.paths.host.pinned!.throughput_gbps).toEqual({ median: 11, min: 10, max: 12 });
    expect(goals(report).map((g) => [g.what.split(' ')[0], g.target, g.met])).toEqual([
      ['throughput', 0.95, true], ['throughput', 1.36, true], ['TCP_RR', 0.9, true], ['TCP_RR', 1.59, false],
    ]);
    const table = renderTable(report);
    expect(table).toContain('| metric | host | route | overlay | xmasq | xmasq/host | xmasq/overlay |');
    expect(table).toContain('| throughput, 1 stream (Gbit/s) | 11.00 (10.00–12.00) | 9.00 | 7.00 | 10.60 (10.50–10.70) | 0.96× | 1.51× |');
    expect(table).toContain('| TCP_RR rate ≥ 0.90 × host | 0.99× | met |');
    expect(table).toContain('| TCP_RR rate ≥ 1.59 × overlay | 1.56× | **not met** |');
    const svg = renderSvg(report);
    expect(svg.startsWith('<svg')).toBe(true);
    // 3 groups × 4 paths of bars, plus the background and the 4 legend squares.
    expect(svg.match(/<rect /g)).toHaveLength(3 * 4 + 1 + 4);
    expect(svg).not.toMatch(/NaN|undefined/);
  });
});

describe.skipIf(!isRoot)('demo --quick in a real lab', () => {
  it('measures every path and metric, the xmasq numbers on the fast path, and leaves nothing behind', async () => {
    const files = { json: join(tmp, 'demo.json'), svg: join(tmp, 'demo.svg'), md: join(tmp, 'demo.md') };
    const run = demo(['--quick', '--json', files.json, '--svg', files.svg, '--md', files.md]);
    const { code, out, err } = await run.done;
    expect(code, err).toBe(0);

    const report = JSON.parse(readFileSync(files.json, 'utf8')) as DemoReport;
    expect(Object.keys(report).sort()).toEqual(['date', 'duration_s', 'machine', 'paths', 'rounds']);
    expect(report).toMatchObject({ rounds: 1, duration_s: 1 });
    expect(report.machine.cores).toBeGreaterThan(0);
    expect(report.machine.cpu).not.toBe('');
    expect(report.machine.kernel).not.toBe('');
    expect(Number.isNaN(Date.parse(report.date))).toBe(false);
    for (const path of PATHS) {
      for (const mode of MODES) {
        const r = report.paths[path][mode];
        expect(r, `${path} ${mode}`).toBeDefined();
        for (const m of METRICS) {
          const v = r![m]!;
          expect(v, `${path} ${mode} ${m}`).toBeDefined();
          expect(Object.keys(v).sort()).toEqual(['max', 'median', 'min']);
          for (const x of [v.median, v.min, v.max]) {
            expect(Number.isFinite(x) && x > 0, `${path} ${mode} ${m} = ${x}`).toBe(true);
          }
        }
      }
    }

    // Every xmasq measurement reports how many packets h1 masqueraded meanwhile (the demo
    // fails if that is 0); the route measurements, how few went through flannel.1.
    const xmasqLines = err.split('\n').filter((l) => /^round 1\/1: xmasq /.test(l));
    expect(xmasqLines).toHaveLength(2 * 3);
    for (const l of xmasqLines) expect(Number(/h1 masqueraded \+(\d+)/.exec(l)?.[1]), l).toBeGreaterThan(100);
    for (const l of err.split('\n').filter((x) => /^round 1\/1: route /.test(x))) expect(Number(/flannel\.1 tx \+(\d+)/.exec(l)?.[1]), l).toBeLessThanOrEqual(10);
    for (const l of err.split('\n').filter((x) => /^round 1\/1: overlay /.test(x))) expect(Number(/flannel\.1 tx \+(\d+)/.exec(l)?.[1]), l).toBeGreaterThan(100);

    expect(out).toMatch(/\| xmasq\/host \| xmasq\/overlay \|/);
    expect(out).toMatch(/throughput \(1 stream\) ≥ 0\.95 × host \| [\d.]+× \| (met|\*\*not met\*\*) \|/);
    expect(readFileSync(files.svg, 'utf8')).toMatch(/^<svg[\s\S]*<\/svg>\n$/);
    expect(readFileSync(files.md, 'utf8')).toContain('## How it was measured');

    const lab = labOf(err);
    expect(lab, err).toBeDefined();
    expect(leftovers(lab!)).toEqual([]);
  }, 120_000);

  it('Ctrl-C in the middle of a measurement tears the lab down and exits 130', async () => {
    const run = demo(['--quick', '--duration', '5', '--pinned-only']);
    const deadline = Date.now() + 60_000;
    while (!/round 1\/1: host pinned/.test(run.err()) && Date.now() < deadline && run.child.exitCode === null) await new Promise((r) => setTimeout(r, 100));
    expect(run.err()).toMatch(/round 1\/1: host pinned/);
    run.child.kill('SIGINT');
    const { code, err } = await run.done;
    expect(code, err).toBe(130);
    expect(err).toContain('the lab is down');
    expect(leftovers(labOf(err)!)).toEqual([]);
  }, 90_000);

  it('a run killed with SIGKILL leaves its lab and processes; the next run removes them', async () => {
    const run = demo(['--quick', '--duration', '5', '--pinned-only']);
    const deadline = Date.now() + 60_000;
    while (!/round 1\/1: host pinned iperf3 -P 1/.test(run.err()) && Date.now() < deadline && run.child.exitCode === null) await new Promise((r) => setTimeout(r, 100));
    run.child.kill('SIGKILL');
    await run.done;
    const lab = labOf(run.err())!;
    expect(leftovers(lab).length).toBeGreaterThan(0);
    const inodes = new Set(readdirSync('/run/netns').filter((n) => n.startsWith(`${lab}-`)).map((n) => statSync(`/run/netns/${n}`).ino));
    const inLab = () => readdirSync('/proc').filter((p) => /^\d+$/.test(p)).filter((p) => {
      try {
        return inodes.has(Number(/\[(\d+)\]/.exec(readlinkSync(`/proc/${p}/ns/net`))?.[1]));
      } catch {
        return false;
      }
    });
    // Usually the measurement that was running when the demo died is still there (not
    // asserted: the kill may land between two measurements).

    const notes: string[] = [];
    await removeStaleLabs((s) => notes.push(s));
    expect(notes.join('\n')).toContain(`removing lab ${lab}`);
    expect(leftovers(lab)).toEqual([]);
    await new Promise((r) => setTimeout(r, 200));
    expect(inLab()).toEqual([]);
  }, 90_000);
});
