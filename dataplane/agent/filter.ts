/**
 * egress_filter, the egress entries' presence filter (bpf/maps.h), as the
 * agent keeps it: filled from the entries when an upgrade finds them pinned
 * without it, and rebuilt from the live entries so that the bits of gone
 * pairs (expired, purged) do not pile up and make masq look up what is not
 * there.
 *
 * The programs set a new entry's bit in both halves, after inserting the
 * entry, and never clear one; masq reads the half config.flags names. A
 * write of ours to a word can undo an atomic OR a program makes meanwhile,
 * so the agent only ever writes the half masq does not read, and switches
 * halves only once a scan made after its last write finds every entry's bit
 * there (verify below). An entry that scan missed was inserted after the scan
 * passed its bucket, so after our last write, and its program sets its bit
 * after inserting it: that bit stays. An entry the scan saw has its bit checked
 * after our last write, and no write comes after. So the half masq switches
 * to holds the bit of every entry, and of no pair gone before the rebuild began.
 */
import type { MapOps, MapSnapshot } from '../map-ops.ts';
import { ConfigFlag, FILTER_BLOCK_BYTES, arrayIndex, config, egressFilterSlot, egressKey } from '../maps.ts';

const ZERO = arrayIndex.encode({ index: 0 });
/** Where a key's addresses lie: read in place as the programs hold them (network-order words). */
const EK = { local: egressKey.field('local_pod').offset, remote: egressKey.field('remote_pod').offset };

/**
 * The filter as u32 words: its blocks one after another, each block's u64
 * words as u32 pairs (little-endian, as the kernel lays them out), so slot i
 * of a half is bit i % 32 of word i / 32 from the half's start.
 */
type Words = Uint32Array;

export interface RebuildResult {
  /** Whether masq now reads the rebuilt half. */
  switched: boolean;
  /** The half masq reads afterwards. */
  half: 0 | 1;
  /** Bits set in that half, and in the half it read before. */
  bits: number;
  bitsBefore: number;
  /** Scans that found a bit missing (an entry created while we wrote) before one found none. */
  retries: number;
}

/** The half config.flags says masq reads. */
export function activeHalf(cfg: MapOps): 0 | 1 {
  const v = cfg.lookup(ZERO);
  if (!v) throw new Error('config has no slot 0');
  return config.decode(v).flags & ConfigFlag.FILTER_HALF1 ? 1 : 0;
}

function setActiveHalf(cfg: MapOps, half: 0 | 1): void {
  const c = config.decode(cfg.lookup(ZERO)!);
  c.flags = half ? c.flags | ConfigFlag.FILTER_HALF1 : c.flags & ~ConfigFlag.FILTER_HALF1;
  cfg.update(ZERO, config.encode(c));
}

/** Every block of the filter, both halves: one batch read (a syscall copies a block at a time). */
export function readWords(filter: MapOps): Words {
  const words = new Uint32Array((filter.maxEntries * FILTER_BLOCK_BYTES) / 4);
  const all = filter.readAll();
  const bytes = Buffer.from(words.buffer);
  for (let i = 0; i < all.count; i++) {
    const index = all.keys.readUInt32LE(i * all.keySize);
    all.values.copy(bytes, index * FILTER_BLOCK_BYTES, i * all.valueSize, i * all.valueSize + FILTER_BLOCK_BYTES);
  }
  return words;
}

/** u32 words of a half of this filter. */
const halfWords = (filter: MapOps) => (filter.maxEntries / 2) * (FILTER_BLOCK_BYTES / 4);

/** The bits of every egress entry in snap, laid out as one half of a filter of halfU32 u32 words. */
export function entryBits(snap: MapSnapshot, halfU32: number): Words {
  const half = new Uint32Array(halfU32);
  for (let i = 0; i < snap.count; i++) {
    const at = i * snap.keySize;
    const slot = egressFilterSlot(snap.keys.readUInt32LE(at + EK.local), snap.keys.readUInt32LE(at + EK.remote), halfU32 * 32);
    half[slot >>> 5] |= 1 << (slot & 31);
  }
  return half;
}

/** Writes the blocks of half (a half's words) that differ from what cur holds there; returns how many. */
function writeHalf(filter: MapOps, which: 0 | 1, half: Words, cur: Words): number {
  const per = FILTER_BLOCK_BYTES / 4;
  const base = which * half.length;
  let written = 0;
  for (let b = 0; b < half.length / per; b++) {
    let same = true;
    for (let w = b * per; w < (b + 1) * per && same; w++) same = half[w] === cur[base + w];
    if (same) continue;
    const block = Buffer.from(half.buffer, half.byteOffset + b * FILTER_BLOCK_BYTES, FILTER_BLOCK_BYTES);
    filter.update(arrayIndex.encode({ index: base / per + b }), block);
    written++;
  }
  return written;
}

const popcount = (x: number) => {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return (Math.imul((x + (x >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24);
};

function bitsIn(words: Words, which: 0 | 1): number {
  const n = words.length / 2;
  let bits = 0;
  for (let i = which * n; i < (which + 1) * n; i++) bits += popcount(words[i]);
  return bits;
}

/**
 * Both halves from the entries, for a filter no program reads or writes yet:
 * created by this load, beside egress entries pinned by a version without it
 * (whose programs do not know it). Without it, those pairs would stay on the
 * overlay until they learn again. Returns the bits set.
 */
export function fillEgressFilter(egress: MapOps, filter: MapOps): number {
  const want = entryBits(egress.readAll(), halfWords(filter));
  const cur = readWords(filter);
  writeHalf(filter, 0, want, cur);
  writeHalf(filter, 1, want, cur);
  return bitsIn(readWords(filter), 0);
}

/**
 * Rebuilds the half masq does not read from the live entries and switches
 * masq to it (the comment at the top says why this never loses an entry's
 * bit). Gives up without switching after `tries` scans that each found a bit
 * missing (entries created while we wrote, every time): the half masq reads
 * keeps every bit then, and the next rebuild tries again.
 */
export function rebuildEgressFilter(egress: MapOps, filter: MapOps, cfg: MapOps, tries = 3): RebuildResult {
  const active = activeHalf(cfg);
  const next = (1 - active) as 0 | 1;
  const n = halfWords(filter);
  let cur = readWords(filter);
  const bitsBefore = bitsIn(cur, active);
  const want = entryBits(egress.readAll(), n);
  writeHalf(filter, next, want, cur);
  for (let retries = 0; retries < tries; retries++) {
    const live = entryBits(egress.readAll(), n);
    cur = readWords(filter);
    let missing = false;
    for (let i = 0; i < n && !missing; i++) missing = (live[i] & ~cur[next * n + i]) !== 0;
    if (!missing) {
      setActiveHalf(cfg, next);
      return { switched: true, half: next, bits: bitsIn(cur, next), bitsBefore, retries };
    }
    // Ours and the program's bits both: the scan after this write decides again.
    const merged = live.map((x, i) => x | cur[next * n + i]);
    writeHalf(filter, next, merged, cur);
  }
  return { switched: false, half: active, bits: bitsBefore, bitsBefore, retries: tries };
}
