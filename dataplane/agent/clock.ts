/**
 * The programs' clock (bpf/maps.h xmasq_now): the agent tells the length of
 * the kernel's jiffy and the coarse time at a jiffy, so that the full paths
 * turn bpf_jiffies64(), which the verifier inlines on x86-64, into
 * CLOCK_MONOTONIC_COARSE nanoseconds instead of calling
 * bpf_ktime_get_coarse_ns(). Both come from clock_probe (bpf/xmasq.bpf.c),
 * which reads jiffies and the coarse clock in one BPF_PROG_TEST_RUN: user
 * space has no way to read jiffies.
 *
 * Jiffies and the coarse clock both move at the tick, but not at the same
 * instant: the tick handler advances jiffies first and the timekeeping a
 * moment later, so a probe in between sees the new jiffy with the old time.
 * Of a burst of probes, the one with the latest time and, for that time, the
 * lowest jiffy is the one read with both settled.
 */
import { skbCtx, SK_BUFF_OFFSETS, type BpfMap, type BpfProgram } from '../libbpf.ts';
import { arrayIndex, clock, ProbeCb, type Clock } from '../maps.ts';
import type { Log } from './log.ts';
import type { ClockStatus } from './protocol.ts';

export interface ClockSample {
  jiffies: bigint;
  /** bpf_ktime_get_coarse_ns(): CLOCK_MONOTONIC_COARSE. */
  coarseNs: bigint;
}

/** The kernel's choices of CONFIG_HZ. */
export const HZ_CHOICES = [100, 250, 300, 1000] as const;

/** A jiffy's length at hz, as the kernel rounds it (TICK_NSEC: (NSEC_PER_SEC + HZ/2) / HZ). */
export function tickNsOf(hz: number): bigint {
  return (1_000_000_000n + BigInt(hz) / 2n) / BigInt(hz);
}

/** How far apart calibrate() takes its two bursts: 250 and 300 Hz then differ by 5 jiffies. */
export const CALIBRATION_GAP_MS = 100;
/** Measurements calibrate() makes before it gives up (each CALIBRATION_GAP_MS). */
export const CALIBRATION_TRIES = 3;
/** Probes in a burst: a few µs each. */
const BURST = 8;

const ZERO = arrayIndex.encode({ index: 0 });
const CB = SK_BUFF_OFFSETS.cb;

/** One run of clock_probe: jiffies and the coarse clock, read a few instructions apart. */
export function probeClock(probe: BpfProgram): ClockSample {
  const r = probe.testRun({ data: Buffer.alloc(14), ctx: skbCtx() });
  const ctx = r.ctx!;
  const u64 = (lo: number, hi: number) => (BigInt(ctx.readUInt32LE(CB + 4 * hi)) << 32n) | BigInt(ctx.readUInt32LE(CB + 4 * lo));
  return { jiffies: u64(ProbeCb.JIFFIES_LO, ProbeCb.JIFFIES_HI), coarseNs: u64(ProbeCb.COARSE_LO, ProbeCb.COARSE_HI) };
}

/** A burst of probes, reduced to the one read with jiffies and the clock both settled (above). */
export function probeSettled(probe: BpfProgram, n = BURST): ClockSample {
  let best: ClockSample | undefined;
  for (let i = 0; i < n; i++) best = settledOf(best, probeClock(probe));
  return best!;
}

/** Of two samples, the later time, and for one time the lower jiffy. */
export function settledOf(a: ClockSample | undefined, b: ClockSample): ClockSample {
  if (!a || b.coarseNs > a.coarseNs || (b.coarseNs === a.coarseNs && b.jiffies < a.jiffies)) return b;
  return a;
}

/**
 * The tick from two settled samples some tens of ms apart: the one length of
 * HZ_CHOICES whose jiffies over the time between them is within 1.5 of the
 * jiffies counted (a sample caught between the two updates is one off; the
 * tick handler runs a little late now and then). A reason instead when none
 * fits, or more than one (the samples too close together).
 */
