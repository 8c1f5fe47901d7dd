/**
 * The event queue: a binary min-heap on (time, insertion order), so events at
 * the same instant run in the order they were scheduled and a run is
 * deterministic. Times and insertion numbers live in typed arrays beside the
 * items: the sift loops compare numbers without touching the items, whose
 * classes differ (a flow, a packet on the wire, an agent scan), and pushing
 * allocates nothing once the arrays have grown.
 */
export interface Scheduled {
  /** Simulated time in nanoseconds. */
  t: number;
}

/** Insertion numbers, shared by queues that are popped together (Lanes). */
export class Sequence {
  n = 0;
}

export class EventQueue<E extends Scheduled> {
  private times = new Float64Array(256);
  private seqs = new Float64Array(256);
  private items: Array<E | undefined> = new Array(256).fill(undefined);
  private n = 0;

  constructor(private readonly seq = new Sequence()) {}

  get size(): number {
    return this.n;
  }

  /** The first event's time and insertion number (when size > 0). */
  get topTime(): number {
    return this.times[0];
  }

  get topSeq(): number {
    return this.seqs[0];
  }

  push(e: E): void {
    if (this.n === this.times.length) this.grow();
    const t = e.t, s = this.seq.n++;
    const times = this.times, seqs = this.seqs, items = this.items;
    let i = this.n++;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!(t < times[p] || (t === times[p] && s < seqs[p]))) break;
      times[i] = times[p];
      seqs[i] = seqs[p];
      items[i] = items[p];
      i = p;
    }
    times[i] = t;
    seqs[i] = s;
    items[i] = e;
  }

  pop(): E | undefined {
    if (this.n === 0) return undefined;
    const times = this.times, seqs = this.seqs, items = this.items;
    const top = items[0];
    const n = --this.n;
    const t = times[n], s = seqs[n], last = items[n];
    items[n] = undefined;
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      if (l >= n) break;
      const r = l + 1;
      const c = r < n && (times[r] < times[l] || (times[r] === times[l] && seqs[r] < seqs[l])) ? r : l;
      if (!(times[c] < t || (times[c] === t && seqs[c] < s))) break;
      times[i] = times[c];
      seqs[i] = seqs[c];
      items[i] = items[c];
      i = c;
    }
    if (n > 0) {
      times[i] = t;
      seqs[i] = s;
      items[i] = last;
    }
    return top;
  }

  private grow(): void {
    const m = this.times.length * 2;
    const times = new Float64Array(m), seqs = new Float64Array(m);
    times.set(this.times);
    seqs.set(this.seqs);
    this.times = times;
    this.seqs = seqs;
    for (let i = this.items.length; i < m; i++) this.items.push(undefined);
  }
}

/**
 * Two queues popped as one, in (time, insertion) order over both: what one
 * queue would give. The simulator keeps packets on the wire (a few at a time)
 * apart from flows and timers (hundreds): a packet's push and pop then sift
 * through a heap of a few, and a sift's compares are branches the CPU cannot
 * predict.
 */
export class Lanes<A extends Scheduled, B extends Scheduled> {
  private readonly seq = new Sequence();
  readonly a = new EventQueue<A>(this.seq);
  readonly b = new EventQueue<B>(this.seq);

  get size(): number {
    return this.a.size + this.b.size;
  }

  pop(): A | B | undefined {
    const a = this.a, b = this.b;
    if (a.size === 0) return b.pop();
    if (b.size === 0) return a.pop();
    const ta = a.topTime, tb = b.topTime;
    return ta < tb || (ta === tb && a.topSeq < b.topSeq) ? a.pop() : b.pop();
  }
}
