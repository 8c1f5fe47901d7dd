import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { EventQueue, Lanes } from './events.ts';

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

  it('pops the earliest event at any point of pushes and pops interleaved', () => {
    // Each op pushes an event at a time (a number) or pops (null); a sorted list is the reference.
    fc.assert(fc.property(fc.array(fc.option(fc.nat(50), { freq: 3 }), { maxLength: 400 }), (ops) => {
      const q = new EventQueue<{ t: number; n: number }>();
      const ref: Array<{ t: number; n: number }> = [];
      ops.forEach((t, n) => {
        if (t !== null) {
          const e = { t, n };
          q.push(e);
          ref.push(e);
          ref.sort((a, b) => a.t - b.t || a.n - b.n);
        } else expect(q.pop()).toBe(ref.shift());
        expect(q.size).toBe(ref.length);
      });
    }));
  });

  it('two lanes pop as one queue would: by time, then by the order pushed over both', () => {
    fc.assert(fc.property(fc.array(fc.tuple(fc.nat(20), fc.boolean()), { maxLength: 200 }), (pushes) => {
      const q = new Lanes<{ t: number; n: number }, { t: number; n: number }>();
      pushes.forEach(([t, lane], n) => (lane ? q.a : q.b).push({ t, n }));
      const got: Array<[number, number]> = [];
      for (let e = q.pop(); e; e = q.pop()) got.push([e.t, e.n]);
      const want = pushes.map(([t], n) => [t, n] as [number, number]).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
      expect(got).toEqual(want);
      expect(q.size).toBe(0);
    }));
  });
});
