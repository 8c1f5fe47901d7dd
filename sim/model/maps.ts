/**
 * Twin of bpf/maps.h: every map of the datapath, as the model holds them
 * (state.ts HashTable for the hash maps, policy-table.ts PolicySlots for policy_table;
 * config and policy_start, one-slot arrays, as their one value), and the helpers maps.h defines on them. The
 * counters map is RunEffects.counters and redirect_trace (test build) is
 * RunEffects.redirect (state.ts); maps.test.ts holds this list against the
 * maps of the built objects.
 */
import type { Struct } from '../../dataplane/layout.ts';
import {
  ConfigFlag, FILTER_BLOCK_BYTES, NO_OVERLAY, NO_SERVICES, NodeFlag, egressFilterSlot, ctAdmission, ctRecent, ctPendingValue, ctTuple, egressKey, ingressKey, nodeInfo, nodeIp, path, podInfo, podIp,
  UNCALIBRATED, type Clock, type Config, type CtAdmission, type CtTupleKey, type EgressKey, type IngressKey, type NodeInfo, type Path, type PodInfo, type PolicyStart,
} from '../../dataplane/maps.ts';
import { PolicySlots } from './policy-table.ts';
import { ModelCodec, ipKeys, structKeys } from './codec.ts';
import {
  HashTable, type Env,
  type ModelCtAdmission, type ModelCtRecent, type ModelCtTupleKey, type ModelEgressKey, type ModelIngressKey, type ModelNodeInfo, type ModelPath, type ModelPodInfo,
} from './state.ts';

/** The maps, by their names in the C. */
export interface DatapathState {
  /** Written by the agent (CNI ADD/DEL); read by init, restore (learning) and masq. */
  pod_info: HashTable<string, PodInfo, number, ModelPodInfo>;
  /** Written by init (outer headers, keys) and restore (peer key); read by masq. */
  egress_cache: HashTable<EgressKey, Path, ModelEgressKey, ModelPath>;
  /**
   * The egress entries' presence filter (bpf/maps.h): its blocks one after
   * another, their u64 words as pairs of u32 in the kernel's (little-endian)
   * order, so slot i of a half is bit i % 32 of u32 word i / 32 from the
   * half's start. Set in both halves by egressLookupOrCreate; masq reads the
   * half config.flags names.
   */
  egress_filter: Uint32Array;
  /** Written by init (when it allocates a key); read and refreshed by restore. */
  ingress_cache: HashTable<IngressKey, Path, ModelIngressKey, ModelPath>;
  /** Written by the agent; read by every program (config_get: its one slot). */
  config: Config;
  /** Deny rules compiled by the agent into tables of 256 slots (policy.ts); read by every program. */
  policy_table: PolicySlots;
  /** Where each direction's walk starts, switched by the agent once new tables are whole. */
  policy_start: PolicyStart;
  /** TCP flows to make liberal (conntrack.ts), written by masq and restore, drained by the agent. */
  ct_pending: HashTable<CtTupleKey, { queued: number }, ModelCtTupleKey, { queued: number }>;
  /** Flows conntrack admitted a moment ago (conntrack.ts), written by masq and restore. */
  ct_admitted: HashTable<CtTupleKey, CtAdmission, ModelCtTupleKey, ModelCtAdmission>;
  /**
   * One CPU's slots of ct_recent, the per-CPU first-level admission cache
   * (conntrack.ts), written and read by masq and restore: the model runs on
   * one CPU (the differential's kernel.ts compares it with the CPU the run took).
   */
  ct_recent: ModelCtRecent[];
  /** The overlay's nodes by underlay address, written by the agent; flag SELF marks this host's own (bpf/xmasq.h). */
  nodes: HashTable<string, NodeInfo, number, ModelNodeInfo>;
  /** The programs' clock (xmasqNow), written by the agent (dataplane/agent/clock.ts). */
  clock: Clock;
}

/** max_entries of the hash maps (maps.ts MAX_ENTRIES: the test build's or the production one's). */
export interface Sizes { pods: number; paths: number; policySlots: number; ctPending?: number; ctAdmitted?: number; ctRecentSlots?: number; nodes?: number; filterBlocks?: number }

const asStruct = (s: unknown) => s as Struct<never>;

/** The maps as a freshly loaded object holds them: hash maps empty, arrays zeroed. */
export function emptyState(sizes: Sizes): DatapathState {
  const paths = new ModelCodec<ModelPath>(asStruct(path));
  const tuples = structKeys<CtTupleKey, ModelCtTupleKey>(asStruct(ctTuple));
  return {
    pod_info: new HashTable(ipKeys(asStruct(podIp)), new ModelCodec<ModelPodInfo>(asStruct(podInfo)), sizes.pods),
    egress_cache: new HashTable(structKeys<EgressKey, ModelEgressKey>(asStruct(egressKey)), paths, sizes.paths),
    egress_filter: new Uint32Array((sizes.filterBlocks ?? 2) * (FILTER_BLOCK_BYTES / 4)),
    ingress_cache: new HashTable(structKeys<IngressKey, ModelIngressKey>(asStruct(ingressKey)), paths, sizes.paths),
    config: { nic_ifindex: 0, flags: 0, ...NO_OVERLAY, ...NO_SERVICES, vxlan_port: 0, geneve_port: 0 },
    policy_table: new PolicySlots(sizes.policySlots),
    policy_start: { egress: 0, ingress: 0 },
    ct_pending: new HashTable(tuples, new ModelCodec<{ queued: number }>(asStruct(ctPendingValue)), sizes.ctPending ?? 16),
    ct_admitted: new HashTable(tuples, new ModelCodec<ModelCtAdmission>(asStruct(ctAdmission)), sizes.ctAdmitted ?? 16),
    ct_recent: Array.from({ length: sizes.ctRecentSlots ?? 8 }, emptyCtRecent),
    nodes: new HashTable(ipKeys(asStruct(nodeIp)), new ModelCodec<ModelNodeInfo>(asStruct(nodeInfo)), sizes.nodes ?? 16),
    clock: { ...UNCALIBRATED },
  };
}

