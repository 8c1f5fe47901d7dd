/**
 * npm run bench:vm [-- --rounds N --seconds S --json]
 *
 * The rpeer kernel in numbers: boots the kernel of kernel-patch/ (cached in
 * /var/cache/xmasq-kernel) under QEMU and runs vm-tests/guest/rpeer-bench.ts in the
 * guest: host, overlay, xmasq in veth (stock kernel) mode and xmasq in rpeer mode, side
 * by side with sockperf ping-pong and iperf3, interleaved. Writes
 * bench/results/vm-rpeer-<date>.{json,md}.
 *
 * QEMU runs with TCG here (no KVM): every figure is an emulated machine's, far below
 * real hardware, and only ratios between paths of one run mean anything.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, release } from 'node:os';
import { join } from 'node:path';
import { commandLine, intOption, usageError, UsageError } from '../testing/args.ts';
import { ensureKernel } from '../kernel-patch/kernel.ts';
import { recordBase } from '../testing/records.ts';
import { ROOT } from '../testing/root.ts';
import { runGuestSuites } from '../vm-tests/qemu.ts';
import type { BenchPath, BenchSample, GuestBenchResult } from '../vm-tests/guest/rpeer-bench.ts';

const METRICS = ['sockperf_rr_tps', 'sockperf_p50_us', 'iperf3_gbps'] as const;
type Metric = (typeof METRICS)[number];
const LABEL: Record<Metric, string> = {
  sockperf_rr_tps: 'sockperf ping-pong, TCP 64 B (round trips/s)',
  sockperf_p50_us: 'sockperf p50 latency, half a round trip (µs)',
  iperf3_gbps: 'iperf3, 1 TCP stream (Gbit/s)',
};
/** Higher is better, except latency. */
const HIGHER_BETTER: Record<Metric, boolean> = { sockperf_rr_tps: true, sockperf_p50_us: false, iperf3_gbps: true };

interface Stat { median: number; min: number; max: number; n: number }

export interface VmBenchReport {
  date: string;
  /** The host's 1-minute load average before the guest booted and after it powered off (other work than QEMU slows the guest unevenly). */
  host: { cpu: string; cores: number; kernel: string; load?: { before: number; after: number } };
  guest: { kernel: string; cpus: number; cpu: string; accel: 'tcg'; kernelKey: string };
  rounds: number;
  duration_s: number;
  modes: GuestBenchResult['modes'];
  paths: Partial<Record<BenchPath, Record<Metric, Stat>>>;
  /** Ratios of the medians, within this one guest run. */
  ratios: Record<string, Record<Metric, number>>;
  /**
   * The same ratios taken round by round (each path against the other in the same
   * round, a minute or so apart), median (min–max) over the rounds: what a slow drift
   * of the emulated machine's speed does not move. Absent from records before it.
   */
  paired?: Record<string, Record<Metric, Stat>>;
  /** (xmasq − overlay) / (host − overlay) of the medians: the share of the overlay's cost each mode removes. */
  overhead_removed: Partial<Record<'xmasq-veth' | 'xmasq-rpeer', Record<Metric, number>>>;
  samples: BenchSample[];
}

function stat(xs: number[]): Stat {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return { median: s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2, min: s[0], max: s[s.length - 1], n: s.length };
}

/** The ratios the report names, as [name, numerator, denominator]. */
const RATIOS: Array<[string, BenchPath, BenchPath]> = [
  ['xmasq-rpeer / host', 'xmasq-rpeer', 'host'],
  ['xmasq-veth / host', 'xmasq-veth', 'host'],
  ['xmasq-rpeer / xmasq-veth', 'xmasq-rpeer', 'xmasq-veth'],
  ['xmasq-rpeer / overlay', 'xmasq-rpeer', 'overlay'],
  ['xmasq-veth / overlay', 'xmasq-veth', 'overlay'],
];

