/**
 * The event queue: a binary min-heap on (time, insertion order), so events at
 * the same instant run in the order they were scheduled and a run is
 * deterministic.
 */
export interface Scheduled {
  /** Simulated time in nanoseconds. */
  t: number;
  seq: number;
}

export class EventQueue<E extends Scheduled> {
  private heap: E[] = [];
  private seq = 0;

  get size(): number {
    return this.heap.length;
  }

  push(e: E): void {
    e.seq = this.seq++;
    const h = this.heap;
    let i = h.length;
    h.push(e);
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!before(e, h[p])) break;
      h[i] = h[p];
      i = p;
    }
    h[i] = e;
  }

  pop(): E | undefined {
    const h = this.heap;
    const top = h[0];
    const last = h.pop();
    if (h.length === 0 || last === undefined) return top;
    let i = 0;
    const n = h.length;
    for (;;) {
      const l = 2 * i + 1;
      if (l >= n) break;
      const r = l + 1;
      const c = r < n && before(h[r], h[l]) ? r : l;
      if (!before(h[c], last)) break;
      h[i] = h[c];
      i = c;
    }
    h[i] = last;
    return top;
  }
}

function before(a: Scheduled, b: Scheduled): boolean {
  return a.t < b.t || (a.t === b.t && a.seq < b.seq);
}
