/**
 * Frame builder. A FrameSpec is plain JSON-able data (addresses as strings,
 * bytes as hex strings or filler descriptions) so fixtures can store specs
 * rather than opaque dumps. Every header field can be overridden, including to
 * wrong values, because tests need malformed packets; lengths and checksums
 * default to correct values computed from the bytes actually built.
 */
import { bytesToHex, ip6ToBytes, ipToBytes, macToBytes, toBytes, type Bytes } from './addr.ts';
import { internetChecksum, ipv4HeaderChecksum, l4Checksum, pseudoHeaderSum, udpChecksum } from './checksum.ts';
import {
  ETH_P_8021Q, ETH_P_ARP, ETH_P_EXPERIMENTAL, ETH_P_IPV4, ETH_P_IPV6, ETH_P_TEB, IP_DF, IP_MF, IP_RF,
  IPPROTO_EXPERIMENTAL, IPPROTO_ICMP, IPPROTO_NONE, IPPROTO_TCP, IPPROTO_UDP, TCP_FLAGS, VXLAN_FLAG_I,
} from './consts.ts';

export type { Bytes } from './addr.ts';

export const DEFAULT_SRC_MAC = '02:00:00:00:00:01';
export const DEFAULT_DST_MAC = '02:00:00:00:00:02';

/** One Ethernet frame, described from the outside in. At most one of ipv4 / ipv6 / arp. */
export interface FrameSpec {
  eth?: EthSpec;
  ipv4?: Ipv4Spec;
  ipv6?: Ipv6Spec;
  /** `true` builds a who-has request with zero addresses. */
  arp?: true | ArpSpec;
  /** Ethernet payload for a frame without an L3 layer (L3 payloads live inside ipv4/ipv6). */
  payload?: Bytes;
  /** Bytes after the L3 datagram that its length fields do not count: Ethernet padding or junk. */
  trailer?: Bytes;
  /** Zero-pad the frame after the trailer to at least this length, as a NIC pads to 60. */
  minLength?: number;
}

export interface EthSpec {
  /** Default DEFAULT_SRC_MAC. */
  src?: string;
  /** Default DEFAULT_DST_MAC. */
  dst?: string;
  /** Tags outermost first. A number is a VID under TPID 0x8100; use the object form for QinQ (tpid 0x88a8) or PCP/DEI. */
  vlan?: (number | VlanTag)[];
  /** Innermost ethertype; default follows the L3 layer (0x88b5 when there is none). */
  type?: number;
}

export interface VlanTag {
  vid: number;
  pcp?: number;
  dei?: boolean;
  /** Default 0x8100; 0x88a8 for an 802.1ad service tag. */
  tpid?: number;
}

export interface Ipv4Spec {
  src: string;
  dst: string;
  tos?: number;
  id?: number;
  /** Reserved flag (0x8000), which XMasq uses as its marker. */
  rf?: boolean;
  df?: boolean;
  mf?: boolean;
  /** In 8-byte units, as in the header. */
  fragOffset?: number;
  /** Default 64. */
  ttl?: number;
  /** Default follows l4 (253 when there is no l4). */
  protocol?: number;
  /** Zero-padded to a multiple of 4; at most 40 bytes. */
  options?: Bytes;
  /** Overrides, for malformed packets. */
  version?: number;
  ihl?: number;
  totalLength?: number;
  checksum?: number;
  l4?: L4Spec;
  /** Raw bytes after the header, instead of l4. */
  payload?: Bytes;
}

export interface Ipv6Spec {
  src: string;
  dst: string;
  trafficClass?: number;
  flowLabel?: number;
  /** Default 59 (no next header). */
  nextHeader?: number;
  /** Default 64. */
  hopLimit?: number;
  /** Override. */
  payloadLength?: number;
  payload?: Bytes;
}

/** Ethernet/IPv4 ARP. Addresses default to zero, sha to the frame's source MAC. */
export interface ArpSpec {
  /** 1 request (default), 2 reply. */
  op?: number;
  sha?: string;
  spa?: string;
  tha?: string;
  tpa?: string;
}

export type L4Spec =
  | { udp: UdpSpec }
  | { tcp: TcpSpec }
  | { icmp: IcmpSpec }
  | { raw: { protocol: number; bytes: Bytes } };

/**
 * 'valid' (default) computes the checksum; 'partial' stores the bare
 * pseudo-header sum, as an skb with CHECKSUM_PARTIAL carries it before the
 * NIC or skb_checksum_help finishes it; a number is stored as is.
 */
