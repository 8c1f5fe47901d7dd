/**
 * The flow caches as the agent sees them: dumped, purged for a pod, and
 * expired, always through the layouts of dataplane/maps.ts.
 *
 * They take any map of the MapOps contract (dataplane/map-ops.ts): the
 * kernel's, or the cluster simulator's tables (sim/cluster/agent.ts), whose
 * lookupBatch reuses its value buffers. Expiry, purge and counts read whole
 * caches through readAll, whose buffers are the map's own in both.
 */
import type { FieldType, Struct } from '../layout.ts';
import type { MapError, MapOps } from '../map-ops.ts';
import { egressKey, ingressKey, path, type EgressKey, type IngressKey, type Path } from '../maps.ts';
import type { EgressDumpEntry, IngressDumpEntry, PathJson, Purged } from './protocol.ts';

export interface Entry<K> {
  /** The key exactly as the kernel holds it, for deletes. */
  raw: Buffer;
  key: K;
  value: Path;
}

export function readEgress(map: MapOps): Entry<EgressKey>[] {
  return map.lookupBatch().map(([k, v]) => ({ raw: k, key: egressKey.decode(k), value: path.decode(v) }));
}

export function readIngress(map: MapOps): Entry<IngressKey>[] {
  return map.lookupBatch().map(([k, v]) => ({ raw: k, key: ingressKey.decode(k), value: path.decode(v) }));
}

export function pathJson(p: Path): PathJson {
  return { ...p, last_seen: p.last_seen.toString() };
}

function idleSeconds(now: bigint, lastSeen: bigint): number {
  // A stamp newer than our clock read only means it was refreshed meanwhile.
  return now > lastSeen ? Number(now - lastSeen) / 1e9 : 0;
}

export function dumpEgress(map: MapOps, now: bigint): EgressDumpEntry[] {
  return readEgress(map)
    .map((e) => ({ key: e.key, value: pathJson(e.value), idleSeconds: idleSeconds(now, e.value.last_seen) }))
    .sort((a, b) => a.key.local_pod.localeCompare(b.key.local_pod) || a.key.remote_pod.localeCompare(b.key.remote_pod));
}

export function dumpIngress(map: MapOps, now: bigint): IngressDumpEntry[] {
  return readIngress(map)
    .map((e) => ({ key: e.key, value: pathJson(e.value), idleSeconds: idleSeconds(now, e.value.last_seen) }))
    .sort((a, b) => a.key.remote_host.localeCompare(b.key.remote_host) || a.key.key - b.key.key);
}

/**
 * Every entry that could deliver to or send for the pod at ip: egress
 * entries it is the local pod of are deleted; ingress entries that restore
 * into it become tombstones. The caller removes the pod from pod_info first,
 * so that init cannot learn a new entry for it while we sweep.
 *
 * Why tombstones: a peer may go on masquerading to the deleted pod under our
 * key until its agent finds the pair unanswered (its --egress-idle plus a
 * scan). Were the key free at once, init could draw it for another pair, and
 * restore would put those packets into that pair's pod. A tombstone (ifindex
 * 0, stamped now) keeps the key taken: restore drops what arrives under it
 * without refreshing it, init never counts it as a pair's key, and expiry
 * removes it --ingress-idle later (config.ts requires that to outlast the
 * peer's --egress-idle and scan).
 */
export function purgePod(egress: MapOps, ingress: MapOps, ip: string, now: bigint): Purged {
  const want = wordsOf(egressKey.encode({ local_pod: ip, remote_pod: ip }))[EK.local];
  const eg = egress.readAll();
  const egKeys = wordsOf(eg.keys), egStride = strideOf(eg.keySize, 'egress key');
  const doomed = new KeyList(eg.keySize);
  for (let i = 0; i < eg.count; i++) if (egKeys[i * egStride + EK.local] === want) doomed.push(eg.keys, i * eg.keySize);
  const ing = ingress.readAll();
  const ingValues = wordsOf(ing.values), vStride = strideOf(ing.valueSize, 'path');
  let tombstoned = 0;
  for (let i = 0; i < ing.count; i++) {
    const vo = i * vStride;
    if (ingValues[vo + P.localIp] !== want || isTombstone(ingValues, vo)) continue;
    if (tombstone(ingress, ing.keys, i * ing.keySize, ingValues, vo, now)) tombstoned++;
  }
  return { egress: egress.deleteKeys(doomed.keys, doomed.count), ingress: tombstoned };
}

