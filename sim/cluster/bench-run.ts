/**
 * One run of npm run bench:sim: microservice traffic (traffic.ts
 * MICROSERVICES) on 4 hosts × 20 pods until a number of packets were sent,
 * timed. bench.ts runs it on the main thread, and as a worker module on every
 * core at once (workers.ts), each worker its own cluster and seed.
 */
import { DEFAULT_TIMING } from './agent.ts';
import { Cluster, type RunStats } from './cluster.ts';
import { Rng } from './rng.ts';
import type { Scenario } from './scenario.ts';
import { MICROSERVICES, TrafficGenerator } from './traffic.ts';
import { serveJobs } from './workers.ts';

export interface Measured {
  scheme: string;
  seed: number;
  packets: number;
  wallSeconds: number;
  packetsPerSecond: number;
  /** When the run started and ended, ms on a clock all threads share (performance.timeOrigin + now()). */
  startMs: number;
  endMs: number;
  modelCalls: number;
  modelShare: number;
  modelCallsPerSecondInside: number;
  fastPathShare: number;
  violations: number;
}

export function benchScenario(scheme: string, seed = 1): Scenario {
  return {
    hosts: 4, podsPerHost: 20, link: { latencyNs: 50e3, jitterNs: 20e3, loss: 0.001 }, timing: DEFAULT_TIMING,
    scheme, ifindex: 'fresh', flows: [], hostFlows: [], churn: [], policy: [], durationNs: 3600e9, seed,
  };
}

const clock = () => performance.timeOrigin + performance.now();

/** timeModel: sample the time inside the model programs (a clock read per 16 calls). */
export function measure(scheme: string, packets: number, seed = 1, timeModel = true): Measured {
  const sc = benchScenario(scheme, seed);
  const gen = new TrafficGenerator(MICROSERVICES, sc.hosts, sc.podsPerHost, new Rng(seed + 1));
  const t0 = clock();
  const r = new Cluster(sc, { generator: gen, maxPackets: packets, timeModel }).run();
  const t1 = clock();
  const wall = (t1 - t0) / 1000;
  const s: RunStats = r.stats;
  return {
    scheme,
    seed,
    packets: s.packets,
    wallSeconds: +wall.toFixed(3),
    packetsPerSecond: Math.round(s.packets / wall),
    startMs: t0,
    endMs: t1,
    modelCalls: s.modelCalls,
    modelShare: +(s.modelMs / 1000 / wall).toFixed(3),
    modelCallsPerSecondInside: s.modelMs > 0 ? Math.round(s.modelCalls / (s.modelMs / 1000)) : 0,
    fastPathShare: s.sent.cross ? +(s.masqueraded / s.sent.cross).toFixed(4) : 0,
    violations: r.violations.length,
  };
}

/**
 * A fixed amount of plain CPU work (integer adds), ms: run alone and on every
 * core at once beside the simulator's runs, it tells how fast, and how
 * parallel, this shared machine was during them (the same work takes twice as
 * long when a neighbour holds the core).
 */
export function cpuCheck(): { ms: number } {
  // Warmed up and in chunks: timed in one long loop, the work would run at whatever tier the JIT happened to reach.
  let x = 0;
  for (let c = 0; c < 20; c++) x = addChunk(x, c * CHUNK);
  const t0 = performance.now();
  for (let c = 0; c < CPU_CHECK_ADDS / CHUNK; c++) x = addChunk(x, c * CHUNK);
  cpuCheckSink ^= x;
  return { ms: +(performance.now() - t0).toFixed(1) };
}

const CHUNK = 1_000_000;

function addChunk(x: number, from: number): number {
  for (let i = from; i < from + CHUNK; i++) x = (x + Math.imul(i, 7)) | 0;
  return x;
}

/** Where the check's sum goes, so that its loop is not dead code. */
let cpuCheckSink = 0;

export const CPU_CHECK_ADDS = 500_000_000;

export type BenchJob = { scheme: string; packets: number; seed: number } | { cpuCheck: true };

serveJobs(import.meta.url, (j: BenchJob) => ('cpuCheck' in j ? cpuCheck() : measure(j.scheme, j.packets, j.seed, false)));
