/**
 * Twin of bpf/conntrack.h: flow admission by the host's conntrack. The
 * host's table is an input of the model, like the clock: the differential
 * fills the kernel's real table with the same entries (dataplane/conntrack.ts).
 */
import { CT_RECHECK_NS, CtBits, type CounterName } from '../../dataplane/maps.ts';
import { ipv4ToBytes } from '../../dataplane/layout.ts';
import { IPPROTO_TCP, IPPROTO_UDP, isFragment, readIpv4, type Hdrs } from './packet.ts';
import { emptyCtRecent, xmasqNow, type DatapathState } from './maps.ts';
import type { ModelCtAdmission, ModelCtRecent, ModelCtTupleKey } from './state.ts';
import type { Env } from './state.ts';

const TCP_FLAG_FIN = 0x01;
const TCP_FLAG_SYN = 0x02;
const TCP_FLAG_RST = 0x04;

/** A flow's tuple as the programs hold it: address words (packet.ts readIpv4), ports in host order. */
export interface ModelCtTuple { src: number; dst: number; sport: number; dport: number; proto: number }

/** What the programs read of an entry. */
export interface ModelCtEntry {
  orig: ModelCtTuple;
  reply: ModelCtTuple;
  status: number;
  tcpState: number;
  /** ip_ct_tcp_state.flags of the original and the reply direction. */
  flags: [number, number];
}

/** The conntrack table the programs consult: an entry is found by either direction's tuple. */
export class ModelConntrack {
  private readonly byTuple = new Map<string, ModelCtEntry>();

  constructor(entries: ModelCtEntry[] = []) {
    for (const e of entries) this.add(e);
  }

  add(e: ModelCtEntry): void {
    this.byTuple.set(tupleName(e.orig), e);
    this.byTuple.set(tupleName(e.reply), e);
  }

  lookup(t: ModelCtTuple): ModelCtEntry | undefined {
    return this.byTuple.get(tupleName(t));
  }

  get size(): number {
    return new Set(this.byTuple.values()).size;
  }
}

function tupleName(t: ModelCtTuple): string {
  return `${t.src}|${t.dst}|${t.sport}|${t.dport}|${t.proto}`;
}

/** The address word of dotted text, as readIpv4 reads it from a packet. */
export function ipWord(ip: string): number {
  const b = Buffer.alloc(4);
  ipv4ToBytes(ip, b, 0);
  return readIpv4(b, 0);
}

/**
 * C: XMASQ_CT_CURRENT_NETNS, XMASQ_CT_NO_NETNS. Whose conntrack ctAdmit
 * consults: the program's own namespace's (the host's, where init, restore and
 * masq run), or the host's by the id the program's namespace gives it
 * (masq_rpeer, in the pod's); NONE: the host's has no id there, nothing admitted.
 */
export const CT_CURRENT_NETNS = -1;
export const CT_NO_NETNS = -2;

/** C: enum xmasq_nat_side. Which end of a flow the caller lets the host's NAT move. */
export const NatSide = { NONE: 0, DST: 1, SRC: 2 } as const;

/** The flow as the host sends it on (C: the struct ct_tuple ct_admit fills); words and host-order ports. */
export interface CtTo { saddr: number; daddr: number; sport: number; dport: number }
export const newCtTo = (): CtTo => ({ saddr: 0, daddr: 0, sport: 0, dport: 0 });

/** The C's XMASQ_CT_ADMIT: admitted. Anything else is the counter to bump. */
export const CT_ADMIT = 'ADMIT';
export type CtVerdict = typeof CT_ADMIT | Extract<CounterName, 'CT_REFUSED' | 'CT_NAT' | 'CT_PENDING'>;

/**
 * C: ct_admit. The flow of a pod packet from src to dst, ports and protocol
 * from h. When admitted, to is the flow as the host sends it on: the same, or
 * NATed at the end side allows. Without a table, the build without the check
 * (XMASQ_NO_CONNTRACK). netnsId: the host's namespace, CT_CURRENT_NETNS or its
 * id from where the program runs, whose inode netnsIno the entry found must
 * then be in (env.conntrack is the table of the namespace env.netnsIno names).
 */