/**
 * Makes the ingress entry whose key is at byte ko of keys, its value at word
 * vo of values, a tombstone stamped now; false if the program deleted it
 * meanwhile (it stays deleted: the write is only over the entry as it is).
 */
function tombstone(ingress: MapOps, keys: Buffer, ko: number, values: Uint32Array, vo: number, now: bigint): boolean {
  const dead = scratch(path.size);
  dead.words.set(values.subarray(vo, vo + dead.words.length));
  dead.words[P.ifindex] = 0;
  dead.words[P.lastSeenLo] = Number(now & 0xffffffffn);
  dead.words[P.lastSeenHi] = Number((now >> 32n) & 0xffffffffn);
  try {
    ingress.update(Buffer.from(keys.subarray(ko, ko + ingressKey.size)), dead.bytes, 'exist');
    return true;
  } catch (e) {
    if ((e as MapError).code !== 'ENOENT') throw e;
    return false;
  }
}

/**
 * The node set as sweepNodes compares addresses: each as the 32-bit word its
 * four bytes (network order, as the maps hold them) make, as the scans read
 * them.
 */
export interface NodeWords { self: Set<number>; peers: Set<number> }

export function nodeWords(self: readonly string[], peers: readonly string[]): NodeWords {
  const word = (ip: string) => wordsOf(egressKey.encode({ local_pod: ip, remote_pod: ip }))[EK.local];
  return { self: new Set(self.map(word)), peers: new Set(peers.map(word)) };
}

/**
 * Holds the caches to the node set (nodes.ts), as the programs rely on: a
 * live ingress entry restores only what its host sends, which must be a peer
 * node, and restore no longer asks the node set on a hit (bpf/restore.h); an
 * egress entry whose outer addresses match an overlay packet lets init skip
 * the node checks (bpf/init.h), so its local address must be ours and its
 * remote one a peer node. The programs create entries only so; what breaks it
 * is the set changing. So, against the set as it is now:
 *  - ingress entries from a host that is no peer node become tombstones
 *    (purgePod says why a tombstone and not a delete: a host that still
 *    masquerades with an old key must never restore into a new pair);
 *  - egress entries whose remote_ip is set and no peer node, or whose
 *    local_ip is set and not ours, are deleted: the pair's next packet takes
 *    the overlay, where init's checks decide. Each is read again just before
 *    the delete and spared if the program rewrote it meanwhile to addresses
 *    the set holds.
 * A sweep reads both caches once, as an expiry scan does; the agent's scans
 * sweep as they expire (expire's nodes), in the same read. This is the sweep
 * alone, for the agent's start over pinned caches.
 */
export function sweepNodes(egress: MapOps, ingress: MapOps, nodes: NodeWords, now: bigint): Purged {
  return scanCaches(egress, ingress, now, undefined, nodes).swept;
}

/*
 * Purge and expiry read whole caches, 65,536 entries each: decoding every
 * entry into strings costs ~10 µs, a second per cache, during which the agent
 * serves nothing. They read the few fields they need straight from the
 * kernel's bytes instead, at the offsets maps.ts defines; an address is
 * compared as the 32-bit number its four bytes make. They read them in place,
 * in the map's snapshot buffers (MapOps.readAll): a Buffer view per entry made
 * two heap objects per entry per scan. And they read them through typed
 * arrays over those buffers, a plain load per field: Buffer's readUInt32LE
 * validates its offset at every call, which made the JavaScript of a scan of
 * full caches take as long as the kernel's two batch reads (~50 ms here);
 * with typed arrays it takes ~15 ms.
 *
 * Typed arrays read in the host's order, as layout.ts takes it: little-endian
 * (x86_64, arm64), where a 32-bit word reads as readUInt32LE would.
 */
