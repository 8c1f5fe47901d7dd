/**
 * Twin of bpf/packet.h: header parsing and checksum arithmetic, same names,
 * same order of checks. Where the C re-derives packet pointers, bounds-checks
 * offsets against XMASQ_MAX_HDR_OFF or pulls non-linear data in, it does so for
 * the verifier or for GSO packets; the model's packet is one flat Buffer, so
 * those steps are no-ops here and say so.
 */
import { IP_MF, IP_OFFSET } from '../../dataplane/maps.ts';

export const ETH_HLEN = 14;
export const ETH_P_IP = 0x0800;
export const IPPROTO_ICMP = 1;
export const IPPROTO_TCP = 6;
export const IPPROTO_UDP = 17;
export const MAX_HDR_OFF = 512;
export const TCP_CSUM_OFF = 16;
export const TCP_FLAGS_OFF = 13;
export const TCP_URG_PTR_OFF = 18;
export const TCP_FLAG_URG = 0x20;
export const UDP_LEN_OFF = 4;
export const UDP_CSUM_OFF = 6;
export const ICMP_CSUM_OFF = 2;
export const ICMP_ECHOREPLY = 0;
export const ICMP_ECHO = 8;
const GENEVE_PROTO_ETH = 0x6558;
const VXLAN_FLAG_VNI = 0x08;

/*
 * Reads and writes of the packet's bytes. Buffer's readUInt16BE and the like
 * validate their arguments through several calls on every access; these check
 * only the bounds (an access past the end throws, as Buffer's does), which
 * every caller has checked already, as the C checks them for the verifier.
 * The throws live in functions of their own so that the checks stay small
 * enough to inline.
 */
function inBounds(pkt: Buffer, at: number, n: number): void {
  if (!(at >= 0 && at + n <= pkt.length)) outOfBounds(pkt, at, n);
}

function outOfBounds(pkt: Buffer, at: number, n: number): never {
  throw new RangeError(`read of ${n} bytes at ${at} outside a ${pkt.length}-byte packet`);
}

/** A big-endian u16 (network order), as readUInt16BE. */
function be16(pkt: Buffer, at: number): number {
  inBounds(pkt, at, 2);
  return (pkt[at] << 8) | pkt[at + 1];
}

/** A little-endian u16 (the bytes as the C reads a __u16 from memory), as readUInt16LE. */
function le16(pkt: Buffer, at: number): number {
  inBounds(pkt, at, 2);
  return pkt[at] | (pkt[at + 1] << 8);
}

/** A little-endian u32, as readUInt32LE. */
function le32(pkt: Buffer, at: number): number {
  inBounds(pkt, at, 4);
  return word32(pkt, at) >>> 0;
}

/*
 * Writes, checked as Buffer's writeUInt16BE and the like check them: the bytes
 * in the packet, the value an integer in range. (v & 0xffff) !== v is true
 * exactly when v is not an integer in 0..0xffff (NaN, fractions, negatives and
 * larger values all change), (v >>> 0) !== v likewise for 0..0xffffffff.
 */
function fits16(pkt: Buffer, at: number, v: number): void {
  inBounds(pkt, at, 2);
  if ((v & 0xffff) !== v) doesNotFit(v, 2);
}

function doesNotFit(v: number, n: number): never {
  throw new RangeError(`value ${v} does not fit ${n} bytes`);
}

function putBe16(pkt: Buffer, at: number, v: number): void {
  fits16(pkt, at, v);
  pkt[at] = v >>> 8;
  pkt[at + 1] = v;
}

/** A checksum back where le16 read it: in bounds, and a fold is always 16 bits. */
function setLe16(pkt: Buffer, at: number, v: number): void {
  pkt[at] = v;
  pkt[at + 1] = v >>> 8;
}

/**
 * What the programs know about one IPv4 datagram (C: struct hdrs). As in the
 * C, each run makes its own (a stack local there), so runs share nothing but
 * the maps.
 */
