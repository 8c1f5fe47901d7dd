/**
 * npm run sim:study [-- --quick] [-- --out DIR] [-- --schemes 6-bit,...]
 *
 * The capacity study: how much traffic takes the fast path, against pods per
 * host (steady all-to-all, and all-to-all microservices), concurrent pod pairs
 * per host pair, the agent's expiry times and pod churn, for each key scheme.
 * Writes DIR/sim-study.md with one SVG plot per sweep beside it; the report's
 * last line (also printed) is `fast-path packets: <pct>% (110 pods/host,
 * all-to-all)`, for steady all-to-all traffic on the default datapath (wide keys).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { join, relative } from 'node:path';
import { parseArgs } from 'node:util';
import { DEFAULT_TIMING, type AgentTiming } from './agent.ts';
import { Cluster } from './cluster.ts';
import { KEY_SCHEMES } from './datapath.ts';
import { Rng } from './rng.ts';
import type { ChurnSpec, FlowSpec, Scenario } from './scenario.ts';
import { lineChart, type Series } from './svg.ts';
import { MICROSERVICES, TrafficGenerator, type TrafficModel } from './traffic.ts';

const ROOT = new URL('../../', import.meta.url).pathname;

const USAGE = `usage: npm run sim:study -- [--quick] [--out DIR] [--schemes LIST] [--help]

Simulates a 2-host cluster for every point of five sweeps — pods per host under steady
all-to-all traffic and under microservice traffic, concurrent pod pairs per host pair, agent
expiry times, pod churn — and writes
DIR/sim-study.md with SVG plots of the fraction of packets and of flows on the fast path.

  --out DIR        where to write (default bench/results)
  --schemes LIST   key schemes to study, comma-separated (default: every scheme but
                   'overlay'; known: ${Object.keys(KEY_SCHEMES).join(', ')})
  --quick          fewer points, shorter runs (a smoke test: numbers are rough)
  --help           this text

Takes about 10 minutes on 2 cores (--quick: about 1).`;

interface Point {
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

interface Sweep {
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

function sweeps(quick: boolean): Sweep[] {
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
      describe: `${HOSTS} hosts; every pod talks to every pod of the other host (pods² pairs per host pair), each pair a request or a response every ${STEADY_GAP_NS / 1e6} ms, starting at a random time in the first 2 s; TCP, UDP or ICMP echo by pair (80/17/3%); agent defaults; ${quick ? 6 : 12} s simulated, the first third not counted: every pair learns its keys in it, with its first two packets (one each way) over the overlay, as the whole-run column shows`,
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

function runPoint(scheme: string, sweep: Sweep, x: number, seed: number): Point {
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

const pct = (v: number) => v.toFixed(1);

function main(argv: string[]): number {
  let args;
  try {
    args = parseArgs({ args: argv, options: { quick: { type: 'boolean' }, out: { type: 'string' }, schemes: { type: 'string' }, help: { type: 'boolean', short: 'h' } }, strict: true }).values;
  } catch (e) {
    process.stderr.write(`sim:study: ${(e as Error).message}\n\n${USAGE}\n`);
    return 2;
  }
  if (args.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const schemes = args.schemes?.split(',').map((x) => x.trim()).filter(Boolean) ?? Object.keys(KEY_SCHEMES).filter((n) => n !== 'overlay');
  const unknown = schemes.filter((n) => !KEY_SCHEMES[n]);
  if (unknown.length || !schemes.length) {
    process.stderr.write(`sim:study: unknown key scheme ${unknown.join(', ') || '(none given)'}; the schemes are ${Object.keys(KEY_SCHEMES).join(', ')}\n`);
    return 2;
  }
  const quick = !!args.quick;
  const out = args.out ?? join(ROOT, 'bench/results');
  mkdirSync(out, { recursive: true });

  const all = sweeps(quick);
  const total = all.reduce((a, s) => a + s.xs.length, 0) * schemes.length;
  const results = new Map<string, Point[]>();
  let done = 0;
  const t0 = performance.now();
  for (const sweep of all) {
    const points: Point[] = [];
    for (const scheme of schemes) {
      for (const x of sweep.xs) {
        const p = runPoint(scheme, sweep, x, 1);
        points.push(p);
        done++;
        process.stderr.write(`sim:study [${done}/${total}] ${scheme} ${sweep.id}=${x}: ${pct(p.packetsPct)}% of packets, ${pct(p.flowsPct)}% of flows on the fast path `
          + `(${p.packets} packets, ${p.wallSeconds.toFixed(1)} s)${p.violations ? `, ${p.violations} INVARIANT VIOLATIONS` : ''}\n`);
      }
    }
    results.set(sweep.id, points);
    const series: Series[] = schemes.flatMap((scheme) => {
      const ps = points.filter((p) => p.scheme === scheme);
      if (sweep.plotViolations) {
        return [
          { name: `${scheme}: packets`, points: ps.map((p) => [p.x, p.packetsPct] as [number, number]) },
          { name: `${scheme}: misdelivered/10⁵`, points: ps.map((p) => [p.x, p.allCross ? (1e5 * p.violations) / p.allCross : 0] as [number, number]), dashed: true },
        ];
      }
      return [
        { name: `${scheme}: packets`, points: ps.map((p) => [p.x, p.packetsPct] as [number, number]) },
        { name: `${scheme}: flows`, points: ps.map((p) => [p.x, p.flowsPct] as [number, number]), dashed: true },
        ...(sweep.id === 'pairs' ? [] : [{ name: `${scheme}: packets w/o heavy`, points: ps.map((p) => [p.x, p.micePct] as [number, number]), dotted: true }]),
      ];
    });
    const yMax = Math.max(100, ...series.flatMap((x) => x.points.map((p) => Math.ceil(p[1] / 100) * 100)));
    writeFileSync(join(out, `sim-study-${sweep.id}.svg`), lineChart({
      title: sweep.title, xLabel: sweep.xLabel, yLabel: sweep.plotViolations ? '% on the fast path; misdelivered per 100,000' : '% on the fast path', series, xLog: sweep.xLog, yMax,
    }));
  }

  // The headline: the shipped datapath (wide keys) if studied, under steady all-to-all traffic.
  const headScheme = schemes.includes('wide') ? 'wide' : schemes[0];
  const headline = results.get('steady')!.find((p) => p.scheme === headScheme && p.x === 110)!;
  const md: string[] = [
    '# Capacity study: how much traffic takes the fast path',
    '',
    `Generated by \`npm run sim:study${quick ? ' -- --quick' : ''}\` (sim/cluster/study.ts) on ${new Date().toISOString().slice(0, 10)}, `
      + `${cpus()[0]?.model ?? 'unknown CPU'} × ${cpus().length}, in ${((performance.now() - t0) / 1000).toFixed(0)} s.${quick ? ' **Quick run: short, few points, rough numbers.**' : ''}`,
    '',
    'Every packet of the simulated cluster runs through the model programs at their hooks (sim/cluster/README.md).',
    'A packet is on the fast path when masq carried it; a flow is when at least one of its packets was. Counted over',
    'cross-host pod traffic only, after a warm-up. Key schemes:',
    '',
    ...schemes.map((n) => `- \`${n}\`: ${KEY_SCHEMES[n].describe}`),
    '',
  ];
  for (const sweep of all) {
    const points = results.get(sweep.id)!;
    md.push(`## ${sweep.title}`, '', sweep.describe + '.', '', `![${sweep.title}](${relative(out, join(out, `sim-study-${sweep.id}.svg`))})`, '');
    md.push(`| scheme | ${sweep.xLabel} | packets on fast path | the same without heavy streams | flows on fast path | packets counted (of which heavy streams) | flows counted | packets on fast path, whole run (warm-up included) | KEY_EXHAUSTED | invariant violations (whole run) |`);
    md.push('|---|---|---|---|---|---|---|---|---|---|');
    for (const p of points) {
      // Flows are counted when they start after the warm-up; the steady sweep's all start before.
      const flows = p.flows ? `${pct(p.flowsPct)}%` : '—';
      md.push(`| ${p.scheme} | ${p.x} | ${pct(p.packetsPct)}% | ${pct(p.micePct)}% | ${flows} | ${p.packets} (${pct(p.heavyPct)}%) | ${p.flows} | ${pct(p.wholeRunPct)}% | ${p.keyExhausted} | ${p.violations} |`);
    }
    md.push('');
  }
  const violations = [...results.values()].flat().reduce((a, p) => a + p.violations, 0);
  if (violations) {
    md.push(`**${violations} invariant violation(s)** in these runs: packets delivered into a pod they were not for (or otherwise against the invariants); see "findings" in sim/cluster/README.md.`, '');
  }
  md.push('## Summary at 110 pods per host', '');
  for (const scheme of schemes) {
    const steady = results.get('steady')!.find((p) => p.scheme === scheme && p.x === 110)!;
    const mice = results.get('pods')!.find((p) => p.scheme === scheme && p.x === 110)!;
    md.push(`- \`${scheme}\`: ${pct(steady.packetsPct)}% of packets on the fast path under steady all-to-all traffic, ${pct(mice.packetsPct)}% under all-to-all microservices`
      + ' (short flows between pairs that talk less often than the entries live: each flow\'s first packets teach the keys over the overlay).');
  }
  md.push('', `The last line is \`${headScheme}\` (${headScheme === 'wide' ? 'the default datapath, `--wide-keys on`' : 'the first scheme studied'}) under steady all-to-all traffic.`, '');
  const last = `fast-path packets: ${pct(headline.packetsPct)}% (110 pods/host, all-to-all)`;
  md.push(last);
  writeFileSync(join(out, 'sim-study.md'), `${md.join('\n')}\n`);
  process.stderr.write(`sim:study: wrote ${join(out, 'sim-study.md')} and ${all.length} SVG plots\n`);
  process.stdout.write(`${last}\n`);
  return 0;
}

process.exitCode = main(process.argv.slice(2));
