/**
 * The end-to-end invariants, checked on every packet. Each packet carries an
 * id in its payload; its record says what was sent (a template frame and the
 * id), from where, to which address, and whether policy denied it when it
 * left. At delivery the frame must be that packet, unchanged but for the TTL
 * (and the header checksum that covers it), in the right place.
 */
import type { PolicyRuleRecord } from '../../dataplane/agent/protocol.ts';
import { bytesToMac } from '../../dataplane/layout.ts';
import { dstMacIs, get32, ipHeaderValid, payloadOffset, readPacketId, type FrameSlot } from './frames.ts';

/** What a packet was sent as: its frame but for the id words, which start at idOffset. */
export interface Sent {
  /** Pod frames: compared from the Ethernet type on. */
  frame: Buffer;
  /** The frame as 32-bit words (its own memory, from offset 0). */
  words: Int32Array;
  idOffset: number;
  /** The 5-tuple policy judges, in the pod's terms. */
  tuple: Tuple;
  /** The checker's masks for this frame (mustEqual as words), made at first use: compared from byte 12 (pods), from 0 (hosts). */
  podMask: Int32Array | undefined;
  hostMask: Int32Array | undefined;
}

/** A fresh record's placeholder until start(). */
const NOTHING_SENT: Sent = { frame: Buffer.alloc(0), words: new Int32Array(0), idOffset: 0, tuple: { src: '', dst: '', sport: 0, dport: 0, proto: 0 }, podMask: undefined, hostMask: undefined };

/**
 * One packet: what was sent, from where, to which address, whether policy
 * denied it when it left, and where the simulator has it now. The record
 * travels with the packet (it is also the wire's arrival event), so nothing
 * is looked up per hop. A record owns its frame's slot and is used again,
 * slot and all, once its packet is done (Cluster's record pool): start()
 * makes it a new packet.
 */
export class PacketRecord {
  /** Set once the packet was delivered or dropped: a second time is a violation. */
  done = false;
  /** When it arrives at host `at` (while on the wire). Times start as doubles (cluster.ts says why). */
  t = Number.NaN;
  at = 0;
  id = 0;
  kind: 'pod' | 'host' = 'pod';
  /** Between pods on different hosts (the traffic XMasq serves). */
  cross = false;
  sent: Sent = NOTHING_SENT;
  sentAt = Number.NaN;
  dstHost = 0;
  dstIp = 0;
  deniedAtSend = false;
  /** What the receiving pod must get: the frame sent, or for a Service flow its NATed form (set by the cluster). */
  expect: Sent = NOTHING_SENT;
  /** The flow of a pod packet, and whether it goes from a to b (its original direction). */
  flow: unknown = undefined;
  fwd = true;
  hops: string[] | undefined = undefined;
  /** The bytes as they are now: a view of slot. */
  frame: Buffer;

  constructor(readonly slot: FrameSlot) {
    this.frame = slot.inner;
  }

  /** A new packet in this record's slot (its frame is slot.inner, to be filled by the caller). */
  start(id: number, kind: 'pod' | 'host', cross: boolean, sent: Sent, sentAt: number, dstHost: number, dstIp: number, deniedAtSend: boolean, hops: string[] | undefined): this {
    this.done = false;
    this.id = id;
    this.kind = kind;
    this.cross = cross;
    this.sent = sent;
    this.sentAt = sentAt;
    this.dstHost = dstHost;
    this.dstIp = dstIp;
    this.deniedAtSend = deniedAtSend;
    this.hops = hops;
    this.frame = this.slot.inner;
    this.expect = sent;
    this.flow = undefined;
    this.fwd = true;
    return this;
  }

  get tuple(): Tuple {
    return this.sent.tuple;
  }
}

export interface Tuple {
  src: string;
  dst: string;
  sport: number;
  dport: number;
  proto: number;
}

export interface Violation {
  t: number;
  id: number;
  rule: string;
  detail: string;
  hops: string[];
}

/** Whether an address is in a block ("10.0.0.0/8", or an address alone), read from the text. */
function inBlock(block: string, addr: string): boolean {
  const word = (a: string) => a.split('.').reduce((n, p) => n * 256 + Number(p), 0);
  const [net, len] = block.split('/');
  const bits = len === undefined ? 32 : Number(len);
  const size = 2 ** (32 - bits);
  return Math.floor(word(net) / size) === Math.floor(word(addr) / size);
}

const inRange = (p: number | undefined, end: number | undefined, x: number) => p === undefined || (x >= p && x <= (end ?? p));

/**
 * Whether a deny rule matches, read straight from the rule (absent = any; a
 * block less its exceptions; a port range), independent of the datapath's
 * classifier. Packets without ports (ICMP) carry port 0, which no port names.
 */