export type ChecksumSpec = number | 'valid' | 'partial';

export interface UdpSpec {
  sport: number;
  dport: number;
  /** Override. */
  length?: number;
  /** Plus 'none' for the 0 that means "no checksum". */
  checksum?: ChecksumSpec | 'none';
  payload?: Bytes | TunnelSpec;
}

export interface TcpSpec {
  sport: number;
  dport: number;
  seq?: number;
  ack?: number;
  /** A number, or letters from 'FSRPAUEC' (e.g. 'S', 'SA', 'PA'). Default 'A'. */
  flags?: number | string;
  /** Default 65535. */
  window?: number;
  urgent?: number;
  /** Zero-padded to a multiple of 4; at most 40 bytes. */
  options?: Bytes;
  /** Overrides, for malformed segments. */
  dataOffset?: number;
  /** The 4 bits between data offset and flags. */
  reserved?: number;
  checksum?: ChecksumSpec;
  payload?: Bytes;
}

export interface IcmpSpec {
  type: number;
  code?: number;
  /** Echo identifier and sequence (the second header word). */
  id?: number;
  seq?: number;
  /** The second header word as one number, for non-echo types; excludes id/seq. */
  rest?: number;
  checksum?: number | 'valid';
  payload?: Bytes;
}

/** A UDP payload that is an overlay header followed by a whole inner Ethernet frame. */
export type TunnelSpec = { vxlan: VxlanSpec; inner: FrameSpec } | { geneve: GeneveSpec; inner: FrameSpec };

export interface VxlanSpec {
  vni: number;
  /** Default 0x08 (I flag: VNI valid). */
  flags?: number;
  /** 24 bits after the flags. */
  reserved1?: number;
  /** Last 8 bits. */
  reserved2?: number;
}

export interface GeneveSpec {
  vni: number;
  /** Multiple of 4 bytes; at most 252. */
  options?: Bytes;
  /** Default 0x6558 (inner Ethernet). The inner is built as Ethernet whatever this says. */
  protocol?: number;
  version?: number;
  oBit?: boolean;
  cBit?: boolean;
  /** 6 bits after O and C. */
  reserved?: number;
  /** Last 8 bits. */
  reserved2?: number;
  /** Override of the 6-bit option length (4-byte words). */
  optLen?: number;
}

function uint(what: string, v: number, bits: number): number {
  const max = 2 ** bits - 1;
  if (!Number.isInteger(v) || v < 0 || v > max) throw new Error(`${what} = ${v}: want an integer in 0..${max}`);
  return v;
}

function pad4(what: string, b: Uint8Array, max: number): Uint8Array {
  const len = Math.ceil(b.length / 4) * 4;
  if (len > max) throw new Error(`${what}: ${b.length} bytes, at most ${max}`);
  if (len === b.length) return b;
  const out = new Uint8Array(len);
  out.set(b);
  return out;
}

const EMPTY = new Uint8Array(0);

/**
 * Generators build many frames from few addresses, and regex parsing was the
 * builder's largest cost. Cached arrays are only ever copied from, never handed out.
 */
const parsed = new Map<string, Uint8Array>();
function cached(kind: string, text: string, parse: (s: string) => Uint8Array): Uint8Array {
  const key = kind + text;
  let v = parsed.get(key);
  if (!v) {
    v = parse(text);
    if (parsed.size > 4096) parsed.clear();
    parsed.set(key, v);
  }
  return v;
}
const mac = (s: string) => cached('m', s, macToBytes);
const ip4 = (s: string) => cached('4', s, ipToBytes);
const ip6 = (s: string) => cached('6', s, ip6ToBytes);

export function parseTcpFlags(flags: number | string): number {
  if (typeof flags === 'number') return uint('tcp.flags', flags, 8);
  let n = 0;
  for (const c of flags.toUpperCase()) {
    const bit = TCP_FLAGS[c as keyof typeof TCP_FLAGS];
    if (bit === undefined) throw new Error(`tcp.flags "${flags}": '${c}' is not one of FSRPAUEC`);
    n |= bit;
  }
  return n;
}

