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
import type { MapError, MapOps, MapSnapshot } from '../map-ops.ts';
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
  const want = u32Of(egressKey.encode({ local_pod: ip, remote_pod: ip }), EK.local);
  const eg = egress.readAll();
  const doomed = new KeyList(eg.keySize);
  for (let i = 0; i < eg.count; i++) if (u32Of(eg.keys, i * eg.keySize + EK.local) === want) doomed.push(eg.keys, i * eg.keySize);
  const ing = ingress.readAll();
  let tombstoned = 0;
  for (let i = 0; i < ing.count; i++) {
    const vo = i * ing.valueSize;
    if (u32Of(ing.values, vo + P.localIp) !== want || u32Of(ing.values, vo + P.ifindex) === 0) continue;
    const dead = Buffer.from(ing.values.subarray(vo, vo + ing.valueSize));
    dead.writeUInt32LE(0, P.ifindex);
    dead.writeBigUInt64LE(now, P.lastSeen);
    // Only over the entry as it is: one the program meanwhile deleted stays deleted.
    try {
      ingress.update(Buffer.from(ing.keys.subarray(i * ing.keySize, (i + 1) * ing.keySize)), dead, 'exist');
      tombstoned++;
    } catch (e) {
      if ((e as MapError).code !== 'ENOENT') throw e;
    }
  }
  return { egress: egress.deleteKeys(doomed.keys, doomed.count), ingress: tombstoned };
}

/** Whether an ingress entry (its raw value) is a deleted pod's tombstone. */
export function isTombstone(v: Buffer, at = 0): boolean {
  return u32Of(v, at + P.ifindex) === 0;
}

/*
 * Purge and expiry read whole caches, 65,536 entries each: decoding every
 * entry into strings costs ~10 µs, a second per cache, during which the agent
 * serves nothing. They read the few fields they need straight from the
 * kernel's bytes instead, at the offsets maps.ts defines; an address is
 * compared as the 32-bit number its four bytes make. And they read them in
 * place, in the map's snapshot buffers (MapOps.readAll): a Buffer view per
 * entry made two heap objects per entry per scan, ~260,000 a scan of full
 * caches, which kept the agent's heap (and RSS) large and its scans slow.
 */
function offsetOf(s: Struct<never>, name: string, type: FieldType): number {
  const f = s.field(name);
  // A layout change must fail here, not read the wrong bytes.
  if (f.type !== type) throw new Error(`struct ${s.name}: field ${name} is ${JSON.stringify(f.type)}, expected ${type}`);
  return f.offset;
}
const asStruct = (s: unknown) => s as Struct<never>;
const P = {
  lastSeen: offsetOf(asStruct(path), 'last_seen', 'u64'),
  localIp: offsetOf(asStruct(path), 'local_ip', 'ipv4'),
  remoteIp: offsetOf(asStruct(path), 'remote_ip', 'ipv4'),
  localKey: offsetOf(asStruct(path), 'local_key', 'u16'),
  remoteKey: offsetOf(asStruct(path), 'remote_key', 'u16'),
  ifindex: offsetOf(asStruct(path), 'ifindex', 'u32'),
};
const EK = {
  local: offsetOf(asStruct(egressKey), 'local_pod', 'ipv4'),
  remote: offsetOf(asStruct(egressKey), 'remote_pod', 'ipv4'),
};
const IK = {
  host: offsetOf(asStruct(ingressKey), 'remote_host', 'ipv4'),
  key: offsetOf(asStruct(ingressKey), 'key', 'u16'),
};
const u32Of = (b: Buffer, at: number) => b.readUInt32LE(at);
const u16Of = (b: Buffer, at: number) => b.readUInt16LE(at);
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

/** Whether the last_seen of a raw path value (at byte `at` of v) is below the bound: idle longer than its limit. */
export function stampBelow(v: Buffer, bound: StampBound, at = 0): boolean {
  const hi = u32Of(v, at + P.lastSeen + 4);
  return hi < bound.hi || (hi === bound.hi && u32Of(v, at + P.lastSeen) < bound.lo);
}