export function ruleMatches(r: PolicyRuleRecord, dir: 'egress' | 'ingress', t: Tuple): boolean {
  const addr = (block: string | undefined, except: string[] | undefined, a: string) =>
    (block === undefined || inBlock(block, a)) && !(except ?? []).some((e) => inBlock(e, a));
  return r.dir === dir && addr(r.src, r.srcExcept, t.src) && addr(r.dst, r.dstExcept, t.dst)
    && inRange(r.sport, r.sportEnd, t.sport) && inRange(r.dport, r.dportEnd, t.dport)
    && (r.proto === undefined || r.proto === t.proto);
}

export function denied(rules: readonly PolicyRuleRecord[], dir: 'egress' | 'ingress', t: Tuple): boolean {
  for (const r of rules) if (ruleMatches(r, dir, t)) return true;
  return false;
}

// Offsets in an untagged Ethernet + IPv4 frame.
const L3 = 14;
const TTL = L3 + 8;
const CSUM = L3 + 10;

/**
 * Which bits of a frame of len bytes must arrive as sent, as 32-bit words:
 * all from byte `from` on, but the TTL, the header checksum and the id words.
 * Built through bytes, so it holds whatever the platform's byte order.
 */
const masks = new Map<number, Int32Array>();

function mustEqual(i: number, from: number, id: number): boolean {
  return i >= from && i !== TTL && i !== CSUM && i !== CSUM + 1 && (i < id || i >= id + 8);
}

function maskFor(len: number, from: number, id: number): Int32Array {
  const name = len * 0x100000 + id * 0x100 + from;
  let m = masks.get(name);
  if (m) return m;
  m = new Int32Array(len >> 2);
  const bytes = new Uint8Array(m.buffer);
  for (let i = 0; i < bytes.length; i++) bytes[i] = mustEqual(i, from, id) ? 0xff : 0;
  masks.set(name, m);
  return m;
}

/** The words compare: false at the first bit that must be equal and is not. */
function sameWords(got: Buffer, gotWords: Int32Array, sent: Sent, from: number): boolean {
  const want = sent.words;
  const m = from === 12 ? (sent.podMask ??= maskFor(got.length, from, sent.idOffset))
    : from === 0 ? (sent.hostMask ??= maskFor(got.length, from, sent.idOffset)) : maskFor(got.length, from, sent.idOffset);
  const n = m.length;
  for (let w = 0; w < n; w++) if (((gotWords[w] ^ want[w]) & m[w]) !== 0) return false;
  for (let i = n << 2; i < got.length; i++) if (mustEqual(i, from, sent.idOffset) && got[i] !== sent.frame[i]) return false;
  return true;
}

/**
 * The datagram delivered equals the one sent, the TTL and the header checksum
 * aside (which must still check). gotWords: the frame as words, when it is
 * the start of its slot (then the compare goes a word at a time).
 */
function sameDatagram(got: Buffer, gotWords: Int32Array | undefined, rec: PacketRecord, from: number): string | undefined {
  const want = rec.expect.frame;
  const end = want.length;
  if (got.length !== end) return `length ${got.length}, sent ${end}`;
  if (!ipHeaderValid(got, L3)) return 'IPv4 header checksum does not check';
  if (gotWords !== undefined && sameWords(got, gotWords, rec.expect, from)) return undefined;
  const id = rec.expect.idOffset;
  for (let i = from; i < end; i++) {
    if (!mustEqual(i, from, id)) continue;
    if (got[i] !== want[i]) return `byte ${i} is 0x${got[i].toString(16)}, sent 0x${want[i].toString(16)}`;
  }
  return undefined;
}

export class Checker {
  /** The first few violations, in full. */
  readonly violations: Violation[] = [];
  /** Every violation, by rule. */
  readonly violationCounts: Record<string, number> = {};
  readonly drops: Record<string, number> = {};

  /**
   * clock: the simulated time, read only for a violation (passing the time
   * with every call made V8 box it as a heap number on every packet).
   */
  constructor(private readonly clock: () => number, private readonly maxViolations = 20) {}

  private violate(id: number, rule: string, detail: string, rec?: PacketRecord): void {
    this.violationCounts[rule] = (this.violationCounts[rule] ?? 0) + 1;
    if (this.violations.length < this.maxViolations) this.violations.push({ t: this.clock(), id, rule, detail, hops: rec?.hops ?? [] });
  }

  /**
   * The packet arrives for the first time, carrying the id it was sent with.
   * where: a pod's name, or a host's number (the text is made only for a violation).
   */
  private identify(rec: PacketRecord, f: Buffer, where: string | number): boolean {
    const id = rec.id;
    if (rec.done) {
      this.violate(id, 'exactly once', `packet ${id} arrived at ${place(where)} again`, rec);
      return false;
    }
    rec.done = true;
    const off = payloadOffset(f, L3);
    const carried = off < 0 ? -1 : readPacketId(f, off);
    if (carried !== id) {
      this.violate(id, 'payload intact', `${place(where)} got packet ${id} with its id words ${carried < 0 ? 'destroyed' : `reading ${carried}`}`, rec);
      return false;
    }
    return true;
  }