export function buildFrame(spec: FrameSpec): Buffer {
  const l3 = buildL3(spec);
  const eth = spec.eth ?? {};
  const tags = eth.vlan ?? [];
  const hdr = Buffer.alloc(14 + 4 * tags.length);
  hdr.set(mac(eth.dst ?? DEFAULT_DST_MAC), 0);
  hdr.set(mac(eth.src ?? DEFAULT_SRC_MAC), 6);
  let off = 12;
  for (const t of tags) {
    const tag: VlanTag = typeof t === 'number' ? { vid: t } : t;
    const tci = (uint('vlan.pcp', tag.pcp ?? 0, 3) << 13) | ((tag.dei ? 1 : 0) << 12) | uint('vlan.vid', tag.vid, 12);
    hdr.writeUInt16BE(uint('vlan.tpid', tag.tpid ?? ETH_P_8021Q, 16), off);
    hdr.writeUInt16BE(tci, off + 2);
    off += 4;
  }
  hdr.writeUInt16BE(uint('eth.type', eth.type ?? l3.type, 16), off);
  const parts: Uint8Array[] = [hdr, l3.bytes];
  if (spec.trailer !== undefined) parts.push(toBytes(spec.trailer));
  let frame = Buffer.concat(parts);
  if (spec.minLength !== undefined && frame.length < spec.minLength) {
    frame = Buffer.concat([frame, Buffer.alloc(spec.minLength - frame.length)]);
  }
  return frame;
}

function buildL3(spec: FrameSpec): { type: number; bytes: Uint8Array } {
  const given = (['ipv4', 'ipv6', 'arp', 'payload'] as const).filter((k) => spec[k] !== undefined);
  if (given.length > 1) throw new Error(`frame spec has ${given.join(' and ')}: give at most one`);
  if (spec.ipv4) return { type: ETH_P_IPV4, bytes: buildIpv4(spec.ipv4) };
  if (spec.ipv6) return { type: ETH_P_IPV6, bytes: buildIpv6(spec.ipv6) };
  if (spec.arp) return { type: ETH_P_ARP, bytes: buildArp(spec.arp === true ? {} : spec.arp, spec.eth?.src) };
  return { type: ETH_P_EXPERIMENTAL, bytes: spec.payload === undefined ? EMPTY : toBytes(spec.payload) };
}

/** An IPv4 datagram without link layer, for callers that need raw L3 bytes. */
export function buildIpv4(spec: Ipv4Spec): Buffer {
  const src = ip4(spec.src);
  const dst = ip4(spec.dst);
  if (spec.l4 && spec.payload !== undefined) throw new Error('ipv4 spec has both l4 and payload');
  const l4 = spec.l4
    ? buildL4(spec.l4, src, dst)
    : { protocol: IPPROTO_EXPERIMENTAL, bytes: spec.payload === undefined ? EMPTY : toBytes(spec.payload) };
  const options = spec.options === undefined ? EMPTY : pad4('ipv4.options', toBytes(spec.options), 40);
  const hlen = 20 + options.length;
  const total = hlen + l4.bytes.length;
  if (total > 0xffff) throw new Error(`ipv4 datagram of ${total} bytes exceeds 65535`);
  const h = Buffer.alloc(total);
  h[0] = (uint('ipv4.version', spec.version ?? 4, 4) << 4) | uint('ipv4.ihl', spec.ihl ?? hlen / 4, 4);
  h[1] = uint('ipv4.tos', spec.tos ?? 0, 8);
  h.writeUInt16BE(uint('ipv4.totalLength', spec.totalLength ?? total, 16), 2);
  h.writeUInt16BE(uint('ipv4.id', spec.id ?? 0, 16), 4);
  const frag = (spec.rf ? IP_RF : 0) | (spec.df ? IP_DF : 0) | (spec.mf ? IP_MF : 0) | uint('ipv4.fragOffset', spec.fragOffset ?? 0, 13);
  h.writeUInt16BE(frag, 6);
  h[8] = uint('ipv4.ttl', spec.ttl ?? 64, 8);
  h[9] = uint('ipv4.protocol', spec.protocol ?? l4.protocol, 8);
  h.set(src, 12);
  h.set(dst, 16);
  h.set(options, 20);
  // IHL may be overridden to a lie; the checksum still covers the bytes actually built.
  h.writeUInt16BE(spec.checksum === undefined ? ipv4HeaderChecksum(h, 0, hlen) : uint('ipv4.checksum', spec.checksum, 16), 10);
  h.set(l4.bytes, hlen);
  return h;
}

