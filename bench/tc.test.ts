/**
 * Smoke test of npm run bench:tc: the same code with few frames. runTcBench
 * itself refuses a number for frames that did not cross both hooks (each
 * reached b0; init and restore each passed it on, or nothing of ours ran).
 */
import { describe, expect, it } from 'vitest';
import { formatTcReport, runTcBench } from './tc.ts';

if (process.getuid?.() !== 0) throw new Error('bench/tc.test.ts needs root (network namespaces, BPF): run it as root');

describe('bench:tc', () => {
  it('measures every configuration, a few thousand frames each, and reports per hook over none', () => {
    const r = runTcBench({ rounds: 2, frames: 5000, cpu: 0 });
    expect(Object.keys(r.nsPerFrame)).toEqual(['none', 'xmasq cls_bpf', 'xmasq tcx', 'empty cls_bpf', 'empty tcx']);
    for (const [name, s] of Object.entries(r.nsPerFrame)) {
      expect(s.samples, name).toHaveLength(2);
      for (const x of s.samples) expect(x, name).toBeGreaterThan(0);
    }
    // Per hook: half of a configuration's median over none's, worked out here from the samples.
    const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)];
    const perHook = (name: string) => (median(r.nsPerFrame[name].samples) - median(r.nsPerFrame.none.samples)) / 2;
    expect(r.tcxMinusClsBpfPerHook.xmasq).toBeCloseTo(perHook('xmasq tcx') - perHook('xmasq cls_bpf'), 6);
    expect(r.tcxMinusClsBpfPerHook.empty).toBeCloseTo(perHook('empty tcx') - perHook('empty cls_bpf'), 6);
    expect(formatTcReport(r)).toContain('| xmasq tcx |');
  });
});