function offsetOf(s: Struct<never>, name: string, type: FieldType, align: 2 | 4): number {
  const f = s.field(name);
  // A layout change must fail here, not read the wrong bytes.
  if (f.type !== type) throw new Error(`struct ${s.name}: field ${name} is ${JSON.stringify(f.type)}, expected ${type}`);
  if (f.offset % align !== 0) throw new Error(`struct ${s.name}: field ${name} at byte ${f.offset} is not ${align}-aligned, as the scans read it`);
  return f.offset / align;
}
const asStruct = (s: unknown) => s as Struct<never>;
/** path's fields as indexes of 32-bit words, the u16 ones (…16) as indexes of 16-bit halves. */
const P = {
  lastSeenLo: offsetOf(asStruct(path), 'last_seen', 'u64', 4),
  lastSeenHi: offsetOf(asStruct(path), 'last_seen', 'u64', 4) + 1,
  localIp: offsetOf(asStruct(path), 'local_ip', 'ipv4', 4),
  remoteIp: offsetOf(asStruct(path), 'remote_ip', 'ipv4', 4),
  ifindex: offsetOf(asStruct(path), 'ifindex', 'u32', 4),
  localKey16: offsetOf(asStruct(path), 'local_key', 'u16', 2),
  remoteKey16: offsetOf(asStruct(path), 'remote_key', 'u16', 2),
};
const EK = {
  local: offsetOf(asStruct(egressKey), 'local_pod', 'ipv4', 4),
  remote: offsetOf(asStruct(egressKey), 'remote_pod', 'ipv4', 4),
};
const IK = {
  host: offsetOf(asStruct(ingressKey), 'remote_host', 'ipv4', 4),
  key16: offsetOf(asStruct(ingressKey), 'key', 'u16', 2),
};

/** A struct's size in 32-bit words: entries are read at a multiple of it. */
function strideOf(size: number, what: string): number {
  if (size % 4 !== 0) throw new Error(`${what} entries of ${size} bytes are not a whole number of 32-bit words, as the scans read them`);
  return size / 4;
}

/** b's bytes as 32-bit words, in place; a copy only where b does not start at a word boundary. */
function wordsOf(b: Buffer): Uint32Array {
  if (b.byteOffset % 4 === 0) return new Uint32Array(b.buffer, b.byteOffset, b.length >>> 2);
  const copy = new Uint32Array(b.length >>> 2);
  new Uint8Array(copy.buffer).set(b.subarray(0, copy.length * 4));
  return copy;
}

/** The same memory as 16-bit halves: word w's are halves 2w and 2w + 1 (low, high: little-endian). */
function halvesOf(words: Uint32Array): Uint16Array {
  return new Uint16Array(words.buffer, words.byteOffset, words.length * 2);
}

/** A zeroed buffer of size bytes for lookupInto, with its words and halves: one entry read again. */
function scratch(size: number): { bytes: Buffer; words: Uint32Array; halves: Uint16Array } {
  const words = new Uint32Array(Math.ceil(size / 4));
  return { bytes: Buffer.from(words.buffer, 0, size), words, halves: halvesOf(words) };
}

/** Whether an ingress entry (its value at word vo of v) is a deleted pod's tombstone. */
function isTombstone(v: Uint32Array, vo: number): boolean {
  return v[vo + P.ifindex] === 0;
}

/**
 * Expiry judges every entry's last_seen: reading each as a BigInt and
 * subtracting it from now made two heap objects per entry per scan. So a
 * scan turns its clock and idle limit into one bound instead: `now -
 * last_seen > idle` is exactly `last_seen < now - idle`, and last_seen is
 * compared with the bound as two 32-bit words, high then low. The bound is
 * clamped to [0, 2^64]: below 0 no stamp is under it, at 2^64 (hi 2^32,
 * above any word) every stamp is.
 */
export interface StampBound { hi: number; lo: number }

const U64_END = 1n << 64n;

