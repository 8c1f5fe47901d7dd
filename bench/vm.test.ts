/** bench:vm's report (bench/vm.ts): what it computes from a guest's samples, without a guest. */
import { expect, it } from 'vitest';
import type { BenchPath, BenchSample } from '../vm-tests/guest/rpeer-bench.ts';
import { markdown, pairedRatios, summarize } from './vm.ts';

const sample = (round: number, path: BenchPath, rr: number, p50: number, gbps: number): BenchSample =>
  ({ round, path, sockperf_rr_tps: rr, sockperf_p50_us: p50, iperf3_gbps: gbps });

// Three rounds: rpeer is 1.25x, 0.8x and 1.1x veth's RR, so the medians' ratio (1.1x, from
// medians 1100 and 1000) and the paired one (1.1x, range 0.8-1.25) differ in what they say.
const samples = [
  sample(1, 'host', 1000, 100, 1), sample(1, 'overlay', 500, 200, 0.5), sample(1, 'xmasq-veth', 800, 125, 0.8), sample(1, 'xmasq-rpeer', 1000, 110, 0.9),
  sample(2, 'xmasq-rpeer', 800, 130, 0.6), sample(2, 'xmasq-veth', 1000, 120, 0.75), sample(2, 'overlay', 600, 180, 0.5), sample(2, 'host', 1200, 90, 1),
  sample(3, 'host', 1100, 95, 1), sample(3, 'overlay', 550, 190, 0.5), sample(3, 'xmasq-veth', 1000, 120, 0.7), sample(3, 'xmasq-rpeer', 1100, 100, 0.7),
];

it('pairs each ratio round by round: median, min and max of the per-round ratios', () => {
  const p = pairedRatios(samples);
  expect(Object.keys(p)).toEqual(['xmasq-rpeer / host', 'xmasq-veth / host', 'xmasq-rpeer / xmasq-veth', 'xmasq-rpeer / overlay', 'xmasq-veth / overlay']);
  const rr = p['xmasq-rpeer / xmasq-veth'].sockperf_rr_tps;
  expect(rr.median).toBeCloseTo(1.1, 10);
  expect(rr.min).toBeCloseTo(0.8, 10);
  expect(rr.max).toBeCloseTo(1.25, 10);
  expect(rr.n).toBe(3);
  // host / overlay in every round: 2, 2, 2
  expect(p['xmasq-veth / overlay'].sockperf_rr_tps.min).toBeCloseTo(1.6, 10);
});

it('leaves out rounds that lack one of a ratio\'s paths', () => {
  const p = pairedRatios(samples.filter((s) => !(s.round === 2 && s.path === 'xmasq-veth')));
  expect(p['xmasq-rpeer / xmasq-veth'].sockperf_rr_tps.n).toBe(2);
  expect(p['xmasq-rpeer / host'].sockperf_rr_tps.n).toBe(3);
});

it('renders the paired table, marking a ratio whose rounds fall on both sides of 1', () => {
  const r = summarize({ date: '2026-12-07T00:00:00Z', kernel: '6.1', cpus: 2, cpu: 'qemu', rounds: 3, duration_s: 5, modes: {}, paths: ['host', 'overlay', 'xmasq-veth', 'xmasq-rpeer'], samples } as never, 'key');
  const md = markdown(r);
  expect(md).toContain('| xmasq-rpeer / xmasq-veth | 1.10× (0.80–1.25) ± |');
  expect(md).toContain('| xmasq-veth / overlay | 1.67× (1.60–1.82) |');
});
