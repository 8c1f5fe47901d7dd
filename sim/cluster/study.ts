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
import { commandLine } from '../../testing/args.ts';
import { KEY_SCHEMES } from './datapath.ts';
import { sweeps, type Point, type PointJob, type Sweep } from './study-points.ts';
import { lineChart, type Series } from './svg.ts';
import { mapInWorkers, threadsOption } from './workers.ts';

const ROOT = new URL('../../', import.meta.url).pathname;

const USAGE = `usage: npm run sim:study -- [--quick] [--out DIR] [--schemes LIST] [--threads T] [--help] [--version]

Simulates a 2-host cluster for every point of five sweeps — pods per host under steady
all-to-all traffic and under microservice traffic, concurrent pod pairs per host pair, agent
expiry times, pod churn — and writes
DIR/sim-study.md with SVG plots of the fraction of packets and of flows on the fast path.

  --out DIR        where to write (default bench/results)
  --schemes LIST   key schemes to study, comma-separated (default: every scheme but
                   'overlay'; known: ${Object.keys(KEY_SCHEMES).join(', ')})
  --threads T      points run at once, each in its own worker thread (default: one per
                   core); the figures do not depend on it, only the time taken
  --quick          fewer points, shorter runs (a smoke test: numbers are rough)
  --help           this text
  --version        the checkout's version

Takes 20-35 s on 2 cores (--quick: about 10 s).`;

const pct = (v: number) => v.toFixed(1);

async function main(argv: string[]): Promise<number> {
  const line = commandLine('sim:study', USAGE, argv, { quick: { type: 'boolean' }, out: { type: 'string' }, schemes: { type: 'string' }, threads: { type: 'string' } });
  if (typeof line === 'number') return line;
  const args = line.values;
  const schemes = args.schemes?.split(',').map((x) => x.trim()).filter(Boolean) ?? Object.keys(KEY_SCHEMES).filter((n) => n !== 'overlay');
  const unknown = schemes.filter((n) => !KEY_SCHEMES[n]);
  if (unknown.length || !schemes.length) {
    process.stderr.write(`sim:study: unknown key scheme ${unknown.join(', ') || '(none given)'}; the schemes are ${Object.keys(KEY_SCHEMES).join(', ')}\n`);
    return 2;
  }
  const threads = threadsOption(args.threads);
  if (typeof threads === 'string') {
    process.stderr.write(`sim:study: ${threads}\n`);
    return 2;
  }
  const quick = !!args.quick;
  const out = args.out ?? join(ROOT, 'bench/results');
  mkdirSync(out, { recursive: true });

  const all = sweeps(quick);
  // Every point of every sweep, the longest first (the most pods, the longest runs), so no thread is left with one long point at the end.
  const jobs: PointJob[] = all.flatMap((sweep) => schemes.flatMap((scheme) => sweep.xs.map((x) => ({ sweep: sweep.id, quick, scheme, x, seed: 1 }))));
  const order = jobs.map((j, i) => ({ i, cost: cost(all.find((s) => s.id === j.sweep)!.setup(j.x)) })).sort((a, b) => b.cost - a.cost).map((o) => o.i);
  let done = 0;
  const t0 = performance.now();
  process.stderr.write(`sim:study: ${jobs.length} points on ${Math.min(threads, jobs.length)} threads\n`);
  const ran = await mapInWorkers<PointJob, Point>(new URL('./study-points.ts', import.meta.url), order.map((i) => jobs[i]), {
    threads,
    onResult: (k, p) => {
      done++;
      process.stderr.write(`sim:study [${done}/${jobs.length}] ${p.scheme} ${jobs[order[k]].sweep}=${p.x}: ${pct(p.packetsPct)}% of packets, ${pct(p.flowsPct)}% of flows on the fast path `
        + `(${p.packets} packets, ${p.wallSeconds.toFixed(1)} s)${p.violations ? `, ${p.violations} INVARIANT VIOLATIONS` : ''}\n`);
    },
  });
  const byJob = new Array<Point>(jobs.length);
  order.forEach((i, k) => (byJob[i] = ran[k]));
  const results = new Map<string, Point[]>();
  for (const sweep of all) {
    const points = byJob.filter((_, i) => jobs[i].sweep === sweep.id);
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
    'cross-host pod traffic only, after a warm-up. The hosts have conntrack, and the programs admit a flow only once it is established there, liberal and not NATed',
    '(sim/cluster/README.md, "The host stays in charge"): a TCP connection\'s packets cross the host stack until the agent\'s drain of ct_pending (every 10 ms)',
    'has made its entries liberal, ICMP always does, and so does a TCP connection\'s FIN. Key schemes:',
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
      + ' (short flows: a new TCP connection crosses the host stack until the agent, draining ct_pending every 10 ms, makes its conntrack entries liberal, so connections shorter than that never take the fast path; and flows between pairs that talk less often than the entries live learn the keys again).');
  }
  md.push('', `The last line is \`${headScheme}\` (${headScheme === 'wide' ? 'the default datapath, `--wide-keys on`' : 'the first scheme studied'}) under steady all-to-all traffic.`, '');
  const last = `fast-path packets: ${pct(headline.packetsPct)}% (110 pods/host, all-to-all)`;
  md.push(last);
  writeFileSync(join(out, 'sim-study.md'), `${md.join('\n')}\n`);
  process.stderr.write(`sim:study: wrote ${join(out, 'sim-study.md')} and ${all.length} SVG plots\n`);
  process.stdout.write(`${last}\n`);
  return 0;
}

/** A point's rough cost, to start the long ones first: pods × simulated time. */
function cost(setup: ReturnType<Sweep['setup']>): number {
  return setup.scenario.podsPerHost * setup.scenario.durationNs;
}

main(process.argv.slice(2)).then((code) => (process.exitCode = code), (e: Error) => {
  process.stderr.write(`sim:study: ${e.message}\n`);
  process.exitCode = 1;
});
