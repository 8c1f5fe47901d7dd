/**
 * What the host stack does to frames on the overlay path: route (TTL − 1),
 * VXLAN encapsulation as flannel.1 sends it, and decapsulation; plus the
 * packet id the simulator writes into every payload. All on raw bytes.
 */
import { bytesToMac } from '../../dataplane/layout.ts';
import { VXLAN_PORT, VXLAN_VNI } from './topology.ts';

export const ETH_HLEN = 14;
export const VXLAN_OVERHEAD = 50;
const UDP_SPORT_MIN = 32768;
const UDP_SPORT_RANGE = 61000 - 32768;

/*
 * Reads and writes of frame fields, network order. Buffer's readUInt16BE and
 * the like validate their arguments through several calls per read; these
 * check only that the bytes are in the frame (and throw as Buffer's do).
 */
function inFrame(f: Uint8Array, at: number, n: number): void {
  if (!(at >= 0 && at + n <= f.length)) throw new RangeError(`${n} bytes at ${at} outside a ${f.length}-byte frame`);
}

export function get16(f: Uint8Array, at: number): number {
  inFrame(f, at, 2);
  return (f[at] << 8) | f[at + 1];
}

export function get32(f: Uint8Array, at: number): number {
  inFrame(f, at, 4);
  return ((f[at] << 24) | (f[at + 1] << 16) | (f[at + 2] << 8) | f[at + 3]) >>> 0;
}

/** Writes a MAC at f[at] (six stores: a TypedArray set() call costs more for six bytes). */
export function putMac(f: Uint8Array, at: number, mac: Uint8Array): void {
  f[at] = mac[0];
  f[at + 1] = mac[1];
  f[at + 2] = mac[2];
  f[at + 3] = mac[3];
  f[at + 4] = mac[4];
  f[at + 5] = mac[5];
}

/** Whether the frame's destination MAC is mac (without the subarray Buffer a per-packet compare would allocate). */
export function dstMacIs(f: Uint8Array, mac: Uint8Array): boolean {
  return f[0] === mac[0] && f[1] === mac[1] && f[2] === mac[2] && f[3] === mac[3] && f[4] === mac[4] && f[5] === mac[5];
}

/** ip_decrease_ttl: TTL − 1, header checksum updated incrementally; false when the TTL runs out. */
export function decreaseTtl(f: Buffer, l3: number): boolean {
  if (f[l3 + 8] <= 1) return false;
  f[l3 + 8]--;
  let c = get16(f, l3 + 10) + 0x0100;
  c = (c & 0xffff) + (c >>> 16);
  put16(f, l3 + 10, c);
  return true;
}

/** A header whose checksum a receiving stack accepts. */
export function ipHeaderValid(f: Buffer, l3: number): boolean {
  const ihl = (f[l3] & 0x0f) * 4;
  if (ihl < 20 || l3 + ihl > f.length) return false;
  let s = 0;
  for (let i = l3; i < l3 + ihl; i += 2) s += (f[i] << 8) | f[i + 1];
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return s === 0xffff;
}

/** The outer headers flannel.1 writes towards one peer host. */
export interface Encap {
  srcMac: Buffer;
  dstMac: Buffer;
  srcIp: number;
  dstIp: number;
}

/**
 * The Linux vxlan device's output for flannel.1: outer IPv4 (TOS 0 with the
 * inner ECN copied, no DF, TTL 64), UDP from a port hashed from the inner
 * flow to 8472 with checksum 0, VXLAN with VNI 1. A new frame; the simulator
 * writes the header in place instead (vxlanEncapHeader).
 */
export function vxlanEncap(inner: Buffer, o: Encap, ipId: number): Buffer {
  const out = Buffer.allocUnsafe(VXLAN_OVERHEAD + inner.length);
  out.set(inner, VXLAN_OVERHEAD);
  vxlanEncapHeader(out, o, ipId);
  return out;
}

/**
 * The outer headers written into out[0, VXLAN_OVERHEAD) in front of the
 * inner frame already at out[VXLAN_OVERHEAD..]: encapsulation in the
 * headroom, without copying the inner frame.
 */
