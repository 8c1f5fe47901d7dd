/**
 * The agent's control loops on a simulated host, run by the agent's own
 * functions: dataplane/agent/caches.ts expires and purges, and
 * dataplane/agent/policy.ts (PolicyTable) compiles rules into policy_table and
 * policy_start. Those functions take any map of the MapOps contract
 * (dataplane/map-ops.ts: the kernel's maps as raw bytes); here they read the model's tables through ModelMapView, which gives each
 * entry's fields at the offsets of dataplane/maps.ts, so they see exactly the
 * bytes the kernel would hold.
 */
import type { MapOps, MapSnapshot, UpdateFlag } from '../../dataplane/map-ops.ts';
import { NO_HOST_NETNS, arrayIndex, policySlot, policyStart } from '../../dataplane/maps.ts';
import { expire, purgePod, type ExpiryResult } from '../../dataplane/agent/caches.ts';
import { CT_DRAIN_INTERVAL_MS, ConntrackDrain, type LiberalTable } from '../../dataplane/agent/conntrack.ts';
import type { Log } from '../../dataplane/agent/log.ts';
import { PolicyTable, type PolicyMap } from '../../dataplane/agent/policy.ts';
import type { PolicyRuleRecord } from '../../dataplane/agent/protocol.ts';
import { E2BIG, EEXIST, ENOENT, type DatapathState, type HashTable } from '../model/index.ts';

/** The model's errnos by the names a refused update reports (MapError.code). */
const ERRNO_NAMES: Record<number, string> = { [ENOENT]: 'ENOENT', [EEXIST]: 'EEXIST', [E2BIG]: 'E2BIG' };

/** A model table as the kernel's bytes, at the offsets of maps.ts (HashTable's byte boundary). */
export class ModelMapView implements MapOps {
  private snapshot = { keys: Buffer.alloc(0), values: Buffer.alloc(0) };
  private keySize = 0;

  constructor(private readonly table: HashTable<unknown, unknown>) {}

  get maxEntries(): number {
    return this.table.maxEntries;
  }

  lookup(k: Buffer): Buffer | undefined {
    return this.table.lookupBytes(k);
  }

  /**
   * The buffers are the table's own, rewritten by the next lookupBatch
   * (HashTable.entriesBytes), as MapOps allows: caches.ts reads a batch
   * before it reads the map's batch again and copies a value before it changes one.
   */
  lookupBatch(): Array<[Buffer, Buffer]> {
    return this.table.entriesBytes();
  }

  update(k: Buffer, v: Buffer, flags: UpdateFlag = 'any'): void {
    const rc = this.table.updateBytes(k, v, flags);
    // The kernel's errors as the kernel's maps report them (MapError.code).
    if (rc < 0) throw Object.assign(new Error(`update (${flags}): errno ${-rc}`), { code: ERRNO_NAMES[rc] });
  }

  /** As lookupBatch (the same buffers). */
  entries(): Array<[Buffer, Buffer]> {
    return this.table.entriesBytes();
  }

  delete(k: Buffer): boolean {
    return this.table.deleteBytes(k);
  }

  deleteBatch(keys: Buffer[]): number {
    let n = 0;
    for (const k of keys) if (this.table.deleteBytes(k)) n++;
    return n;
  }

  /** The entries packed into buffers this view keeps and reuses, as the kernel's maps do. */
  readAll(): MapSnapshot {
    const all = this.table.entriesBytes();
    const ks = all[0]?.[0].length ?? this.keySize, vs = all[0]?.[1].length ?? 0;
    this.keySize = ks;
    if (this.snapshot.keys.length < all.length * ks || this.snapshot.values.length < all.length * vs) {
      this.snapshot = { keys: Buffer.alloc(all.length * 2 * ks), values: Buffer.alloc(all.length * 2 * vs) };
    }
    all.forEach(([k, v], i) => {
      k.copy(this.snapshot.keys, i * ks);
      v.copy(this.snapshot.values, i * vs);
    });
    return { count: all.length, keys: this.snapshot.keys, values: this.snapshot.values, keySize: ks, valueSize: vs };
  }

  lookupInto(k: Buffer, v: Buffer): boolean {
    const got = this.table.lookupBytes(k);
    got?.copy(v);
    return got !== undefined;
  }

  /** The keys come from this map's readAll, which told us their size: the model's codecs have none. */
  deleteKeys(keys: Buffer, count: number): number {
    const ks = this.keySize;
    if (count > 0 && ks === 0) throw new Error('deleteKeys on a model table before a readAll that saw an entry: the key size is unknown');
    let n = 0;
    for (let i = 0; i < count; i++) if (this.table.deleteBytes(keys.subarray(i * ks, (i + 1) * ks))) n++;
    return n;
  }
}

export interface AgentTiming {
  egressIdleNs: number;
  ingressIdleNs: number;
  scanIntervalNs: number;
  /** How often ct_pending is drained (dataplane/agent/conntrack.ts CT_DRAIN_INTERVAL_MS, the default). */
  ctDrainNs?: number;
}

