/**
 * Tolerant frame decoder for test diagnostics. It never throws: when bytes run
 * out or a field makes further parsing meaningless it records why and keeps
 * the rest as an 'undecoded' layer. Every byte of the input ends up in exactly
 * one layer's span, so a field-by-field comparison of two decodes misses no
 * byte difference.
 */
import { bytesToHex, bytesToIp, bytesToIp6, bytesToMac } from './addr.ts';
import { ipv4HeaderChecksum, l4ChecksumInfo, verifyIpv4Header } from './checksum.ts';
import {
  ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6, ETH_P_QINQ_OLD, ETH_P_TEB, IP_DF, IP_MF,
  IP_OFFSET, IP_RF, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_FLAGS, UDP_PORT_GENEVE, UDP_PORT_VXLAN,
  UDP_PORT_VXLAN_LINUX, VXLAN_FLAG_I,
} from './consts.ts';

export type FieldValue = number | string | boolean;

export interface Layer {
  /** Protocol: eth, vlan, ipv4, ipv6, arp, udp, tcp, icmp, vxlan, geneve, payload, trailer, udp-trailer, undecoded. */
  name: string;
  /** Unique within the frame: 'inner.' per tunnel level, '[i]' for repeated vlan tags: 'vlan[0]', 'inner.ipv4'. */
  path: string;
  /** Tunnel nesting level, 0 for the outer frame. */
  depth: number;
  /** Byte span of this layer's own header (or data, for payload-like layers). */
  offset: number;
  length: number;
  /** Wire fields in order, then derived ones (checksumValid, checksumExpected, checksumPartial). */
  fields: Record<string, FieldValue>;
}

export interface DecodedFrame {
  length: number;
  layers: Layer[];
  /** Where the bytes ran out, innermost hard stop first, else the first length field that overran. */
  truncatedAt?: string;
  /** A field value that made decoding stop. */
  error?: string;
  /** Every anomaly seen, in order, including the ones above. */
  notes: string[];
}

export interface DecodeOptions {
  /** What the buffer starts with; default 'eth'. */
  start?: 'eth' | 'ipv4' | 'ipv6';
}

/** Tunnels nested deeper than this are left as payload; real traffic never gets close. */
const MAX_DEPTH = 8;

const u16 = (b: Uint8Array, o: number) => (b[o] << 8) | b[o + 1];
const u24 = (b: Uint8Array, o: number) => (b[o] << 16) | (b[o + 1] << 8) | b[o + 2];
const u32 = (b: Uint8Array, o: number) => b[o] * 0x1000000 + ((b[o + 1] << 16) | (b[o + 2] << 8) | b[o + 3]);

const ICMP_ECHO_TYPES = new Set([0, 8, 13, 14]);

class Decoder {
  readonly layers: Layer[] = [];
  readonly notes: string[] = [];
  private hardTrunc?: string;
  private softTrunc?: string;
  error?: string;
  private readonly paths = new Map<string, number>();

  constructor(private readonly b: Uint8Array) {}

  result(): DecodedFrame {
    const d: DecodedFrame = { length: this.b.length, layers: this.layers, notes: this.notes };
    const t = this.hardTrunc ?? this.softTrunc;
    if (t !== undefined) d.truncatedAt = t;
    if (this.error !== undefined) d.error = this.error;
    return d;
  }

  private add(name: string, depth: number, offset: number, length: number, fields: Record<string, FieldValue>): Layer {
    const base = 'inner.'.repeat(depth) + name;
    const n = this.paths.get(base) ?? 0;
    this.paths.set(base, n + 1);
    const path = name === 'vlan' ? `${base}[${n}]` : n === 0 ? base : `${base}[${n}]`;
    const layer = { name, path, depth, offset, length, fields };
    this.layers.push(layer);
    return layer;
  }

  private msg(depth: number, m: string): string {
    const full = 'inner '.repeat(depth) + m;
    this.notes.push(full);
    return full;
  }

  private note(depth: number, m: string): void {
    this.msg(depth, m);
  }

  private undecoded(depth: number, off: number, end: number): void {
    if (off < end) this.add('undecoded', depth, off, end - off, { len: end - off, hex: bytesToHex(this.b, off, end) });
  }

