/**
 * npm run bench: every benchmark of the project, one after the other, into
 * one dated record under bench/results/. Each part is its own command (and
 * can be run alone); this only runs them in turn, shows their progress, and
 * keeps what each printed with --json.
 *
 * They run one at a time on purpose: on a 2-core machine any two of them
 * would measure each other.
 */
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { cpus, release } from 'node:os';
import { commandLine } from '../testing/args.ts';
import type { DemoReport } from '../demo/report.ts';
import { ROOT } from '../testing/root.ts';

interface Part {
  name: string;
  what: string;
  /** The command line, given the output directory/prefix and whether --quick was asked. */
  argv: (out: string, quick: boolean) => string[];
  /** Where the part's JSON is: its stdout, or a file it writes. */
  json: 'stdout' | ((out: string) => string);
  /** The part's headline figure, from its JSON, printed at the end. */
  headline?: (report: never) => string;
}

const fmt = (n: number) => n.toLocaleString('en');

const TSX = [process.execPath, '--import', 'tsx'];

const PARTS: Part[] = [
  {
    name: 'programs',
    what: 'ns/packet of every program path next to an empty program (BPF_PROG_TEST_RUN), hot and (full run) cold',
    argv: (_, quick) => [...TSX, `${ROOT}bench/programs.ts`, '--json', ...(quick ? ['--repeat', '100000', '--runs', '3'] : ['--cold'])],
    json: 'stdout',
  },
  {
    name: 'tc',
    what: 'ns per packet of a TC hook, tcx links against cls_bpf filters, real frames through a veth pair',
    argv: (_, quick) => [...TSX, `${ROOT}bench/tc.ts`, '--json', ...(quick ? ['--rounds', '3', '--frames', '200000'] : [])],
    json: 'stdout',
    headline: (r: { tcxMinusClsBpfPerHook: { xmasq: number; empty: number } }) =>
      `tcx − cls_bpf per hook: ${r.tcxMinusClsBpfPerHook.xmasq.toFixed(1)} ns with init/restore, ${r.tcxMinusClsBpfPerHook.empty.toFixed(1)} ns with an empty program`,
  },
  {
    name: 'agent',
    what: 'agent RSS, CNI ADD → masq attached, expiry scan at 65,536 entries',
    argv: (_, quick) => [...TSX, `${ROOT}bench/agent.ts`, '--json', ...(quick ? ['--cycles', '100', '--entries', '8192'] : [])],
    json: 'stdout',
    headline: (r: { latencyMs: { pluginVersion: { p50: number }; cniAddUntilAttached: { p50: number } }; rssMiB: { afterScans: number }; scan: { liveAgentMs: { p50: number } } }) =>
      `xmasq plugin VERSION p50 ${r.latencyMs.pluginVersion.p50.toFixed(0)} ms (goal 100), whole CNI ADD until masq attached p50 ${r.latencyMs.cniAddUntilAttached.p50.toFixed(0)} ms (goal 150), RSS after full-cache scans ${r.rssMiB.afterScans.toFixed(0)} MiB (goal 100), a scan ${r.scan.liveAgentMs.p50.toFixed(0)} ms (goal 100)`,
  },
  {
    name: 'sim',
    what: 'simulated packets per second of the cluster simulator (sim/cluster)',
    argv: (_, quick) => [...TSX, `${ROOT}bench/sim.ts`, '--json', ...(quick ? ['--quick'] : [])],
    json: 'stdout',
    headline: (r: { allThreads: { median: number }; oneThread: { wide: { median: number } }; allCores: Array<{ threads: number }>; goal: number }) =>
      `${fmt(r.allThreads.median)} simulated packets/s on ${r.allCores[0]?.threads} threads, a cluster each (one thread: ${fmt(r.oneThread.wide.median)}; goal ${fmt(r.goal)})`,
  },
  {
    name: 'demo',
    what: 'host / route / overlay / xmasq: iperf3, sockperf ping-pong and TCP_RR between pods on two lab hosts',
    argv: (out, quick) => [...TSX, `${ROOT}demo/main.ts`, '--json', `${out}-demo.json`, '--svg', `${out}-demo.svg`, '--md', `${out}-demo.md`, ...(quick ? ['--quick'] : [])],
    json: (out) => `${out}-demo.json`,
    headline: (r: DemoReport) => {
      const ratio = (m: 'throughput_gbps' | 'sockperf_rr_tps') => {
        const x = r.paths.xmasq.pinned?.[m]?.median, h = r.paths.host.pinned?.[m]?.median;
        return x !== undefined && h ? `${(x / h).toFixed(2)}× host` : '–';
      };
      const pct = (x: number | null | undefined) => (x === null || x === undefined ? '–' : `${(x * 100).toFixed(0)}%`);
      const o = r.overhead_removed.pinned;
      return `xmasq pinned: throughput ${ratio('throughput_gbps')}, sockperf RR ${ratio('sockperf_rr_tps')}; overlay overhead removed: RR ${pct(o?.rr)}, p50 ${pct(o?.p50)}, throughput ${pct(o?.throughput)}`;
    },
  },
];

