/**
 * A simulated host's conntrack: what Linux's nf_conntrack keeps for the pod
 * packets that cross the host's stack, as far as XMasq's admission check
 * (bpf/conntrack.h, its twin sim/model/conntrack.ts) and the host's rules
 * depend on it.
 *
 * - An entry is made by a packet that crosses the stack (track), and enters
 *   the table only if the host's rules accept that packet (confirm), as an
 *   unconfirmed entry is dropped with its skb.
 * - TCP follows a faithful subset of nf_conntrack_proto_tcp.c's state table
 *   (SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK,
 *   TIME_WAIT, CLOSE, with their timeouts); a mid-stream packet without an
 *   entry is picked up as ESTABLISHED and liberal (nf_conntrack_tcp_loose=1);
 *   what the table calls invalid is INVALID. Sequence numbers and windows are
 *   not modelled.
 * - UDP: 30 s until a reply was seen, then 120 s once the entry is older than
 *   2 s (a stream, ASSURED), as nf_conntrack_proto_udp.c. ICMP echo: 30 s.
 * - A DNAT (a Service) is kept as the entry's reply tuple, as the kernel does:
 *   orig client → ClusterIP:port, reply backend:targetPort → client.
 * - An entry past its timeout is not found (nf_conntrack_find_get skips
 *   expired entries) and its slot is reused.
 *
 * The programs read it through ModelConntrack.lookup, which this class
 * implements over flat arrays (no object per entry: a host holds tens of
 * thousands of entries in a benchmark run, which the garbage collector would
 * otherwise mark again and again). lookup returns one view object, filled
 * for each call: the programs read it at once and keep nothing.
 *
 * Addresses are model words (sim/model/packet.ts readIpv4: the four bytes as
 * a little-endian u32), ports in host order, as the programs hold them.
 */
import { CtBits } from '../../dataplane/maps.ts';
import { ModelConntrack, ipWord, type ModelCtEntry, type ModelCtTuple } from '../model/conntrack.ts';

export const IPS_SEEN_REPLY = CtBits.IPS_SEEN_REPLY;
export const IPS_ASSURED = 0x4;
export const IPS_DST_NAT = CtBits.IPS_DST_NAT;

/** include/uapi/linux/netfilter/nf_conntrack_tcp.h */
export const TCP = { NONE: 0, SYN_SENT: 1, SYN_RECV: 2, ESTABLISHED: 3, FIN_WAIT: 4, CLOSE_WAIT: 5, LAST_ACK: 6, TIME_WAIT: 7, CLOSE: 8 } as const;
export const TCP_STATE_NAMES = ['NONE', 'SYN_SENT', 'SYN_RECV', 'ESTABLISHED', 'FIN_WAIT', 'CLOSE_WAIT', 'LAST_ACK', 'TIME_WAIT', 'CLOSE'];
const LIBERAL = CtBits.TCP_FLAG_BE_LIBERAL;

export const TCP_FIN = 0x01, TCP_SYN = 0x02, TCP_RST = 0x04, TCP_PSH = 0x08, TCP_ACK = 0x10;

/** The ctstate the host's rules see for a packet (-m conntrack --ctstate). */
export const CT_NEW = 0, CT_ESTABLISHED = 1, CT_INVALID = 2;

/** Timeouts, ns. */
export interface CtTimeouts {
  tcpSynSent: number;
  tcpSynRecv: number;
  tcpEstablished: number;
  tcpFinWait: number;
  tcpCloseWait: number;
  tcpLastAck: number;
  tcpTimeWait: number;
  tcpClose: number;
  udp: number;
  udpStream: number;
  /** A replied UDP entry older than this is a stream. */
  udpStreamAfter: number;
  icmp: number;
}

const S = 1e9;
/** Linux's defaults (net.netfilter.nf_conntrack_*_timeout*). */
export const LINUX_CT_TIMEOUTS: CtTimeouts = {
  tcpSynSent: 120 * S, tcpSynRecv: 60 * S, tcpEstablished: 432000 * S, tcpFinWait: 120 * S, tcpCloseWait: 60 * S,
  tcpLastAck: 30 * S, tcpTimeWait: 120 * S, tcpClose: 10 * S, udp: 30 * S, udpStream: 120 * S, udpStreamAfter: 2 * S, icmp: 30 * S,
};

/** Every timeout times f (the property tests run at a scaled clock, as they do the agent's timing). */
export function scaledTimeouts(f: number): CtTimeouts {
  const t = { ...LINUX_CT_TIMEOUTS };
  for (const k of Object.keys(t) as Array<keyof CtTimeouts>) t[k] *= f;
  return t;
}