  /** Bytes ran out inside a header: nothing after this point at this depth can be decoded. */
  private truncated(depth: number, what: string, need: number, have: number, off: number, end: number): void {
    this.hardTrunc = this.msg(depth, `${what}: need ${need} bytes, have ${have}`);
    this.undecoded(depth, off, end);
  }

  /** A length field promises more than is present; decoding goes on with what there is. */
  private short(depth: number, m: string): void {
    const full = this.msg(depth, m);
    this.softTrunc ??= full;
  }

  private fail(depth: number, m: string, off: number, end: number): void {
    const full = this.msg(depth, m);
    this.error ??= full;
    this.undecoded(depth, off, end);
  }

  private payload(depth: number, off: number, end: number, name = 'payload'): void {
    const len = Math.max(0, end - off);
    this.add(name, depth, off, len, { len, hex: bytesToHex(this.b, off, off + len) });
  }

  eth(depth: number, off: number, end: number): void {
    const b = this.b;
    if (end - off < 14) return this.truncated(depth, 'eth header', 14, end - off, off, end);
    let type = u16(b, off + 12);
    this.add('eth', depth, off, 14, { dst: bytesToMac(b, off), src: bytesToMac(b, off + 6), type });
    let p = off + 14;
    while (type === ETH_P_8021Q || type === ETH_P_8021AD || type === ETH_P_QINQ_OLD) {
      if (end - p < 4) return this.truncated(depth, 'vlan tag', 4, end - p, p, end);
      const tci = u16(b, p);
      type = u16(b, p + 2);
      this.add('vlan', depth, p, 4, { pcp: tci >> 13, dei: (tci & 0x1000) !== 0, vid: tci & 0xfff, type });
      p += 4;
    }
    this.l3(depth, type, p, end);
  }

  /** An L3 datagram of ethertype `type` in [off, end), then whatever its length fields leave over. */
  l3(depth: number, type: number, off: number, end: number): void {
    let dEnd: number;
    if (type === ETH_P_IPV4) dEnd = this.ipv4(depth, off, end);
    else if (type === ETH_P_IPV6) dEnd = this.ipv6(depth, off, end);
    else if (type === ETH_P_ARP) dEnd = this.arp(depth, off, end);
    else {
      this.payload(depth, off, end);
      dEnd = end;
    }
    if (dEnd < end) this.payload(depth, dEnd, end, 'trailer');
  }

  /** Returns where the datagram ends (clipped to `end`). */
  ipv4(depth: number, off: number, end: number): number {
    const b = this.b;
    const have = end - off;
    if (have < 20) {
      this.truncated(depth, 'ipv4 header', 20, have, off, end);
      return end;
    }
    const version = b[off] >> 4;
    const ihl = b[off] & 0x0f;
    const hlen = ihl * 4;
    const totalLength = u16(b, off + 2);
    const frag = u16(b, off + 6);
    const fragOffset = frag & IP_OFFSET;
    const mf = (frag & IP_MF) !== 0;
    const protocol = b[off + 9];
    const fields: Record<string, FieldValue> = {
      version, ihl, tos: b[off + 1], totalLength, id: u16(b, off + 4),
      rf: (frag & IP_RF) !== 0, df: (frag & IP_DF) !== 0, mf, fragOffset,
      ttl: b[off + 8], protocol, checksum: u16(b, off + 10), src: bytesToIp(b, off + 12), dst: bytesToIp(b, off + 16),
    };
    const layer = this.add('ipv4', depth, off, 20, fields);
    if (version !== 4) {
      this.fail(depth, `ipv4 version ${version} != 4`, off + 20, end);
      return end;
    }
    if (ihl < 5) {
      this.fail(depth, `ipv4 ihl ${ihl} < 5`, off + 20, end);
      return end;
    }
    if (hlen > have) {
      this.truncated(depth, 'ipv4 options', hlen, have, off + 20, end);
      return end;
    }
    layer.length = hlen;
    if (hlen > 20) fields.options = bytesToHex(b, off + 20, off + hlen);
    fields.checksumValid = verifyIpv4Header(b, off);
    fields.checksumExpected = ipv4HeaderChecksum(b, off);
    if (totalLength < hlen) {
      this.fail(depth, `ipv4 totalLength ${totalLength} < header length ${hlen}`, off + hlen, end);
      return end;
    }
    let dEnd = off + totalLength;
    if (dEnd > end) {
      this.short(depth, `ipv4 payload: totalLength ${totalLength} needs ${totalLength - hlen} bytes after the header, have ${end - off - hlen}`);
      dEnd = end;
    }
    const l4 = off + hlen;
    if (fragOffset > 0) {
      this.note(depth, `ipv4 non-first fragment (offset ${fragOffset * 8}): no L4 decode`);
      this.payload(depth, l4, dEnd);
    } else if (protocol === IPPROTO_UDP) this.udp(depth, off, l4, dEnd, mf);
    else if (protocol === IPPROTO_TCP) this.tcp(depth, off, l4, dEnd);
    else if (protocol === IPPROTO_ICMP) this.icmp(depth, off, l4, dEnd);
    else this.payload(depth, l4, dEnd);
    return dEnd;
  }

