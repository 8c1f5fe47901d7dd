/**
 * The event queue: a binary min-heap on (time, insertion order), so events at
 * the same instant run in the order they were scheduled and a run is
 * deterministic. The heap itself is three typed arrays: times, insertion
 * numbers, and the number of the slot that holds each event. Sifts move
 * numbers only; an event is stored once when pushed and once when popped.
 * (Moving the events themselves through a JS array cost a write barrier per
 * move, most events being younger than the array: ~7% of a simulator run.)
 * Nothing is allocated once the arrays have grown.
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
  private slotOf = new Int32Array(256);
  /** Events by slot; a slot is free again once its event is popped (free, a stack of slot numbers). */
  private slots: Array<E | undefined> = new Array(256).fill(undefined);
  private free = new Int32Array(256);
  private nFree = 0;
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
    // Slots in use are exactly the n events queued: a free one, or the next never used.
    const slot = this.nFree > 0 ? this.free[--this.nFree] : this.n;
    this.slots[slot] = e;
    const t = e.t, s = this.seq.n++;
    const times = this.times, seqs = this.seqs, slotOf = this.slotOf;
    let i = this.n++;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!(t < times[p] || (t === times[p] && s < seqs[p]))) break;
      times[i] = times[p];
      seqs[i] = seqs[p];
      slotOf[i] = slotOf[p];
      i = p;
    }
    times[i] = t;
    seqs[i] = s;
    slotOf[i] = slot;
  }

  pop(): E | undefined {
    if (this.n === 0) return undefined;
    const times = this.times, seqs = this.seqs, slotOf = this.slotOf;
    const topSlot = slotOf[0];
    const top = this.slots[topSlot];
    this.slots[topSlot] = undefined;
    this.free[this.nFree++] = topSlot;
    const n = --this.n;
    const t = times[n], s = seqs[n], last = slotOf[n];
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      if (l >= n) break;
      const r = l + 1;
      const c = r < n && (times[r] < times[l] || (times[r] === times[l] && seqs[r] < seqs[l])) ? r : l;
      if (!(times[c] < t || (times[c] === t && seqs[c] < s))) break;
      times[i] = times[c];
      seqs[i] = seqs[c];
      slotOf[i] = slotOf[c];
      i = c;
    }
    if (n > 0) {
      times[i] = t;
      seqs[i] = s;
      slotOf[i] = last;
    }
    return top;
  }

  private grow(): void {
    const m = this.times.length * 2;
    const times = new Float64Array(m), seqs = new Float64Array(m), slotOf = new Int32Array(m), free = new Int32Array(m);
    times.set(this.times);
    seqs.set(this.seqs);
    slotOf.set(this.slotOf);
    free.set(this.free);
    this.times = times;
    this.seqs = seqs;
    this.slotOf = slotOf;
    this.free = free;
    for (let i = this.slots.length; i < m; i++) this.slots.push(undefined);
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