export class Hdrs {
  l3 = 0;
  l4 = 0;
  end = 0;
  saddr = 0; // the C's words (readIpv4)
  daddr = 0;
  frag = 0;
  id = 0; // host order here; the C keeps network order
  sport = 0; // host order here; the C keeps network order, which only matters for policy keys
  dport = 0;
  carrier = 0; // the L4 word a wide key can ride in (TCP urgent pointer, UDP length, ICMP type and code); 0 when not readable
  tcp_flags = 0; // 0 when not TCP or not readable
  tos = 0;
  proto = 0;
  l4_ok = false;
}

/** C: the struct copy *to = *from. */
export function copyHdrs(to: Hdrs, from: Hdrs): void {
  to.l3 = from.l3;
  to.l4 = from.l4;
  to.end = from.end;
  to.saddr = from.saddr;
  to.daddr = from.daddr;
  to.frag = from.frag;
  to.id = from.id;
  to.sport = from.sport;
  to.dport = from.dport;
  to.carrier = from.carrier;
  to.tcp_flags = from.tcp_flags;
  to.tos = from.tos;
  to.proto = from.proto;
  to.l4_ok = from.l4_ok;
}

export function isFirstFragment(h: Hdrs): boolean {
  return (h.frag & IP_OFFSET) === 0;
}

export function isFragment(h: Hdrs): boolean {
  return (h.frag & (IP_MF | IP_OFFSET)) !== 0;
}

export function l4HeaderNeed(proto: number): number {
  switch (proto) {
    case IPPROTO_TCP: return 20;
    case IPPROTO_UDP: return 8;
    case IPPROTO_ICMP: return 4;
    default: return 0;
  }
}

/**
 * C: load_ipv4_hdr. The IPv4 header, the L4 fields left empty: 0 when the
 * header is sound, -1 to make the caller pass.
 */
export function loadIpv4Hdr(pkt: Buffer, off: number, limit: number, h: Hdrs): number {
  if (off > MAX_HDR_OFF || off + 20 > limit) return -1;
  // C: ensure_linear, then the (ip + 1) > data_end check: the whole model packet is linear.
  inBounds(pkt, off, 20);
  const vihl = pkt[off];
  const version = vihl >> 4;
  const ihl = vihl & 0x0f;
  if (version !== 4 || ihl < 5) return -1;
  const hlen = ihl * 4;
  const tot = (pkt[off + 2] << 8) | pkt[off + 3];
  if (tot < hlen || off + tot > limit) return -1;

  const l4 = off + hlen, end = off + tot, proto = pkt[off + 9];
  h.l3 = off;
  h.l4 = l4;
  h.end = end;
  h.saddr = readIpv4(pkt, off + 12);
  h.daddr = readIpv4(pkt, off + 16);
  h.frag = (pkt[off + 6] << 8) | pkt[off + 7];
  h.id = (pkt[off + 4] << 8) | pkt[off + 5];
  h.tos = pkt[off + 1];
  h.proto = proto;
  h.sport = 0;
  h.dport = 0;
  h.carrier = 0;
  h.tcp_flags = 0;
  h.l4_ok = false;
  return 0;
}

/** C: load_l4. The ports, the carrier and the TCP flags of a whole first fragment's L4 header. */
export function loadL4(pkt: Buffer, h: Hdrs): number {
  // Only a first fragment carries the L4 header.
  if (!isFirstFragment(h)) return 0;
  const { l4, end, proto } = h;
  const need = l4HeaderNeed(proto);
  if (need === 0 || l4 + need > end) return 0;
  if (l4 > MAX_HDR_OFF) return -1;
  // C: ensure_linear, then its pointer checks on the ports, the carrier and the TCP flags.
  inBounds(pkt, l4, need);
  if (proto !== IPPROTO_ICMP) {
    h.sport = (pkt[l4] << 8) | pkt[l4 + 1];
    h.dport = (pkt[l4 + 2] << 8) | pkt[l4 + 3];
  }
  const c = l4 + carrierOff(proto);
  h.carrier = (pkt[c] << 8) | pkt[c + 1];
  if (proto === IPPROTO_TCP) h.tcp_flags = pkt[l4 + TCP_FLAGS_OFF];
  h.l4_ok = true;
  return 0;
}