export function vxlanEncapHeader(out: Buffer, o: Encap, ipId: number): void {
  const innerLen = out.length - VXLAN_OVERHEAD;
  const inner = VXLAN_OVERHEAD;
  putMac(out, 0, o.dstMac);
  putMac(out, 6, o.srcMac);
  put16(out, 12, 0x0800);
  // Every field is known: the header checksum is summed from them, not read back.
  const l3 = ETH_HLEN;
  const verTos = 0x4500 | (out[inner + ETH_HLEN + 1] & 3);
  const totLen = VXLAN_OVERHEAD - ETH_HLEN + innerLen;
  const id = ipId & 0xffff;
  const ttlProto = (64 << 8) | 17;
  let sum = verTos + totLen + id + ttlProto + (o.srcIp >>> 16) + (o.srcIp & 0xffff) + (o.dstIp >>> 16) + (o.dstIp & 0xffff);
  sum = (sum & 0xffff) + (sum >>> 16);
  sum = (sum & 0xffff) + (sum >>> 16);
  put16(out, l3, verTos);
  put16(out, l3 + 2, totLen);
  put16(out, l3 + 4, id);
  put16(out, l3 + 6, 0);
  put16(out, l3 + 8, ttlProto);
  put16(out, l3 + 10, ~sum & 0xffff);
  put32(out, l3 + 12, o.srcIp);
  put32(out, l3 + 16, o.dstIp);
  const udp = l3 + 20;
  put16(out, udp, UDP_SPORT_MIN + (flowHash(out, inner) % UDP_SPORT_RANGE));
  put16(out, udp + 2, VXLAN_PORT);
  put16(out, udp + 4, 8 + 8 + innerLen);
  put16(out, udp + 6, 0);
  put32(out, udp + 8, 0x08000000);
  put32(out, udp + 12, VXLAN_VNI << 8);
}

export function put16(f: Buffer, at: number, v: number): void {
  f[at] = v >>> 8;
  f[at + 1] = v;
}

export function put32(f: Buffer, at: number, v: number): void {
  f[at] = v >>> 24;
  f[at + 1] = v >>> 16;
  f[at + 2] = v >>> 8;
  f[at + 3] = v;
}

/** A hash of the inner addresses and ports, as udp_flow_src_port spreads flows over source ports. */
function flowHash(f: Buffer, inner: number): number {
  const l3 = inner + ETH_HLEN;
  let h = 2166136261;
  const end = Math.min(f.length, l3 + ((f[l3] & 0x0f) * 4) + 4);
  for (let i = l3 + 9; i < end; i++) {
    if (i === l3 + 10 || i === l3 + 11) continue;
    h = Math.imul(h ^ f[i], 16777619);
  }
  return h >>> 0;
}

/**
 * The vxlan socket's receive path for a frame whose outer IPv4 header (at 14)
 * is addressed to this host: the inner Ethernet frame, or undefined when it is
 * not VXLAN with VNI 1. A frame of a FrameSlot whose inner frame is the slot's
 * gives the slot's view of it (no new view per packet).
 */
export function vxlanDecap(f: Buffer, slot?: FrameSlot): Buffer | undefined {
  const l3 = ETH_HLEN;
  const ihl = (f[l3] & 0x0f) * 4;
  const udp = l3 + ihl;
  if (f[l3 + 9] !== 17 || udp + 16 > f.length) return undefined;
  if (get16(f, udp + 2) !== VXLAN_PORT) return undefined;
  const ulen = get16(f, udp + 4);
  if (ulen < 16 + ETH_HLEN || udp + ulen > f.length) return undefined;
  if (!(f[udp + 8] & 0x08) || (get32(f, udp + 12) >>> 8) !== VXLAN_VNI) return undefined;
  if (slot !== undefined && f === slot.outer && udp + 16 === VXLAN_OVERHEAD && udp + ulen === f.length) return slot.inner;
  return f.subarray(udp + 16, udp + ulen);
}

/** Bytes in front of a pod frame in its slot: room for VXLAN, and the frame starts on a 4-byte boundary. */
const HEADROOM = VXLAN_OVERHEAD + 2;

/**
 * One frame's memory, as an skb has headroom: the frame at HEADROOM (inner),
 * and the same bytes with the VXLAN headers in front (outer), so that
 * encapsulation writes 50 bytes and moves none. words: the frame as 32-bit
 * words, for the checker's compare.
 */
export class FrameSlot {
  readonly inner: Buffer;
  readonly outer: Buffer;
  readonly words: Int32Array;

  constructor(readonly len: number) {
    const mem = new ArrayBuffer(HEADROOM + len);
    this.inner = Buffer.from(mem, HEADROOM, len);
    this.outer = Buffer.from(mem, HEADROOM - VXLAN_OVERHEAD, VXLAN_OVERHEAD + len);
    this.words = new Int32Array(mem, HEADROOM, len >> 2);
  }
}

/**
 * A frame copied into the slot a word at a time (TypedArray.set costs more
 * for a frame this short): frame and words are one frame and its words view.
 */
export function fillSlot(slot: FrameSlot, frame: Buffer, words: Int32Array): void {
  const to = slot.words;
  const n = words.length;
  if (frame.length !== slot.len || n !== to.length) throw new RangeError(`a ${frame.length}-byte frame into a ${slot.len}-byte slot`);
  for (let i = 0; i < n; i++) to[i] = words[i];
  const inner = slot.inner;
  for (let i = n << 2; i < frame.length; i++) inner[i] = frame[i];
}

