/**
 * egress_filter's upkeep (filter.ts) on the kernel's maps: the test build's
 * object loaded (its egress_cache, egress_filter and config; nothing
 * attached). What the programs do to the filter (a new entry's bit in both
 * halves, masq reading the half config names) the differential run and the
 * fixtures hold against the model; here, what the agent does to it.
 */
import { fileURLToPath } from 'node:url';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import { BpfObject } from '../libbpf.ts';
import type { MapOps, MapSnapshot } from '../map-ops.ts';
import { ConfigFlag, FILTER_BLOCK_BYTES, FLANNEL_PORTS, NO_OVERLAY, NO_SERVICES, arrayIndex, config, egressFilterSlot, egressKey, path } from '../maps.ts';
import { activeHalf, fillEgressFilter, rebuildEgressFilter } from './filter.ts';
import { requireRoot } from '../../testing/privileges.ts';

const TEST_OBJECT = fileURLToPath(new URL('../../bpf/build/xmasq.test.bpf.o', import.meta.url));
const ZERO = arrayIndex.encode({ index: 0 });
const CONFIG = { nic_ifindex: 7, flags: ConfigFlag.WIDE_KEYS, ...NO_OVERLAY, ...NO_SERVICES, ...FLANNEL_PORTS };

requireRoot(import.meta.url, 'a BPF object: CAP_BPF');
const obj = BpfObject.open(TEST_OBJECT);
obj.load();
afterAll(() => obj.close());
const egress = obj.map('egress_cache');
const filter = obj.map('egress_filter');
const cfg = obj.map('config');
/** u64 words of a half, across its blocks. */
const HALF_WORDS = (filter.maxEntries / 2) * (FILTER_BLOCK_BYTES / 8);
const blockOf = (half: number, w: number) => arrayIndex.encode({ index: half * (filter.maxEntries / 2) + Math.floor(w / (FILTER_BLOCK_BYTES / 8)) });

const key = (remote: string, local = '10.244.1.5') => egressKey.encode({ local_pod: local, remote_pod: remote });
const slotOf = (k: Buffer) => egressFilterSlot(k.readUInt32LE(0), k.readUInt32LE(4), HALF_WORDS * 64);
const word = (half: number, w: number) => filter.lookup(blockOf(half, w))!.readBigUInt64LE((w % (FILTER_BLOCK_BYTES / 8)) * 8);
const setWord = (half: number, w: number, v: bigint) => {
  const b = filter.lookup(blockOf(half, w))!;
  b.writeBigUInt64LE(v, (w % (FILTER_BLOCK_BYTES / 8)) * 8);
  filter.update(blockOf(half, w), b);
};
const bit = (half: number, k: Buffer) => Number((word(half, Math.floor(slotOf(k) / 64)) >> BigInt(slotOf(k) % 64)) & 1n);
/** What a program's egress_lookup_or_create does: the entry, then its bit in both halves. */
function programCreates(k: Buffer, withBit = true): void {
  egress.update(k, path.encode(path.zero()), 'noexist');
  if (!withBit) return;
  const s = slotOf(k);
  for (const half of [0, 1]) setWord(half, Math.floor(s / 64), word(half, Math.floor(s / 64)) | (1n << BigInt(s % 64)));
}
function bitsIn(half: number): number {
  let n = 0;
  for (let w = 0; w < HALF_WORDS; w++) for (let x = word(half, w); x; x >>= 1n) n += Number(x & 1n);
  return n;
}
/** Distinct slots of these keys: the test build's halves are 256 bits, so pairs may share one. */
const slots = (ks: Buffer[]) => new Set(ks.map(slotOf)).size;

beforeEach(() => {
  egress.clear();
  for (let i = 0; i < filter.maxEntries; i++) filter.update(arrayIndex.encode({ index: i }), Buffer.alloc(FILTER_BLOCK_BYTES));
  cfg.update(ZERO, config.encode(CONFIG));
});