/** C: load_ipv4. load_ipv4_hdr, then load_l4. */
export function loadIpv4(pkt: Buffer, off: number, limit: number, h: Hdrs): number {
  return loadIpv4Hdr(pkt, off, limit, h) || loadL4(pkt, h);
}

/*
 * Wide carriers (C: packet.h explains them): the TCP urgent pointer with URG
 * clear and the UDP length under DSCP 0; an ICMP echo's code (the key's high
 * 8 bits) with DSCP (its low 6).
 */
export function isEcho(h: Hdrs): boolean {
  const type = h.carrier >> 8;
  return h.proto === IPPROTO_ICMP && (type === ICMP_ECHO || type === ICMP_ECHOREPLY);
}

/** C: wide_carrier. A whole datagram with a word that can carry a wide key. */
export function wideCarrier(h: Hdrs): boolean {
  if (!h.l4_ok || isFragment(h)) return false;
  if (h.proto === IPPROTO_TCP) return !(h.tcp_flags & TCP_FLAG_URG);
  return h.proto === IPPROTO_UDP || isEcho(h);
}

/** C: carrier_free_value. The carrier as the pod sends it when it can take a key. */
export function carrierFreeValue(h: Hdrs): number {
  if (h.proto === IPPROTO_TCP) return 0;
  if (h.proto === IPPROTO_UDP) return (h.end - h.l4) & 0xffff;
  return h.carrier & 0xff00;
}

/** C: carrier_with_key. */
export function carrierWithKey(h: Hdrs, key: number): number {
  if (h.proto === IPPROTO_ICMP) return (h.carrier & 0xff00) | (key >> 6);
  return key;
}

/** C: dscp_with_key. */
export function dscpWithKey(h: Hdrs, key: number): number {
  return h.proto === IPPROTO_ICMP ? key & 0x3f : 0;
}

/** C: carries_wide_key. A masqueraded packet under a wide key. */
export function carriesWideKey(h: Hdrs): boolean {
  if (!wideCarrier(h)) return false;
  return isEcho(h) ? (h.carrier & 0xff) !== 0 : (h.tos >> 2) === 0;
}

/** C: carried_wide_key. */
export function carriedWideKey(h: Hdrs): number {
  if (h.proto === IPPROTO_ICMP) return ((h.carrier & 0xff) << 6) | (h.tos >> 2);
  return h.carrier;
}

/**
 * C: load_eth_ipv4_hdr. An Ethernet frame carrying IPv4 directly (no VLAN
 * tag), neither in the frame nor taken out of it into the skb (vlanPresent):
 * its IPv4 header.
 */
export function loadEthIpv4Hdr(pkt: Buffer, h: Hdrs, vlanPresent = false): number {
  if (vlanPresent) return -1;
  if (pkt.length < ETH_HLEN) return -1;
  if (be16(pkt, 12) !== ETH_P_IP) return -1;
  return loadIpv4Hdr(pkt, ETH_HLEN, pkt.length, h);
}

/** C: load_eth_ipv4. load_eth_ipv4_hdr, then load_l4. */
export function loadEthIpv4(pkt: Buffer, h: Hdrs, vlanPresent = false): number {
  return loadEthIpv4Hdr(pkt, h, vlanPresent) || loadL4(pkt, h);
}

/** The overlay's UDP ports as config holds them (host order; 0: none). */
export interface TunnelPorts { vxlan_port: number; geneve_port: number }

/** C: is_tunnel_port. One of the overlay's UDP ports. */
export function isTunnelPort(cfg: TunnelPorts, dport: number): boolean {
  return dport !== 0 && (dport === cfg.vxlan_port || dport === cfg.geneve_port);
}

/** C: is_tunnel. A UDP datagram to an overlay port, whole and unfragmented. */
export function isTunnel(cfg: TunnelPorts, h: Hdrs): boolean {
  return h.proto === IPPROTO_UDP && h.l4_ok && !isFragment(h) && isTunnelPort(cfg, h.dport);
}

