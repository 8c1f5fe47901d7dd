/**
 * npm run bench:tc [-- --json] [-- --rounds N --frames N --cpu C --md FILE]
 *
 * What a TC hook costs per packet, tcx links against cls_bpf filters, side by
 * side in one run. BPF_PROG_TEST_RUN (bench:prog) calls a program directly,
 * past the hook, so here real frames cross real hooks: netns a --a0/b0-- netns b,
 * bench/tc-send.c pushing 64-byte frames out of a0 (AF_PACKET, sendmmsg) on
 * one pinned CPU, each through a0's TC egress and, in the receive softirq the
 * send runs on that CPU, b0's TC ingress, where IP drops it (no device's MAC).
 * Per round, in turn (rotated each round, so drift over the run is spread):
 *
 *   none            no program, no clsact qdisc
 *   xmasq cls_bpf   init at a0 egress, restore at b0 ingress, as the agent's cls_bpf filters
 *   xmasq tcx       the same as tcx links
 *   empty cls_bpf   bench_empty (returns XMASQ_CONTINUE at once) on both hooks, cls_bpf
 *   empty tcx       the same as tcx links
 *
 * A host frame is what init and restore pass on (pass-through), so the xmasq
 * rows are the hooks plus our pass-through paths, and the empty rows the
 * hooks alone. The report gives each row's median, min and max ns per frame,
 * and per hook: (row - none) / 2 of the medians and of the minimums; and
 * tcx - cls_bpf per hook of the same programs, paired round by round (the two
 * ran within seconds of each other): the median of the rounds' differences,
 * with their quartiles. On a shared VM a run's spread is wide (other tasks'
 * cache use, the hypervisor's steal time inside the CPU time), which the
 * pairing and the minimums are there to see through; the quartiles say how far.
 * The time is the sender thread's CPU time (other tasks' turns on the CPU
 * left out), which holds the receive softirq run in its context unless the
 * kernel accounts IRQ time apart (CONFIG_IRQ_TIME_ACCOUNTING): then the wall
 * clock is used, and the report says which.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, release, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';
import { BpfObject, closeLink, haveTcx, tcAttach, tcDestroyHook, tcxAttach, withNetns, type BpfProgram, type TcHookPoint } from '../dataplane/libbpf.ts';
import { COUNTER_NAMES, FLANNEL_PORTS, NO_OVERLAY, NO_SERVICES, arrayIndex, config, counterValue } from '../dataplane/maps.ts';
import { commandLine, intOption, usageError, UsageError } from '../testing/args.ts';

const USAGE = `usage: npm run bench:tc [-- --json] [-- --rounds N] [-- --frames N] [-- --cpu C] [-- --md FILE] [-- --help] [-- --version]

ns per frame through a veth's TC egress and its peer's TC ingress, with our programs
(init, restore) and an empty one attached as cls_bpf filters and as tcx links, and
with nothing attached; the configurations interleaved round by round. As root.

  --rounds N   rounds, each running every configuration once (default 40)
  --frames N   frames per configuration and round (default 250000)
  --cpu C      the CPU the sender runs on (default: the last one)
  --json       the report as JSON
  --md FILE    also write the report as a markdown table`;

const XMASQ_OBJECT = fileURLToPath(new URL('../bpf/build/xmasq.bpf.o', import.meta.url));
const BENCH_OBJECT = fileURLToPath(new URL('../bpf/build/xmasq.bench.bpf.o', import.meta.url));
const SENDER = fileURLToPath(new URL('./tc-send.c', import.meta.url));
const BATCH = 64;

type Kind = 'cls_bpf' | 'tcx';
interface Config { name: string; programs?: 'xmasq' | 'empty'; kind?: Kind }
const CONFIGS: Config[] = [
  { name: 'none' },
  { name: 'xmasq cls_bpf', programs: 'xmasq', kind: 'cls_bpf' },
  { name: 'xmasq tcx', programs: 'xmasq', kind: 'tcx' },
  { name: 'empty cls_bpf', programs: 'empty', kind: 'cls_bpf' },
  { name: 'empty tcx', programs: 'empty', kind: 'tcx' },
];

interface Stat { median: number; min: number; max: number; samples: number[] }
export interface TcBenchReport {
  date: string;
  kernel: string;
  cpu: string;
  frames: number;
  rounds: number;
  senderCpu: number;
  /** What nsPerFrame measures: the sender thread's CPU time, or the wall clock (see above). */
  clock: 'thread-cpu' | 'wall';
  /** ns per frame (two hooks crossed), by configuration. */
  nsPerFrame: Record<string, Stat>;
  /** (configuration - none) / 2 of the medians: ns per hook. */
  nsPerHook: Record<string, number>;
  /** The same of the minimums. */
  nsPerHookMin: Record<string, number>;
  /** tcx - cls_bpf per hook of the same programs, the median of each round's difference (negative: tcx is cheaper). */
  tcxMinusClsBpfPerHook: { xmasq: number; empty: number };
  /** The quartiles of those rounds' differences. */
  tcxMinusClsBpfQuartiles: { xmasq: [number, number]; empty: [number, number] };
  /** The other clock's ns per frame, for reference (wall: other tasks' turns included). */
  otherClockNsPerFrame: Record<string, Stat>;
}