export function tickFrom(a: ClockSample, b: ClockSample): { hz: number; tickNs: bigint } | { why: string } {
  const dj = Number(b.jiffies - a.jiffies);
  const dns = Number(b.coarseNs - a.coarseNs);
  const what = `${dj} jiffies in ${(dns / 1e6).toFixed(3)} ms`;
  if (dj <= 0 || dns <= 0) return { why: `${what} between two probes` };
  const fits = HZ_CHOICES.filter((hz) => Math.abs(dj - (dns * hz) / 1e9) <= 1.5);
  if (fits.length !== 1) return { why: `${what} fits ${fits.length ? `each of HZ ${fits.join(', ')}` : `no HZ of ${HZ_CHOICES.join(', ')}`}` };
  return { hz: fits[0], tickNs: tickNsOf(fits[0]) };
}

/**
 * The map's value for a settled sample s at tick tickNs. It keeps the base
 * jiffy of prev (what the map holds) when prev has the same tick and a base
 * jiffy not after s's, so that a re-base changes base_ns alone: a program
 * reading the map while it is written then sees either value of the one
 * field that changed, each a time within a tick or so of the coarse clock,
 * never a new base_ns with an old base_jiffies.
 */
export function clockFor(s: ClockSample, tickNs: bigint, prev?: Clock): Clock {
  if (prev && prev.tick_ns === tickNs && prev.base_jiffies !== 0n && prev.base_jiffies <= s.jiffies) {
    return { base_ns: BigInt.asUintN(64, s.coarseNs - (s.jiffies - prev.base_jiffies) * tickNs), base_jiffies: prev.base_jiffies, tick_ns: tickNs };
  }
  return { base_ns: s.coarseNs, base_jiffies: s.jiffies, tick_ns: tickNs };
}

/** The programs' now for a clock value and a probe (bpf/maps.h xmasq_now, u64 arithmetic). */
export function clockNow(c: Clock, s: ClockSample): bigint {
  if (c.tick_ns === 0n) return s.coarseNs;
  return BigInt.asUintN(64, c.base_ns + BigInt.asUintN(64, s.jiffies - c.base_jiffies) * c.tick_ns);
}