/** C: struct tunnel; a run's own, as Hdrs is. */
export class Tunnel {
  readonly outer = new Hdrs();
  readonly inner = new Hdrs();
  inner_eth = 0;
}

/** C: load_tunnel. Outer IPv4/UDP, VXLAN or Geneve, inner Ethernet + IPv4. */
export function loadTunnel(pkt: Buffer, cfg: TunnelPorts, outer: Hdrs, t: Tunnel): number {
  if (!isTunnel(cfg, outer)) return -1;
  copyHdrs(t.outer, outer);

  // The UDP length bounds the tunnel payload, as the UDP stack would trim it.
  const l4 = outer.l4;
  if (l4 > MAX_HDR_OFF) return -1;
  const ulen = be16(pkt, l4 + 4);
  if (ulen < 8 || l4 + ulen > outer.end) return -1;
  const limit = l4 + ulen;

  const tun = l4 + 8;
  if (tun + 8 > limit) return -1;
  if (tun > MAX_HDR_OFF) return -1;
  inBounds(pkt, tun, 8);

  let innerEth: number;
  if (outer.dport === cfg.geneve_port) {
    // Geneve: version 0, options of 4-byte words, then an Ethernet frame.
    if ((pkt[tun] >> 6) !== 0) return -1;
    if (((pkt[tun + 2] << 8) | pkt[tun + 3]) !== GENEVE_PROTO_ETH) return -1;
    innerEth = tun + 8 + (pkt[tun] & 0x3f) * 4;
  } else {
    if (!(pkt[tun] & VXLAN_FLAG_VNI)) return -1;
    innerEth = tun + 8;
  }

  if (innerEth + ETH_HLEN > limit) return -1;
  if (innerEth > MAX_HDR_OFF) return -1;
  if (be16(pkt, innerEth + 12) !== ETH_P_IP) return -1;
  t.inner_eth = innerEth;
  return loadIpv4(pkt, innerEth + ETH_HLEN, limit, t.inner);
}

// ---- checksums: the kernel's csum_add / csum_fold on 32-bit words in memory order ----

/*
 * The sums are held as int32 (`| 0`), the same 32 bits as the C's __u32: V8
 * keeps an int32 in a register or a small integer, while a u32 above 2^31 is
 * a double, boxed into a fresh heap object whenever it crosses a call the
 * compiler did not inline. Every word the sums take, u32 or int32, gives the
 * same bits.
 */

export function csumAdd32(a: number, b: number): number {
  const r = (a + b) | 0;
  return (r + ((r >>> 0) < (b >>> 0) ? 1 : 0)) | 0;
}

export function csumFold32(s: number): number {
  s = (s & 0xffff) + (s >>> 16);
  s = (s & 0xffff) + (s >>> 16);
  return ~s & 0xffff;
}

/**
 * C: csum_fold64. A sum of 32-bit words (here below 2^53) folded to the 32
 * bits csumAdd32 would give adding them one at a time, as an int32.
 */
export function csumFold64(s: number): number {
  let hi = Math.floor(s / 0x1_0000_0000);
  s = (s - hi * 0x1_0000_0000) + hi;
  hi = Math.floor(s / 0x1_0000_0000);
  return ((s - hi * 0x1_0000_0000) + hi) | 0;
}

/**
 * The address at pkt[at] as the C holds it: its four bytes read as a
 * little-endian u32 (state.ts: the model's addresses are these words).
 */
export function readIpv4(pkt: Buffer, at: number): number {
  return le32(pkt, at);
}

/** The four bytes at pkt[at] as a little-endian int32: a word for the sums. */
function word32(pkt: Buffer, at: number): number {
  return pkt[at] | (pkt[at + 1] << 8) | (pkt[at + 2] << 16) | (pkt[at + 3] << 24);
}

/**
 * C: rewrite_ipv4. Rewrites tos, ID, flags and addresses of the IPv4 header
 * at l3 and fixes its checksum; returns the address diff for the L4 pseudo
 * header. The caller has checked that the header is in bounds (the C's
 * pointer check); so does this, once for the whole header.
 */