export function stampBound(now: bigint, idleNs: bigint): StampBound {
  const b = now - idleNs;
  const c = b < 0n ? 0n : b > U64_END ? U64_END : b;
  return { hi: Number(c >> 32n), lo: Number(c & 0xffffffffn) };
}

/** Whether the last_seen of a path value (at word vo of v) is below the bound: idle longer than its limit. */
export function stampBelow(v: Uint32Array, vo: number, bound: StampBound): boolean {
  const hi = v[vo + P.lastSeenHi];
  return hi < bound.hi || (hi === bound.hi && v[vo + P.lastSeenLo] < bound.lo);
}

/** Whether two path values (at word aAt of a, bAt of b) hold the same last_seen. */
function sameStamp(a: Uint32Array, aAt: number, b: Uint32Array, bAt: number): boolean {
  return a[aAt + P.lastSeenLo] === b[bAt + P.lastSeenLo] && a[aAt + P.lastSeenHi] === b[bAt + P.lastSeenHi];
}

/** Keys copied one after another into one growing buffer, for MapOps.deleteKeys. */
class KeyList {
  keys: Buffer;
  count = 0;

  constructor(private readonly keySize: number, capacity = 64) {
    this.keys = Buffer.alloc(keySize * capacity);
  }

  push(from: Buffer, at: number): void {
    if ((this.count + 1) * this.keySize > this.keys.length) {
      const bigger = Buffer.alloc(this.keys.length * 2);
      this.keys.copy(bigger);
      this.keys = bigger;
    }
    from.copy(this.keys, this.count * this.keySize, at, at + this.keySize);
    this.count++;
  }
}

/**
 * An ingress snapshot's entries by (remote host, key), in typed arrays:
 * open addressing over entry numbers, keys compared in the snapshot's own
 * words. A Map per host of Buffers per key made two objects per entry.
 */
class PeerIndex {
  private readonly slots: Int32Array;
  private readonly mask: number;

  constructor(private readonly keys: Uint32Array, private readonly halves: Uint16Array, private readonly stride: number, count: number) {
    let size = 16;
    while (size < count * 2) size *= 2;
    this.slots = new Int32Array(size).fill(-1);
    this.mask = size - 1;
    for (let i = 0; i < count; i++) {
      const at = i * stride;
      let slot = this.hash(keys[at + IK.host], halves[at * 2 + IK.key16]);
      while (this.slots[slot] !== -1) slot = (slot + 1) & this.mask;
      this.slots[slot] = i;
    }
  }

  /** murmur3's finalizer: addresses differ in their high bytes (read little-endian), the slot takes the low bits. */
  private hash(host: number, key: number): number {
    let h = host ^ Math.imul(key, 0x9e3779b1);
    h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
    h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
    return (h ^ (h >>> 16)) & this.mask;
  }

  /** The entry number of (host, key) in the snapshot, or -1. */
  find(host: number, key: number): number {
    const { keys, halves, stride } = this;
    for (let slot = this.hash(host, key); ; slot = (slot + 1) & this.mask) {
      const i = this.slots[slot];
      if (i === -1) return -1;
      if (keys[i * stride + IK.host] === host && halves[i * stride * 2 + IK.key16] === key) return i;
    }
  }
}

export interface ExpiryResult {
  /** unanswered: deleted because the peer stopped talking back, though masq kept the entry busy. */
  egress: { deleted: number; remaining: number; unanswered: number };
  ingress: { deleted: number; remaining: number };
  /** What the node sweep of the same read took (expire's nodes; 0 and 0 without). remaining counts it out. */
  swept: Purged;
}

type EgressVerdict = 'keep' | 'idle' | 'unanswered';

