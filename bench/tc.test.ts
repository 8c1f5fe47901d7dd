/**
 * Smoke test of npm run bench:tc: the same code with few frames. runTcBench
 * itself refuses a number for frames that did not cross both hooks (each
 * reached b0; init and restore each passed it on, or nothing of ours ran).
 */
import { describe, expect, it } from 'vitest';
import { formatTcReport, runTcBench } from './tc.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'network namespaces, BPF');

describe('bench:tc', () => {
  it('measures every configuration, a few thousand frames each, and reports per hook over none', () => {
    const r = runTcBench({ rounds: 2, frames: 5000, cpu: 0 });
    expect(Object.keys(r.nsPerFrame)).toEqual(['none', 'xmasq cls_bpf', 'xmasq tcx', 'empty cls_bpf', 'empty tcx']);
    for (const [name, s] of Object.entries(r.nsPerFrame)) {
      expect(s.samples, name).toHaveLength(2);
      for (const x of s.samples) expect(x, name).toBeGreaterThan(0);
    }
    // Worked out here from the samples: per hook, half a configuration's median over none's;
    // tcx - cls_bpf, half the difference of the two in each round, its median (2 rounds: the upper).
    const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)];
    const ns = (name: string) => r.nsPerFrame[name].samples;
    expect(r.nsPerHook['xmasq tcx']).toBeCloseTo((median(ns('xmasq tcx')) - median(ns('none'))) / 2, 6);
    for (const p of ['xmasq', 'empty'] as const) {
      expect(r.tcxMinusClsBpfPerHook[p], p).toBeCloseTo(median(ns(`${p} tcx`).map((t, i) => (t - ns(`${p} cls_bpf`)[i]) / 2)), 6);
    }
    expect(formatTcReport(r)).toContain('| xmasq tcx |');
  });
});
