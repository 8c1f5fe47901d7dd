/**
 * The clock map's calibration (clock.ts) against the real kernel: the test
 * build's object loaded (its clock map and clock_probe; nothing attached).
 * What the programs compute from the map (xmasq_now, the fallback at tick_ns
 * 0 among it) the differential run holds against the model, whose clock the
 * harness reads around each run; the agent's own start is in agent.test.ts.
 */
import { existsSync, readFileSync } from 'node:fs';
import { release } from 'node:os';
import { gunzipSync } from 'node:zlib';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { BpfObject, type BpfMap, type BpfProgram } from '../libbpf.ts';
import { UNCALIBRATED, arrayIndex, clock, type Clock } from '../maps.ts';
import type { Log } from './log.ts';
import { monotonicCoarseNs } from './native.ts';
import { ClockKeeper, HZ_CHOICES, clockFor, clockNow, probeClock, probeSettled, tickFrom, tickNsOf, type ClockSample } from './clock.ts';
import { requireRoot } from '../../testing/privileges.ts';

const TEST_OBJECT = fileURLToPath(new URL('../../bpf/build/xmasq.test.bpf.o', import.meta.url));
const ZERO = arrayIndex.encode({ index: 0 });

requireRoot(import.meta.url, 'a BPF object: CAP_BPF');
const obj = BpfObject.open(TEST_OBJECT);
obj.load();
afterAll(() => obj.close());
const map = obj.map('clock');
const probe = obj.program('clock_probe');