const USAGE = `usage: npm run bench -- [--quick] [--only a,b] [--out DIR] [--help] [--version]

Runs, one after the other: ${PARTS.map((p) => p.name).join(', ')}.
${PARTS.map((p) => `  ${p.name.padEnd(10)}${p.what}`).join('\n')}
and writes DIR/bench-<date>.json (every part's JSON report, with the machine) plus the
demo's .json/.svg/.md beside it. Needs root. Takes about 17 minutes (--quick: 3).

  --quick        short runs (smoke test; numbers are rough)
  --only LIST    only these parts, comma-separated
  --out DIR      where to write (default bench/results)
  --help         this text
  --version      the checkout's version`;

function runPart(argv: string[]): Promise<{ code: number; stdout: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(argv[0], argv.slice(1), { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'] });
    let stdout = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.on('error', reject);
    child.on('exit', (code, sig) => resolve({ code: code ?? (sig ? 128 : 1), stdout }));
  });
}

async function main(argv: string[]): Promise<number> {
  const line = commandLine('bench', USAGE, argv, { quick: { type: 'boolean' }, only: { type: 'string' }, out: { type: 'string' } });
  if (typeof line === 'number') return line;
  const args = line.values;
  const only = args.only?.split(',').map((s) => s.trim()).filter(Boolean);
  const unknown = only?.filter((n) => !PARTS.some((p) => p.name === n)) ?? [];
  if (unknown.length) {
    process.stderr.write(`bench: unknown part ${unknown.join(', ')}; the parts are ${PARTS.map((p) => p.name).join(', ')}\n`);
    return 2;
  }
  if (process.getuid?.() !== 0) {
    process.stderr.write('bench: needs root (BPF programs, network namespaces)\n');
    return 1;
  }
  const parts = PARTS.filter((p) => !only || only.includes(p.name));
  const date = new Date().toISOString();
  const dir = args.out ?? `${ROOT}bench/results`;
  mkdirSync(dir, { recursive: true });
  const out = `${dir}/bench-${date.slice(0, 10)}`;
  const record: Record<string, unknown> = {
    date,
    machine: { cpu: cpus()[0]?.model ?? 'unknown', cores: cpus().length, kernel: release() },
    quick: !!args.quick,
  };
  const failed: string[] = [];
  for (const [i, p] of parts.entries()) {
    process.stderr.write(`\nbench [${i + 1}/${parts.length}] ${p.name}: ${p.what}\n`);
    const t0 = Date.now();
    const r = await runPart(p.argv(out, !!args.quick));
    const secs = ((Date.now() - t0) / 1000).toFixed(0);
    if (r.code !== 0) {
      process.stderr.write(`bench: ${p.name} failed (exit ${r.code}) after ${secs} s; going on with the others\n`);
      failed.push(p.name);
      continue;
    }
    try {
      record[p.name] = JSON.parse(p.json === 'stdout' ? r.stdout : readFileSync(p.json(out), 'utf8'));
    } catch (e) {
      process.stderr.write(`bench: ${p.name} printed no JSON report: ${(e as Error).message}\n`);
      failed.push(p.name);
      continue;
    }
    process.stderr.write(`bench: ${p.name} done in ${secs} s\n`);
  }
  writeFileSync(`${out}.json`, `${JSON.stringify(record, null, 2)}\n`);
  for (const p of parts) if (p.headline && record[p.name] !== undefined) process.stdout.write(`${p.name}: ${p.headline(record[p.name] as never)}\n`);
  process.stderr.write(`\nwrote ${out}.json${failed.length ? `; FAILED: ${failed.join(', ')}` : ''}\n`);
  return failed.length ? 1 : 0;
}

main(process.argv.slice(2)).then((code) => process.exit(code), (e: Error) => {
  process.stderr.write(`bench: ${e.stack ?? e.message}\n`);
  process.exit(1);
});
