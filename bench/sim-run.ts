/**
 * One run of npm run bench:sim: microservice traffic (traffic.ts
 * MICROSERVICES) on 4 hosts × 20 pods until a number of packets were sent,
 * timed. sim.ts runs it on the main thread, and as a worker module on every
 * core at once (workers.ts), each worker its own cluster and seed.
 */
import { createHash } from 'node:crypto';
import { DEFAULT_TIMING } from '../sim/cluster/agent.ts';
import { Cluster, type RunStats } from '../sim/cluster/cluster.ts';
import { Rng } from '../sim/cluster/rng.ts';
import type { Scenario } from '../sim/cluster/scenario.ts';
import { MICROSERVICES, TrafficGenerator } from '../sim/cluster/traffic.ts';
import { serveJobs } from '../sim/cluster/workers.ts';

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

/**
 * timeModel: sample the time inside the model programs (a clock read per 16
 * calls). start: a start line shared with the other runs (startLine), which
 * this run waits at before its clock starts.
 */
export function measure(scheme: string, packets: number, seed = 1, timeModel = true, start?: SharedArrayBuffer): Measured {
  const sc = benchScenario(scheme, seed);
  const gen = new TrafficGenerator(MICROSERVICES, sc.hosts, sc.podsPerHost, new Rng(seed + 1));
  if (start) waitAtStartLine(start);
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
 * How fast this shared machine was: two fixed pieces of work, run alone and
 * on every core at once beside the simulator's runs.
 * - SHA-256 over 256 MiB: native code, the same instructions every time (a
 *   JS loop of int32 adds timed here ran at 0.5 or at 5 ns an add from one
 *   process to the next, by which tier V8 happened to compile it at).
 * - A chase of dependent reads through 64 MiB in a random cycle: each read
 *   waits for memory, as the simulator's reads of its objects do; a
 *   neighbour on the shared L3 cache or the memory bus slows it down where
 *   the hash does not notice.
 */
export function machineCheck(): MachineCheck {
  const buf = Buffer.alloc(1 << 20, 0x5a);
  const t0 = performance.now();
  for (let i = 0; i < SHA_MIB; i++) createHash('sha256').update(buf).digest();
  const sha256Ms = performance.now() - t0;
  const cycle = chaseCycle();
  let at = 0;
  // The first pass brings the pages in; the second is timed.
  for (let i = 0; i < CHASE_READS; i++) at = cycle[at];
  const t1 = performance.now();
  for (let i = 0; i < CHASE_READS; i++) at = cycle[at];
  const chaseNs = ((performance.now() - t1) * 1e6) / CHASE_READS;
  checkSink ^= at;
  return { sha256Ms: +sha256Ms.toFixed(1), chaseNs: +chaseNs.toFixed(1) };
}

export interface MachineCheck {
  /** ms to hash SHA_MIB MiB. */
  sha256Ms: number;
  /** ns per dependent read through CHASE_BYTES. */
  chaseNs: number;
}

export const SHA_MIB = 256;
export const CHASE_BYTES = 64 << 20;
const CHASE_READS = 2_000_000;

/** A single random cycle through every slot (Sattolo's shuffle), made once per thread. */
let cycleMemo: Int32Array | undefined;

function chaseCycle(): Int32Array {
  if (cycleMemo) return cycleMemo;
  const n = CHASE_BYTES / 4;
  const c = new Int32Array(n);
  for (let i = 0; i < n; i++) c[i] = i;
  let seed = 0x9e3779b9;
  for (let i = n - 1; i > 0; i--) {
    seed = (Math.imul(seed, 1664525) + 1013904223) | 0;
    const j = (seed >>> 0) % i;
    const x = c[i];
    c[i] = c[j];
    c[j] = x;
  }
  return (cycleMemo = c);
}

/** Where the chase's last slot goes, so that its loop is not dead code. */
let checkSink = 0;

/**
 * A start line for runs in several threads: each waits at it until all have
 * come (workers take a moment to start, tsx compiling the sources again in
 * each), so that they run side by side from the same instant.
 */
export function startLine(runs: number): SharedArrayBuffer {
  const line = new SharedArrayBuffer(8);
  new Int32Array(line)[1] = runs;
  return line;
}

const START_TIMEOUT_MS = 120_000;

function waitAtStartLine(line: SharedArrayBuffer): void {
  // [0]: the runs arrived so far; [1]: how many will come.
  const a = new Int32Array(line);
  Atomics.add(a, 0, 1);
  Atomics.notify(a, 0);
  const deadline = Date.now() + START_TIMEOUT_MS;
  for (let n = Atomics.load(a, 0); n < a[1]; n = Atomics.load(a, 0)) {
    if (Date.now() > deadline || Atomics.wait(a, 0, n, START_TIMEOUT_MS) === 'timed-out') throw new Error(`only ${n} of ${a[1]} runs reached the start line in ${START_TIMEOUT_MS / 1000} s`);
  }
}

export type BenchJob = { scheme: string; packets: number; seed: number; start?: SharedArrayBuffer } | { machineCheck: true };

serveJobs(import.meta.url, (j: BenchJob) => ('machineCheck' in j ? machineCheck() : measure(j.scheme, j.packets, j.seed, false, j.start)));
