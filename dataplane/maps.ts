/**
 * The ONE TypeScript definition of every map layout in bpf/xmasq.h and
 * bpf/maps.h. The agent, the CLI, the tests and the simulator all encode and
 * decode map entries through these; nobody packs a Buffer by hand elsewhere.
 * layout.test.ts checks each struct against the BTF of the built object.
 */
import {
  COUNTER, COUNTER_MAX, CONSTS, MAP_MAX_ENTRIES, OBJECT_MAPS, POLICY_DIR, PROBE_CB, REDIRECT_KIND, STRUCTS, type ObjectMapName, type StructName,
} from './generated/objects.ts';
import { Struct, type Fields, type StructValue } from './layout.ts';

// ---- constants and enums (bpf/xmasq.h), read off the built objects' BTF by
// scripts/gen-objects.ts: a constant renamed or removed in C fails tsc here ----
export const IP_RF = CONSTS.IP_RF;
export const IP_DF = CONSTS.IP_DF;
export const IP_MF = CONSTS.IP_MF;
export const IP_OFFSET = CONSTS.IP_OFFSET;
/** Narrow keys ride in DSCP; wide keys in a carrier word of TCP, UDP or ICMP echo (bpf/packet.h). */
export const KEY_MIN = CONSTS.KEY_MIN;
export const KEY_MAX = CONSTS.KEY_MAX;
export const KEY_COUNT = CONSTS.KEY_COUNT;
export const WIDE_KEY_MIN = CONSTS.WIDE_KEY_MIN;
export const WIDE_KEY_MAX = CONSTS.WIDE_KEY_MAX;
export const WIDE_KEY_COUNT = CONSTS.WIDE_KEY_COUNT;
export const KEY_TRIES = CONSTS.KEY_TRIES;
/** config.flags (XMASQ_CFG_*). */
export const ConfigFlag = { WIDE_KEYS: CONSTS.CFG_WIDE_KEYS, FILTER_HALF1: CONSTS.CFG_FILTER_HALF1 } as const;
/** The IANA and Linux VXLAN ports and Geneve's: defaults of the agent, not of the C (config carries the ports). */
export const PORT_VXLAN = 4789;
export const PORT_VXLAN_LINUX = 8472;
export const PORT_GENEVE = 6081;
/**
 * The policy walk's verdicts (XMASQ_POLICY_*); any other value says where the
 * walk goes on: the key's byte (bits POLICY_POS_SHIFT and up) and the table.
 */
export const POLICY_ALLOW = CONSTS.POLICY_ALLOW;
export const POLICY_DENY = CONSTS.POLICY_DENY;
export const POLICY_POS_SHIFT = CONSTS.POLICY_POS_SHIFT;
export const POLICY_TABLE_MASK = CONSTS.POLICY_TABLE_MASK;
/** Slots of a table of policy_table: one per value of a byte. */
export const POLICY_TABLE_SLOTS = CONSTS.POLICY_TABLE_SLOTS;
/** The bytes of the key a walk reads (bpf/policy.h): src 0-3, dst 4-7, protocol 8, dport 9-10, sport 11-12. */
export const POLICY_KEY_BYTES = CONSTS.POLICY_KEY_BYTES;

/** Map sizes of the two builds (bpf/maps.h). */
export const MAX_ENTRIES = {
  production: maxEntries('production'),
  test: maxEntries('test'),
} as const;
function maxEntries<B extends 'production' | 'test'>(b: B) {
  const m = MAP_MAX_ENTRIES;
  return {
    pods: m.pod_info[b], paths: m.egress_cache[b], policySlots: m.policy_table[b],
    ctPending: m.ct_pending[b], ctAdmitted: m.ct_admitted[b], ctRecentSlots: m.ct_recent[b], nodes: m.nodes[b], filterBlocks: m.egress_filter[b],
  } as const;
}