/**
 * Whether an egress entry still serves a live pair: its key at word ko of k,
 * its value at word vo of v (v16: the same memory as halves), and peer the
 * ingress entry under (value's remote_ip, local_key), at word po of peer.
 *
 * Idleness alone cannot retire an entry masq uses: masq refreshes last_seen
 * on every packet the local pod sends, whether or not anything at the other
 * end accepts them. When the remote pod is deleted, its host purges the
 * ingress entry our remote_key named, drops what we masquerade to it
 * (RESTORE_MISS), and — if the IP goes to a new pod — the new pod is
 * unreachable from here for as long as our pod keeps sending.
 *
 * So an entry masq can use (both keys set) is alive only while the peer
 * talks back: our own ingress entry for the pair, ingress[(peer host,
 * local_key)], must still exist, still restore to this very pair, and have
 * been refreshed by restore within the egress idle time. restore refreshes
 * it on every masqueraded packet of the pair from the peer; init creates it
 * fresh when it draws the key. Otherwise the entry goes, the next packet
 * takes the overlay, and init and restore learn the pair again with keys
 * both hosts hold. The price: a pair whose peer goes quiet (a one-way
 * stream) leaves the fast path after the idle time, until the peer sends.
 *
 * Entries masq cannot use (no local or no remote key) keep the plain idle
 * rule: they send nothing past the overlay, and retiring them while the
 * overlay still carries the pair (a peer without XMasq, a one-way flow) would
 * only make init draw a new key every idle period while the old key's ingress
 * entry lingers, eating into the 63 keys of the host pair.
 */
function judgeEgress(k: Uint32Array, ko: number, v: Uint32Array, v16: Uint16Array, vo: number,
  peer: Uint32Array | undefined, po: number, idle: StampBound): EgressVerdict {
  if (stampBelow(v, vo, idle)) return 'idle';
  if (v16[vo * 2 + P.localKey16] === 0 || v16[vo * 2 + P.remoteKey16] === 0) return 'keep';
  const answered = peer !== undefined && !isTombstone(peer, po)
    && peer[po + P.localIp] === k[ko + EK.local] && peer[po + P.remoteIp] === k[ko + EK.remote]
    && !stampBelow(peer, po, idle);
  return answered ? 'keep' : 'unanswered';
}

/**
 * Deletes idle entries, and egress entries whose peer stopped answering
 * (judgeEgress). The programs write entries concurrently: each candidate is
 * read again, with the ingress entry it depends on, just before the delete
 * and spared if it no longer qualifies, which narrows the race to a few
 * microseconds; losing it only sends that flow back through the overlay to
 * learn again. nodes: sweep against this node set in the same read
 * (sweepNodes), which leaves the caches as a sweep followed by an expiry
 * scan would; swept counts what the sweep took.
 */
export function expire(egress: MapOps, ingress: MapOps, now: bigint, egressIdleNs: bigint, ingressIdleNs: bigint,
  nodes?: NodeWords): ExpiryResult {
  return scanCaches(egress, ingress, now, { egress: egressIdleNs, ingress: ingressIdleNs }, nodes);
}

/**
 * One read of both caches for expiry (idle: the limits; undefined, none) and
 * the node sweep (nodes; undefined, none), deciding as the sweep and then an
 * expiry scan would. The expiry rules read the snapshot from before the
 * sweep's tombstones, which changes none of their verdicts: an egress entry's
 * peer is the ingress entry under its own remote_ip, which the sweep keeps
 * the entry for only if that host is a peer, whose entries it leaves alone;
 * and an idle ingress candidate is read again, with the tombstone's new
 * stamp, before its delete.
 */
