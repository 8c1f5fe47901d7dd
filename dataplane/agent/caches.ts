/**
 * The flow caches as the agent sees them: dumped, purged for a pod, and
 * expired, always through the layouts of dataplane/maps.ts.
 *
 * They take any map of the MapOps contract (dataplane/map-ops.ts): the
 * kernel's, or the cluster simulator's tables (sim/cluster/agent.ts), whose
 * lookupBatch reuses its value buffers.
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
  const want = u32Of(egressKey.encode({ local_pod: ip, remote_pod: ip }), EK.local);
  const e = egress.lookupBatch().filter(([k]) => u32Of(k, EK.local) === want).map(([k]) => k);
  let tombstoned = 0;
  for (const [k, v] of ingress.lookupBatch()) {
    if (u32Of(v, P.localIp) !== want || u32Of(v, P.ifindex) === 0) continue;
    const dead = Buffer.from(v);
    dead.writeUInt32LE(0, P.ifindex);
    dead.writeBigUInt64LE(now, P.lastSeen);
    // Only over the entry as it is: one the program meanwhile deleted stays deleted.
    try {
      ingress.update(k, dead, 'exist');
      tombstoned++;
    } catch (e) {
      if ((e as MapError).code !== 'ENOENT') throw e;
    }
  }
  return { egress: egress.deleteBatch(e), ingress: tombstoned };
}

/** Whether an ingress entry (its raw value) is a deleted pod's tombstone. */
export function isTombstone(v: Buffer): boolean {
  return u32Of(v, P.ifindex) === 0;
}

/*
 * Purge and expiry read whole caches, 65,536 entries each: decoding every
 * entry into strings costs ~10 µs, a second per cache, during which the agent
 * serves nothing. They read the few fields they need straight from the
 * kernel's bytes instead, at the offsets maps.ts defines; an address is
 * compared as the 32-bit number its four bytes make.
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

/** Whether the last_seen of a raw path value is below the bound: idle longer than its limit. */
export function stampBelow(v: Buffer, bound: StampBound): boolean {
  const hi = u32Of(v, P.lastSeen + 4);
  return hi < bound.hi || (hi === bound.hi && u32Of(v, P.lastSeen) < bound.lo);
}

/** Whether two raw path values hold the same last_seen. */
function sameStamp(a: Buffer, b: Buffer): boolean {
  return u32Of(a, P.lastSeen) === u32Of(b, P.lastSeen) && u32Of(a, P.lastSeen + 4) === u32Of(b, P.lastSeen + 4);
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
function judgeEgress(k: Buffer, v: Buffer, peer: Buffer | undefined, idle: StampBound): EgressVerdict {
  if (stampBelow(v, idle)) return 'idle';
  if (u16Of(v, P.localKey) === 0 || u16Of(v, P.remoteKey) === 0) return 'keep';
  const answered = peer !== undefined && !isTombstone(peer)
    && u32Of(peer, P.localIp) === u32Of(k, EK.local) && u32Of(peer, P.remoteIp) === u32Of(k, EK.remote)
    && !stampBelow(peer, idle);
  return answered ? 'keep' : 'unanswered';
}

/** The ingress key an egress entry's key for the peer lives under: (peer host, our key). */
function peerKey(v: Buffer): Buffer {
  const k = Buffer.alloc(ingressKey.size);
  v.copy(k, IK.host, P.remoteIp, P.remoteIp + 4);
  k.writeUInt16LE(u16Of(v, P.localKey), IK.key);
  return k;
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
  const ingressEntries = ingress.lookupBatch();
  // The batch's ingress entries by remote host, then key: Map keys of 32 bits
  // at most (one number of both, 48 bits, is a heap number per entry; filing
  // and finding 65,536 that way took ~2.5x as long in a micro-benchmark).
  const byHost = new Map<number, Map<number, Buffer>>();
  for (const [k, v] of ingressEntries) {
    const host = u32Of(k, IK.host);
    let keys = byHost.get(host);
    if (keys === undefined) byHost.set(host, (keys = new Map()));
    keys.set(u16Of(k, IK.key), v);
  }
  const snapshotPeer = (v: Buffer) => {
    const key = u16Of(v, P.localKey);
    return key ? byHost.get(u32Of(v, P.remoteIp))?.get(key) : undefined;
  };
  const currentPeer = (v: Buffer) => (u16Of(v, P.localKey) ? ingress.lookup(peerKey(v)) : undefined);

  const egressEntries = egress.lookupBatch();
  const doomed: Buffer[] = [];
  let unanswered = 0;
  for (const [k, v] of egressEntries) {
    if (judgeEgress(k, v, snapshotPeer(v), egressIdle) === 'keep') continue;
    const again = egress.lookup(k);
    if (!again) continue;
    const verdict = judgeEgress(k, again, currentPeer(again), egressIdle);
    if (verdict === 'keep') continue;
    doomed.push(k);
    if (verdict === 'unanswered') unanswered++;
  }
  const egressDeleted = egress.deleteBatch(doomed);

  const stale: Buffer[] = [];
  for (const [k, v] of ingressEntries) {
    if (!stampBelow(v, ingressIdle)) continue;
    const again = ingress.lookup(k);
    if (again && sameStamp(again, v)) stale.push(k);
  }
  const ingressDeleted = ingress.deleteBatch(stale);
  return {
    egress: { deleted: egressDeleted, remaining: egressEntries.length - egressDeleted, unanswered },
    ingress: { deleted: ingressDeleted, remaining: ingressEntries.length - ingressDeleted },
  };
}

/** Entries in a hash map, without decoding them. */
export function countEntries(map: MapOps): number {
  return map.lookupBatch().length;
}