/** Whether the kernel charges softirq time apart from the task it interrupted. */
function irqTimeAccounted(): boolean {
  if (!existsSync('/proc/config.gz')) return true; // unknown: the wall clock is the safe reading
  return /^CONFIG_IRQ_TIME_ACCOUNTING=y$/m.test(gunzipSync(readFileSync('/proc/config.gz')).toString('utf8'));
}

class BenchError extends Error {}

const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

function stat(samples: number[]): Stat {
  const s = [...samples].sort((a, b) => a - b);
  return { median: s[Math.floor(s.length / 2)], min: s[0], max: s[s.length - 1], samples };
}

export function runTcBench(opts: { rounds: number; frames: number; cpu: number; progress?: (s: string) => void }): TcBenchReport {
  if (process.getuid?.() !== 0) throw new BenchError('needs root (network namespaces, BPF): run it as root');
  if (!haveTcx()) throw new BenchError('this kernel has no tcx links (Linux 6.6+): there is nothing to compare cls_bpf with');
  const id = `${process.pid}`.slice(-5);
  const NS = { a: `xbtc${id}-a`, b: `xbtc${id}-b` };
  const dir = mkdtempSync(join(tmpdir(), 'xmasq-bench-tc-'));
  const objs: BpfObject[] = [];
  try {
    const sender = join(dir, 'tc-send');
    sh('cc', ['-O2', '-o', sender, SENDER]);
    for (const ns of Object.values(NS)) sh('ip', ['netns', 'add', ns]);
    sh('ip', ['link', 'add', 'a0', 'netns', NS.a, 'type', 'veth', 'peer', 'name', 'b0', 'netns', NS.b]);
    sh('ip', ['-n', NS.a, 'link', 'set', 'a0', 'up']);
    sh('ip', ['-n', NS.b, 'link', 'set', 'b0', 'up']);
    const ifindex = (ns: string, dev: string) => (JSON.parse(sh('ip', ['-n', ns, '-j', 'link', 'show', dev])) as Array<{ ifindex: number }>)[0].ifindex;
    const a0 = ifindex(NS.a, 'a0'), b0 = ifindex(NS.b, 'b0');

    const xmasq = BpfObject.open(XMASQ_OBJECT);
    objs.push(xmasq);
    xmasq.load();
    // The tunnel ports set, as an agent sets them: the frames (UDP to 9000) are host traffic.
    xmasq.map('config').update(arrayIndex.encode({ index: 0 }), config.encode({ nic_ifindex: a0, flags: 0, ...NO_OVERLAY, ...NO_SERVICES, ...FLANNEL_PORTS }));
    const bench = BpfObject.open(BENCH_OBJECT);
    objs.push(bench);
    bench.load();
    const progs = {
      xmasq: { egress: xmasq.program('init'), ingress: xmasq.program('restore') },
      empty: { egress: bench.program('bench_empty'), ingress: bench.program('bench_empty') },
    };

    const hooks: Array<{ ns: string; ifindex: number; where: TcHookPoint }> = [
      { ns: NS.a, ifindex: a0, where: 'egress' },
      { ns: NS.b, ifindex: b0, where: 'ingress' },
    ];
    const attach = (c: Config): (() => void) => {
      if (!c.programs || !c.kind) return () => {};
      const undo: Array<() => void> = [];
      for (const h of hooks) {
        const prog: BpfProgram = progs[c.programs][h.where];
        withNetns(`/run/netns/${h.ns}`, () => {
          if (c.kind === 'tcx') {
            const fd = tcxAttach(h.ifindex, h.where, prog);
            undo.push(() => closeLink(fd));
          } else {
            tcAttach(h.ifindex, h.where, prog);
            // The whole qdisc goes, so that "none" runs without one.
            undo.push(() => withNetns(`/run/netns/${h.ns}`, () => tcDestroyHook(h.ifindex)));
          }
        });
      }
      return () => { for (const u of undo) u(); };
    };

    const passed = (): bigint => (xmasq.map('counters').lookupPerCpu(arrayIndex.encode({ index: COUNTER_NAMES.indexOf('PASSED') })) ?? [])
      .reduce((sum, v) => sum + counterValue.decode(v).value, 0n);
    const samples = new Map<string, number[]>(CONFIGS.map((c) => [c.name, []]));
    const wallSamples = new Map<string, number[]>(CONFIGS.map((c) => [c.name, []]));
    const received = () => (JSON.parse(sh('ip', ['-n', NS.b, '-j', '-s', 'link', 'show', 'b0'])) as Array<{ stats64: { rx: { packets: number } } }>)[0].stats64.rx.packets;
    for (let r = 0; r < opts.rounds; r++) {
      for (let i = 0; i < CONFIGS.length; i++) {
        const c = CONFIGS[(i + r) % CONFIGS.length];
        const detach = attach(c);
        try {
          const before = received(), passedBefore = passed();
          const [ns, wall] = sh('nsenter', [`--net=/run/netns/${NS.a}`, 'taskset', '-c', String(opts.cpu), sender, 'a0', String(opts.frames), String(BATCH)]).trim().split(' ').map(Number);
          // No number for frames that did not take the path: each reached b0, and init and restore each passed it on.
          const got = received() - before;
          if (got < opts.frames) throw new BenchError(`${c.name}: b0 received ${got} of ${opts.frames} frames`);
          const ran = passed() - passedBefore;
          if (c.programs === 'xmasq' && ran < BigInt(2 * opts.frames)) throw new BenchError(`${c.name}: init and restore passed ${ran} frames, not 2 × ${opts.frames}`);
          if (c.programs !== 'xmasq' && ran !== 0n) throw new BenchError(`${c.name}: init or restore ran (${ran} frames passed) with nothing of ours attached`);
          if (!Number.isFinite(ns) || ns <= 0) throw new BenchError(`${c.name}: tc-send printed no time`);
          samples.get(c.name)!.push(ns);
          wallSamples.get(c.name)!.push(wall);
        } finally {
          detach();
        }
      }
      opts.progress?.(`round ${r + 1}/${opts.rounds}: ${CONFIGS.map((c) => `${c.name} ${samples.get(c.name)!.at(-1)!.toFixed(1)}`).join(', ')} ns/frame (thread CPU time)`);
    }
    const clock = irqTimeAccounted() ? 'wall' : 'thread-cpu';
    const [main, other] = clock === 'thread-cpu' ? [samples, wallSamples] : [wallSamples, samples];
    const nsPerFrame = Object.fromEntries(CONFIGS.map((c) => [c.name, stat(main.get(c.name)!)]));
    const none = nsPerFrame.none.median;
    const nsPerHook = Object.fromEntries(CONFIGS.filter((c) => c.programs).map((c) => [c.name, (nsPerFrame[c.name].median - none) / 2]));
    const nsPerHookMin = Object.fromEntries(CONFIGS.filter((c) => c.programs).map((c) => [c.name, (nsPerFrame[c.name].min - nsPerFrame.none.min) / 2]));
    const paired = (programs: string) => {
      const t = nsPerFrame[`${programs} tcx`].samples, c = nsPerFrame[`${programs} cls_bpf`].samples;
      const d = t.map((x, i) => (x - c[i]) / 2).sort((x, y) => x - y);
      const q = (f: number) => d[Math.min(d.length - 1, Math.floor(f * d.length))];
      return { median: q(0.5), quartiles: [q(0.25), q(0.75)] as [number, number] };
    };
    const px = paired('xmasq'), pe = paired('empty');
    return {
      date: new Date().toISOString(),
      kernel: release(),
      cpu: cpus()[0]?.model ?? 'unknown',
      frames: opts.frames,
      rounds: opts.rounds,
      senderCpu: opts.cpu,
      clock,
      nsPerFrame,
      nsPerHook,
      nsPerHookMin,
      tcxMinusClsBpfPerHook: { xmasq: px.median, empty: pe.median },
      tcxMinusClsBpfQuartiles: { xmasq: px.quartiles, empty: pe.quartiles },
      otherClockNsPerFrame: Object.fromEntries(CONFIGS.map((c) => [c.name, stat(other.get(c.name)!)])),
    };
  } finally {
    for (const o of objs) o.close();
    for (const ns of Object.values(NS)) {
      try {
        sh('ip', ['netns', 'del', ns]);
      } catch {
        // not made
      }
    }
    rmSync(dir, { recursive: true, force: true });
  }
}