/**
 * egress_filter (bpf/maps.h): two halves of blocks, a bit per slot; slot i of
 * a half is bit i % 64 of the half's u64 word i / 64, counting words across
 * its blocks (FILTER_BLOCK_BYTES each). A pod pair's slot in a half of
 * halfSlots slots, as egress_filter_slot computes it from the addresses as the
 * programs hold them (the key's words, network order read as a little-endian
 * u32: what readUInt32LE gives of the key's bytes).
 */
export function egressFilterSlot(localPod: number, remotePod: number, halfSlots: number): number {
  let x = (localPod ^ Math.imul(remotePod, 0x9e3779b1)) >>> 0;
  x ^= x >>> 16;
  x = Math.imul(x, 0x85ebca6b) >>> 0;
  x ^= x >>> 13;
  x = Math.imul(x, 0xc2b2ae35) >>> 0;
  x ^= x >>> 16;
  return (x & (halfSlots - 1)) >>> 0;
}

export const Counter = COUNTER;
export const COUNTER_COUNT = COUNTER_MAX;
export type CounterName = keyof typeof Counter;
export const COUNTER_NAMES = Object.keys(Counter) as CounterName[];

export const RedirectKind = REDIRECT_KIND;
export type RedirectKindName = keyof typeof RedirectKind;

/** What the programs read of a conntrack entry (bpf/xmasq.h, XMASQ_IPS_* and friends). */
export const CtBits = {
  IPS_SEEN_REPLY: CONSTS.IPS_SEEN_REPLY, IPS_SRC_NAT: CONSTS.IPS_SRC_NAT, IPS_DST_NAT: CONSTS.IPS_DST_NAT,
  TCP_CONNTRACK_ESTABLISHED: CONSTS.TCP_CONNTRACK_ESTABLISHED, TCP_FLAG_BE_LIBERAL: CONSTS.CT_TCP_FLAG_BE_LIBERAL,
} as const;
/** How long a flow conntrack admitted is admitted again without a lookup (XMASQ_CT_RECHECK_NS). */
export const CT_RECHECK_NS = BigInt(CONSTS.CT_RECHECK_NS);

/** node_info.flags (XMASQ_NODE_*): SELF marks one of this host's own addresses. */
export const NodeFlag = { SELF: CONSTS.NODE_SELF } as const;

export const PolicyDir = POLICY_DIR;

// ---- structs ----

type SpecNames<F extends Fields> = { -readonly [K in keyof F]: F[K] extends readonly [infer N, unknown] ? N : never };
type MemberNames<M> = { -readonly [K in keyof M]: M[K] extends readonly [infer X, number, number] ? X : never };
type CNames<N extends StructName> = MemberNames<(typeof STRUCTS)[N]['members']>;
/** unknown when spec's field names are the C struct's member names in order; never (a tsc error) otherwise. */
type SameNames<N extends StructName, F extends Fields> =
  [SpecNames<F>] extends [CNames<N>] ? ([CNames<N>] extends [SpecNames<F>] ? unknown : never) : never;

/**
 * A struct of xmasq.h: tsc refuses field names other than the C members in
 * their order (generated/objects.ts), and importing this module throws if a
 * field's offset or size differs from the C's, before any map entry is
 * written with a wrong layout. layout.test.ts holds both against each build's BTF.
 */
function cStruct<N extends StructName, const F extends Fields>(name: N, spec: F & SameNames<N, F>): Struct<F> {
  const s = new Struct<F>(name, spec);
  const c = STRUCTS[name];
  const got = JSON.stringify({ size: s.size, members: s.fields.map((f) => [f.name, f.offset, f.size]) });
  if (got !== JSON.stringify(c)) {
    throw new Error(`dataplane/maps.ts lays out struct ${name} as ${got}, the built objects as ${JSON.stringify(c)}: change maps.ts with bpf/xmasq.h (and run npm run build:bpf)`);
  }
  return s;
}