const IPPROTO_ICMP = 1, IPPROTO_TCP = 6, IPPROTO_UDP = 17;
const MIN_ENTRIES = 64;

/** A hash of a tuple's four words, spread over the low bits. */
function tupleHash(a: number, b: number, c: number, d: number): number {
  let h = Math.imul(a, 0x9e3779b1) ^ b;
  h = Math.imul(h ^ (h >>> 15), 0x85ebca6b) ^ c;
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) ^ d;
  return h ^ (h >>> 16);
}

/** Which TCP flags the state table looks at (get_conntrack_index). */
const I_SYN = 0, I_SYNACK = 1, I_FIN = 2, I_ACK = 3, I_RST = 4, I_NONE = 5;
function tcpIndex(flags: number): number {
  if (flags & TCP_RST) return I_RST;
  if (flags & TCP_SYN) return flags & TCP_ACK ? I_SYNACK : I_SYN;
  if (flags & TCP_FIN) return I_FIN;
  if (flags & TCP_ACK) return I_ACK;
  return I_NONE;
}

/** A state the table leaves as it is (the kernel's sIG: accepted, nothing learned). */
const IG = -1;
/** Invalid (sIV). */
const IV = -2;

/**
 * The subset of tcp_conntracks[dir][index][state] the simulator's traffic
 * reaches, by direction (0 original, 1 reply), flag index and state.
 * States: NONE SS SR ES FW CW LA TW CL.
 */