/** Each ratio of RATIOS per round, over the rounds that measured both of its paths. */
export function pairedRatios(samples: BenchSample[]): NonNullable<VmBenchReport['paired']> {
  const out: NonNullable<VmBenchReport['paired']> = {};
  for (const [name, a, b] of RATIOS) {
    const rounds = [...new Set(samples.map((s) => s.round))];
    const pairs = rounds.flatMap((r) => {
      const x = samples.find((s) => s.round === r && s.path === a), y = samples.find((s) => s.round === r && s.path === b);
      return x && y ? [[x, y] as const] : [];
    });
    if (pairs.length) out[name] = Object.fromEntries(METRICS.map((m) => [m, stat(pairs.map(([x, y]) => x[m] / y[m]))])) as Record<Metric, Stat>;
  }
  return out;
}

export function summarize(g: GuestBenchResult, kernelKey: string): VmBenchReport {
  const paths: VmBenchReport['paths'] = {};
  for (const p of g.paths) {
    const mine = g.samples.filter((x) => x.path === p);
    paths[p] = Object.fromEntries(METRICS.map((m) => [m, stat(mine.map((x) => x[m]))])) as Record<Metric, Stat>;
  }
  const med = (p: BenchPath, m: Metric) => paths[p]?.[m].median ?? NaN;
  const ratio = (a: BenchPath, b: BenchPath) => Object.fromEntries(METRICS.map((m) => [m, med(a, m) / med(b, m)])) as Record<Metric, number>;
  const ratios: VmBenchReport['ratios'] = Object.fromEntries(RATIOS.map(([name, a, b]) => [name, ratio(a, b)]));
  const removed = (x: BenchPath) => Object.fromEntries(METRICS.map((m) => [m, (med(x, m) - med('overlay', m)) / (med('host', m) - med('overlay', m))])) as Record<Metric, number>;
  return {
    date: g.date,
    host: { cpu: (/^model name\s*:\s*(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? cpus()[0]?.model ?? 'unknown').trim(), cores: cpus().length, kernel: release() },
    guest: { kernel: g.kernel, cpus: g.cpus, cpu: g.cpu, accel: 'tcg', kernelKey },
    rounds: g.rounds, duration_s: g.duration_s, modes: g.modes,
    paths, ratios, paired: pairedRatios(g.samples),
    overhead_removed: { 'xmasq-veth': removed('xmasq-veth'), 'xmasq-rpeer': removed('xmasq-rpeer') },
    samples: g.samples,
  };
}

/**
 * The per-round ratios: a ratio whose rounds fall on both sides of 1 is not told
 * apart from 1 by this run, whatever its medians' ratio.
 */
function paired(p: NonNullable<VmBenchReport['paired']>): string[] {
  const cell = (s: Stat) => `${num(s.median, 2)}× (${num(s.min, 2)}–${num(s.max, 2)})${s.min < 1 && s.max > 1 ? ' ±' : ''}`;
  return [
    '| paired by round: median (min–max) of the per-round ratios | sockperf RR | sockperf p50 | iperf3 |',
    '|---|---:|---:|---:|',
    ...Object.entries(p).map(([k, v]) => `| ${k} | ${cell(v.sockperf_rr_tps)} | ${cell(v.sockperf_p50_us)} | ${cell(v.iperf3_gbps)} |`),
    '',
    '±: the rounds fall on both sides of 1, so this run does not tell the two paths apart on that metric.',
    '',
  ];
}

const num = (x: number, digits: number) => (Number.isFinite(x) ? x.toLocaleString('en', { minimumFractionDigits: digits, maximumFractionDigits: digits }) : '—');

/**
 * What a reader may conclude: the host's load around the run, and where a path's
 * rounds differ by more than 2×, that its ratios say nothing (under TCG the guest's
 * speed follows the host CPU it is given, so a loaded host scatters the rounds).
 */
function trust(r: VmBenchReport): string[] {
  const out: string[] = [];
  if (r.host.load) out.push(`Host load average (1 min): ${r.host.load.before.toFixed(1)} before the guest booted, ${r.host.load.after.toFixed(1)} after it powered off (${r.host.cores} cores).`);
  const wide = Object.entries(r.paths).flatMap(([p, ms]) => METRICS.filter((m) => ms && ms[m].min > 0 && ms[m].max / ms[m].min > 2).map((m) => `${p} ${m}`));
  if (wide.length) {
    out.push(`**Rounds disagree by more than 2× for ${wide.join(', ')}**: a ratio involving these is noise, not a finding; run again on an idle host with more rounds (\`--rounds 5\`).`);
  }
  return out.length ? [...out, ''] : [];
}

export function markdown(r: VmBenchReport): string {
  const cols = Object.keys(r.paths) as BenchPath[];
  const digits: Record<Metric, number> = { sockperf_rr_tps: 0, sockperf_p50_us: 1, iperf3_gbps: 3 };
  const cell = (s: Stat | undefined, m: Metric) => (s ? `${num(s.median, digits[m])} (${num(s.min, digits[m])}–${num(s.max, digits[m])})` : '—');
  const lines = [
    `# The rpeer kernel in numbers (${r.date.slice(0, 10)}): a TCG guest`,
    '',
    `\`npm run bench:vm\`: the \`bpf_redirect_rpeer\` kernel (${r.guest.kernel}, cache key ${r.guest.kernelKey}) under QEMU **TCG** (no KVM),`,
    `${r.guest.cpus} vCPUs, on ${r.host.cpu} (${r.host.cores} cores, host kernel ${r.host.kernel}). Median (min–max) of ${r.rounds} rounds × ${r.duration_s} s,`,
    'paths interleaved (every other round in reverse). An emulated machine runs everything many times slower than',
    'real hardware: **only the ratios between paths of this one run mean anything**, never the absolute figures.',
    'sockperf ping-pong over TCP with 64-byte messages (its latency is half a round trip); iperf3 one TCP stream.',
    '',
    `| metric | ${cols.join(' | ')} |`,
    `|---|${cols.map(() => '---:').join('|')}|`,
    ...METRICS.map((m) => `| ${LABEL[m]} | ${cols.map((p) => cell(r.paths[p]?.[m], m)).join(' | ')} |`),
    '',
    ...trust(r),
    '| ratio of medians (this run) | sockperf RR | sockperf p50 | iperf3 |',
    '|---|---:|---:|---:|',
    ...Object.entries(r.ratios).map(([k, v]) => `| ${k} | ${num(v.sockperf_rr_tps, 2)}× | ${num(v.sockperf_p50_us, 2)}× | ${num(v.iperf3_gbps, 2)}× |`),
    ...Object.entries(r.overhead_removed).map(([k, v]) => `| ${k}: share of the overlay's cost removed, (xmasq − overlay) / (host − overlay) | ${num(v.sockperf_rr_tps * 100, 0)}% | ${num(v.sockperf_p50_us * 100, 0)}% | ${num(v.iperf3_gbps * 100, 0)}% |`),
    '',
    ...paired(r.paired ?? pairedRatios(r.samples)),
    `Agents' mode as their status said: ${Object.entries(r.modes).map(([p, m]) => `${p} ${m}`).join(', ')}. Per measurement, the packets h1 sent`,
    'through its VXLAN device and those its agent masqueraded: each new TCP connection crosses the overlay until the host\'s',
    'conntrack admits it, which in the emulated guest takes a good part of each run.',
    '',
    '| round | path | sockperf RR | p50 µs | iperf3 Gbit/s | h1 VXLAN tx | h1 masqueraded |',
    '|---:|---|---:|---:|---:|---:|---:|',
    ...r.samples.map((s) => `| ${s.round} | ${s.path} | ${num(s.sockperf_rr_tps, 0)} | ${num(s.sockperf_p50_us, 1)} | ${num(s.iperf3_gbps, 3)} | ${s.evidence?.vxlan_tx ?? ''} | ${s.evidence?.masqueraded ?? ''} |`),
  ];
  // Which direction is better, so that a reader does not invert a latency ratio.
  lines.push('', `Higher is better for ${METRICS.filter((m) => HIGHER_BETTER[m]).map((m) => LABEL[m]).join(' and ')}; lower for latency.`);
  return `${lines.join('\n')}\n`;
}

const USAGE = `usage: npm run bench:vm -- [--rounds N] [--seconds S] [--nice N] [--json] [--help] [--version]

  --rounds N    interleaved rounds of the four paths (default 3)
  --seconds S   each sockperf and iperf3 run (default 5)
  --nice N      QEMU's nice level (default -10; 0 to leave the host's other work its share)
  --json        print the JSON report on stdout instead of the table
  --help        this text
  --version     the checkout's version

Needs root and QEMU; builds the rpeer kernel first if it is not cached (20-35 min).
Writes bench/results/vm-rpeer-<date>.json and .md (vm-rpeer-<date>-2 … when the day
has a record already). Takes ~15-50 min under TCG.`;

async function main(argv: string[]): Promise<number> {
  const line = commandLine('bench:vm', USAGE, argv, { rounds: { type: 'string' }, seconds: { type: 'string' }, nice: { type: 'string' }, json: { type: 'boolean' } });
  if (typeof line === 'number') return line;
  const v = line.values;
  let rounds: number, seconds: number, nice: number;
  try {
    rounds = intOption('--rounds', v.rounds, 3, 1);
    seconds = intOption('--seconds', v.seconds, 5, 2);
    nice = intOption('--nice', v.nice, -10, -20);
    if (nice > 19) throw new UsageError(`--nice wants a whole number from -20 to 19, got "${v.nice}"`);
  } catch (e) {
    return usageError('bench:vm', USAGE, e as Error);
  }
  if (process.getuid?.() !== 0) throw new Error('bench:vm needs root: the kernel cache is in /var/cache and the guest runs the lab as root');
  for (const tool of ['sockperf', 'iperf3']) {
    if (!['/usr/bin', '/usr/sbin', '/bin'].some((d) => existsSync(join(d, tool)))) throw new Error(`${tool} is not installed (the guest runs the host's): apt-get install ${tool}`);
  }
  const err = (l: string) => process.stderr.write(`${l}\n`);
  const kernel = await ensureKernel({ log: err });
  err(`bench:vm: booting ${kernel.bzImage} (key ${kernel.key}) under QEMU TCG: ${rounds} rounds × 4 paths × (sockperf + iperf3) × ${seconds} s`);
  const started = Date.now();
  const loadBefore = loadavg()[0];
  // At nice -10: on a busy 2-core host the guest otherwise gets so little CPU that its CNI
  // plugins time out; the ratios between its paths are what counts, not its share of the host.
  const vm = await runGuestSuites({ bzImage: kernel.bzImage, bench: { rounds, seconds }, nice, timeoutMs: 120 * 60_000, log: (l) => err(`vm | ${l}`) });
  err(`bench:vm: QEMU exited ${vm.qemuExit} after ${Math.round((Date.now() - started) / 1000)} s; console in ${vm.resultsDir}`);
  const out = join(vm.resultsDir, 'bench.json');
  if (vm.timedOut || vm.status !== 'done' || vm.guestExitCode !== 0 || !existsSync(out)) {
    throw new Error(`the guest's benchmark did not finish (status ${vm.status ?? 'never started'}, exit ${vm.guestExitCode}${vm.timedOut ? ', QEMU timed out' : ''}); console in ${vm.resultsDir}/console.log`);
  }
  const report = summarize(JSON.parse(readFileSync(out, 'utf8')) as GuestBenchResult, kernel.key);
  report.host.load = { before: loadBefore, after: loadavg()[0] };
  const dir = join(ROOT, 'bench/results');
  mkdirSync(dir, { recursive: true });
  const base = recordBase(dir, `vm-rpeer-${report.date.slice(0, 10)}`, ['json', 'md']);
  writeFileSync(`${base}.json`, `${JSON.stringify(report, null, 2)}\n`);
  const md = markdown(report);
  writeFileSync(`${base}.md`, md);
  err(`bench:vm: wrote ${base}.json and .md`);
  process.stdout.write(v.json ? `${JSON.stringify(report, null, 2)}\n` : md);
  return 0;
}

// Run only as a script: its markdown() also renders a saved record (bench/results/vm-rpeer-*.json).
if (import.meta.url === `file://${process.argv[1]}`) main(process.argv.slice(2)).then((code) => process.exit(code), (e: Error) => {
  process.stderr.write(`bench:vm: ${e.message}\n`);
  process.exit(1);
});