export const podIp = new Struct('pod_ip', [['ip', 'ipv4']] as const);
export const podInfo = cStruct('pod_info', [
  ['ifindex', 'u32'],
  ['mac', 'mac'],
  ['pad', { pad: 2 }],
  ['host_netns_id', 's32'],
  ['host_netns_ino', 'u32'],
] as const);
/** pod_info's host namespace fields when masq runs in the host's (veth mode): unread. */
export const NO_HOST_NETNS = { host_netns_id: -1, host_netns_ino: 0 } as const;
export const egressKey = cStruct('egress_key', [
  ['local_pod', 'ipv4'],
  ['remote_pod', 'ipv4'],
] as const);
export const ingressKey = cStruct('ingress_key', [
  ['remote_host', 'ipv4'],
  ['key', 'u16'],
  ['pad', { pad: 2 }],
] as const);
export const path = cStruct('path', [
  ['last_seen', 'u64'],
  ['local_mac', 'mac'],
  ['remote_mac', 'mac'],
  ['local_ip', 'ipv4'],
  ['remote_ip', 'ipv4'],
  ['ifindex', 'u32'],
  ['local_key', 'u16'],
  ['remote_key', 'u16'],
  ['remote_ready', 'u8'],
  ['pad', { pad: 3 }],
] as const);
export const config = cStruct('config', [
  ['nic_ifindex', 'u32'],
  ['flags', 'u32'],
  ['overlay_ifindex', 'u32'],
  ['overlay_mac', 'mac'],
  ['pad', { pad: 2 }],
  ['service_net', 'ipv4'],
  ['service_mask', 'ipv4'],
  ['vxlan_port', 'be16'],
  ['geneve_port', 'be16'],
] as const);
/** config's overlay fields when no overlay device is configured (restore hands to the stack at the NIC). */
export const NO_OVERLAY = { overlay_ifindex: 0, overlay_mac: '00:00:00:00:00:00' } as const;
/** config's tunnel ports of Flannel's VXLAN (the kernel's historical 8472) and of Geneve (IANA 6081). */
export const FLANNEL_PORTS = { vxlan_port: 8472, geneve_port: 6081 } as const;
/** config's Service range when none is configured (masq never looks a Service up). */
export const NO_SERVICES = { service_net: '0.0.0.0', service_mask: '0.0.0.0' } as const;
/** A slot of policy_table (bpf/xmasq.h): a verdict, or the key's byte and the table the walk goes on with. */
export const policySlot = cStruct('policy_slot', [['next', 'u32']] as const);
export const policyStart = cStruct('policy_start', [['egress', 'u32'], ['ingress', 'u32']] as const);
export type PolicyStart = StructValue<typeof policyStart extends Struct<infer F> ? F : never>;
export const redirectTrace = cStruct('redirect_trace', [
  ['ifindex', 'u32'],
  ['kind', 'u32'],
] as const);
export const ctTuple = cStruct('ct_tuple', [
  ['saddr', 'ipv4'],
  ['daddr', 'ipv4'],
  ['sport', 'be16'],
  ['dport', 'be16'],
  ['protocol', 'u8'],
  ['pad', { pad: 3 }],
] as const);
export const ctPendingValue = new Struct('ct_pending_value', [['queued', 'u32']] as const);
export const ctAdmission = cStruct('ct_admission', [
  ['checked', 'u64'],
  ['saddr', 'ipv4'],
  ['daddr', 'ipv4'],
  ['sport', 'be16'],
  ['dport', 'be16'],
  ['pad', { pad: 4 }],
] as const);
/** A slot of ct_recent (bpf/xmasq.h struct ct_recent): a flow and its admission. */
export const ctRecent = cStruct('ct_recent', [
  ['flow', { struct: ctTuple }],
  ['admitted', { struct: ctAdmission }],
] as const);
/**
 * clock's one value (bpf/xmasq.h struct xmasq_clock): the programs' now is
 * base_ns + (jiffies - base_jiffies) * tick_ns, or the coarse clock while
 * tick_ns is 0 (bpf/maps.h xmasq_now; dataplane/agent/clock.ts writes it).
 */