  private checksumFields(fields: Record<string, FieldValue>, ipOff: number, limit: number): void {
    const info = l4ChecksumInfo(this.b, ipOff, limit);
    if (!info) return;
    fields.checksumValid = info.valid;
    fields.checksumExpected = info.expected;
    if (info.protocol !== IPPROTO_ICMP) fields.checksumPartial = info.partial;
  }

  private udp(depth: number, ipOff: number, off: number, end: number, fragment: boolean): void {
    const b = this.b;
    const have = end - off;
    if (have < 8) return this.truncated(depth, 'udp header', 8, have, off, end);
    const dport = u16(b, off + 2);
    const length = u16(b, off + 4);
    const fields: Record<string, FieldValue> = { sport: u16(b, off), dport, length, checksum: u16(b, off + 6) };
    this.checksumFields(fields, ipOff, end);
    this.add('udp', depth, off, 8, fields);
    let pEnd = end;
    if (length < 8) this.note(depth, `udp length ${length} < 8`);
    else if (off + length <= end) pEnd = off + length;
    // A first fragment's UDP length counts the later fragments too; that is not truncation.
    else if (!fragment) this.short(depth, `udp payload: length ${length} needs ${length - 8} bytes, have ${have - 8}`);
    const tunnelPort = dport === UDP_PORT_VXLAN || dport === UDP_PORT_VXLAN_LINUX || dport === UDP_PORT_GENEVE;
    if (tunnelPort && fragment) {
      this.note(depth, `udp to tunnel port ${dport} in a fragment: tunnel not decoded`);
      this.payload(depth, off + 8, pEnd);
    } else if (tunnelPort && depth < MAX_DEPTH) {
      if (dport === UDP_PORT_GENEVE) this.geneve(depth, off + 8, pEnd);
      else this.vxlan(depth, off + 8, pEnd);
    } else {
      this.payload(depth, off + 8, pEnd);
    }
    if (pEnd < end) this.payload(depth, pEnd, end, 'udp-trailer');
  }

  private vxlan(depth: number, off: number, end: number): void {
    const b = this.b;
    if (end - off < 8) return this.truncated(depth, 'vxlan header', 8, end - off, off, end);
    const flags = b[off];
    this.add('vxlan', depth, off, 8, { flags, reserved1: u24(b, off + 1), vni: u24(b, off + 4), reserved2: b[off + 7] });
    // Linux drops a frame without the I flag; the inner is decoded anyway because it explains more.
    if (!(flags & VXLAN_FLAG_I)) this.note(depth, `vxlan flags 0x${flags.toString(16).padStart(2, '0')} lack the I flag`);
    this.eth(depth + 1, off + 8, end);
  }

  private geneve(depth: number, off: number, end: number): void {
    const b = this.b;
    const have = end - off;
    if (have < 8) return this.truncated(depth, 'geneve header', 8, have, off, end);
    const version = b[off] >> 6;
    const optLen = b[off] & 0x3f;
    const protocol = u16(b, off + 2);
    const fields: Record<string, FieldValue> = {
      version, optLen, oBit: (b[off + 1] & 0x80) !== 0, cBit: (b[off + 1] & 0x40) !== 0, reserved: b[off + 1] & 0x3f,
      protocol, vni: u24(b, off + 4), reserved2: b[off + 7],
    };
    const layer = this.add('geneve', depth, off, 8, fields);
    if (version !== 0) return this.fail(depth, `geneve version ${version} != 0`, off + 8, end);
    const hlen = 8 + optLen * 4;
    if (hlen > have) return this.truncated(depth, 'geneve options', hlen, have, off + 8, end);
    layer.length = hlen;
    if (optLen > 0) fields.options = bytesToHex(b, off + 8, off + hlen);
    if (protocol === ETH_P_TEB) this.eth(depth + 1, off + hlen, end);
    else if (protocol === ETH_P_IPV4 || protocol === ETH_P_IPV6) this.l3(depth + 1, protocol, off + hlen, end);
    else this.payload(depth, off + hlen, end);
  }