export function rewriteIpv4(pkt: Buffer, l3: number, tos: number, id: number, fragHost: number, saddr: number, daddr: number): number {
  inBounds(pkt, l3, 20);
  if ((id & 0xffff) !== id) doesNotFit(id, 2);
  if ((fragHost & 0xffff) !== fragHost) doesNotFit(fragHost, 2);
  if ((saddr >>> 0) !== saddr) doesNotFit(saddr, 4);
  if ((daddr >>> 0) !== daddr) doesNotFit(daddr, 4);
  const w0 = word32(pkt, l3);
  const w1 = word32(pkt, l3 + 4);
  const s = word32(pkt, l3 + 12);
  const d = word32(pkt, l3 + 16);

  pkt[l3 + 1] = tos;
  pkt[l3 + 4] = id >>> 8;
  pkt[l3 + 5] = id;
  pkt[l3 + 6] = fragHost >>> 8;
  pkt[l3 + 7] = fragHost;
  pkt[l3 + 12] = saddr;
  pkt[l3 + 13] = saddr >>> 8;
  pkt[l3 + 14] = saddr >>> 16;
  pkt[l3 + 15] = saddr >>> 24;
  pkt[l3 + 16] = daddr;
  pkt[l3 + 17] = daddr >>> 8;
  pkt[l3 + 18] = daddr >>> 16;
  pkt[l3 + 19] = daddr >>> 24;

  // Each old word's complement and each new word, summed whole (< 2^36: exact in a double).
  const addr = (~s >>> 0) + (saddr >>> 0) + (~d >>> 0) + (daddr >>> 0);
  const check = pkt[l3 + 10] | (pkt[l3 + 11] << 8);
  const all = addr + (~w0 >>> 0) + (word32(pkt, l3) >>> 0) + (~w1 >>> 0) + (word32(pkt, l3 + 4) >>> 0) + (~check >>> 0);
  const next = csumFold32(csumFold64(all));
  pkt[l3 + 10] = next;
  pkt[l3 + 11] = next >>> 8;
  return csumFold64(addr);
}

/**
 * The kernel's bpf_l4_csum_replace(skb, off, 0, diff, BPF_F_PSEUDO_HDR [| MARK_MANGLED_0])
 * for an skb whose checksum is not partial, as BPF_PROG_TEST_RUN builds it.
 * (A partial checksum holds the pseudo-header sum instead; the kernel
 * updates it the other way round, which the lab tests cover on real veths.)
 */
export function l4CsumReplaceByDiff(pkt: Buffer, off: number, diff: number, markMangled0: boolean): void {
  const sum = le16(pkt, off);
  if (markMangled0 && sum === 0) return;
  let next = csumFold32(csumAdd32(diff, ~sum));
  if (markMangled0 && next === 0) next = 0xffff;
  setLe16(pkt, off, next);
}

/**
 * The kernel's bpf_l4_csum_replace(skb, off, from, to, 2) (no pseudo header)
 * for a checksum that is not partial: csum_replace4 of the two big-endian
 * values widened to 32 bits, in memory order. (On a partial checksum the
 * kernel leaves the field alone: the device sums the final bytes.)
 */
export function l4CsumReplace2(pkt: Buffer, off: number, fromHost: number, toHost: number, markMangled0: boolean): void {
  const sum = le16(pkt, off);
  if (markMangled0 && sum === 0) return;
  const tmp = csumAdd32(~sum, ~swap16(fromHost));
  let next = csumFold32(csumAdd32(tmp, swap16(toHost)));
  if (markMangled0 && next === 0) next = 0xffff;
  setLe16(pkt, off, next);
}

/**
 * A 16-bit value's two bytes read as the C reads memory (little-endian).
 * Module level: an arrow inside the caller would be a new closure per call.
 */
function swap16(v: number): number {
  return ((v & 0xff) << 8) | (v >>> 8);
}

