/**
 * npm run bench:sim [-- --json] [-- --quick]
 *
 * How many simulated packets per second the cluster simulator processes:
 * microservice traffic (traffic.ts MICROSERVICES) on 4 hosts × 20 pods, on
 * one thread on the wide-key datapath (the default), on the 6-bit one and
 * with no XMasq (every packet on the overlay, no program does anything), with
 * the time inside the model programs measured apart; then on every core at
 * once, a cluster per core (a run is one thread's work; a study's points run
 * this way, workers.ts). The programs alone are also timed on one fast-path
 * packet, to show what a packet's model calls cost.
 */
import { cpus, release } from 'node:os';
import { commandLine } from '../testing/args.ts';
import { buildFrame } from '../testing/packet/index.ts';
import { masqInPlace, newEffects, restoreInPlace } from '../sim/model/index.ts';
import { CHASE_BYTES, SHA_MIB, benchScenario, machineCheck, measure, startLine, type BenchJob, type MachineCheck, type Measured } from './sim-run.ts';
import { Cluster } from '../sim/cluster/cluster.ts';
import { mapInWorkers, threadsOption } from '../sim/cluster/workers.ts';

const USAGE = `usage: npm run bench:sim -- [--packets N] [--threads T] [--rounds R] [--quick] [--json] [--help] [--version]

Runs the cluster simulator on 4 hosts × 20 pods of microservice traffic until N simulated
packets (default 2000000; --quick: 300000) were sent, on one thread: on the wide-key and 6-bit
datapaths and with no XMasq; then on T threads at once (default: one per core), each its own
cluster of wide keys, started together once every worker is up; R rounds of all four (default 3; --quick: 1), one after the other. Prints
simulated packets per second, the median of the rounds and their range: runs of the same build
on this VM differ by up to 1.5x from one to the next. The time inside the model programs is
sampled on the one-thread runs (one call in 16 timed). A machine check before and after, alone
and on T threads at once, shows how fast the shared machine was meanwhile: SHA-256 of 256 MiB
(the cores) and dependent reads through 64 MiB (memory and the shared cache, which a neighbour
can slow down as the simulator feels it). --json prints one JSON report on stdout.`;

/**
 * The two model calls of a fast-path packet, alone, on a pair learned with
 * wide keys, as the simulator makes them: the frame copied into a buffer and
 * rewritten in place. Each is run once to warm the JIT up, then timed.
 */
function programsAlone(n: number): { masqPerSecond: number; restorePerSecond: number } {
  const sc = benchScenario('wide');
  sc.flows = [{ at: 0, a: { host: 0, slot: 0 }, b: { host: 1, slot: 0 }, proto: 'tcp', packets: 10, gapNs: 1e6, pattern: 'rr' }];
  sc.durationNs = 1e9;
  const c = new Cluster(sc);
  c.run();
  const [a, b] = c.hosts;
  const pod = buildFrame({ eth: { src: '0a:58:00:00:00:01', dst: a.addr.cniMac }, ipv4: { src: a.slots[0]!.ipStr, dst: b.slots[0]!.ipStr, l4: { tcp: { sport: 1, dport: 2, payload: { len: 64 } } } } });
  const env = { now: 2n, random: () => 1, ifindex: a.slots[0]!.ifindex };
  const fx = newEffects();
  const sent = Buffer.from(pod);
  if (masqInPlace(sent, a.state, env, fx) !== 7) throw new Error('bench: the pair did not reach the fast path; the simulator is broken');
  const frame = Buffer.alloc(pod.length);
  const time = (input: Buffer, f: () => void) => {
    let perSecond = 0;
    for (let round = 0; round < 2; round++) {
      const t0 = performance.now();
      for (let i = 0; i < n; i++) {
        frame.set(input);
        f();
      }
      perSecond = Math.round(n / ((performance.now() - t0) / 1000));
    }
    return perSecond;
  };
  return {
    masqPerSecond: time(pod, () => masqInPlace(frame, a.state, env, fx)),
    restorePerSecond: time(sent, () => restoreInPlace(frame, b.state, env, fx)),
  };
}

/**
 * The machine's figure: one cluster per core, all at once (each its own
 * seed), started together from a start line once every worker is up (tsx
 * compiles the sources again in each), the packets of all of them over the
 * time from the first start to the last end.
 */
interface AllCores { threads: number; packetsPerSecond: number; wallSeconds: number; runs: Measured[] }

async function allCores(scheme: string, packets: number, threads: number): Promise<AllCores> {
  const start = startLine(threads);
  const jobs: BenchJob[] = Array.from({ length: threads }, (_, i) => ({ scheme, packets, seed: i + 1, start }));
  const runs = await mapInWorkers<BenchJob, Measured>(BENCH_RUN, jobs, { threads });
  const wall = (Math.max(...runs.map((r) => r.endMs)) - Math.min(...runs.map((r) => r.startMs))) / 1000;
  const total = runs.reduce((a, r) => a + r.packets, 0);
  return { threads, packetsPerSecond: Math.round(total / wall), wallSeconds: +wall.toFixed(3), runs };
}

const BENCH_RUN = new URL('./sim-run.ts', import.meta.url);

/** The machine check (sim-run.ts) on this thread, then on every thread at once. */
async function machineChecks(threads: number): Promise<{ alone: MachineCheck; allThreads: MachineCheck[] }> {
  const alone = machineCheck();
  const allThreads = await mapInWorkers<BenchJob, MachineCheck>(BENCH_RUN, Array.from({ length: threads }, () => ({ machineCheck: true as const })), { threads });
  return { alone, allThreads };
}

const fmt = (n: number) => n.toLocaleString('en');

