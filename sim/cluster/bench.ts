/**
 * npm run bench:sim [-- --json] [-- --quick]
 *
 * How many simulated packets per second the cluster simulator processes,
 * single-threaded: microservice traffic (traffic.ts MICROSERVICES) on
 * 4 hosts × 20 pods, run on the wide-key datapath (the default), on the 6-bit one and with no XMasq
 * (every packet on the overlay, no program does anything), with the time
 * inside the model programs measured apart. The programs alone are also
 * timed on one fast-path packet, to show what a packet's model calls cost.
 */
import { cpus, release } from 'node:os';
import { parseArgs } from 'node:util';
import { buildFrame } from '../packet/index.ts';
import { masqInPlace, newEffects, restoreInPlace } from '../model/index.ts';
import { DEFAULT_TIMING } from './agent.ts';
import { Cluster, type RunStats } from './cluster.ts';
import { Rng } from './rng.ts';
import type { Scenario } from './scenario.ts';
import { MICROSERVICES, TrafficGenerator } from './traffic.ts';

const USAGE = `usage: npm run bench:sim -- [--packets N] [--quick] [--json] [--help]

Runs the cluster simulator on 4 hosts × 20 pods of microservice traffic until N simulated
packets (default 2000000; --quick: 300000) were sent, on the wide-key and 6-bit datapaths and with no XMasq,
and prints simulated packets per second. The time inside the model programs is sampled (one
call in 16 timed). --json prints one JSON report on stdout.`;

interface Measured {
  scheme: string;
  packets: number;
  wallSeconds: number;
  packetsPerSecond: number;
  modelCalls: number;
  modelShare: number;
  modelCallsPerSecondInside: number;
  fastPathShare: number;
  violations: number;
}

function scenario(scheme: string): Scenario {
  return {
    hosts: 4, podsPerHost: 20, link: { latencyNs: 50e3, jitterNs: 20e3, loss: 0.001 }, timing: DEFAULT_TIMING,
    scheme, ifindex: 'fresh', flows: [], hostFlows: [], churn: [], policy: [], durationNs: 3600e9, seed: 1,
  };
}

function measure(scheme: string, packets: number): Measured {
  const sc = scenario(scheme);
  const gen = new TrafficGenerator(MICROSERVICES, sc.hosts, sc.podsPerHost, new Rng(2));
  const t0 = performance.now();
  const r = new Cluster(sc, { generator: gen, maxPackets: packets, timeModel: true }).run();
  const wall = (performance.now() - t0) / 1000;
  const s: RunStats = r.stats;
  return {
    scheme,
    packets: s.packets,
    wallSeconds: +wall.toFixed(3),
    packetsPerSecond: Math.round(s.packets / wall),
    modelCalls: s.modelCalls,
    modelShare: +(s.modelMs / 1000 / wall).toFixed(3),
    modelCallsPerSecondInside: s.modelMs > 0 ? Math.round(s.modelCalls / (s.modelMs / 1000)) : 0,
    fastPathShare: s.sent.cross ? +(s.masqueraded / s.sent.cross).toFixed(4) : 0,
    violations: r.violations.length,
  };
}

/**
 * The two model calls of a fast-path packet, alone, on a learned pair, as the
 * simulator makes them: the frame copied into a buffer and rewritten in place.
 */
function programsAlone(n: number): { masqPerSecond: number; restorePerSecond: number } {
  const sc = scenario('6-bit');
  sc.flows = [{ at: 0, a: { host: 0, slot: 0 }, b: { host: 1, slot: 0 }, proto: 'tcp', packets: 10, gapNs: 1e6, pattern: 'rr' }];
  sc.durationNs = 1e9;
  const c = new Cluster(sc);
  c.run();
  const [a, b] = c.hosts;
  const pod = buildFrame({ eth: { src: '0a:58:00:00:00:01', dst: a.addr.cniMac }, ipv4: { src: a.slots[0]!.ipStr, dst: b.slots[0]!.ipStr, l4: { tcp: { sport: 1, dport: 2, payload: { len: 64 } } } } });
  const env = { now: 2n, random: () => 1 };
  const fx = newEffects();
  const sent = Buffer.from(pod);
  if (masqInPlace(sent, a.state, env, fx) !== 7) throw new Error('bench: the pair did not reach the fast path; the simulator is broken');
  const frame = Buffer.alloc(pod.length);
  const time = (input: Buffer, f: () => void) => {
    const t0 = performance.now();
    for (let i = 0; i < n; i++) {
      frame.set(input);
      f();
    }
    return Math.round(n / ((performance.now() - t0) / 1000));
  };
  return {
    masqPerSecond: time(pod, () => masqInPlace(frame, a.state, env, fx)),
    restorePerSecond: time(sent, () => restoreInPlace(frame, b.state, env, fx)),
  };
}

function main(argv: string[]): number {
  let args;
  try {
    args = parseArgs({ args: argv, options: { packets: { type: 'string' }, quick: { type: 'boolean' }, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } }, strict: true }).values;
  } catch (e) {
    process.stderr.write(`bench:sim: ${(e as Error).message}\n\n${USAGE}\n`);
    return 2;
  }
  if (args.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  // Long enough that the JIT's warm-up is a small part of the run at a million packets a second.
  const packets = args.packets !== undefined ? Number(args.packets) : args.quick ? 300_000 : 2_000_000;
  if (!Number.isInteger(packets) || packets < 1000) {
    process.stderr.write(`bench:sim: --packets ${args.packets}: want an integer of at least 1000\n`);
    return 2;
  }
  const runs: Measured[] = [];
  for (const scheme of ['wide', '6-bit', 'overlay']) {
    process.stderr.write(`bench:sim: ${scheme}, ${packets} packets…\n`);
    runs.push(measure(scheme, packets));
  }
  const alone = programsAlone(args.quick ? 20_000 : 100_000);
  const report = {
    when: new Date().toISOString(), cpu: cpus()[0]?.model ?? 'unknown', cpus: cpus().length, kernel: release(), node: process.version,
    topology: '4 hosts × 20 pods, microservices', runs, programsAlone: alone, goal: 1_000_000,
  };
  if (args.json) {
    process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
    return runs.some((r) => r.violations) ? 1 : 0;
  }
  for (const r of runs) {
    process.stdout.write(`${r.scheme.padEnd(8)} ${r.packetsPerSecond.toLocaleString('en')} packets/s  (${r.packets} packets in ${r.wallSeconds} s; `
      + `${(r.modelShare * 100).toFixed(0)}% of it in ${r.modelCalls} model calls, ${r.modelCallsPerSecondInside.toLocaleString('en')} calls/s; fast path ${(r.fastPathShare * 100).toFixed(1)}%; violations ${r.violations})\n`);
  }
  process.stdout.write(`model alone: masq ${alone.masqPerSecond.toLocaleString('en')}/s, restore ${alone.restorePerSecond.toLocaleString('en')}/s on a learned pair\n`);
  const [wide, six] = runs;
  process.stdout.write(`sim: ${wide.packetsPerSecond.toLocaleString('en')} simulated packets/s (wide keys, the default datapath; 6-bit: ${six.packetsPerSecond.toLocaleString('en')}; goal 1,000,000)\n`);
  return runs.some((r) => r.violations) ? 1 : 0;
}

process.exitCode = main(process.argv.slice(2));