/** C: fix_l4_checksum. */
export function fixL4Checksum(pkt: Buffer, h: Hdrs, addrDiff: number): number {
  if (!isFirstFragment(h) || !h.l4_ok) return 0;
  if (h.proto === IPPROTO_TCP) l4CsumReplaceByDiff(pkt, h.l4 + TCP_CSUM_OFF, addrDiff, false);
  else if (h.proto === IPPROTO_UDP) l4CsumReplaceByDiff(pkt, h.l4 + UDP_CSUM_OFF, addrDiff, true);
  return 0;
}

/** C: carrier_off, l4_csum_off. */
export function carrierOff(proto: number): number {
  return proto === IPPROTO_TCP ? TCP_URG_PTR_OFF : proto === IPPROTO_UDP ? UDP_LEN_OFF : 0;
}

export function l4CsumOff(proto: number): number {
  return proto === IPPROTO_TCP ? TCP_CSUM_OFF : proto === IPPROTO_UDP ? UDP_CSUM_OFF : ICMP_CSUM_OFF;
}

/**
 * C: rewrite_packet. masq's and restore's rewrite, the carrier included
 * (h.carrier keeps the old value); 0, or -1 if a helper failed.
 */
export function rewritePacket(pkt: Buffer, h: Hdrs, dstMac: number, srcMac: number, tos: number, fragHost: number, saddr: number, daddr: number, carrier: number): number {
  // Only a wide key changes the carrier, and only on a whole datagram.
  const carrierChanged = carrier !== h.carrier;
  if (carrierChanged) {
    const at = h.l4 + carrierOff(h.proto);
    if (at > MAX_HDR_OFF + TCP_URG_PTR_OFF) return -1;
    putBe16(pkt, at, carrier);
  }
  writeMac(pkt, 0, dstMac);
  writeMac(pkt, 6, srcMac);
  const addrDiff = rewriteIpv4(pkt, h.l3, tos & 0xff, h.id, fragHost & 0xffff, saddr, daddr);
  if (fixL4Checksum(pkt, h, addrDiff)) return -1;
  // The carrier is not in the pseudo header: a plain 2-byte update; UDP's "no checksum" stays 0.
  if (carrierChanged) l4CsumReplace2(pkt, h.l4 + l4CsumOff(h.proto), h.carrier, carrier, h.proto === IPPROTO_UDP);
  return 0;
}

/** C: rewrite_port. A port of a whole datagram (off: 0 source, 2 destination), host order, its checksum kept. */
export function rewritePort(pkt: Buffer, h: Hdrs, off: number, from: number, to: number): number {
  putBe16(pkt, h.l4 + off, to);
  l4CsumReplace2(pkt, h.l4 + l4CsumOff(h.proto), from, to, h.proto === IPPROTO_UDP);
  return 0;
}
export const SPORT_OFF = 0;
export const DPORT_OFF = 2;

/** C: rewritable. The protocols whose checksums masq and restore keep valid. */
export function rewritable(h: Hdrs): boolean {
  if (h.proto !== IPPROTO_TCP && h.proto !== IPPROTO_UDP && h.proto !== IPPROTO_ICMP) return false;
  // A first fragment must hold its whole L4 header, or we cannot fix it.
  return !isFirstFragment(h) || h.l4_ok;
}

/** The MAC at pkt[at] as the model holds it: its six bytes as a 48-bit number, first byte highest. */
export function readMac(pkt: Buffer, at: number): number {
  // Two 24-bit halves: readUIntBE validates its arguments on every call.
  return ((pkt[at] << 16) | (pkt[at + 1] << 8) | pkt[at + 2]) * 0x1000000 + ((pkt[at + 3] << 16) | (pkt[at + 4] << 8) | pkt[at + 5]);
}

export function writeMac(pkt: Buffer, at: number, mac: number): void {
  // Subtraction, not %: a double's remainder is a library call, ~10x a multiply.
  const hi = Math.floor(mac / 0x1000000), lo = mac - hi * 0x1000000;
  pkt[at] = hi >>> 16;
  pkt[at + 1] = hi >>> 8;
  pkt[at + 2] = hi;
  pkt[at + 3] = lo >>> 16;
  pkt[at + 4] = lo >>> 8;
  pkt[at + 5] = lo;
}