function scanCaches(egress: MapOps, ingress: MapOps, now: bigint, idle: { egress: bigint; ingress: bigint } | undefined,
  nodes: NodeWords | undefined): ExpiryResult {
  const ing = ingress.readAll();
  const ingKeys = wordsOf(ing.keys), ingValues = wordsOf(ing.values);
  const ikStride = strideOf(ing.keySize, 'ingress key'), ivStride = strideOf(ing.valueSize, 'ingress path');
  let tombstoned = 0;
  if (nodes) {
    for (let i = 0; i < ing.count; i++) {
      const vo = i * ivStride;
      if (nodes.peers.has(ingKeys[i * ikStride + IK.host]) || isTombstone(ingValues, vo)) continue;
      if (tombstone(ingress, ing.keys, i * ing.keySize, ingValues, vo, now)) tombstoned++;
    }
  }

  const eg = egress.readAll();
  const egKeys = wordsOf(eg.keys), egValues = wordsOf(eg.values), egHalves = halvesOf(egValues);
  const ekStride = strideOf(eg.keySize, 'egress key'), evStride = strideOf(eg.valueSize, 'egress path');
  const stray = (v: Uint32Array, vo: number) => {
    if (!nodes) return false;
    const local = v[vo + P.localIp], remote = v[vo + P.remoteIp];
    return (remote !== 0 && !nodes.peers.has(remote)) || (local !== 0 && !nodes.self.has(local));
  };
  // Candidates are read again one at a time into these, not into a Buffer each.
  const key = scratch(egressKey.size), again = scratch(path.size);
  const peerKey = scratch(ingressKey.size), peerNow = scratch(path.size);
  const egressIdle = idle && stampBound(now, idle.egress);
  const peers = idle && new PeerIndex(ingKeys, halvesOf(ingKeys), ikStride, ing.count);

  const strays = new KeyList(eg.keySize), doomed = new KeyList(eg.keySize);
  let unanswered = 0;
  for (let i = 0; i < eg.count; i++) {
    const ko = i * ekStride, vo = i * evStride;
    const isStray = stray(egValues, vo);
    let expiring = false;
    if (!isStray && peers && egressIdle) {
      const local = egHalves[vo * 2 + P.localKey16];
      const p = local ? peers.find(egValues[vo + P.remoteIp], local) : -1;
      expiring = judgeEgress(egKeys, ko, egValues, egHalves, vo, p < 0 ? undefined : ingValues, p * ivStride, egressIdle) !== 'keep';
    }
    if (!isStray && !expiring) continue;
    eg.keys.copy(key.bytes, 0, i * eg.keySize, (i + 1) * eg.keySize);
    if (!egress.lookupInto(key.bytes, again.bytes)) continue;
    if (stray(again.words, 0)) {
      strays.push(key.bytes, 0);
      continue;
    }
    if (!egressIdle) continue;
    let peerFound = false;
    if (again.halves[P.localKey16]) {
      // The ingress key our key for the peer lives under: (peer host, our key).
      peerKey.words[IK.host] = again.words[P.remoteIp];
      peerKey.halves[IK.key16] = again.halves[P.localKey16];
      peerFound = ingress.lookupInto(peerKey.bytes, peerNow.bytes);
    }
    const verdict = judgeEgress(key.words, 0, again.words, again.halves, 0, peerFound ? peerNow.words : undefined, 0, egressIdle);
    if (verdict === 'keep') continue;
    doomed.push(key.bytes, 0);
    if (verdict === 'unanswered') unanswered++;
  }
  const egressSwept = egress.deleteKeys(strays.keys, strays.count);
  const egressDeleted = egress.deleteKeys(doomed.keys, doomed.count);

  let ingressDeleted = 0;
  if (idle) {
    const ingressIdle = stampBound(now, idle.ingress);
    const stale = new KeyList(ing.keySize);
    const ingKey = scratch(ingressKey.size);
    for (let i = 0; i < ing.count; i++) {
      const vo = i * ivStride;
      if (!stampBelow(ingValues, vo, ingressIdle)) continue;
      ing.keys.copy(ingKey.bytes, 0, i * ing.keySize, (i + 1) * ing.keySize);
      if (ingress.lookupInto(ingKey.bytes, peerNow.bytes) && sameStamp(peerNow.words, 0, ingValues, vo)) stale.push(ingKey.bytes, 0);
    }
    ingressDeleted = ingress.deleteKeys(stale.keys, stale.count);
  }
  const egressLeft = eg.count - egressSwept - egressDeleted;
  return {
    egress: { deleted: egressDeleted, remaining: egressLeft, unanswered },
    ingress: { deleted: ingressDeleted, remaining: ing.count - ingressDeleted },
    swept: { egress: egressSwept, ingress: tombstoned },
  };
}

/** Entries in a hash map, without decoding them. */
export function countEntries(map: MapOps): number {
  return map.readAll().count;
}