/** Whether two raw path values (at byte aAt of a, bAt of b) hold the same last_seen. */
function sameStamp(a: Buffer, aAt: number, b: Buffer, bAt: number): boolean {
  return u32Of(a, aAt + P.lastSeen) === u32Of(b, bAt + P.lastSeen) && u32Of(a, aAt + P.lastSeen + 4) === u32Of(b, bAt + P.lastSeen + 4);
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
 * bytes. A Map per host of Buffers per key made two objects per entry.
 */
class PeerIndex {
  private readonly slots: Int32Array;
  private readonly mask: number;

  constructor(private readonly s: MapSnapshot) {
    let size = 16;
    while (size < s.count * 2) size *= 2;
    this.slots = new Int32Array(size).fill(-1);
    this.mask = size - 1;
    for (let i = 0; i < s.count; i++) {
      const at = i * s.keySize;
      let slot = this.hash(u32Of(s.keys, at + IK.host), u16Of(s.keys, at + IK.key));
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
    const { keys, keySize } = this.s;
    for (let slot = this.hash(host, key); ; slot = (slot + 1) & this.mask) {
      const i = this.slots[slot];
      if (i === -1) return -1;
      if (u32Of(keys, i * keySize + IK.host) === host && u16Of(keys, i * keySize + IK.key) === key) return i;
    }
  }
}

export interface ExpiryResult {
  /** unanswered: deleted because the peer stopped talking back, though masq kept the entry busy. */
  egress: { deleted: number; remaining: number; unanswered: number };
  ingress: { deleted: number; remaining: number };
}

type EgressVerdict = 'keep' | 'idle' | 'unanswered';

/**
 * Whether an egress entry (k, v: its raw key and value) still serves a live
 * pair; peer is the raw ingress entry under (v.remote_ip, v.local_key).
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
function judgeEgress(k: Buffer, ko: number, v: Buffer, vo: number, peer: Buffer | undefined, po: number, idle: StampBound): EgressVerdict {
  if (stampBelow(v, idle, vo)) return 'idle';
  if (u16Of(v, vo + P.localKey) === 0 || u16Of(v, vo + P.remoteKey) === 0) return 'keep';
  const answered = peer !== undefined && !isTombstone(peer, po)
    && u32Of(peer, po + P.localIp) === u32Of(k, ko + EK.local) && u32Of(peer, po + P.remoteIp) === u32Of(k, ko + EK.remote)
    && !stampBelow(peer, idle, po);
  return answered ? 'keep' : 'unanswered';
}

/** Writes into k the ingress key an egress entry's key for the peer lives under: (peer host, our key). */
function peerKeyInto(k: Buffer, v: Buffer, vo: number): void {
  v.copy(k, IK.host, vo + P.remoteIp, vo + P.remoteIp + 4);
  k.writeUInt16LE(u16Of(v, vo + P.localKey), IK.key);
}

/**
 * Deletes idle entries, and egress entries whose peer stopped answering
 * (judgeEgress). The programs write entries concurrently: each candidate is
 * read again, with the ingress entry it depends on, just before the delete
 * and spared if it no longer qualifies, which narrows the race to a few
 * microseconds; losing it only sends that flow back through the overlay to
 * learn again.
 */
export function expire(egress: MapOps, ingress: MapOps, now: bigint, egressIdleNs: bigint, ingressIdleNs: bigint): ExpiryResult {
  const egressIdle = stampBound(now, egressIdleNs), ingressIdle = stampBound(now, ingressIdleNs);
  const ing = ingress.readAll();
  const peers = new PeerIndex(ing);
  const eg = egress.readAll();
  // Candidates are read again one at a time into these, not into a Buffer each.
  const key = Buffer.alloc(eg.keySize), again = Buffer.alloc(eg.valueSize);
  const peerKey = Buffer.alloc(ing.keySize), peerNow = Buffer.alloc(ing.valueSize);

  const doomed = new KeyList(eg.keySize);
  let unanswered = 0;
  for (let i = 0; i < eg.count; i++) {
    const ko = i * eg.keySize, vo = i * eg.valueSize;
    const local = u16Of(eg.values, vo + P.localKey);
    const p = local ? peers.find(u32Of(eg.values, vo + P.remoteIp), local) : -1;
    if (judgeEgress(eg.keys, ko, eg.values, vo, p < 0 ? undefined : ing.values, p * ing.valueSize, egressIdle) === 'keep') continue;
    eg.keys.copy(key, 0, ko, ko + eg.keySize);
    if (!egress.lookupInto(key, again)) continue;
    let peerFound = false;
    if (u16Of(again, P.localKey)) {
      peerKeyInto(peerKey, again, 0);
      peerFound = ingress.lookupInto(peerKey, peerNow);
    }
    const verdict = judgeEgress(key, 0, again, 0, peerFound ? peerNow : undefined, 0, egressIdle);
    if (verdict === 'keep') continue;
    doomed.push(key, 0);
    if (verdict === 'unanswered') unanswered++;
  }
  const egressDeleted = egress.deleteKeys(doomed.keys, doomed.count);

  const stale = new KeyList(ing.keySize);
  const ingKey = Buffer.alloc(ing.keySize);
  for (let i = 0; i < ing.count; i++) {
    const vo = i * ing.valueSize;
    if (!stampBelow(ing.values, ingressIdle, vo)) continue;
    ing.keys.copy(ingKey, 0, i * ing.keySize, (i + 1) * ing.keySize);
    if (ingress.lookupInto(ingKey, peerNow) && sameStamp(peerNow, 0, ing.values, vo)) stale.push(ingKey, 0);
  }
  const ingressDeleted = ingress.deleteKeys(stale.keys, stale.count);
  return {
    egress: { deleted: egressDeleted, remaining: eg.count - egressDeleted, unanswered },
    ingress: { deleted: ingressDeleted, remaining: ing.count - ingressDeleted },
  };
}

/** Entries in a hash map, without decoding them. */
export function countEntries(map: MapOps): number {
  return map.readAll().count;
}
