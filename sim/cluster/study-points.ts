/**
 * The capacity study's sweeps and one point of a sweep: study.ts runs the
 * points, in worker threads (workers.ts), one per core, since they do not
 * depend on each other; this module is the workers' too.
 */
import { DEFAULT_TIMING, type AgentTiming } from './agent.ts';
import { Cluster } from './cluster.ts';
import { Rng } from './rng.ts';
import type { ChurnSpec, FlowSpec, Scenario } from './scenario.ts';
import { MICROSERVICES, TrafficGenerator, type TrafficModel } from './traffic.ts';
import { serveJobs } from './workers.ts';

export interface Point {
  scheme: string;
  x: number;
  packetsPct: number;
  /** The same, leaving out the heavy streams. */
  micePct: number;
  flowsPct: number;
  packets: number;
  /** Share of the counted packets that belong to the heavy streams. */
  heavyPct: number;
  flows: number;
  keyExhausted: number;
  violations: number;
  /** Cross-host pod packets of the whole run, warm-up included (violations are counted over it). */
  allCross: number;
  /** Packets on the fast path over the whole run, the warm-up's learning included. */
  wholeRunPct: number;
  wallSeconds: number;
}

export interface Sweep {
  id: string;
  title: string;
  xLabel: string;
  xLog?: boolean;
  xs: number[];
  /** The run for one x: flows arriving from a traffic model, or only the scenario's own. */
  setup(x: number): { scenario: Omit<Scenario, 'scheme' | 'seed'>; traffic?: TrafficModel; warmupNs: number };
  /** Plot a series per scheme of the packets misdelivered per 100,000, instead of the flows. */
  plotViolations?: boolean;
  describe: string;
}

/** Each pod starts this many flows per second, to any other pod (all-to-all). */
const FLOWS_PER_POD_PER_SECOND = 0.5;
const HOSTS = 2;

function base(pods: number, timing: AgentTiming, durationNs: number): Omit<Scenario, 'scheme' | 'seed'> {
  return {
    hosts: HOSTS, podsPerHost: pods, link: { latencyNs: 50e3, jitterNs: 20e3, loss: 0 }, timing,
    ifindex: 'fresh', flows: [], hostFlows: [], churn: [], policy: [], durationNs,
  };
}

/**
 * Steady all-to-all: every pod of host 0 holds a connection with every pod of
 * host 1 (pods² pairs), each a request or response every STEADY_GAP_NS, starting
 * at a random time in the first 2 s; by pair, TCP, UDP or ICMP echo as often
 * as the microservice mix draws them.
 */
const STEADY_GAP_NS = 200e6;

function steadyFlows(pods: number, durationNs: number, seed: number): FlowSpec[] {
  const rng = new Rng(seed);
  const flows: FlowSpec[] = [];
  for (let a = 0; a < pods; a++) {
    for (let b = 0; b < pods; b++) {
      const u = rng.next();
      const at = rng.next() * 2e9;
      flows.push({
        at, a: { host: 0, slot: a }, b: { host: 1, slot: b }, proto: u < 0.8 ? 'tcp' : u < 0.97 ? 'udp' : 'icmp',
        packets: Math.floor((durationNs - at) / STEADY_GAP_NS), gapNs: STEADY_GAP_NS, pattern: 'rr',
      });
    }
  }
  return flows;
}

