/**
 * The ONE TypeScript definition of every map layout in bpf/xmasq.h and
 * bpf/maps.h. The agent, the CLI, the tests and the simulator all encode and
 * decode map entries through these; nobody packs a Buffer by hand elsewhere.
 * layout.test.ts checks each struct against the BTF of the built object.
 */
import { Struct, type StructValue } from './layout.ts';

// ---- constants (bpf/xmasq.h) ----
export const IP_RF = 0x8000;
export const IP_DF = 0x4000;
export const IP_MF = 0x2000;
export const IP_OFFSET = 0x1fff;
/** Narrow keys ride in DSCP; wide keys in a carrier word of TCP, UDP or ICMP echo (bpf/packet.h). */
export const KEY_MIN = 1;
export const KEY_MAX = 63;
export const KEY_COUNT = KEY_MAX - KEY_MIN + 1;
export const WIDE_KEY_MIN = 64;
export const WIDE_KEY_MAX = 16383;
export const WIDE_KEY_COUNT = WIDE_KEY_MAX - WIDE_KEY_MIN + 1;
export const KEY_TRIES = 9;
/** config.flags (XMASQ_CFG_*). */
export const ConfigFlag = { WIDE_KEYS: 0x1 } as const;
export const PORT_VXLAN = 4789;
export const PORT_VXLAN_LINUX = 8472;
export const PORT_GENEVE = 6081;
export const POLICY_MAX_MASKS = 31;

/** Map sizes of the two builds (bpf/maps.h). */
export const MAX_ENTRIES = {
  production: { pods: 1024, paths: 65536, rules: 65536, ctPending: 4096, ctAdmitted: 65536, nodes: 8192 },
  test: { pods: 16, paths: 64, rules: 32, ctPending: 16, ctAdmitted: 16, nodes: 16 },
} as const;

// ---- enums (bpf/xmasq.h); layout.test.ts holds them against the object's BTF ----
export const Counter = {
  MASQUERADED: 0,
  RESTORED: 1,
  LEARNED: 2,
  FELL_BACK: 3,
  KEY_EXHAUSTED: 4,
  POLICY_DROP: 5,
  PASSED: 6,
  RESTORE_MISS: 7,
  CT_REFUSED: 8,
  CT_NAT: 9,
  CT_PENDING: 10,
  NOT_OURS: 11,
  PEER_NOT_NODE: 12,
  SIGNAL_NOT_NODE: 13,
  SIGNAL_WRONG_NODE: 14,
  MARKED_NOT_NODE: 15,
  POD_MARKED: 16,
  SERVICE_NAT: 17,
} as const;
export const COUNTER_COUNT = 18;
export type CounterName = keyof typeof Counter;
export const COUNTER_NAMES = Object.keys(Counter) as CounterName[];

export const RedirectKind = { NONE: 0, EGRESS: 1, PEER: 2, RPEER: 3, INGRESS: 4 } as const;
export type RedirectKindName = keyof typeof RedirectKind;

/** What the programs read of a conntrack entry (bpf/xmasq.h, XMASQ_IPS_* and friends). */
export const CtBits = {
  IPS_SEEN_REPLY: 0x2, IPS_SRC_NAT: 0x10, IPS_DST_NAT: 0x20, TCP_CONNTRACK_ESTABLISHED: 3, TCP_FLAG_BE_LIBERAL: 0x08,
} as const;
/** How long a flow conntrack admitted is admitted again without a lookup (XMASQ_CT_RECHECK_NS). */
export const CT_RECHECK_NS = 200_000_000n;

/** node_info.flags (XMASQ_NODE_*): SELF marks one of this host's own addresses. */
export const NodeFlag = { SELF: 0x1 } as const;

export const PolicyDir = { EGRESS: 0, INGRESS: 1 } as const;
export const PolicyField = { SRC_IP: 1, DST_IP: 2, SRC_PORT: 4, DST_PORT: 8, PROTOCOL: 16 } as const;