  private tcp(depth: number, ipOff: number, off: number, end: number): void {
    const b = this.b;
    const have = end - off;
    if (have < 20) return this.truncated(depth, 'tcp header', 20, have, off, end);
    const dataOffset = b[off + 12] >> 4;
    const fields: Record<string, FieldValue> = {
      sport: u16(b, off), dport: u16(b, off + 2), seq: u32(b, off + 4), ack: u32(b, off + 8),
      dataOffset, reserved: b[off + 12] & 0x0f, flags: b[off + 13], window: u16(b, off + 14),
      checksum: u16(b, off + 16), urgent: u16(b, off + 18),
    };
    const layer = this.add('tcp', depth, off, 20, fields);
    if (dataOffset < 5) return this.fail(depth, `tcp dataOffset ${dataOffset} < 5`, off + 20, end);
    const hlen = dataOffset * 4;
    if (hlen > have) return this.truncated(depth, 'tcp options', hlen, have, off + 20, end);
    layer.length = hlen;
    if (hlen > 20) fields.options = bytesToHex(b, off + 20, off + hlen);
    this.checksumFields(fields, ipOff, end);
    this.payload(depth, off + hlen, end);
  }

  private icmp(depth: number, ipOff: number, off: number, end: number): void {
    const b = this.b;
    const have = end - off;
    if (have < 8) return this.truncated(depth, 'icmp header', 8, have, off, end);
    const type = b[off];
    const fields: Record<string, FieldValue> = { type, code: b[off + 1], checksum: u16(b, off + 2) };
    if (ICMP_ECHO_TYPES.has(type)) {
      fields.id = u16(b, off + 4);
      fields.seq = u16(b, off + 6);
    } else {
      fields.rest = u32(b, off + 4);
    }
    this.checksumFields(fields, ipOff, end);
    this.add('icmp', depth, off, 8, fields);
    this.payload(depth, off + 8, end);
  }

  private arp(depth: number, off: number, end: number): number {
    const b = this.b;
    const have = end - off;
    if (have < 8) {
      this.truncated(depth, 'arp header', 8, have, off, end);
      return end;
    }
    const htype = u16(b, off);
    const ptype = u16(b, off + 2);
    const hlen = b[off + 4];
    const plen = b[off + 5];
    const fields: Record<string, FieldValue> = { htype, ptype, hlen, plen, op: u16(b, off + 6) };
    const layer = this.add('arp', depth, off, 8, fields);
    const need = 8 + 2 * (hlen + plen);
    if (need > have) {
      this.truncated(depth, 'arp addresses', need, have, off + 8, end);
      return end;
    }
    layer.length = need;
    const hw = (o: number) => (hlen === 6 ? bytesToMac(b, o) : bytesToHex(b, o, o + hlen));
    const pr = (o: number) => (ptype === ETH_P_IPV4 && plen === 4 ? bytesToIp(b, o) : bytesToHex(b, o, o + plen));
    let p = off + 8;
    fields.sha = hw(p); p += hlen;
    fields.spa = pr(p); p += plen;
    fields.tha = hw(p); p += hlen;
    fields.tpa = pr(p);
    return off + need;
  }

  private ipv6(depth: number, off: number, end: number): number {
    const b = this.b;
    const have = end - off;
    if (have < 40) {
      this.truncated(depth, 'ipv6 header', 40, have, off, end);
      return end;
    }
    const version = b[off] >> 4;
    const payloadLength = u16(b, off + 4);
    this.add('ipv6', depth, off, 40, {
      version, trafficClass: ((b[off] & 0x0f) << 4) | (b[off + 1] >> 4), flowLabel: ((b[off + 1] & 0x0f) << 16) | u16(b, off + 2),
      payloadLength, nextHeader: b[off + 6], hopLimit: b[off + 7], src: bytesToIp6(b, off + 8), dst: bytesToIp6(b, off + 24),
    });
    if (version !== 6) {
      this.fail(depth, `ipv6 version ${version} != 6`, off + 40, end);
      return end;
    }
    let dEnd = off + 40 + payloadLength;
    if (dEnd > end) {
      this.short(depth, `ipv6 payload: payloadLength ${payloadLength}, have ${have - 40}`);
      dEnd = end;
    }
    this.payload(depth, off + 40, dEnd);
    return dEnd;
  }
}