export function sweeps(quick: boolean): Sweep[] {
  const s = quick ? 0.25 : 1;
  // Two heavy streams that last the whole run, one packet every 2 ms each.
  const microservices = (pods: number, durationNs: number): TrafficModel => ({
    ...MICROSERVICES, flowsPerSecond: FLOWS_PER_POD_PER_SECOND * pods * HOSTS, heavyFlows: 2, heavyPackets: Math.round(durationNs / 2e6), heavyGapNs: 2e6,
  });
  return [
    {
      id: 'steady', title: 'Fast path vs pods per host (steady all-to-all)', xLabel: 'pods per host',
      xs: quick ? [10, 50, 110] : [10, 30, 50, 70, 90, 110],
      setup: (pods) => {
        const dur = 12e9 * (quick ? 0.5 : 1);
        return { scenario: { ...base(pods, DEFAULT_TIMING, dur), flows: steadyFlows(pods, dur, 5) }, warmupNs: dur / 3 };
      },
      describe: `${HOSTS} hosts; every pod talks to every pod of the other host (pods² pairs per host pair), each pair a request or a response every ${STEADY_GAP_NS / 1e6} ms, starting at a random time in the first 2 s; TCP, UDP or ICMP echo by pair (80/17/3%); agent defaults; ${quick ? 6 : 12} s simulated, the first third not counted: every pair learns its keys in it, with its first two packets (one each way) over the overlay, and a TCP pair's connection is admitted once the agent has made its entries liberal (its first ~10 ms), as the whole-run column shows; its last packet, a FIN, and ICMP echo stay on the overlay`,
    },
    {
      id: 'pods', title: 'Fast path vs pods per host (all-to-all microservices)', xLabel: 'pods per host',
      xs: quick ? [10, 50, 110] : [10, 30, 50, 70, 90, 110],
      setup: (pods) => ({ scenario: base(pods, DEFAULT_TIMING, 90e9 * s), traffic: microservices(pods, 90e9 * s), warmupNs: 30e9 * s }),
      describe: `${HOSTS} hosts; every pod starts ${FLOWS_PER_POD_PER_SECOND} flows/s to a random other pod (log-normal sizes, median ${MICROSERVICES.sizeMedian} packets; spacing median ${MICROSERVICES.gapMedianNs / 1e6} ms) plus 2 heavy streams (a packet every 2 ms for the whole run); agent defaults (egress idle 20 s, ingress 40 s, scan 1 s); 90 s simulated, the first 30 s not counted`,
    },
    {
      id: 'pairs', title: 'Fast path vs concurrent pod pairs per host pair', xLabel: 'pod pairs talking between the two hosts', xLog: true,
      xs: quick ? [16, 63, 256] : [8, 16, 32, 48, 63, 96, 128, 256, 512],
      setup: (pairs) => ({
        scenario: base(110, DEFAULT_TIMING, 60e9 * s),
        // Each pair starts a flow every 2 s on average: all of them stay active, none expires.
        traffic: { ...MICROSERVICES, pairs, flowsPerSecond: pairs / 2, heavyFlows: 0 },
        warmupNs: 20e9 * s,
      }),
      describe: '110 pods per host; only P fixed pod pairs (chosen at random) talk, each starting a flow every 2 s on average, so all P stay active; agent defaults; 60 s simulated, the first 20 s not counted',
    },
    {
      id: 'expiry', title: 'Fast path vs expiry time (50 pods/host, all-to-all)', xLabel: 'egress idle time, s (ingress idle: twice that)', xLog: true,
      xs: quick ? [2, 20] : [1, 2, 5, 10, 20, 40],
      setup: (idle) => {
        const timing = { egressIdleNs: idle * 1e9, ingressIdleNs: 2 * idle * 1e9, scanIntervalNs: 1e9 };
        const dur = Math.max(60e9, 6 * timing.ingressIdleNs) * s;
        return { scenario: base(50, timing, dur), traffic: microservices(50, dur), warmupNs: dur / 3 };
      },
      describe: `50 pods per host, the traffic of the pods sweep; ingress idle = 2 × egress idle, scan every 1 s; simulated for max(60 s, 6 × ingress idle), the first third not counted`,
    },
    {
      id: 'churn', title: 'Fast path and misdelivery vs pod churn (50 pods/host)', xLabel: 'pods replaced per second (of 100)',
      xs: quick ? [0, 2] : [0, 0.2, 0.5, 1, 2],
      plotViolations: true,
      setup: (rate) => {
        const dur = 60e9 * s;
        const rng = new Rng(17);
        const churn: ChurnSpec[] = [];
        // A pod replaced: deleted, and a new one in its slot 2 s later, on the same IP half the time.
        for (let t = rate > 0 ? rng.exponential(1e9 / rate) : Infinity; t < dur; t += rng.exponential(1e9 / rate)) {
          churn.push({ at: t, pod: { host: rng.int(HOSTS), slot: rng.int(50) }, gapNs: 2e9, sameIp: rng.next() < 0.5 });
        }
        // No heavy streams: whether churn happens to hit one of their two pairs would decide the counts.
        return { scenario: { ...base(50, DEFAULT_TIMING, dur), churn, deadPeerGraceNs: 1e9 }, traffic: { ...microservices(50, dur), heavyFlows: 0 }, warmupNs: dur / 3 };
      },
      describe: '50 pods per host, the traffic of the pods sweep without its heavy streams; a flow stops 1 s after one of its pods is deleted (a client notices a dead peer, or its endpoints are updated); pods replaced at random (Poisson), the new pod 2 s later, on the old IP half the time; agent defaults; 60 s simulated, the first 20 s not counted. Misdelivered: packets restored into a pod they were not addressed to, per 100,000 cross-host packets of the whole run (sim/cluster/README.md, findings)',
    },
  ];
}

export function runPoint(scheme: string, sweep: Sweep, x: number, seed: number): Point {
  const { scenario, traffic, warmupNs } = sweep.setup(x);
  const sc: Scenario = { ...scenario, scheme, seed };
  const gen = traffic && new TrafficGenerator(traffic, sc.hosts, sc.podsPerHost, new Rng(seed + 1));
  const t0 = performance.now();
  const r = new Cluster(sc, { generator: gen, measureFromNs: warmupNs }).run();
  const w = r.stats.window;
  return {
    scheme, x,
    packetsPct: w.cross ? (100 * w.fast) / w.cross : 0,
    micePct: w.cross > w.stream ? (100 * (w.fast - w.streamFast)) / (w.cross - w.stream) : 0,
    flowsPct: w.flows ? (100 * w.fastFlows) / w.flows : 0,
    packets: w.cross, heavyPct: w.cross ? (100 * w.stream) / w.cross : 0, flows: w.flows, keyExhausted: r.stats.counters.KEY_EXHAUSTED,
    violations: Object.values(r.violationCounts).reduce((a, n) => a + n, 0),
    allCross: r.stats.sent.cross,
    wholeRunPct: r.stats.sent.cross ? (100 * r.stats.masqueraded) / r.stats.sent.cross : 0,
    wallSeconds: (performance.now() - t0) / 1000,
  };
}

/** One point, as a job for a worker: the sweep by id (a sweep's setup is code, not data). */
export interface PointJob { sweep: string; quick: boolean; scheme: string; x: number; seed: number }

export function runPointJob(j: PointJob): Point {
  const sweep = sweeps(j.quick).find((s) => s.id === j.sweep);
  if (!sweep) throw new Error(`no sweep "${j.sweep}"`);
  return runPoint(j.scheme, sweep, j.x, j.seed);
}

serveJobs(import.meta.url, runPointJob);