/** Blocks the thread for ms, as the agent's scans are apart (Atomics.wait: no timer needed). */
function sleepMs(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function logged(): Log & { lines: string[] } {
  const lines: string[] = [];
  const add = (level: string) => (m: string) => lines.push(`${level}: ${m}`);
  return { lines, info: add('info'), warn: add('warn'), error: add('error'), debug: add('debug') };
}

/**
 * CONFIG_HZ of the running kernel, from its config where it is installed
 * (Debian's /boot) or built in (/proc/config.gz): an oracle the calibration
 * does not read.
 */
function configHz(): { hz: number; from: string } | undefined {
  for (const [from, read] of [
    [`/boot/config-${release()}`, (f: string) => readFileSync(f, 'utf8')],
    ['/proc/config.gz', (f: string) => gunzipSync(readFileSync(f)).toString('utf8')],
  ] as const) {
    if (!existsSync(from)) continue;
    const m = /^CONFIG_HZ=(\d+)$/m.exec(read(from));
    if (m) return { hz: Number(m[1]), from };
  }
  return undefined;
}

describe('clock calibration on the kernel', () => {
  it('a probe reads jiffies and the coarse clock user space reads', () => {
    const before = monotonicCoarseNs();
    const s = probeClock(probe);
    const after = monotonicCoarseNs();
    expect(s.jiffies).toBeGreaterThan(0n);
    expect(s.coarseNs >= before && s.coarseNs <= after, `${before} <= ${s.coarseNs} <= ${after}`).toBe(true);
  });

  it('tells the kernel\'s tick and writes a clock whose now stays within two ticks of CLOCK_MONOTONIC_COARSE', () => {
    map.update(ZERO, clock.encode(UNCALIBRATED));
    const log = logged();
    const k = new ClockKeeper(map, probe, log);
    k.calibrate();
    expect(log.lines.filter((l) => l.startsWith('warn')), log.lines.join('\n')).toEqual([]);
    expect(HZ_CHOICES).toContain(k.hz);
    const cfg = configHz();
    if (cfg) expect(k.hz, `CONFIG_HZ=${cfg.hz} in ${cfg.from}`).toBe(cfg.hz);
    else console.log(`no /boot/config-${release()} nor /proc/config.gz: the tick (HZ ${k.hz}) is not checked against CONFIG_HZ`);
    const c = clock.decode(map.lookup(ZERO)!);
    expect(c.tick_ns).toBe(tickNsOf(k.hz!));
    expect(k.status()).toEqual({ hz: k.hz, tickNs: Number(c.tick_ns) });
    // For ~300 ms, re-based now and then as the scan does: the map's now for a fresh
    // probe's jiffies against the coarse clock user space reads around it.
    const tick = c.tick_ns;
    const worst: bigint[] = [];
    const end = Date.now() + 300;
    for (let i = 0; Date.now() < end; i++) {
      if (i % 50 === 0) k.rebase();
      const before = monotonicCoarseNs();
      const now = clockNow(clock.decode(map.lookup(ZERO)!), probeClock(probe));
      const after = monotonicCoarseNs();
      const off = now < before ? now - before : now > after ? now - after : 0n;
      worst.push(off < 0n ? -off : off);
    }
    const max = worst.reduce((a, b) => (a > b ? a : b), 0n);
    expect(max <= 2n * tick, `the map's now was ${max} ns off the coarse clock (a tick is ${tick} ns)`).toBe(true);
  });

  it('a base found moved by two re-bases in a row is written: base_jiffies kept, base_ns alone moved', () => {
    const k = new ClockKeeper(map, probe, logged());
    k.calibrate();
    const a = clock.decode(map.lookup(ZERO)!);
    const off = { ...a, base_ns: a.base_ns + 5n * a.tick_ns };
    map.update(ZERO, clock.encode(off));
    k.rebase();
    expect(clock.decode(map.lookup(ZERO)!), 'after one re-base').toEqual(off);
    sleepMs(20); // scans are a second apart: a burst and the next are not
    k.rebase();
    const b = clock.decode(map.lookup(ZERO)!);
    expect(b.base_jiffies).toBe(a.base_jiffies);
    expect(b.tick_ns).toBe(a.tick_ns);
    const d = b.base_ns > a.base_ns ? b.base_ns - a.base_ns : a.base_ns - b.base_ns;
    // a burst, as the calibration's, may read a tick off either way
    expect(d <= 2n * a.tick_ns, `re-based ${d} ns from the calibration`).toBe(true);
  });

  it('re-bases leave a base within half a tick of theirs as it is: no write while programs read the map', () => {
    const k = new ClockKeeper(map, probe, logged());
    k.calibrate();
    // The base most bursts agree on (a single one can read a jiffy and a time of two ticks).
    const c0 = clock.decode(map.lookup(ZERO)!);
    const bases = Array.from({ length: 7 }, () => clockFor(probeSettled(probe, 4), c0.tick_ns, c0).base_ns).sort((x, y) => (x < y ? -1 : x > y ? 1 : 0));
    const a = { ...c0, base_ns: bases[3] };
    for (const off of [0n, a.tick_ns / 2n, -(a.tick_ns / 2n)]) {
      const near = { ...a, base_ns: a.base_ns + off };
      map.update(ZERO, clock.encode(near));
      // ten re-bases, 20 ms apart (the agent's scans are a second apart)
      for (let i = 0; i < 10; i++) {
        k.rebase();
        sleepMs(20);
      }
      expect(clock.decode(map.lookup(ZERO)!), `a base ${off} ns off`).toEqual(near);
    }
  });

  it('a probe that fails leaves tick_ns 0, says why in its status and its log, and stays so on a re-base', () => {
    map.update(ZERO, clock.encode({ base_ns: 5n, base_jiffies: 7n, tick_ns: 4_000_000n }));
    // The kernel refusing the test run, as it would a program of another type.
    const refusing = { testRun: () => { throw new Error('bpf_prog_test_run_opts: Invalid argument'); } } as unknown as BpfProgram;
    const log = logged();
    const k = new ClockKeeper(map, refusing, log);
    k.calibrate();
    k.rebase();
    expect(clock.decode(map.lookup(ZERO)!)).toEqual({ base_ns: 5n, base_jiffies: 7n, tick_ns: 0n });
    expect(k.status()).toEqual({ reason: 'the probe failed: bpf_prog_test_run_opts: Invalid argument' });
    expect(log.lines.filter((l) => l.startsWith('warn'))).toEqual([
      'warn: clock: the probe failed: bpf_prog_test_run_opts: Invalid argument: the programs read the coarse clock (bpf_ktime_get_coarse_ns, a helper call a packet)',
    ]);
  });

  it('a first calibration, or another tick, goes through tick_ns 0: no write mixes two clocks\' fields', () => {
    // The kernel's map, every value written to it recorded.
    const writes: Clock[] = [];
    const recording = {
      lookup: (k: Buffer) => map.lookup(k),
      update: (k: Buffer, v: Buffer) => {
        writes.push(clock.decode(v));
        map.update(k, v);
      },
    } as unknown as BpfMap;
    const changedFields = (a: Clock, b: Clock) => (['base_ns', 'base_jiffies', 'tick_ns'] as const).filter((f) => a[f] !== b[f]);
    for (const start of [UNCALIBRATED, { base_ns: 5n, base_jiffies: 7n, tick_ns: 1_000_000n }]) {
      map.update(ZERO, clock.encode(start));
      writes.length = 0;
      const log = logged();
      new ClockKeeper(recording, probe, log).calibrate();
      let prev: Clock = start;
      for (const w of writes) {
        const f = changedFields(prev, w);
        // One field, or, while tick_ns is 0 before and after (the coarse clock), any.
        expect(f.length <= 1 || (prev.tick_ns === 0n && w.tick_ns === 0n), `${JSON.stringify(prev, (_, v) => String(v))} -> ${JSON.stringify(w, (_, v) => String(v))}`).toBe(true);
        prev = w;
      }
      expect(prev.tick_ns, `writes ${writes.length}; ${log.lines.join('; ')}`).not.toBe(0n);
    }
  });
});

describe('the tick from two samples (no kernel)', () => {
  const at = (jiffies: bigint, coarseNs: bigint): ClockSample => ({ jiffies, coarseNs });
  it('each HZ from 100 ms of jiffies, also when a sample is one jiffy off', () => {
    for (const hz of HZ_CHOICES) {
      const t = tickNsOf(hz);
      const n = BigInt(hz / 10);
      for (const skew of [0n, 1n, -1n]) {
        expect(tickFrom(at(1000n, 5_000_000_000n), at(1000n + n + skew, 5_000_000_000n + n * t))).toEqual({ hz, tickNs: t });
      }
    }
    expect(tickNsOf(300)).toBe(3_333_333n);
  });
  it('refuses what fits no HZ, or more than one, or no time at all', () => {
    expect(tickFrom(at(10n, 1_000_000n), at(10n, 101_000_000n))).toHaveProperty('why');
    expect(tickFrom(at(10n, 1_000_000n), at(27n, 101_000_000n))).toHaveProperty('why'); // 6 ms a jiffy
    expect(tickFrom(at(10n, 1_000_000n), at(11n, 4_000_000n))).toHaveProperty('why'); // 3 ms: 250 and 300 both fit
    expect(tickFrom(at(10n, 5n), at(20n, 5n))).toHaveProperty('why');
  });
  it('the clock for a sample: now at the sample is its time; a base jiffy kept only with the same tick and not after it', () => {
    const s = at(5000n, 9_000_000_000n);
    const fresh = clockFor(s, 4_000_000n);
    expect(clockNow(fresh, s)).toBe(s.coarseNs);
    const kept = clockFor(s, 4_000_000n, { base_ns: 1n, base_jiffies: 4000n, tick_ns: 4_000_000n });
    expect(kept).toEqual({ base_ns: 9_000_000_000n - 1000n * 4_000_000n, base_jiffies: 4000n, tick_ns: 4_000_000n });
    expect(clockNow(kept, s)).toBe(s.coarseNs);
    expect(clockFor(s, 4_000_000n, { base_ns: 1n, base_jiffies: 6000n, tick_ns: 4_000_000n }).base_jiffies).toBe(5000n);
    expect(clockFor(s, 4_000_000n, { base_ns: 1n, base_jiffies: 4000n, tick_ns: 1_000_000n }).base_jiffies).toBe(5000n);
    // tick_ns 0: the coarse clock itself; a now past 2^64 wraps as the C's u64 does.
    expect(clockNow(UNCALIBRATED, s)).toBe(s.coarseNs);
    expect(clockNow({ base_ns: (1n << 64n) - 1n, base_jiffies: 4999n, tick_ns: 2n }, s)).toBe(1n);
  });
});