export const DEFAULT_CT_DRAIN_NS = CT_DRAIN_INTERVAL_MS * 1e6;
/** The agent's defaults (dataplane/agent/config.ts, conntrack.ts): 20 s, 40 s, a scan every second, its drain interval. */
export const DEFAULT_TIMING: AgentTiming = { egressIdleNs: 20e9, ingressIdleNs: 40e9, scanIntervalNs: 1e9, ctDrainNs: DEFAULT_CT_DRAIN_NS };

/** The drain's log: a warning would mean the simulated table refused, which it cannot; kept for a test to read. */
class MemoryLog implements Log {
  readonly lines: string[] = [];
  info(m: string): void { this.lines.push(m); }
  warn(m: string): void { this.lines.push(m); }
  error(m: string): void { this.lines.push(m); }
  debug(): void {}
}

export interface AgentFaults {
  /** A planted bug for the property tests: pod DEL leaves the pod's cache entries behind. */
  noPurgeOnDelete?: boolean;
}

export class SimAgent {
  private readonly egress: MapOps;
  private readonly ingress: MapOps;
  private readonly policyTable: PolicyTable;
  readonly expired = { egress: 0, ingress: 0, unanswered: 0 };
  /** The agent's own drain of ct_pending, making the host's entries liberal (undefined: the host has no conntrack). */
  readonly ctDrain: ConntrackDrain | undefined;
  readonly log = new MemoryLog();

  constructor(private readonly s: DatapathState, readonly timing: AgentTiming, private readonly faults: AgentFaults = {}, conntrack?: LiberalTable) {
    this.egress = new ModelMapView(s.egress_cache);
    this.ingress = new ModelMapView(s.ingress_cache);
    this.policyTable = new PolicyTable(tableView(s), startView(s), []);
    this.policyTable.sync();
    if (conntrack) {
      this.ctDrain = new ConntrackDrain(new ModelMapView(s.ct_pending), new ModelMapView(s.ct_admitted), this.log, () => conntrack, () => this.drainNow);
    }
  }

  /** The host's clock at the drain running now (the real agent reads CLOCK_MONOTONIC_COARSE). */
  private drainNow = 0n;

  /** One drain of ct_pending, and now and then a sweep of ct_admitted (every ctDrainNs). */
  drainConntrack(nowNs: bigint): void {
    this.drainNow = nowNs;
    this.ctDrain?.drain();
  }

  /** CNI ADD: the agent writes pod_info; a different pod on the same IP is forgotten first. */
  addPod(ip: string, mac: string, ifindex: number, nowNs: bigint): void {
    const old = this.s.pod_info.lookup(ip);
    if (old && (old.mac !== mac || old.ifindex !== ifindex)) this.forgetPod(ip, nowNs);
    this.s.pod_info.update(ip, { ifindex, mac, ...NO_HOST_NETNS });
  }

  /** CNI DEL, which runs before IPAM frees the IP. */
  delPod(ip: string, nowNs: bigint): void {
    this.forgetPod(ip, nowNs);
  }

  private forgetPod(ip: string, nowNs: bigint): void {
    this.s.pod_info.delete(ip);
    if (!this.faults.noPurgeOnDelete) purgePod(this.egress, this.ingress, ip, nowNs);
  }

  scan(nowNs: bigint): ExpiryResult {
    const r = expire(this.egress, this.ingress, nowNs, BigInt(this.timing.egressIdleNs), BigInt(this.timing.ingressIdleNs));
    this.expired.egress += r.egress.deleted;
    this.expired.ingress += r.ingress.deleted;
    this.expired.unanswered += r.egress.unanswered;
    return r;
  }

  /** Adds a deny rule (the agent's own PolicyTable: validation, compile, writes); returns its id. */
  addRule(spec: unknown): number {
    return this.policyTable.add(spec).id;
  }

  removeRule(id: number): boolean {
    if (!this.policyTable.list().some((r) => r.id === id)) return false;
    this.policyTable.remove(id);
    return true;
  }

  /** The rules in force, for the invariant checker. */
  get policy(): readonly PolicyRuleRecord[] {
    return this.policyTable.list();
  }
}

/** The model's policy_table as the kernel's bytes: slots by index, as the agent reads and writes them. */
function tableView(s: DatapathState): PolicyMap {
  const t = s.policy_table;
  const write = (k: Buffer, v: Buffer) => {
    if (!t.updateBytes(k, v)) throw Object.assign(new Error('policy_table: slot past its end'), { code: 'E2BIG' });
  };
  return {
    maxEntries: t.maxEntries,
    lookup: (k) => {
      const next = t.lookup(arrayIndex.decode(k).index);
      return next === undefined ? undefined : policySlot.encode({ next });
    },
    update: write,
    updateBatch: (keys, values, count) => {
      for (let i = 0; i < count; i++) write(keys.subarray(i * arrayIndex.size, (i + 1) * arrayIndex.size), values.subarray(i * policySlot.size, (i + 1) * policySlot.size));
    },
  };
}

/** The model's policy_start slot as the kernel's bytes. */
function startView(s: DatapathState): PolicyMap {
  return {
    maxEntries: 1,
    lookup: () => policyStart.encode(s.policy_start),
    update: (_k, v) => {
      s.policy_start = policyStart.decode(v);
    },
    updateBatch: () => {
      throw new Error('policy_start: one slot, never written in batches');
    },
  };
}
