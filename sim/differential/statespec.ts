/**
 * A map state as plain JSON (what a fixture's .json holds and what the
 * generators produce), and its conversion to the model's state.
 */
import type { Config, EgressKey, IngressKey, NodeInfo, Path, PodInfo } from '../../dataplane/maps.ts';
import { compile } from '../../dataplane/agent/policy.ts';
import { POLICY_TABLE_SLOTS } from '../../dataplane/maps.ts';
import type { PolicyRuleRecord } from '../../dataplane/agent/protocol.ts';
import { egressFilterAdd, emptyState, type DatapathState, type Sizes } from '../model/index.ts';
import { ModelConntrack, ipWord, type ModelCtTuple } from '../model/conntrack.ts';
import { inverse, type CtEntrySpec, type CtTuple } from '../../dataplane/conntrack.ts';
import { CtBits, NO_HOST_NETNS } from '../../dataplane/maps.ts';

/** A path with its u64 timestamp as a decimal string, for JSON. */
export type PathJson = Omit<Path, 'last_seen'> & { last_seen: string };

export interface StateSpec {
  pod_info?: Array<{ ip: string } & Pick<PodInfo, 'ifindex' | 'mac'>>;
  egress_cache?: Array<{ key: EgressKey; value: PathJson }>;
  ingress_cache?: Array<{ key: IngressKey; value: PathJson }>;
  config?: Config;
  /** Deny rules as the agent stores them; the state holds what the agent compiles them to. */
  policy?: PolicyRuleRecord[];
  /** The overlay's nodes by underlay address (flags: NodeFlag.SELF for this host's own). */
  nodes?: Array<{ ip: string } & NodeInfo>;
  /**
   * true: egress_filter as a version without it leaves it, empty, whatever the
   * entries (an upgrade before the agent filled it). Otherwise every egress
   * entry's bit is set, as the programs and the agent keep it.
   */
  egress_filter_empty?: boolean;
}

export type ProgramName = 'init' | 'restore' | 'masq';

/** The host's conntrack entries for a case, as dataplane/conntrack.ts creates them. */
export type ConntrackSpec = CtEntrySpec[];

/**
 * The model's view of the entries the kernel holds once ctnetlink created
 * them: a DNAT rewrites the reply direction's source and sets IPS_DST_NAT, an
 * SNAT its destination and IPS_SRC_NAT (each only if it changed the tuple);
 * the TCP flags are exactly the liberal bits the creator set.
 */
export function modelConntrack(spec: ConntrackSpec): ModelConntrack {
  const word = (t: CtTuple): ModelCtTuple => ({ src: ipWord(t.src), dst: ipWord(t.dst), sport: t.sport, dport: t.dport, proto: t.proto });
  return new ModelConntrack(spec.map((e) => {
    let reply = inverse(e.orig);
    if (e.dnat) reply = { ...reply, src: e.dnat.ip, sport: e.dnat.port };
    if (e.snat) reply = { ...reply, dst: e.snat.ip, dport: e.snat.port };
    // The kernel marks a NAT only when it changed the tuple (nf_nat_setup_info).
    const dnated = e.dnat !== undefined && (e.dnat.ip !== e.orig.dst || e.dnat.port !== e.orig.dport);
    const snated = e.snat !== undefined && (e.snat.ip !== e.orig.src || e.snat.port !== e.orig.sport);
    const lib = e.liberal ?? [false, false];
    return {
      orig: word(e.orig), reply: word(reply),
      status: e.status | (dnated ? CtBits.IPS_DST_NAT : 0) | (snated ? CtBits.IPS_SRC_NAT : 0),
      tcpState: e.orig.proto === 6 ? (e.tcpState ?? CtBits.TCP_CONNTRACK_ESTABLISHED) : 0,
      flags: [lib[0] ? CtBits.TCP_FLAG_BE_LIBERAL : 0, lib[1] ? CtBits.TCP_FLAG_BE_LIBERAL : 0],
    };
  }));
}

/** The __sk_buff fields BPF_PROG_TEST_RUN lets a test set. */
export interface SkbContext {
  ifindex?: number;
  ingress_ifindex?: number;
  mark?: number;
  /** Non-zero makes the packet a GSO packet (skb->gso_size), as a TSO stream's overlay packets are. */
  gso_size?: number;
}

export function pathFromJson(p: PathJson): Path {
  return { ...p, last_seen: BigInt(p.last_seen) };
}

export function stateFromSpec(spec: StateSpec, sizes: Sizes): DatapathState {
  const s = emptyState(sizes);
  for (const p of spec.pod_info ?? []) {
    must(s.pod_info.update(p.ip, { ifindex: p.ifindex, mac: p.mac, ...NO_HOST_NETNS }), `pod_info ${p.ip}`);
  }
  for (const e of spec.egress_cache ?? []) must(putEgress(s, e.key, pathFromJson(e.value), { filter: !spec.egress_filter_empty }), 'egress_cache');
  for (const e of spec.ingress_cache ?? []) must(s.ingress_cache.update(e.key, pathFromJson(e.value)), 'ingress_cache');
  if (spec.config) s.config = { ...spec.config };
  if (spec.policy) installPolicy(s, spec.policy);
  for (const n of spec.nodes ?? []) must(s.nodes.update(n.ip, { flags: n.flags }), `nodes ${n.ip}`);
  return s;
}

/**
 * An egress entry written into a state as a program or the agent leaves it:
 * with the pair's bit in both halves of egress_filter (model maps.ts
 * egressFilterAdd), unless filter is false (a state a version without the
 * filter left). Every state the harness makes writes its egress entries here.
 */
export function putEgress(s: DatapathState, key: EgressKey, value: Path, opts: { flag?: 'any' | 'noexist' | 'exist'; filter?: boolean } = {}): number {
  const rc = s.egress_cache.update(key, value, opts.flag);
  if (rc === 0 && opts.filter !== false) {
    const k = s.egress_cache.keys.fromLayout(key);
    egressFilterAdd(s, k.local_pod, k.remote_pod);
  }
  return rc;
}

/**
 * The tables the agent's compiler (dataplane/agent/policy.ts) makes of rules
 * (ids 1, 2, …), written into the state's policy_table and policy_start.
 * False when they do not fit the table (the state is then left without them).
 */
export function installPolicy(s: DatapathState, rules: readonly PolicyRuleRecord[]): boolean {
  const t = compile(rules);
  if ((t.tables.size + 1) * POLICY_TABLE_SLOTS > s.policy_table.maxEntries) return false;
  for (const [id, slots] of t.tables) slots.forEach((next, v) => s.policy_table.update(id * POLICY_TABLE_SLOTS + v, next));
  s.policy_start = { ...t.start };
  return true;
}

function must(rc: number, what: string): void {
  if (rc !== 0) throw new Error(`state spec: cannot insert into ${what} (errno ${-rc}); is the table over its size?`);
}
