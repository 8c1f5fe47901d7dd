import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { EventQueue } from './events.ts';

describe('sim/cluster event queue', () => {
  it('pops in time order, and events at the same time in the order they were pushed', () => {
    fc.assert(fc.property(fc.array(fc.nat(20), { maxLength: 200 }), (times) => {
      const q = new EventQueue<{ t: number; seq: number; n: number }>();
      times.forEach((t, n) => q.push({ t, seq: 0, n }));
      const got: Array<[number, number]> = [];
      for (let e = q.pop(); e; e = q.pop()) got.push([e.t, e.n]);
      const want = times.map((t, n) => [t, n] as [number, number]).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
      expect(got).toEqual(want);
    }));
  });
});