function buildIpv6(spec: Ipv6Spec): Uint8Array {
  const payload = spec.payload === undefined ? EMPTY : toBytes(spec.payload);
  if (payload.length > 0xffff) throw new Error(`ipv6 payload of ${payload.length} bytes exceeds 65535`);
  const h = Buffer.alloc(40 + payload.length);
  const tc = uint('ipv6.trafficClass', spec.trafficClass ?? 0, 8);
  const fl = uint('ipv6.flowLabel', spec.flowLabel ?? 0, 20);
  h.writeUInt32BE(((6 << 28) | (tc << 20) | fl) >>> 0, 0);
  h.writeUInt16BE(uint('ipv6.payloadLength', spec.payloadLength ?? payload.length, 16), 4);
  h[6] = uint('ipv6.nextHeader', spec.nextHeader ?? IPPROTO_NONE, 8);
  h[7] = uint('ipv6.hopLimit', spec.hopLimit ?? 64, 8);
  h.set(ip6(spec.src), 8);
  h.set(ip6(spec.dst), 24);
  h.set(payload, 40);
  return h;
}

function buildArp(spec: ArpSpec, ethSrc: string | undefined): Uint8Array {
  const a = Buffer.alloc(28);
  a.writeUInt16BE(1, 0);
  a.writeUInt16BE(ETH_P_IPV4, 2);
  a[4] = 6;
  a[5] = 4;
  a.writeUInt16BE(uint('arp.op', spec.op ?? 1, 16), 6);
  a.set(mac(spec.sha ?? ethSrc ?? DEFAULT_SRC_MAC), 8);
  a.set(ip4(spec.spa ?? '0.0.0.0'), 14);
  a.set(mac(spec.tha ?? '00:00:00:00:00:00'), 18);
  a.set(ip4(spec.tpa ?? '0.0.0.0'), 24);
  return a;
}

function buildL4(l4: L4Spec, src: Uint8Array, dst: Uint8Array): { protocol: number; bytes: Uint8Array } {
  if ('udp' in l4) return { protocol: IPPROTO_UDP, bytes: buildUdp(l4.udp, src, dst) };
  if ('tcp' in l4) return { protocol: IPPROTO_TCP, bytes: buildTcp(l4.tcp, src, dst) };
  if ('icmp' in l4) return { protocol: IPPROTO_ICMP, bytes: buildIcmp(l4.icmp) };
  if ('raw' in l4) return { protocol: uint('raw.protocol', l4.raw.protocol, 8), bytes: toBytes(l4.raw.bytes) };
  throw new Error(`l4 spec ${JSON.stringify(l4)}: want one of udp, tcp, icmp, raw`);
}

function isTunnel(p: Bytes | TunnelSpec | undefined): p is TunnelSpec {
  return typeof p === 'object' && !(p instanceof Uint8Array) && !Array.isArray(p) && ('vxlan' in p || 'geneve' in p);
}

/** Shared by TCP and UDP: the checksum field is zero in `seg` when this runs. */
function l4ChecksumValue(mode: ChecksumSpec, proto: number, src: Uint8Array, dst: Uint8Array, seg: Uint8Array, what: string): number {
  if (mode === 'valid') return proto === IPPROTO_UDP ? udpChecksum(src, dst, seg) : l4Checksum(src, dst, proto, seg);
  if (mode === 'partial') return pseudoHeaderSum(src, dst, proto, seg.length);
  return uint(what, mode, 16);
}

function buildUdp(spec: UdpSpec, src: Uint8Array, dst: Uint8Array): Uint8Array {
  const payload = isTunnel(spec.payload) ? buildTunnel(spec.payload) : spec.payload === undefined ? EMPTY : toBytes(spec.payload);
  const len = 8 + payload.length;
  if (len > 0xffff) throw new Error(`udp datagram of ${len} bytes exceeds 65535`);
  const u = Buffer.alloc(len);
  u.writeUInt16BE(uint('udp.sport', spec.sport, 16), 0);
  u.writeUInt16BE(uint('udp.dport', spec.dport, 16), 2);
  u.writeUInt16BE(uint('udp.length', spec.length ?? len, 16), 4);
  u.set(payload, 8);
  const mode = spec.checksum ?? 'valid';
  // The checksum covers the bytes built, so an overridden length field does not change it.
  u.writeUInt16BE(mode === 'none' ? 0 : l4ChecksumValue(mode, IPPROTO_UDP, src, dst, u, 'udp.checksum'), 6);
  return u;
}