  /** A check of the caller's (a Service's replies, host policy) failed on a packet that arrived. */
  violation(rec: PacketRecord, rule: string, detail: string): void {
    this.violate(rec.id, rule, detail, rec);
  }

  hop(rec: PacketRecord, text: string): void {
    if (!rec.done) rec.hops?.push(text);
  }

  /** A pod received a frame into its namespace. */
  podReceived(rec: PacketRecord, f: Buffer, pod: { ip: number; mac: Buffer; name: string; host: number }, ingressRules: readonly PolicyRuleRecord[]): boolean {
    if (!this.identify(rec, f, pod.name)) return false;
    const id = rec.id;
    if (rec.kind === 'host') {
      this.violate(id, 'host traffic untouched', `host packet ${id} was delivered into pod ${pod.name}`, rec);
      return false;
    }
    if (get32(f, L3 + 16) !== pod.ip || rec.dstIp !== pod.ip) {
      this.violate(id, 'right pod', `packet ${id} for ${ipStr(rec.dstIp)} entered pod ${pod.name} (${ipStr(pod.ip)}) addressed to ${ipStr(get32(f, L3 + 16))}`, rec);
      return false;
    }
    if (!dstMacIs(f, pod.mac)) {
      this.violate(id, 'right pod', `packet ${id} entered pod ${pod.name} with Ethernet destination ${bytesToMac(f, 0)}, not the pod's ${bytesToMac(pod.mac, 0)}`, rec);
      return false;
    }
    const diff = sameDatagram(f, f === rec.slot.inner ? rec.slot.words : undefined, rec, 12);
    if (diff) {
      this.violate(id, 'original headers and payload', `packet ${id} reached pod ${pod.name} altered: ${diff}`, rec);
      return false;
    }
    if (rec.cross && (rec.deniedAtSend || denied(ingressRules, 'ingress', rec.expect.tuple))) {
      this.violate(id, 'denied flows never pass', `packet ${id} ${tupleStr(rec.tuple)} reached pod ${pod.name} though a deny rule ${rec.deniedAtSend ? 'on the sending host' : 'on the receiving host'} matches it`, rec);
      return false;
    }
    return true;
  }

  /** The host stack accepted a frame as its own (not for a pod). */
  hostReceived(rec: PacketRecord, f: Buffer, host: number): boolean {
    if (!this.identify(rec, f, host)) return false;
    const id = rec.id;
    if (rec.kind === 'pod') {
      this.violate(id, 'never to the host stack', `pod packet ${id} ${tupleStr(rec.tuple)} was delivered to the stack of host h${host}`, rec);
      return false;
    }
    const diff = rec.dstHost !== host ? `it was sent to host h${rec.dstHost}` : sameDatagram(f, f === rec.slot.inner ? rec.slot.words : undefined, rec, 0) ?? (f[L3 + 8] !== rec.sent.frame[L3 + 8] ? 'its TTL changed' : undefined);
    if (diff) {
      this.violate(id, 'host traffic untouched', `host packet ${id} reached host h${host} altered: ${diff}`, rec);
      return false;
    }
    return true;
  }

  /** The datapath or the network dropped a packet; receiverIngress: the rules of the host that dropped it, when it is the receiver. */
  dropped(rec: PacketRecord, reason: string, receiverIngress: readonly PolicyRuleRecord[] = []): void {
    this.drops[reason] = (this.drops[reason] ?? 0) + 1;
    const id = rec.id;
    if (rec.done) {
      this.violate(id, 'exactly once', `packet ${id} was dropped (${reason}) after it had arrived or been dropped`, rec);
      return;
    }
    rec.done = true;
    if (rec.kind === 'host' && reason !== 'wire-loss') {
      this.violate(id, 'host traffic untouched', `host packet ${id} was dropped (${reason})`, rec);
    } else if (reason === 'policy' && rec.cross && !rec.deniedAtSend && !denied(receiverIngress, 'ingress', rec.expect.tuple)) {
      this.violate(id, 'policy drops only denied flows', `packet ${id} ${tupleStr(rec.tuple)} was dropped by policy, yet no rule in force matches it`, rec);
    }
  }
}

function place(where: string | number): string {
  return typeof where === 'number' ? `the stack of host ${where}` : `pod ${where}`;
}

export function ipStr(n: number): string {
  return `${n >>> 24}.${(n >>> 16) & 0xff}.${(n >>> 8) & 0xff}.${n & 0xff}`;
}


export function tupleStr(t: Tuple): string {
  const p = ({ 1: 'icmp', 6: 'tcp', 17: 'udp' } as Record<number, string>)[t.proto] ?? String(t.proto);
  return `${p} ${t.src}:${t.sport} → ${t.dst}:${t.dport}`;
}