export function ctAdmit(s: DatapathState, env: Env, h: Hdrs, src: number, dst: number, netnsId: number, netnsIno: number,
  side: number, to: CtTo): CtVerdict {
  to.saddr = src;
  to.daddr = dst;
  to.sport = h.sport;
  to.dport = h.dport;
  const ct = env.conntrack;
  if (ct === undefined) return CT_ADMIT;
  if ((h.proto !== IPPROTO_TCP && h.proto !== IPPROTO_UDP) || !h.l4_ok || isFragment(h)) return 'CT_REFUSED';
  if (h.proto === IPPROTO_TCP && (h.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST))) return 'CT_REFUSED';
  if (netnsId < CT_CURRENT_NETNS) return 'CT_REFUSED';

  const k = { saddr: src, daddr: dst, sport: h.sport, dport: h.dport, protocol: h.proto };
  // C: the caller's clock read (now); the same within a run.
  const now = xmasqNow(s, env);
  // This CPU's slot first (C: an inlined array lookup).
  const slot = ctRecentSlot(k, s.ct_recent.length);
  const r = s.ct_recent[slot];
  const mine = ctTupleEq(r.flow, k);
  if (mine && now >= r.admitted.checked && now - r.admitted.checked < CT_RECHECK_NS) {
    ctAdmissionApply(r.admitted, to);
    return natAllowed(k, to, side) ? CT_ADMIT : 'CT_NAT';
  }

  // C copies the entry and checks the copy (ct_admitted_copy): another CPU may
  // free and reuse the element under the read. One thread here: always whole.
  const seen = s.ct_admitted.lookupElem(k);
  if (seen && now >= seen.checked && now - seen.checked < CT_RECHECK_NS) {
    ctAdmissionApply(seen, to);
    if (!natAllowed(k, to, side)) return 'CT_NAT';
    // The entry's own time: the slot must not outlive the check it copies.
    ctRecentPut(r, k, seen.checked, to);
    return CT_ADMIT;
  }

  let e = ct.lookup({ src, dst, sport: h.sport, dport: h.dport, proto: h.proto });
  // An id is a number of the program's namespace: the entry must be the host's, by its inode.
  if (e && netnsId !== CT_CURRENT_NETNS && env.netnsIno !== netnsIno) e = undefined;
  if (!e) {
    if (seen) s.ct_admitted.deleteElem(k);
    if (mine) s.ct_recent[slot] = emptyCtRecent();
    return 'CT_REFUSED';
  }

  let verdict: CtVerdict = CT_ADMIT;
  if (e.status & CtBits.IPS_SRC_NAT) verdict = 'CT_NAT';
  else if (h.proto === IPPROTO_UDP) verdict = e.status & CtBits.IPS_SEEN_REPLY ? CT_ADMIT : 'CT_REFUSED';
  else if (e.tcpState !== CtBits.TCP_CONNTRACK_ESTABLISHED) verdict = 'CT_REFUSED';
  else if (!(e.flags[0] & e.flags[1] & CtBits.TCP_FLAG_BE_LIBERAL)) verdict = 'CT_PENDING';
  if (verdict === CT_ADMIT && e.status & CtBits.IPS_DST_NAT) {
    ctTranslated(e, k, to);
    if (!natAllowed(k, to, side)) verdict = 'CT_NAT';
  }

  if (verdict === CT_ADMIT) {
    s.ct_admitted.updateElem(k, ctAdmissionOf(to, now), 'any');
    ctRecentPut(r, k, now, to);
    return verdict;
  }
  // No longer admitted: the cached admission must not outlive the entry's change.
  if (seen) s.ct_admitted.deleteElem(k);
  if (mine) s.ct_recent[slot] = emptyCtRecent();
  // A plain hash: when full, the insert fails and the flow waits (maps.h).
  if (verdict === 'CT_PENDING') s.ct_pending.updateElem(k, { queued: 1 }, 'any');
  return verdict;
}

type FlowKey = { saddr: number; daddr: number; sport: number; dport: number };

const swap16 = (x: number) => ((x & 0xff) << 8) | (x >>> 8);

/**
 * C: ct_recent_slot. The flow's slot of ct_recent (of slots, a power of two):
 * murmur3's finalizer over the tuple as the C holds it, ports in network order.
 */
export function ctRecentSlot(k: FlowKey & { protocol: number }, slots: number): number {
  const ports = ((swap16(k.sport) << 16) | swap16(k.dport)) >>> 0;
  let x = (k.saddr ^ Math.imul(k.daddr, 0x9e3779b1) ^ Math.imul(ports, 0x85ebca6b) ^ k.protocol) >>> 0;
  x ^= x >>> 16;
  x = Math.imul(x, 0x85ebca6b) >>> 0;
  x ^= x >>> 13;
  x = Math.imul(x, 0xc2b2ae35) >>> 0;
  x ^= x >>> 16;
  return (x & (slots - 1)) >>> 0;
}

/** C: ct_tuple_eq. Whether a and b are one flow. */
function ctTupleEq(a: ModelCtTupleKey, b: ModelCtTupleKey): boolean {
  return a.protocol === b.protocol && a.saddr === b.saddr && a.daddr === b.daddr && a.sport === b.sport && a.dport === b.dport;
}

/** C: ct_recent_put. The slot now holds the flow k, admitted as to by the lookup made at checked. */
function ctRecentPut(r: ModelCtRecent, k: ModelCtTupleKey, checked: bigint, to: CtTo): void {
  r.flow = { saddr: k.saddr, daddr: k.daddr, sport: k.sport, dport: k.dport, protocol: k.protocol };
  r.admitted = ctAdmissionOf(to, checked);
}

/** C: ct_admission_of. The admission of a flow the host sends on as to, by a lookup made at checked. */
function ctAdmissionOf(to: CtTo, checked: bigint): ModelCtAdmission {
  return { checked, saddr: to.saddr, daddr: to.daddr, sport: to.sport, dport: to.dport };
}

/** C: ct_admission_apply. The flow as admission a says the host sends it on, into to. */
function ctAdmissionApply(a: ModelCtAdmission, to: CtTo): void {
  to.saddr = a.saddr;
  to.daddr = a.daddr;
  to.sport = a.sport;
  to.dport = a.dport;
}

/**
 * C: ct_translated. A packet of the original direction leaves with the reply
 * tuple reversed, one of the reply direction with the original reversed.
 */
function ctTranslated(e: ModelCtEntry, k: FlowKey, to: CtTo): void {
  const o = e.orig;
  const other = o.src === k.saddr && o.sport === k.sport && o.dst === k.daddr && o.dport === k.dport ? e.reply : o;
  to.saddr = other.dst;
  to.sport = other.dport;
  to.daddr = other.src;
  to.dport = other.sport;
}

/** C: nat_allowed. Whether the flow k, NATed into to, moved only the end side allows. */
function natAllowed(k: FlowKey, to: CtTo, side: number): boolean {
  const srcKept = to.saddr === k.saddr && to.sport === k.sport;
  const dstKept = to.daddr === k.daddr && to.dport === k.dport;
  if (side === NatSide.DST) return srcKept;
  if (side === NatSide.SRC) return dstKept;
  return srcKept && dstKept;
}
