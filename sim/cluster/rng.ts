/**
 * A small seeded generator (splitmix32-style mixing of a counter) and the
 * distributions the traffic generator draws from. Every run of the simulator
 * is a function of its scenario and seed, so a failing case replays exactly.
 */
export class Rng {
  /** The counter's 32 bits as an int32: a small integer to V8, so storing it allocates nothing (a u32 past 2^31 would be a heap number). */
  private state: number;

  constructor(seed: number) {
    this.state = seed | 0;
  }

  /** A uniform 32-bit unsigned integer, like one bpf_get_prandom_u32(). */
  u32(): number {
    let z = (this.state = (this.state + 0x9e3779b9) | 0) >>> 0;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  }

  /** Uniform in [0, 1). */
  next(): number {
    return this.u32() / 0x100000000;
  }

  /** Uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  exponential(mean: number): number {
    return -mean * Math.log(1 - this.next());
  }

  /** Log-normal with the given median and shape sigma: most values near the median, a long right tail. */
  lognormal(median: number, sigma: number): number {
    const u = 1 - this.next();
    const v = this.next();
    const z = Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
    return median * Math.exp(sigma * z);
  }
}