const SCHEMES = ['wide', '6-bit', 'overlay'] as const;

interface Spread { median: number; min: number; max: number }

/** The median (of an even count, the lower middle: a figure that was measured) and the range. */
function spread(xs: number[]): Spread {
  const s = [...xs].sort((a, b) => a - b);
  return { median: s[(s.length - 1) >> 1], min: s[0], max: s[s.length - 1] };
}

async function main(argv: string[]): Promise<number> {
  const line = commandLine('bench:sim', USAGE, argv, {
    packets: { type: 'string' }, threads: { type: 'string' }, rounds: { type: 'string' }, quick: { type: 'boolean' }, json: { type: 'boolean' },
  });
  if (typeof line === 'number') return line;
  const args = line.values;
  // Long enough that the JIT's warm-up is a small part of the run at a million packets a second.
  const packets = args.packets !== undefined ? Number(args.packets) : args.quick ? 300_000 : 2_000_000;
  if (!Number.isInteger(packets) || packets < 1000) {
    process.stderr.write(`bench:sim: --packets ${args.packets}: want an integer of at least 1000\n`);
    return 2;
  }
  const threads = threadsOption(args.threads);
  if (typeof threads === 'string') {
    process.stderr.write(`bench:sim: ${threads}\n`);
    return 2;
  }
  const rounds = args.rounds !== undefined ? Number(args.rounds) : args.quick ? 1 : 3;
  if (!Number.isInteger(rounds) || rounds < 1 || rounds > 100) {
    process.stderr.write(`bench:sim: --rounds ${args.rounds}: want an integer from 1 to 100\n`);
    return 2;
  }
  const before = await machineChecks(threads);
  const runs: Measured[] = [];
  const machines: AllCores[] = [];
  for (let round = 1; round <= rounds; round++) {
    for (const scheme of SCHEMES) {
      process.stderr.write(`bench:sim: round ${round}/${rounds}: ${scheme}, ${packets} packets, one thread…\n`);
      runs.push(measure(scheme, packets));
    }
    process.stderr.write(`bench:sim: round ${round}/${rounds}: wide, ${packets} packets on each of ${threads} threads at once…\n`);
    machines.push(await allCores('wide', packets, threads));
  }
  const alone = programsAlone(args.quick ? 50_000 : 1_000_000);
  const after = await machineChecks(threads);
  const violations = runs.some((r) => r.violations) || machines.some((m) => m.runs.some((r) => r.violations));
  const oneThread = Object.fromEntries(SCHEMES.map((sc) => [sc, spread(runs.filter((r) => r.scheme === sc).map((r) => r.packetsPerSecond))]));
  const allThreads = spread(machines.map((m) => m.packetsPerSecond));
  const report = {
    when: new Date().toISOString(), cpu: cpus()[0]?.model ?? 'unknown', cpus: cpus().length, kernel: release(), node: process.version,
    topology: '4 hosts × 20 pods, microservices', rounds, oneThread, allThreads, runs, allCores: machines, programsAlone: alone, machineCheck: { before, after }, goal: 1_000_000,
  };
  if (args.json) {
    process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
    return violations ? 1 : 0;
  }
  const range = (x: Spread) => (rounds > 1 ? ` (median of ${rounds} rounds; ${fmt(x.min)}-${fmt(x.max)})` : '');
  for (const sc of SCHEMES) {
    // The model's share and rate as in the median run.
    const mine = runs.filter((r) => r.scheme === sc), r = mine.find((x) => x.packetsPerSecond === oneThread[sc].median)!;
    process.stdout.write(`${sc.padEnd(8)} ${fmt(oneThread[sc].median)} packets/s on one thread${range(oneThread[sc])}; ${r.packets} packets a run, `
      + `${(r.modelShare * 100).toFixed(0)}% of it in ${r.modelCalls} model calls, ${fmt(r.modelCallsPerSecondInside)} calls/s; fast path ${(r.fastPathShare * 100).toFixed(1)}%; `
      + `violations ${mine.reduce((a, x) => a + x.violations, 0)}\n`);
  }
  process.stdout.write(`wide     ${fmt(allThreads.median)} packets/s on ${threads} threads${range(allThreads)}; ${threads} clusters at once, seeds 1..${threads}, `
    + `each round's packets over its time from first start to last end (${machines.map((m) => m.runs.map((r) => fmt(r.packetsPerSecond)).join(' + ')).join('; ')} packets/s each)\n`);
  process.stdout.write(`model alone: masq ${fmt(alone.masqPerSecond)}/s, restore ${fmt(alone.restorePerSecond)}/s on a pair learned with wide keys (the frame copy included)\n`);
  const check = (c: typeof before) => `sha-256 ${c.alone.sha256Ms} ms, chase ${c.alone.chaseNs} ns alone; `
    + `${c.allThreads.map((m) => `${m.sha256Ms} ms, ${m.chaseNs} ns`).join(' / ')} on ${c.allThreads.length} threads at once`;
  process.stdout.write(`machine check (sha-256 of ${SHA_MIB} MiB; dependent reads through ${CHASE_BYTES >> 20} MiB): before: ${check(before)}; after: ${check(after)}\n`);
  process.stdout.write(`sim: ${fmt(allThreads.median)} simulated packets/s on this machine (wide keys, the default datapath, ${threads} threads; `
    + `one thread: ${fmt(oneThread.wide.median)}, 6-bit ${fmt(oneThread['6-bit'].median)}; goal 1,000,000)\n`);
  return violations ? 1 : 0;
}

main(process.argv.slice(2)).then((code) => (process.exitCode = code), (e: Error) => {
  process.stderr.write(`bench:sim: ${e.message}\n`);
  process.exitCode = 1;
});