const { SYN_SENT: SS, SYN_RECV: SR, ESTABLISHED: ES, FIN_WAIT: FW, CLOSE_WAIT: CW, LAST_ACK: LA, TIME_WAIT: TW, CLOSE: CL } = TCP;
const TABLE_ROWS: number[][][] = [
  [ // original
    /* SYN    */ [SS, SS, IG, IG, IG, IG, IG, SS, SS],
    /* SYNACK */ [IV, IV, SR, IV, IV, IV, IV, IV, IV],
    /* FIN    */ [IV, IV, FW, FW, LA, LA, LA, TW, CL],
    /* ACK    */ [ES, IV, ES, ES, CW, CW, TW, TW, CL],
    /* RST    */ [IV, CL, CL, CL, CL, CL, CL, CL, CL],
    /* NONE   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV],
  ],
  [ // reply
    /* SYN    */ [IV, IG, IV, IV, IV, IV, IV, IG, IV],
    /* SYNACK */ [IV, SR, IG, IG, IG, IG, IG, IG, IG],
    /* FIN    */ [IV, IV, FW, CW, LA, LA, LA, TW, CL],
    /* ACK    */ [IV, IG, SR, ES, CW, CW, TW, TW, CL],
    /* RST    */ [IV, CL, CL, CL, CL, CL, CL, CL, CL],
    /* NONE   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV],
  ],
];
/** The same table, flat: [dir][index][state] at (dir * 6 + index) * 9 + state. */
const TABLE = Int8Array.from(TABLE_ROWS.flat(2));

/**
 * What lookup returns: one object per table, filled for each call with what
 * the programs read (status, TCP state, flags); the tuples are made only if
 * read (the programs do not).
 */
class CtView implements ModelCtEntry {
  id = 0;
  status = 0;
  tcpState = 0;
  readonly flags: [number, number] = [0, 0];

  constructor(private readonly tuple: (id: number, dir: number) => ModelCtTuple) {}

  get orig(): ModelCtTuple {
    return this.tuple(this.id, 0);
  }

  get reply(): ModelCtTuple {
    return this.tuple(this.id, 1);
  }
}

export class HostConntrack extends ModelConntrack {
  /** The host's clock, ns: set before each program run and stack pass. */
  now = -0;
  // The index: slot i holds a tuple's four words at 4i..4i+3 and entry * 2 + direction in ref[i] (-1 free, -2 deleted).
  private keys = new Int32Array(4 * 4 * MIN_ENTRIES);
  private ref = new Int32Array(4 * MIN_ENTRIES).fill(-1);
  private mask = 4 * MIN_ENTRIES - 1;
  private used = 0;
  // The entries, by number: both tuples (src, dst, ports as sport << 16 | dport), protocol and state.
  private tup = new Int32Array(6 * MIN_ENTRIES);
  private proto = new Uint8Array(MIN_ENTRIES);
  private stat = new Int32Array(MIN_ENTRIES);
  private tcpState = new Uint8Array(MIN_ENTRIES);
  private flags = new Uint8Array(2 * MIN_ENTRIES);
  private expires = new Float64Array(MIN_ENTRIES);
  private streamAt = new Float64Array(MIN_ENTRIES);
  private free: number[] = [];
  private next = 0;
  private live = 0;
  private readonly view = new CtView((id, dir) => {
    const p = this.tup, b = 6 * id + 3 * dir;
    return { src: p[b] >>> 0, dst: p[b + 1] >>> 0, sport: p[b + 2] >>> 16, dport: p[b + 2] & 0xffff, proto: this.proto[id] };
  });
  private readonly words = new Map<string, number>();
  /** The TCP timeout of each state. */
  private readonly tcpTimeouts: Float64Array;

  /** What track() found: the entry (or -1: a new one, to confirm) and the packet's direction. */
  entry = -1;
  dir = 0;
  // A new entry between track() and confirm(): its tuples and state.
  private nTup = new Int32Array(6);
  private nProto = 0;
  private nStat = 0;
  private nState = 0;
  private nFlags = 0;

  constructor(readonly timeouts: CtTimeouts = LINUX_CT_TIMEOUTS) {
    super();
    this.tcpTimeouts = Float64Array.from([0, 1, 2, 3, 4, 5, 6, 7, 8], (s) => tcpTimeout(timeouts, s));
  }

  // ---- what the programs read (ModelConntrack) ----

  override add(e: ModelCtEntry): void {
    const o = e.orig, r = e.reply;
    this.setNew(o.src, o.dst, o.sport, o.dport, o.proto, r.src, r.dst, r.sport, r.dport);
    this.nStat = e.status;
    this.nState = e.tcpState;
    this.nFlags = e.flags[0] | (e.flags[1] << 8);
    this.insert(this.timeouts.tcpEstablished);
  }

  override lookup(t: ModelCtTuple): ModelCtEntry | undefined {
    const ref = this.find(t.src, t.dst, (t.sport << 16) | t.dport, t.proto);
    if (ref < 0) return undefined;
    const id = ref >> 1, v = this.view;
    v.id = id;
    v.status = this.stat[id];
    v.tcpState = this.tcpState[id];
    v.flags[0] = this.flags[2 * id];
    v.flags[1] = this.flags[2 * id + 1];
    return v;
  }

  override get size(): number {
    return this.live;
  }

  // ---- the host stack ----

  /**
   * nf_conntrack_in for a packet from src to dst: finds its entry (this.entry,
   * this.dir) and updates it, or prepares a new one (this.entry = -1, to be
   * confirmed). Returns the packet's ctstate. icmpType: for ICMP, the echo
   * type (sport carries the identifier, dport 0).
   */
  track(src: number, dst: number, sport: number, dport: number, proto: number, tcpFlags: number, icmpType: number): number {
    const ref = this.find(src, dst, (sport << 16) | dport, proto);
    if (ref < 0) {
      this.entry = -1;
      this.dir = 0;
      // ICMP echo: the reply carries the request's identifier as it is (sport), no second port.
      if (proto === IPPROTO_ICMP) this.setNew(src, dst, sport, dport, proto, dst, src, sport, dport);
      else this.setNew(src, dst, sport, dport, proto, dst, src, dport, sport);
      this.nStat = 0;
      this.nFlags = 0;
      this.nState = TCP.NONE;
      if (proto === IPPROTO_TCP) {
        const s = TABLE[tcpIndex(tcpFlags) * 9 + TCP.NONE];
        if (s < 0) return CT_INVALID;
        this.nState = s;
        // Picked up mid-stream: windows unknown, so both directions are liberal (tcp_new).
        if (s === TCP.ESTABLISHED) this.nFlags = LIBERAL | (LIBERAL << 8);
      } else if (proto === IPPROTO_ICMP && icmpType !== 8) {
        return CT_INVALID;
      }
      return CT_NEW;
    }
    const id = ref >> 1, dir = ref & 1, t = this.timeouts;
    this.entry = id;
    this.dir = dir;
    const p = this.proto[id];
    if (p === IPPROTO_TCP) {
      const old = this.tcpState[id];
      const s = TABLE[(dir * 6 + tcpIndex(tcpFlags)) * 9 + old];
      if (s === IV) return CT_INVALID;
      if (s !== IG) this.tcpState[id] = s;
      this.expires[id] = this.now + this.tcpTimeouts[s === IG ? old : s];
    } else if (p === IPPROTO_UDP) {
      // SEEN_REPLY as the UDP handler sees it: set only after it ran (nf_conntrack_in).
      if ((this.stat[id] & IPS_SEEN_REPLY) !== 0 && this.now > this.streamAt[id]) {
        this.stat[id] |= IPS_ASSURED;
        this.expires[id] = this.now + t.udpStream;
      } else this.expires[id] = this.now + t.udp;
    } else {
      this.expires[id] = this.now + t.icmp;
    }
    const established = dir === 1 || (this.stat[id] & IPS_SEEN_REPLY) !== 0;
    if (dir === 1) this.stat[id] |= IPS_SEEN_REPLY;
    return established ? CT_ESTABLISHED : CT_NEW;
  }

  /** A DNAT for the new entry (kube-proxy's nat PREROUTING): its reply comes from the backend. */
  dnat(toIp: number, toPort: number): void {
    const n = this.nTup;
    n[3] = toIp | 0;
    n[5] = (toPort << 16) | (n[5] & 0xffff);
    this.nStat |= IPS_DST_NAT;
  }

  /** The new entry enters the table (__nf_conntrack_confirm): the host's rules accepted its first packet. */
  confirm(): void {
    if (this.entry >= 0) return;
    const t = this.timeouts;
    const p = this.nProto;
    this.entry = this.insert(p === IPPROTO_TCP ? this.tcpTimeouts[this.nState] : p === IPPROTO_UDP ? t.udp : t.icmp);
  }

  /** Of the entry track() found or confirm() made: whether it is DNATed, and its addresses (model words). */
  isDnat(): boolean {
    return this.entry >= 0 ? (this.stat[this.entry] & IPS_DST_NAT) !== 0 : (this.nStat & IPS_DST_NAT) !== 0;
  }

  /** The tuple words of the current entry (new or found): 0..2 original src, dst, ports; 3..5 reply. */
  word(i: number): number {
    return this.entry >= 0 ? this.tup[6 * this.entry + i] : this.nTup[i];
  }

  /** The agent's ctnetlink update (dataplane/agent/conntrack.ts): both directions liberal; false if no entry. */
  makeLiberal(t: { src: string; dst: string; sport: number; dport: number; proto: number }): boolean {
    const ref = this.find(this.wordOf(t.src), this.wordOf(t.dst), (t.sport << 16) | t.dport, t.proto);
    if (ref < 0) return false;
    const id = ref >> 1;
    this.flags[2 * id] |= LIBERAL;
    this.flags[2 * id + 1] |= LIBERAL;
    return true;
  }

  /** Address text as a model word, remembered (the drain names the same few pod addresses again and again). */
  private wordOf(ip: string): number {
    let w = this.words.get(ip);
    if (w === undefined) this.words.set(ip, (w = ipWord(ip)));
    return w;
  }

  /** The TCP state and status of a flow's entry, for tests and traces. */
  describe(src: number, dst: number, sport: number, dport: number, proto: number): string {
    const ref = this.find(src, dst, (sport << 16) | dport, proto);
    if (ref < 0) return 'no entry';
    const id = ref >> 1;
    return `${proto === IPPROTO_TCP ? TCP_STATE_NAMES[this.tcpState[id]] : 'udp/icmp'} status 0x${this.stat[id].toString(16)} flags ${this.flags[2 * id]}/${this.flags[2 * id + 1]}`;
  }

  close(): void {}

  // ---- the table ----

  private setNew(s0: number, d0: number, sp0: number, dp0: number, proto: number, s1: number, d1: number, sp1: number, dp1: number): void {
    const n = this.nTup;
    n[0] = s0 | 0;
    n[1] = d0 | 0;
    n[2] = (sp0 << 16) | dp0;
    n[3] = s1 | 0;
    n[4] = d1 | 0;
    n[5] = (sp1 << 16) | dp1;
    this.nProto = proto;
  }

  /** The slot's ref (entry * 2 + direction) of a live tuple, or -1. An expired entry is removed on the way. */
  private find(src: number, dst: number, ports: number, proto: number): number {
    const a = src | 0, b = dst | 0, c = ports | 0, keys = this.keys, ref = this.ref, mask = this.mask;
    for (let i = tupleHash(a, b, c, proto) & mask; ; i = (i + 1) & mask) {
      const r = ref[i];
      if (r === -1) return -1;
      if (r >= 0 && keys[4 * i] === a && keys[4 * i + 1] === b && keys[4 * i + 2] === c && keys[4 * i + 3] === proto) {
        if (this.expires[r >> 1] > this.now) return r;
        this.remove(r >> 1);
        return -1;
      }
    }
  }

  private insert(timeout: number): number {
    if (this.next === this.proto.length && this.free.length === 0) this.grow();
    // Before the new entry is written: a rehash places every live entry.
    if ((this.used + 2) * 2 > this.ref.length) this.rehash();
    const id = this.free.length ? this.free.pop()! : this.next++;
    const n = this.nTup;
    this.tup.set(n, 6 * id);
    this.proto[id] = this.nProto;
    this.stat[id] = this.nStat;
    this.tcpState[id] = this.nState;
    this.flags[2 * id] = this.nFlags & 0xff;
    this.flags[2 * id + 1] = this.nFlags >>> 8;
    this.expires[id] = this.now + timeout;
    this.streamAt[id] = this.now + this.timeouts.udpStreamAfter;
    this.place(n[0], n[1], n[2], this.nProto, 2 * id);
    this.place(n[3], n[4], n[5], this.nProto, 2 * id + 1);
    this.live++;
    return id;
  }

  private place(a: number, b: number, c: number, d: number, r: number): void {
    const keys = this.keys, ref = this.ref, mask = this.mask;
    let i = tupleHash(a, b, c, d) & mask;
    while (ref[i] >= 0) i = (i + 1) & mask;
    if (ref[i] === -1) this.used++;
    keys[4 * i] = a;
    keys[4 * i + 1] = b;
    keys[4 * i + 2] = c;
    keys[4 * i + 3] = d;
    ref[i] = r;
  }

  private remove(id: number): void {
    const p = this.tup, b = 6 * id, pr = this.proto[id];
    this.unplace(p[b], p[b + 1], p[b + 2], pr, 2 * id);
    this.unplace(p[b + 3], p[b + 4], p[b + 5], pr, 2 * id + 1);
    this.expires[id] = 0;
    this.free.push(id);
    this.live--;
  }

  private unplace(a: number, b: number, c: number, d: number, r: number): void {
    const ref = this.ref, mask = this.mask;
    for (let i = tupleHash(a, b, c, d) & mask; ref[i] !== -1; i = (i + 1) & mask) {
      if (ref[i] === r) {
        ref[i] = -2;
        return;
      }
    }
  }

  /** The entries' arrays, twice as long; expired entries are collected first (the kernel's gc worker), which may make room enough. */
  private grow(): void {
    for (let id = 0; id < this.next; id++) if (this.expires[id] !== 0 && this.expires[id] <= this.now) this.remove(id);
    if (this.free.length > this.next >> 3) return;
    const n = this.proto.length * 2;
    const widen = <T extends Int32Array | Uint8Array | Float64Array>(a: T, per: number): T => {
      const b = new (a.constructor as new (n: number) => T)(n * per);
      b.set(a);
      return b;
    };
    this.tup = widen(this.tup, 6);
    this.proto = widen(this.proto, 1);
    this.stat = widen(this.stat, 1);
    this.tcpState = widen(this.tcpState, 1);
    this.flags = widen(this.flags, 2);
    this.expires = widen(this.expires, 1);
    this.streamAt = widen(this.streamAt, 1);
  }

  /** The index rebuilt at four times the live tuples, without its deleted slots. */
  private rehash(): void {
    let n = 4 * MIN_ENTRIES;
    while (n < (2 * this.live + 2) * 4) n *= 2;
    this.keys = new Int32Array(4 * n);
    this.ref = new Int32Array(n).fill(-1);
    this.mask = n - 1;
    this.used = 0;
    const p = this.tup;
    for (let id = 0; id < this.next; id++) {
      if (this.expires[id] === 0) continue;
      const b = 6 * id, pr = this.proto[id];
      this.place(p[b], p[b + 1], p[b + 2], pr, 2 * id);
      this.place(p[b + 3], p[b + 4], p[b + 5], pr, 2 * id + 1);
    }
  }
}

function tcpTimeout(t: CtTimeouts, s: number): number {
  switch (s) {
    case TCP.SYN_SENT: return t.tcpSynSent;
    case TCP.SYN_RECV: return t.tcpSynRecv;
    case TCP.ESTABLISHED: return t.tcpEstablished;
    case TCP.FIN_WAIT: return t.tcpFinWait;
    case TCP.CLOSE_WAIT: return t.tcpCloseWait;
    case TCP.LAST_ACK: return t.tcpLastAck;
    case TCP.TIME_WAIT: return t.tcpTimeWait;
    default: return t.tcpClose;
  }
}