/** A zeroed slot of ct_recent (C: what a new map holds, and what a refusal leaves): protocol 0 is no flow. */
export function emptyCtRecent(): ModelCtRecent {
  return { flow: { saddr: 0, daddr: 0, sport: 0, dport: 0, protocol: 0 }, admitted: { checked: 0n, saddr: 0, daddr: 0, sport: 0, dport: 0 } };
}

/** ct_recent's slots to and from the kernel's bytes (one CPU's value of each, one after another). */
export const ctRecentCodec = new ModelCodec<ModelCtRecent>(asStruct(ctRecent));

/** A copy of every map, whose tables are of the same kind as s's. */
export function cloneState(s: DatapathState): DatapathState {
  return {
    pod_info: s.pod_info.clone(),
    egress_cache: s.egress_cache.clone(),
    egress_filter: s.egress_filter.slice(),
    ingress_cache: s.ingress_cache.clone(),
    config: { ...s.config },
    policy_table: s.policy_table.clone(),
    policy_start: { ...s.policy_start },
    ct_pending: s.ct_pending.clone(),
    ct_admitted: s.ct_admitted.clone(),
    ct_recent: s.ct_recent.map((r) => ({ flow: { ...r.flow }, admitted: { ...r.admitted } })),
    nodes: s.nodes.clone(),
    clock: { ...s.clock },
  };
}

const U64 = (1n << 64n) - 1n;

/**
 * C: xmasq_now. Now, in the coarse clock's nanoseconds: from jiffies through
 * the clock map, or the coarse clock itself while tick_ns is 0. u64
 * arithmetic, as in the C: a base far off or a tick that wraps gives the
 * same time there as here.
 */
export function xmasqNow(s: DatapathState, env: Env): bigint {
  const c = s.clock;
  if (c.tick_ns === 0n) return env.now;
  if (env.jiffies === undefined) throw new Error('the clock map is calibrated (tick_ns != 0) but the run gave no jiffies (Env.jiffies)');
  return (c.base_ns + ((env.jiffies - c.base_jiffies) & U64) * c.tick_ns) & U64;
}

/** C: is_peer_node. Whether addr is a node of the overlay other than this host. */
export function isPeerNode(s: DatapathState, addr: number): boolean {
  const n = s.nodes.lookupElem(addr);
  return n !== undefined && (n.flags & NodeFlag.SELF) === 0;
}

/** C: is_self. Whether addr is one of this host's own underlay addresses. */
export function isSelf(s: DatapathState, addr: number): boolean {
  const n = s.nodes.lookupElem(addr);
  return n !== undefined && (n.flags & NodeFlag.SELF) !== 0;
}

/** u32 words of a half: where the second half starts. */
const halfU32 = (s: DatapathState) => s.egress_filter.length / 2;

/** C: egress_filter_has. Whether the pair's bit is set in the half masq reads (config.flags). */
export function egressFilterHas(s: DatapathState, localPod: number, remotePod: number): boolean {
  const slot = egressFilterSlot(localPod, remotePod, halfU32(s) * 32);
  const i = (s.config.flags & ConfigFlag.FILTER_HALF1 ? halfU32(s) : 0) + (slot >>> 5);
  return (s.egress_filter[i] & (1 << (slot & 31))) !== 0;
}

/**
 * C: egress_filter_add. Sets the pair's bit in both halves (the C's atomic OR,
 * only where the bit is clear, sets the same bits).
 */
export function egressFilterAdd(s: DatapathState, localPod: number, remotePod: number): void {
  const slot = egressFilterSlot(localPod, remotePod, halfU32(s) * 32);
  for (let half = 0; half < 2; half++) s.egress_filter[half * halfU32(s) + (slot >>> 5)] |= 1 << (slot & 31);
}

/**
 * C: egress_lookup_or_create. The egress entry for a pod pair, created empty
 * if new, its filter bit set once created; undefined when the table is full.
 * (EEXIST from the insert: another CPU created it first and sets the bit.)
 */
export function egressLookupOrCreate(s: DatapathState, ek: ModelEgressKey): ModelPath | undefined {
  const e = s.egress_cache.lookupElem(ek);
  if (e) return e;
  if (s.egress_cache.updateElem(ek, zeroPath(), 'noexist') === 0) egressFilterAdd(s, ek.local_pod, ek.remote_pod);
  return s.egress_cache.lookupElem(ek);
}

/** A zeroed struct path, as the model holds it (C: struct path empty = {}). */
export function zeroPath(): ModelPath {
  return { last_seen: 0n, local_mac: 0, remote_mac: 0, local_ip: 0, remote_ip: 0, ifindex: 0, local_key: 0, remote_key: 0, remote_ready: 0 };
}

/** A zeroed struct path, as maps.ts types it (for callers at the boundary). */
export function emptyPath(): Path {
  return path.zero();
}