export const clock = cStruct('xmasq_clock', [
  ['base_ns', 'u64'],
  ['base_jiffies', 'u64'],
  ['tick_ns', 'u64'],
] as const);
/** clock's value before the agent calibrates it: the programs read the coarse clock. */
export const UNCALIBRATED = { base_ns: 0n, base_jiffies: 0n, tick_ns: 0n } as const;
/** The cb[] words clock_probe writes jiffies and the coarse clock into (low, high u32 each). */
export const ProbeCb = PROBE_CB;
/** nodes: key an underlay address (struct node_ip, a plain u32 in C), value its flags. */
export const nodeIp = new Struct('node_ip', [['ip', 'ipv4']] as const);
export const nodeInfo = cStruct('node_info', [['flags', 'u32']] as const);
export const arrayIndex = new Struct('array_index', [['index', 'u32']] as const);
export const counterValue = new Struct('counter_value', [['value', 'u64']] as const);
/** egress_filter's value: 4096 slots' bits, its u64 words' bytes (little-endian) as they lie. */
export const filterBlock = cStruct('egress_filter_block', [['words', { u8array: 512 }]] as const);
/** Bytes of an egress_filter block. */
export const FILTER_BLOCK_BYTES = filterBlock.size;

export type PodInfo = StructValue<typeof podInfo extends Struct<infer F> ? F : never>;
export type EgressKey = StructValue<typeof egressKey extends Struct<infer F> ? F : never>;
export type IngressKey = StructValue<typeof ingressKey extends Struct<infer F> ? F : never>;
export type Path = StructValue<typeof path extends Struct<infer F> ? F : never>;
export type Config = StructValue<typeof config extends Struct<infer F> ? F : never>;
export type CtTupleKey = StructValue<typeof ctTuple extends Struct<infer F> ? F : never>;
export type CtAdmission = StructValue<typeof ctAdmission extends Struct<infer F> ? F : never>;
export type CtRecent = StructValue<typeof ctRecent extends Struct<infer F> ? F : never>;
export type NodeInfo = StructValue<typeof nodeInfo extends Struct<infer F> ? F : never>;
export type Clock = StructValue<typeof clock extends Struct<infer F> ? F : never>;
export type RedirectTrace = StructValue<typeof redirectTrace extends Struct<infer F> ? F : never>;

/**
 * Every map of the object: its C name, kind, and key/value layouts. tsc
 * refuses a name the test build (which has every map) does not declare, or a
 * map of it left out; importing this module throws if a kind or a size differs.
 */
export const MAPS = {
  pod_info: { kind: 'hash', key: podIp, value: podInfo },
  egress_cache: { kind: 'hash', key: egressKey, value: path },
  egress_filter: { kind: 'array', key: arrayIndex, value: filterBlock },
  ingress_cache: { kind: 'hash', key: ingressKey, value: path },
  config: { kind: 'array', key: arrayIndex, value: config },
  policy_table: { kind: 'array', key: arrayIndex, value: policySlot },
  policy_start: { kind: 'array', key: arrayIndex, value: policyStart },
  ct_pending: { kind: 'hash', key: ctTuple, value: ctPendingValue },
  ct_admitted: { kind: 'hash', key: ctTuple, value: ctAdmission },
  ct_recent: { kind: 'percpu_array', key: arrayIndex, value: ctRecent },
  nodes: { kind: 'hash', key: nodeIp, value: nodeInfo },
  clock: { kind: 'array', key: arrayIndex, value: clock },
  counters: { kind: 'percpu_array', key: arrayIndex, value: counterValue },
  redirect_trace: { kind: 'array', key: arrayIndex, value: redirectTrace },
} as const satisfies Record<ObjectMapName<'test'>, { kind: string; key: Struct<never>; value: Struct<never> }>;
for (const [name, m] of Object.entries(MAPS)) {
  const c = OBJECT_MAPS[name as ObjectMapName<'test'>];
  if (m.kind !== c.type || m.key.size !== c.keySize || m.value.size !== c.valueSize) {
    throw new Error(`dataplane/maps.ts describes map ${name} as a ${m.kind} of ${m.key.size}-byte keys and ${m.value.size}-byte values, the built objects as a ${c.type} of ${c.keySize} and ${c.valueSize}: change maps.ts with bpf/maps.h`);
  }
}
export type MapName = keyof typeof MAPS;