function sleepMs(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/**
 * The kernel's tick from two settled samples CALIBRATION_GAP_MS apart (blocks
 * that long), and the later sample; throws what the probe throws.
 */
export function measureTick(probe: BpfProgram): { tick: ReturnType<typeof tickFrom>; last: ClockSample } {
  const a = probeSettled(probe);
  sleepMs(CALIBRATION_GAP_MS);
  const b = probeSettled(probe);
  return { tick: tickFrom(a, b), last: b };
}

/**
 * Keeps the clock map: calibrate() at start (blocks CALIBRATION_GAP_MS: the
 * agent's start is synchronous from the load to the attach), rebase() at
 * every expiry scan. The map is pinned with the others: the programs of an
 * earlier agent, attached until this one replaces them, read the same map,
 * and programs left attached after the agent stops (SIGUSR2, a crash) keep a
 * clock within a tick or so of the coarse one for as long as jiffies follow
 * CLOCK_MONOTONIC, which they do by construction (the tick advances jiffies
 * by the monotonic time elapsed). An agent that cannot tell the tick writes
 * tick_ns 0: the programs read the coarse clock, a helper call a packet.
 */
export class ClockKeeper {
  /** The tick found at start; undefined: none (the map holds tick_ns 0). */
  tickNs: bigint | undefined;
  hz: number | undefined;
  /** Why the last re-base failed; undefined once one works. */
  private failing: string | undefined;
  /** Why the tick is unknown; undefined while there is one. */
  private why: string | undefined;
  /** A base the last re-base found moved, written if the next finds it too (write). */
  private moved: Clock | undefined;

  constructor(private readonly map: BpfMap, private readonly probe: BpfProgram, private readonly log: Log) {}

  /**
   * Tells the tick and writes the map; on failure writes tick_ns 0 and logs
   * why. Never throws. Up to CALIBRATION_TRIES measurements: on a loaded
   * machine a tick handled late can put one sample a few jiffies off.
   */
  calibrate(): void {
    try {
      let m = measureTick(this.probe);
      for (let i = 1; i < CALIBRATION_TRIES && 'why' in m.tick; i++) m = measureTick(this.probe);
      const { tick: t, last: b } = m;
      if ('why' in t) {
        this.uncalibrated(`could not tell the kernel's tick (${t.why})`);
        return;
      }
      this.tickNs = t.tickNs;
      this.hz = t.hz;
      this.why = undefined;
      const c = this.write(b);
      this.log.info(`clock: HZ ${t.hz} (a jiffy ${t.tickNs} ns); the programs read jiffies from ${c.base_jiffies} (coarse ${c.base_ns} ns) instead of the coarse clock`);
    } catch (e) {
      this.uncalibrated(`the probe failed: ${(e as Error).message.split('\n')[0]}`);
    }
  }

  /**
   * A fresh base for the tick found at start, written only if the map's is
   * more than two ticks off it and the next re-base finds the same (write).
   * Never throws: a failure leaves the last base, logged when it starts or
   * changes.
   */
  rebase(): void {
    if (this.tickNs === undefined) return;
    try {
      this.write(probeSettled(this.probe, 4), true);
      if (this.failing) this.log.info('clock: re-based again');
      this.failing = undefined;
    } catch (e) {
      const msg = (e as Error).message.split('\n')[0];
      if (this.failing !== msg) this.log.warn(`clock: re-basing failed (${msg}): the programs keep the last base`);
      this.failing = msg;
    }
  }

  /** What status and /metrics report. */
  status(): ClockStatus {
    if (this.tickNs === undefined) return { reason: this.why ?? 'not calibrated yet' };
    return { hz: this.hz, tickNs: Number(this.tickNs), ...(this.failing ? { reason: `re-basing failed: ${this.failing}` } : {}) };
  }

  /** The map's value now. */
  read(): Clock {
    return clock.decode(this.map.lookup(ZERO)!);
  }

  /**
   * The map's one slot is copied field after field while programs read it.
   * A re-base changes base_ns alone (clockFor); anything more (a first
   * calibration, another tick) goes through tick_ns 0, each write changing
   * one field or none that a program reads: the old clock, the coarse clock,
   * then the new one, never a mix of two clocks' fields.
   *
   * Nor is one field promised to land whole: the syscall copies the value
   * with memcpy, which may move an 8-byte field in smaller pieces. So a
   * re-base writes base_ns only when the map's is more than two ticks off,
   * which it does not become: jiffies advance by the monotonic time
   * elapsed, a whole tick at a time (tick_do_update_jiffies64), so the base
   * found at start stays right to within the tick handler's latency. A single
   * burst can still read a jiffy and a time of two ticks, a base a tick off
   * either way: on this VM ~0.4% of bursts made a few ms apart, and ~30% of
   * bursts made right after the thread slept (the idle CPU's jiffies are
   * brought up to date a little after its clock), as the agent's scans are.
   * The programs' own reads of jiffies lag the same way, so a tick either way
   * is the clock's accuracy, not a drift; and a re-base writes a base moved
   * further only when the next re-base, a scan later, finds it too.
   */
  private write(s: ClockSample, rebasing = false): Clock {
    const prev = this.read();
    const c = clockFor(s, this.tickNs!, prev);
    const apart = (x: Clock, y: Clock) => 2n * (x.base_ns > y.base_ns ? x.base_ns - y.base_ns : y.base_ns - x.base_ns) > 4n * x.tick_ns;
    if (c.base_jiffies !== prev.base_jiffies || c.tick_ns !== prev.tick_ns) {
      if (prev.tick_ns !== 0n) this.map.update(ZERO, clock.encode({ ...prev, tick_ns: 0n }));
      this.map.update(ZERO, clock.encode({ ...c, tick_ns: 0n }));
      this.map.update(ZERO, clock.encode(c));
      this.moved = undefined;
      return c;
    }
    if (!apart(c, prev)) {
      this.moved = undefined;
      return prev;
    }
    if (rebasing && !(this.moved && !apart(this.moved, c))) {
      this.moved = c;
      return prev;
    }
    this.moved = undefined;
    this.map.update(ZERO, clock.encode(c));
    return c;
  }

  private uncalibrated(why: string): void {
    this.tickNs = undefined;
    this.hz = undefined;
    this.why = why;
    try {
      // tick_ns alone: a program reading the slot meanwhile gets the old clock or the coarse one.
      this.map.update(ZERO, clock.encode({ ...this.read(), tick_ns: 0n }));
    } catch (e) {
      this.log.warn(`clock: writing tick_ns 0 failed: ${(e as Error).message}`);
    }
    this.log.warn(`clock: ${why}: the programs read the coarse clock (bpf_ktime_get_coarse_ns, a helper call a packet)`);
  }
}