export function decodeFrame(buf: Uint8Array, opts: DecodeOptions = {}): DecodedFrame {
  const d = new Decoder(buf);
  try {
    const start = opts.start ?? 'eth';
    if (start === 'eth') d.eth(0, 0, buf.length);
    else d.l3(0, start === 'ipv4' ? ETH_P_IPV4 : ETH_P_IPV6, 0, buf.length);
  } catch (e) {
    // A decoder bug must not replace the test failure the decode was meant to explain.
    d.error ??= `decoder bug: ${e instanceof Error ? e.message : String(e)}`;
  }
  return d.result();
}

export function findLayer(frame: DecodedFrame, path: string): Layer | undefined {
  return frame.layers.find((l) => l.path === path);
}

/** All fields keyed 'path.field' ('inner.ipv4.src'), handy for toMatchObject-style assertions. */
export function flattenFrame(frame: DecodedFrame): Record<string, FieldValue> {
  const out: Record<string, FieldValue> = {};
  for (const l of frame.layers) for (const [k, v] of Object.entries(l.fields)) out[`${l.path}.${k}`] = v;
  return out;
}

/** One line per checksum that a receiver would reject, e.g. 'inner.udp.checksum 0x1234, expected 0x5678'. */
export function checksumProblems(frame: DecodedFrame | Uint8Array): string[] {
  const d = frame instanceof Uint8Array ? decodeFrame(frame) : frame;
  return d.layers
    .filter((l) => l.fields.checksumValid === false)
    .map((l) => `${l.path}.checksum ${formatField(l.name, 'checksum', l.fields.checksum)}, expected ${formatField(l.name, 'checksumExpected', l.fields.checksumExpected)}`);
}

/** Hex width (digits) of fields that read better in hex; others print in decimal. */
const HEX_WIDTH: Record<string, number> = {
  'eth.type': 4, 'vlan.type': 4,
  'ipv4.tos': 2, 'ipv4.checksum': 4, 'ipv4.checksumExpected': 4,
  'ipv6.trafficClass': 2, 'ipv6.flowLabel': 5,
  'arp.htype': 4, 'arp.ptype': 4,
  'udp.checksum': 4, 'udp.checksumExpected': 4,
  'tcp.checksum': 4, 'tcp.checksumExpected': 4, 'tcp.flags': 2, 'tcp.reserved': 1,
  'icmp.checksum': 4, 'icmp.checksumExpected': 4, 'icmp.rest': 8,
  'vxlan.flags': 2, 'vxlan.reserved1': 6, 'vxlan.reserved2': 2,
  'geneve.protocol': 4, 'geneve.reserved': 2, 'geneve.reserved2': 2,
};

/** Fields holding raw bytes as hex, with the offset of their first byte from the layer's start. */
export const HEX_BLOB_FIELDS: Record<string, number> = {
  'ipv4.options': 20, 'tcp.options': 20, 'geneve.options': 8,
  'payload.hex': 0, 'trailer.hex': 0, 'udp-trailer.hex': 0, 'undecoded.hex': 0,
};

export function tcpFlagsString(flags: number): string {
  return Object.entries(TCP_FLAGS).filter(([, bit]) => flags & bit).map(([c]) => c).join('');
}

/** A field value as the diff and summary print it: '0x0b', '[SA]', '10.0.0.1', 'true'. */
export function formatField(layerName: string, field: string, v: FieldValue | undefined): string {
  if (v === undefined) return '(absent)';
  const key = `${layerName}.${field}`;
  if (typeof v === 'number') {
    const w = HEX_WIDTH[key];
    const s = w === undefined ? String(v) : `0x${v.toString(16).padStart(w, '0')}`;
    return key === 'tcp.flags' ? `${s} [${tcpFlagsString(v)}]` : s;
  }
  return String(v);
}
