/**
 * Transformations of built frames that tests need but a spec cannot express
 * directly: repairing checksums after poking bytes, and splitting a datagram
 * into fragments the way a router would.
 */
import { ipv4HeaderChecksum, l4ChecksumInfo } from './checksum.ts';
import { IP_MF, IP_OFFSET } from './consts.ts';
import { decodeFrame, type Layer } from './decode.ts';

/**
 * A copy with every computable checksum made correct, innermost first so an
 * outer UDP checksum covers the repaired inner headers. A UDP checksum of 0
 * ("none") is left at 0.
 */
export function fixChecksums(frame: Uint8Array): Buffer {
  const out = Buffer.from(frame);
  const layers = decodeFrame(out).layers;
  for (let i = layers.length - 1; i >= 0; i--) {
    const l = layers[i];
    if (l.name === 'ipv4' && l.fields.checksumExpected !== undefined) {
      out.writeUInt16BE(ipv4HeaderChecksum(out, l.offset), l.offset + 10);
    } else if ((l.name === 'udp' || l.name === 'tcp' || l.name === 'icmp') && l.fields.checksumExpected !== undefined) {
      if (l.name === 'udp' && l.fields.checksum === 0) continue;
      const ip = enclosingIpv4(layers, i);
      // Recomputed rather than taken from the decode: inner layers fixed above changed the bytes it summed.
      const info = ip && l4ChecksumInfo(out, ip.offset);
      if (info) out.writeUInt16BE(info.expected, info.fieldOffset);
    }
  }
  return out;
}

function enclosingIpv4(layers: Layer[], i: number): Layer | undefined {
  for (let j = i - 1; j >= 0; j--) if (layers[j].depth === layers[i].depth && layers[j].name === 'ipv4') return layers[j];
  return undefined;
}

/** IPv4 options a router copies into every fragment: those with the copied flag (RFC 791). */
function copiedOptions(opts: Uint8Array): Uint8Array {
  const keep: number[] = [];
  for (let i = 0; i < opts.length; ) {
    const type = opts[i];
    if (type === 0) break;
    if (type === 1) { i++; continue; }
    const len = opts[i + 1];
    if (len === undefined || len < 2 || i + len > opts.length) break;
    if (type & 0x80) keep.push(...opts.subarray(i, i + len));
    i += len;
  }
  while (keep.length % 4) keep.push(0);
  return Uint8Array.from(keep);
}

/**
 * Splits the outer IPv4 datagram of an Ethernet frame into fragments carrying
 * at most `maxPayload` bytes each (rounded down to a multiple of 8). The link
 * header is copied to each, Ethernet padding after the datagram is dropped, and
 * a datagram that already fits is returned as a single copy. Fragmenting a
 * fragment keeps its offset and MF bit, as a router on the path would.
 */
export function fragmentIpv4(frame: Uint8Array, maxPayload: number): Buffer[] {
  const d = decodeFrame(frame);
  const ip = d.layers.find((l) => l.name === 'ipv4' && l.depth === 0);
  if (!ip || ip.fields.checksumExpected === undefined) throw new Error('fragmentIpv4: no well-formed outer IPv4 header');
  const chunk = Math.floor(maxPayload / 8) * 8;
  if (chunk < 8) throw new Error(`fragmentIpv4: maxPayload ${maxPayload} < 8`);
  const off = ip.offset;
  const hlen = ip.length;
  const total = ip.fields.totalLength as number;
  if (off + total > frame.length) throw new Error('fragmentIpv4: datagram is truncated');
  const data = frame.subarray(off + hlen, off + total);
  if (data.length <= chunk) return [Buffer.from(frame.subarray(0, off + total))];
  const link = frame.subarray(0, off);
  const firstHdr = frame.subarray(off, off + hlen);
  const laterOpts = copiedOptions(frame.subarray(off + 20, off + hlen));
  const frag = (frame[off + 6] << 8) | frame[off + 7];
  const baseOffset = frag & IP_OFFSET;
  const flagsKept = frag & ~(IP_OFFSET | IP_MF) & 0xffff;
  const out: Buffer[] = [];
  for (let start = 0; start < data.length; start += chunk) {
    const part = data.subarray(start, Math.min(start + chunk, data.length));
    const last = start + chunk >= data.length;
    const hdr = Buffer.alloc(start === 0 ? hlen : 20 + laterOpts.length);
    if (start === 0) hdr.set(firstHdr);
    else {
      hdr.set(firstHdr.subarray(0, 20));
      hdr.set(laterOpts, 20);
      hdr[0] = (hdr[0] & 0xf0) | (hdr.length / 4);
    }
    hdr.writeUInt16BE(hdr.length + part.length, 2);
    const mf = !last || (frag & IP_MF) !== 0 ? IP_MF : 0;
    hdr.writeUInt16BE(flagsKept | mf | (baseOffset + start / 8), 6);
    hdr.writeUInt16BE(0, 10);
    hdr.writeUInt16BE(ipv4HeaderChecksum(hdr), 10);
    out.push(Buffer.concat([link, hdr, part]));
  }
  return out;
}