// ---- structs ----
export const podIp = new Struct('pod_ip', [['ip', 'ipv4']] as const);
export const podInfo = new Struct('pod_info', [
  ['ifindex', 'u32'],
  ['mac', 'mac'],
  ['pad', { pad: 2 }],
  ['host_netns_id', 's32'],
  ['host_netns_ino', 'u32'],
] as const);
/** pod_info's host namespace fields when masq runs in the host's (veth mode): unread. */
export const NO_HOST_NETNS = { host_netns_id: -1, host_netns_ino: 0 } as const;
export const egressKey = new Struct('egress_key', [
  ['local_pod', 'ipv4'],
  ['remote_pod', 'ipv4'],
] as const);
export const ingressKey = new Struct('ingress_key', [
  ['remote_host', 'ipv4'],
  ['key', 'u16'],
  ['pad', { pad: 2 }],
] as const);
export const path = new Struct('path', [
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
export const config = new Struct('config', [
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
export const policyKey = new Struct('policy_key', [
  ['src_ip', 'ipv4'],
  ['dst_ip', 'ipv4'],
  ['src_port', 'be16'],
  ['dst_port', 'be16'],
  ['protocol', 'u8'],
  ['dir', 'u8'],
  ['pad', { pad: 2 }],
] as const);
export const policyRule = new Struct('policy_rule', [['id', 'u32']] as const);
export const policyMasks = new Struct('policy_masks', [
  ['count', 'u32'],
  ['mask', { u8array: POLICY_MAX_MASKS + 1 }],
] as const);
export const redirectTrace = new Struct('redirect_trace', [
  ['ifindex', 'u32'],
  ['kind', 'u32'],
] as const);
export const ctTuple = new Struct('ct_tuple', [
  ['saddr', 'ipv4'],
  ['daddr', 'ipv4'],
  ['sport', 'be16'],
  ['dport', 'be16'],
  ['protocol', 'u8'],
  ['pad', { pad: 3 }],
] as const);
export const ctPendingValue = new Struct('ct_pending_value', [['queued', 'u32']] as const);
export const ctAdmission = new Struct('ct_admission', [
  ['checked', 'u64'],
  ['saddr', 'ipv4'],
  ['daddr', 'ipv4'],
  ['sport', 'be16'],
  ['dport', 'be16'],
  ['pad', { pad: 4 }],
] as const);
/** nodes: key an underlay address (struct node_ip, a plain u32 in C), value its flags. */
export const nodeIp = new Struct('node_ip', [['ip', 'ipv4']] as const);
export const nodeInfo = new Struct('node_info', [['flags', 'u32']] as const);
export const arrayIndex = new Struct('array_index', [['index', 'u32']] as const);
export const counterValue = new Struct('counter_value', [['value', 'u64']] as const);

export type PodInfo = StructValue<typeof podInfo extends Struct<infer F> ? F : never>;
export type EgressKey = StructValue<typeof egressKey extends Struct<infer F> ? F : never>;
export type IngressKey = StructValue<typeof ingressKey extends Struct<infer F> ? F : never>;
export type Path = StructValue<typeof path extends Struct<infer F> ? F : never>;
export type Config = StructValue<typeof config extends Struct<infer F> ? F : never>;
export type PolicyKey = StructValue<typeof policyKey extends Struct<infer F> ? F : never>;
export type PolicyRule = StructValue<typeof policyRule extends Struct<infer F> ? F : never>;
export type PolicyMasks = StructValue<typeof policyMasks extends Struct<infer F> ? F : never>;
export type CtTupleKey = StructValue<typeof ctTuple extends Struct<infer F> ? F : never>;
export type CtAdmission = StructValue<typeof ctAdmission extends Struct<infer F> ? F : never>;
export type NodeInfo = StructValue<typeof nodeInfo extends Struct<infer F> ? F : never>;
export type RedirectTrace = StructValue<typeof redirectTrace extends Struct<infer F> ? F : never>;

/** Every map of the object: its C name, kind, and key/value layouts. */
export const MAPS = {
  pod_info: { kind: 'hash', key: podIp, value: podInfo },
  egress_cache: { kind: 'hash', key: egressKey, value: path },
  ingress_cache: { kind: 'hash', key: ingressKey, value: path },
  config: { kind: 'array', key: arrayIndex, value: config },
  policy_rules: { kind: 'hash', key: policyKey, value: policyRule },
  policy_masks: { kind: 'array', key: arrayIndex, value: policyMasks },
  ct_pending: { kind: 'hash', key: ctTuple, value: ctPendingValue },
  ct_admitted: { kind: 'hash', key: ctTuple, value: ctAdmission },
  nodes: { kind: 'hash', key: nodeIp, value: nodeInfo },
  counters: { kind: 'percpu_array', key: arrayIndex, value: counterValue },
  redirect_trace: { kind: 'array', key: arrayIndex, value: redirectTrace },
} as const;
export type MapName = keyof typeof MAPS;

/** The mask a policy rule implies: the fields it does not leave as "any". */
export function ruleMask(rule: PolicyKey): number {
  return (rule.src_ip !== '0.0.0.0' ? PolicyField.SRC_IP : 0)
    | (rule.dst_ip !== '0.0.0.0' ? PolicyField.DST_IP : 0)
    | (rule.src_port !== 0 ? PolicyField.SRC_PORT : 0)
    | (rule.dst_port !== 0 ? PolicyField.DST_PORT : 0)
    | (rule.protocol !== 0 ? PolicyField.PROTOCOL : 0);
}