/** Where the simulator's 8-byte packet id sits: the start of the L4 payload, or -1. */
export function payloadOffset(f: Buffer, l3: number): number {
  if (f.length < l3 + 20) return -1;
  const ihl = (f[l3] & 0x0f) * 4;
  const l4 = l3 + ihl;
  let off: number;
  switch (f[l3 + 9]) {
    case 6: off = f.length >= l4 + 20 ? l4 + (f[l4 + 12] >> 4) * 4 : -1; break;
    case 17: off = l4 + 8; break;
    case 1: off = l4 + 8; break;
    default: return -1;
  }
  return off >= 0 && off + 8 <= f.length ? off : -1;
}

/**
 * The id as two 16-bit words followed by their complements: the four words
 * add up to zero in ones'-complement arithmetic, so writing them leaves the
 * L4 checksum of the template valid without recomputing it.
 */
export function writePacketId(f: Buffer, off: number, id: number): void {
  const hi = id >>> 16, lo = id & 0xffff;
  put16(f, off, hi);
  put16(f, off + 2, lo);
  put16(f, off + 4, ~hi & 0xffff);
  put16(f, off + 6, ~lo & 0xffff);
}

/** The id at off, or -1 when the four words do not hold together. */
export function readPacketId(f: Buffer, off: number): number {
  const hi = get16(f, off), lo = get16(f, off + 2);
  if (get16(f, off + 4) !== (~hi & 0xffff) || get16(f, off + 6) !== (~lo & 0xffff)) return -1;
  return ((hi << 16) | lo) >>> 0;
}

/**
 * The last four bytes of the MAC at f[at] as an int32: a map key that V8
 * holds unboxed (a 48-bit number is a heap number per lookup). Tables keyed
 * by it (MacTable) compare the whole MAC on a hit.
 */
export function macTail(f: Uint8Array, at: number): number {
  return (f[at + 2] << 24) | (f[at + 3] << 16) | (f[at + 4] << 8) | f[at + 5];
}

/**
 * What a switch knows: entries by MAC. Keyed by the MAC's tail, and a hit
 * whose whole MAC differs is a miss; two entries with one tail are refused
 * (the simulator's MACs differ in their last four bytes: pod MACs end in the
 * pod's uid, NIC MACs in the host's number).
 */
export class MacTable<E extends { mac: Uint8Array }> {
  private readonly m = new Map<number, E>();

  set(e: E): void {
    const tail = macTail(e.mac, 0);
    const old = this.m.get(tail);
    if (old !== undefined && old !== e) throw new Error(`MAC ${bytesToMac(e.mac, 0)} shares its last four bytes with another entry`);
    this.m.set(tail, e);
  }

  delete(e: E): void {
    const tail = macTail(e.mac, 0);
    if (this.m.get(tail) === e) this.m.delete(tail);
  }

  /** The entry for the destination MAC of frame f, if any. */
  forDst(f: Uint8Array): E | undefined {
    const e = this.m.get(macTail(f, 0));
    return e !== undefined && dstMacIs(f, e.mac) ? e : undefined;
  }
}

/** A 16-bit ones'-complement checksum with some 16-bit words replaced (RFC 1624, eqn. 3): the value a recomputation gives. */
function csumReplace(check: number, o1: number, o2: number, o3: number, n1: number, n2: number, n3: number): number {
  let sum = (~check & 0xffff) + (~o1 & 0xffff) + (~o2 & 0xffff) + (~o3 & 0xffff) + n1 + n2 + n3;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

/**
 * nf_nat's rewrite of one address and its port in an untagged IPv4 frame: the
 * address at ipAt becomes word (the model's address word, readIpv4), the TCP
 * or UDP port at portAt becomes port, and the IPv4 header and L4 checksums
 * are updated incrementally (a UDP checksum of 0 stays 0; a computed 0 is
 * sent as 0xffff). Other protocols: the address only.
 */
export function natRewrite(f: Buffer, ipAt: number, portAt: number, word: number, port: number): void {
  const l3 = ETH_HLEN;
  const proto = f[l3 + 9];
  const l4 = l3 + (f[l3] & 0x0f) * 4;
  const o1 = get16(f, ipAt), o2 = get16(f, ipAt + 2);
  const n1 = ((word & 0xff) << 8) | ((word >>> 8) & 0xff), n2 = (((word >>> 16) & 0xff) << 8) | (word >>> 24);
  put16(f, ipAt, n1);
  put16(f, ipAt + 2, n2);
  put16(f, l3 + 10, csumReplace(get16(f, l3 + 10), o1, o2, 0, n1, n2, 0));
  const at = proto === 6 ? l4 + 16 : proto === 17 ? l4 + 6 : -1;
  if (at < 0) return;
  const op = get16(f, portAt);
  put16(f, portAt, port);
  const c = get16(f, at);
  if (proto === 17 && c === 0) return;
  const r = csumReplace(c, o1, o2, op, n1, n2, port);
  put16(f, at, proto === 17 && r === 0 ? 0xffff : r);
}