describe('egress_filter upkeep', () => {
  it('fill (an upgrade: entries pinned, the filter new) sets every entry\'s bit in both halves and no other', () => {
    const ks = [key('10.244.2.7'), key('10.244.2.8'), key('10.244.3.1', '10.244.1.6')];
    for (const k of ks) egress.update(k, path.encode(path.zero()), 'noexist');
    expect(fillEgressFilter(egress, filter)).toBe(slots(ks));
    for (const k of ks) expect([bit(0, k), bit(1, k)]).toEqual([1, 1]);
    expect([bitsIn(0), bitsIn(1)]).toEqual([slots(ks), slots(ks)]);
  });

  it('a rebuild leaves the half masq switches to with exactly the live entries\' bits, and config otherwise as it was', () => {
    const live = [key('10.244.2.7'), key('10.244.2.9')];
    const gone = key('10.244.2.8');
    for (const k of [...live, gone]) programCreates(k);
    egress.delete(gone);
    // and bits of no entry at all in both halves (pairs gone long ago)
    for (const half of [0, 1]) setWord(half, 3, word(half, 3) | 0x8000_0000_0000_0001n);
    expect(activeHalf(cfg)).toBe(0);
    const before = bitsIn(0);

    const r = rebuildEgressFilter(egress, filter, cfg);
    expect(r).toMatchObject({ switched: true, half: 1, retries: 0, bitsBefore: before, bits: slots(live) });
    expect(bitsIn(1)).toBe(slots(live));
    for (const k of live) expect(bit(1, k)).toBe(1);
    if (!live.some((k) => slotOf(k) === slotOf(gone))) expect(bit(1, gone)).toBe(0);
    // the half masq read until now is left as it was: a masq still reading it must find every entry
    expect(bitsIn(0)).toBe(before);
    expect(config.decode(cfg.lookup(ZERO)!)).toEqual({ ...CONFIG, flags: ConfigFlag.WIDE_KEYS | ConfigFlag.FILTER_HALF1 });

    // and back: the next rebuild writes half 0
    const r2 = rebuildEgressFilter(egress, filter, cfg);
    expect(r2).toMatchObject({ switched: true, half: 0, bits: slots(live) });
    expect(bitsIn(0)).toBe(slots(live));
    expect(config.decode(cfg.lookup(ZERO)!).flags).toBe(ConfigFlag.WIDE_KEYS);
  });

  it("an entry a program creates while the rebuild writes (its bit overwritten) is found by the next scan and its bit put back before the switch", () => {
    programCreates(key('10.244.2.7'));
    const late = key('10.244.4.4');
    const w = Math.floor(slotOf(late) / 64);
    // A stale bit in the word where the late entry's bit goes, so that the rebuild writes that word.
    const stale = 1n << BigInt((slotOf(late) % 64 + 1) % 64);
    setWord(1, w, word(1, w) | stale);
    // A stand-in for a program on another CPU: the first scan is taken, then
    // the late entry is created with its bit, before the rebuild writes.
    let scans = 0;
    const racing = {
      readAll(): MapSnapshot {
        const snap = egress.readAll();
        if (scans++ > 0) return snap;
        const copy = { ...snap, keys: Buffer.from(snap.keys), values: Buffer.from(snap.values) };
        programCreates(late);
        return copy;
      },
    } as unknown as MapOps;
    const r = rebuildEgressFilter(racing, filter, cfg);
    expect(r).toMatchObject({ switched: true, half: 1, retries: 1 });
    expect(bit(1, late)).toBe(1);
    expect(bit(1, key('10.244.2.7'))).toBe(1);
  });

  it('entries created during every scan (each before its program set the bit): no switch, the half masq reads untouched', () => {
    programCreates(key('10.244.2.7'));
    setWord(0, 0, word(0, 0) | 0x10n);
    let n = 0;
    const busy = {
      readAll(): MapSnapshot {
        const snap = egress.readAll();
        const copy = { ...snap, keys: Buffer.from(snap.keys), values: Buffer.from(snap.values) };
        // inserted, its bit not set yet: the next scan sees it and misses its bit
        programCreates(key(`10.244.5.${++n}`), false);
        return copy;
      },
    } as unknown as MapOps;
    const before = [0, 1, 2, 3].map((w) => word(0, w));
    const r = rebuildEgressFilter(busy, filter, cfg, 3);
    expect(r).toMatchObject({ switched: false, half: 0, retries: 3 });
    expect(activeHalf(cfg)).toBe(0);
    expect([0, 1, 2, 3].map((w) => word(0, w))).toEqual(before);
  });
});