export function formatTcReport(r: TcBenchReport): string {
  const f = (n: number) => n.toFixed(1);
  const rows = CONFIGS.map((c) => {
    const s = r.nsPerFrame[c.name];
    return `| ${c.name} | ${f(s.median)} (${f(s.min)}–${f(s.max)}) | ${c.programs ? `${f(r.nsPerHook[c.name])} / ${f(r.nsPerHookMin[c.name])}` : '—'} |`;
  });
  return [
    `${r.rounds} rounds × ${r.frames.toLocaleString('en')} frames of 64 bytes, sender on CPU ${r.senderCpu}, Linux ${r.kernel}, ${r.cpu}, ${r.date}; ${r.clock === 'thread-cpu' ? 'the sender thread\'s CPU time' : 'wall clock'}`,
    '',
    '| configuration | ns per frame, median (min–max) | ns per hook over none: of the medians / of the minimums |',
    '|---|---:|---:|',
    ...rows,
    '',
    `tcx − cls_bpf per hook, paired round by round (median, quartiles): ${f(r.tcxMinusClsBpfPerHook.xmasq)} ns (${f(r.tcxMinusClsBpfQuartiles.xmasq[0])} to ${f(r.tcxMinusClsBpfQuartiles.xmasq[1])}) with init/restore, ${f(r.tcxMinusClsBpfPerHook.empty)} ns (${f(r.tcxMinusClsBpfQuartiles.empty[0])} to ${f(r.tcxMinusClsBpfQuartiles.empty[1])}) with the empty program`,
  ].join('\n');
}