function buildTcp(spec: TcpSpec, src: Uint8Array, dst: Uint8Array): Uint8Array {
  const options = spec.options === undefined ? EMPTY : pad4('tcp.options', toBytes(spec.options), 40);
  const payload = spec.payload === undefined ? EMPTY : toBytes(spec.payload);
  const hlen = 20 + options.length;
  const t = Buffer.alloc(hlen + payload.length);
  t.writeUInt16BE(uint('tcp.sport', spec.sport, 16), 0);
  t.writeUInt16BE(uint('tcp.dport', spec.dport, 16), 2);
  t.writeUInt32BE(uint('tcp.seq', spec.seq ?? 0, 32), 4);
  t.writeUInt32BE(uint('tcp.ack', spec.ack ?? 0, 32), 8);
  t[12] = (uint('tcp.dataOffset', spec.dataOffset ?? hlen / 4, 4) << 4) | uint('tcp.reserved', spec.reserved ?? 0, 4);
  t[13] = parseTcpFlags(spec.flags ?? 'A');
  t.writeUInt16BE(uint('tcp.window', spec.window ?? 65535, 16), 14);
  t.writeUInt16BE(uint('tcp.urgent', spec.urgent ?? 0, 16), 18);
  t.set(options, 20);
  t.set(payload, hlen);
  t.writeUInt16BE(l4ChecksumValue(spec.checksum ?? 'valid', IPPROTO_TCP, src, dst, t, 'tcp.checksum'), 16);
  return t;
}

function buildIcmp(spec: IcmpSpec): Uint8Array {
  const payload = spec.payload === undefined ? EMPTY : toBytes(spec.payload);
  const m = Buffer.alloc(8 + payload.length);
  m[0] = uint('icmp.type', spec.type, 8);
  m[1] = uint('icmp.code', spec.code ?? 0, 8);
  if (spec.rest !== undefined && (spec.id !== undefined || spec.seq !== undefined)) {
    throw new Error('icmp spec has rest and id/seq: they are the same header word');
  }
  if (spec.rest !== undefined) m.writeUInt32BE(uint('icmp.rest', spec.rest, 32), 4);
  else {
    m.writeUInt16BE(uint('icmp.id', spec.id ?? 0, 16), 4);
    m.writeUInt16BE(uint('icmp.seq', spec.seq ?? 0, 16), 6);
  }
  m.set(payload, 8);
  const cs = spec.checksum ?? 'valid';
  m.writeUInt16BE(cs === 'valid' ? internetChecksum(m) : uint('icmp.checksum', cs, 16), 2);
  return m;
}

function buildTunnel(t: TunnelSpec): Uint8Array {
  const inner = buildFrame(t.inner);
  if ('vxlan' in t) {
    const v = t.vxlan;
    const h = Buffer.alloc(8 + inner.length);
    h.writeUInt32BE(((uint('vxlan.flags', v.flags ?? VXLAN_FLAG_I, 8) << 24) | uint('vxlan.reserved1', v.reserved1 ?? 0, 24)) >>> 0, 0);
    h.writeUInt32BE(((uint('vxlan.vni', v.vni, 24) << 8) | uint('vxlan.reserved2', v.reserved2 ?? 0, 8)) >>> 0, 4);
    h.set(inner, 8);
    return h;
  }
  const g = t.geneve;
  const opts = g.options === undefined ? EMPTY : toBytes(g.options);
  if (opts.length % 4 !== 0 || opts.length > 252) throw new Error(`geneve.options: ${opts.length} bytes, want a multiple of 4 up to 252`);
  const h = Buffer.alloc(8 + opts.length + inner.length);
  h[0] = (uint('geneve.version', g.version ?? 0, 2) << 6) | uint('geneve.optLen', g.optLen ?? opts.length / 4, 6);
  h[1] = (g.oBit ? 0x80 : 0) | (g.cBit ? 0x40 : 0) | uint('geneve.reserved', g.reserved ?? 0, 6);
  h.writeUInt16BE(uint('geneve.protocol', g.protocol ?? ETH_P_TEB, 16), 2);
  h.writeUInt32BE(((uint('geneve.vni', g.vni, 24) << 8) | uint('geneve.reserved2', g.reserved2 ?? 0, 8)) >>> 0, 4);
  h.set(opts, 8);
  h.set(inner, 8 + opts.length);
  return h;
}

/** A copy of the first `len` bytes, as a capture with that snaplen would hold; length fields are left alone. */
export function truncate(frame: Uint8Array, len: number): Buffer {
  if (!Number.isInteger(len) || len < 0) throw new Error(`truncate: bad length ${len}`);
  return Buffer.from(frame.subarray(0, Math.min(len, frame.length)));
}

/** Hex of a built frame, for storing a fixture's expected bytes next to its spec. */
export function frameHex(spec: FrameSpec): string {
  return bytesToHex(buildFrame(spec));
}
