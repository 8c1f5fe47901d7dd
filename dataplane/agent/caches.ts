/**
 * The flow caches as the agent sees them: dumped, purged for a pod, and
 * expired, always through the layouts of dataplane/maps.ts.
 */
import type { BpfMap } from '../libbpf.ts';
import { egressKey, ingressKey, path, type EgressKey, type IngressKey, type Path } from '../maps.ts';
import type { EgressDumpEntry, IngressDumpEntry, PathJson, Purged } from './protocol.ts';

export interface Entry<K> {
  /** The key exactly as the kernel holds it, for deletes. */
  raw: Buffer;
  key: K;
  value: Path;
}

export function readEgress(map: BpfMap): Entry<EgressKey>[] {
  return map.lookupBatch().map(([k, v]) => ({ raw: k, key: egressKey.decode(k), value: path.decode(v) }));
}

export function readIngress(map: BpfMap): Entry<IngressKey>[] {
  return map.lookupBatch().map(([k, v]) => ({ raw: k, key: ingressKey.decode(k), value: path.decode(v) }));
}

export function pathJson(p: Path): PathJson {
  return { ...p, last_seen: p.last_seen.toString() };
}

function idleSeconds(now: bigint, lastSeen: bigint): number {
  // A stamp newer than our clock read only means it was refreshed meanwhile.
  return now > lastSeen ? Number(now - lastSeen) / 1e9 : 0;
}

export function dumpEgress(map: BpfMap, now: bigint): EgressDumpEntry[] {
  return readEgress(map)
    .map((e) => ({ key: e.key, value: pathJson(e.value), idleSeconds: idleSeconds(now, e.value.last_seen) }))
    .sort((a, b) => a.key.local_pod.localeCompare(b.key.local_pod) || a.key.remote_pod.localeCompare(b.key.remote_pod));
}

export function dumpIngress(map: BpfMap, now: bigint): IngressDumpEntry[] {
  return readIngress(map)
    .map((e) => ({ key: e.key, value: pathJson(e.value), idleSeconds: idleSeconds(now, e.value.last_seen) }))
    .sort((a, b) => a.key.remote_host.localeCompare(b.key.remote_host) || a.key.key - b.key.key);
}

/**
 * Every entry that could deliver to or send for the pod at ip: egress
 * entries it is the local pod of, and ingress entries that restore into it.
 * The caller removes the pod from pod_info first, so that init cannot learn a
 * new entry for it while we sweep.
 */
export function purgePod(egress: BpfMap, ingress: BpfMap, ip: string): Purged {
  const e = readEgress(egress).filter((x) => x.key.local_pod === ip).map((x) => x.raw);
  const i = readIngress(ingress).filter((x) => x.value.local_ip === ip).map((x) => x.raw);
  return { egress: egress.deleteBatch(e), ingress: ingress.deleteBatch(i) };
}

export interface ExpiryResult {
  egress: { deleted: number; remaining: number };
  ingress: { deleted: number; remaining: number };
}

/**
 * Deletes the entries whose last_seen is older than the idle limits. The
 * programs refresh entries concurrently: each candidate is read once more
 * just before the delete and spared if its stamp moved, which narrows the
 * race to a few microseconds; losing it only sends that flow back through
 * the overlay to relearn.
 */
export function expire(egress: BpfMap, ingress: BpfMap, now: bigint, egressIdleNs: bigint, ingressIdleNs: bigint): ExpiryResult {
  const one = (map: BpfMap, entries: Entry<unknown>[], idleNs: bigint) => {
    const stale = entries.filter((x) => now - x.value.last_seen > idleNs);
    const confirmed: Buffer[] = [];
    for (const x of stale) {
      const v = map.lookup(x.raw);
      if (v && path.decode(v).last_seen === x.value.last_seen) confirmed.push(x.raw);
    }
    const deleted = map.deleteBatch(confirmed);
    return { deleted, remaining: entries.length - deleted };
  };
  return {
    egress: one(egress, readEgress(egress), egressIdleNs),
    ingress: one(ingress, readIngress(ingress), ingressIdleNs),
  };
}

/** Entries in a hash map, without decoding them. */
export function countEntries(map: BpfMap): number {
  return map.lookupBatch().length;
}