function main(argv: string[]): number {
  const line = commandLine('bench:tc', USAGE, argv, { json: { type: 'boolean' }, rounds: { type: 'string' }, frames: { type: 'string' }, cpu: { type: 'string' }, md: { type: 'string' } });
  if (typeof line === 'number') return line;
  const v = line.values;
  let opts: { rounds: number; frames: number; cpu: number };
  try {
    opts = {
      rounds: intOption('--rounds', v.rounds, 40, 1),
      frames: intOption('--frames', v.frames, 250_000, 1000),
      cpu: intOption('--cpu', v.cpu, cpus().length - 1, 0),
    };
    if (opts.cpu >= cpus().length) throw new UsageError(`--cpu ${opts.cpu}: this machine has CPUs 0 to ${cpus().length - 1}`);
  } catch (e) {
    if (e instanceof UsageError) return usageError('bench:tc', USAGE, e);
    throw e;
  }
  try {
    const report = runTcBench({ ...opts, progress: (s) => process.stderr.write(`bench:tc: ${s}\n`) });
    if (v.md) writeFileSync(v.md, `${formatTcReport(report)}\n`);
    process.stdout.write(v.json ? `${JSON.stringify(report, null, 2)}\n` : `${formatTcReport(report)}\n`);
    return 0;
  } catch (e) {
    if (e instanceof BenchError) {
      process.stderr.write(`bench:tc: ${e.message}\n`);
      return 1;
    }
    throw e;
  }
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.exitCode = main(process.argv.slice(2));
}
