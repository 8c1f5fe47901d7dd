/**
 * RFC 1071 Internet checksum arithmetic. Validity is judged the way a
 * receiver does it (the sum over the data including the stored checksum folds
 * to 0xffff), so 0x0000 and 0xffff, the two ones'-complement zeros, are treated
 * alike, as the kernel treats them.
 */
import { IP_MF, IP_OFFSET, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP } from './consts.ts';

function fold(sum: number): number {
  // Division rather than >>> so sums beyond 32 bits (huge inputs) still fold correctly.
  while (sum > 0xffff) sum = (sum & 0xffff) + Math.floor(sum / 0x10000);
  return sum;
}

function checkRange(bytes: Uint8Array, start: number, end: number): void {
  if (!(Number.isInteger(start) && Number.isInteger(end) && 0 <= start && start <= end && end <= bytes.length)) {
    throw new RangeError(`checksum range [${start}, ${end}) outside 0..${bytes.length}`);
  }
}

/**
 * Folded 16-bit ones'-complement sum of big-endian words in [start, end), not
 * complemented. Words pair up from `start`, and an odd last byte is the high
 * half of a zero-padded word, so the range must begin where the checksummed
 * data begins.
 */
export function onesComplementSum(bytes: Uint8Array, start = 0, end = bytes.length, initial = 0): number {
  checkRange(bytes, start, end);
  let sum = initial;
  let i = start;
  for (; i + 1 < end; i += 2) sum += (bytes[i] << 8) | bytes[i + 1];
  if (i < end) sum += bytes[i] << 8;
  return fold(sum);
}

/** The value to store in a checksum field whose own bytes are zero (or excluded) in [start, end). */
export function internetChecksum(bytes: Uint8Array, start = 0, end = bytes.length, initial = 0): number {
  return ~onesComplementSum(bytes, start, end, initial) & 0xffff;
}

/**
 * Correct header checksum for the IPv4 header at `off`, ignoring whatever the
 * checksum field currently holds. The length defaults to the header's IHL so a
 * whole packet can be passed.
 */
export function ipv4HeaderChecksum(header: Uint8Array, off = 0, len = (header[off] & 0x0f) * 4): number {
  const s = onesComplementSum(header, off, off + 10);
  return internetChecksum(header, off + 12, off + len, s);
}

/** True when the IPv4 header at `off` is complete (per its IHL) and its checksum checks. */
export function verifyIpv4Header(bytes: Uint8Array, off = 0): boolean {
  if (off + 20 > bytes.length) return false;
  const len = (bytes[off] & 0x0f) * 4;
  if (len < 20 || off + len > bytes.length) return false;
  return onesComplementSum(bytes, off, off + len) === 0xffff;
}

/** Folded sum of the IPv4 pseudo-header (src, dst, zero, proto, L4 length); not complemented. */
export function pseudoHeaderSum(src: Uint8Array, dst: Uint8Array, proto: number, l4len: number): number {
  if (src.length !== 4 || dst.length !== 4) throw new Error('pseudoHeaderSum: want 4-byte IPv4 addresses');
  let sum = proto + l4len;
  sum += (src[0] << 8) | src[1];
  sum += (src[2] << 8) | src[3];
  sum += (dst[0] << 8) | dst[1];
  sum += (dst[2] << 8) | dst[3];
  return fold(sum);
}

/**
 * Full TCP/UDP checksum over pseudo-header + `l4bytes`, which must hold the
 * whole segment with its checksum field zeroed. Not for ICMP, which has no
 * pseudo-header: use internetChecksum there.
 */
export function l4Checksum(src: Uint8Array, dst: Uint8Array, proto: number, l4bytes: Uint8Array): number {
  return internetChecksum(l4bytes, 0, l4bytes.length, pseudoHeaderSum(src, dst, proto, l4bytes.length));
}

/** UDP over IPv4 reserves a transmitted 0 for "no checksum", so a computed 0 goes out as 0xffff (RFC 768). */
export function udpChecksum(src: Uint8Array, dst: Uint8Array, udpBytes: Uint8Array): number {
  return l4Checksum(src, dst, IPPROTO_UDP, udpBytes) || 0xffff;
}

/** What the L4 checksum of one IPv4 datagram holds and should hold. */
export interface L4ChecksumInfo {
  protocol: number;
  /** Offset of the checksum field in the buffer. */
  fieldOffset: number;
  stored: number;
  /** The value a correct sender would store (UDP: never 0). */
  expected: number;
  /** Receiver's verdict; a UDP checksum of 0 means "none" and counts as valid. */
  valid: boolean;
  /** The field holds the bare pseudo-header sum, as an skb with CHECKSUM_PARTIAL carries it before offload. */
  partial: boolean;
}

/**
 * Checksum facts for the TCP, UDP or ICMP datagram whose IPv4 header is at
 * `ipOff`, or undefined when they cannot be computed: the header is malformed,
 * the datagram is a fragment, or its bytes do not all lie below `limit`.
 */
export function l4ChecksumInfo(bytes: Uint8Array, ipOff: number, limit = bytes.length): L4ChecksumInfo | undefined {
  limit = Math.min(limit, bytes.length);
  if (ipOff < 0 || ipOff + 20 > limit) return undefined;
  const hlen = (bytes[ipOff] & 0x0f) * 4;
  if (bytes[ipOff] >> 4 !== 4 || hlen < 20) return undefined;
  const total = (bytes[ipOff + 2] << 8) | bytes[ipOff + 3];
  const frag = (bytes[ipOff + 6] << 8) | bytes[ipOff + 7];
  if (total < hlen || ipOff + total > limit || (frag & (IP_MF | IP_OFFSET)) !== 0) return undefined;
  const protocol = bytes[ipOff + 9];
  const l4 = ipOff + hlen;
  let end = ipOff + total;
  let csOff: number;
  let initial: number;
  const src = bytes.subarray(ipOff + 12, ipOff + 16);
  const dst = bytes.subarray(ipOff + 16, ipOff + 20);
  if (protocol === IPPROTO_TCP) {
    if (end - l4 < 20) return undefined;
    csOff = l4 + 16;
    initial = pseudoHeaderSum(src, dst, protocol, end - l4);
  } else if (protocol === IPPROTO_UDP) {
    if (end - l4 < 8) return undefined;
    const ulen = (bytes[l4 + 4] << 8) | bytes[l4 + 5];
    // The UDP length, not the IP payload length, bounds what the checksum covers.
    if (ulen < 8 || l4 + ulen > end) return undefined;
    end = l4 + ulen;
    csOff = l4 + 6;
    initial = pseudoHeaderSum(src, dst, protocol, ulen);
  } else if (protocol === IPPROTO_ICMP) {
    if (end - l4 < 4) return undefined;
    csOff = l4 + 2;
    initial = 0;
  } else {
    return undefined;
  }
  const stored = (bytes[csOff] << 8) | bytes[csOff + 1];
  const without = onesComplementSum(bytes, csOff + 2, end, onesComplementSum(bytes, l4, csOff, initial));
  let expected = ~without & 0xffff;
  if (protocol === IPPROTO_UDP && expected === 0) expected = 0xffff;
  const valid = (protocol === IPPROTO_UDP && stored === 0) || fold(without + stored) === 0xffff;
  const partial = protocol !== IPPROTO_ICMP && stored === initial;
  return { protocol, fieldOffset: csOff, stored, expected, valid, partial };
}

/** Receiver's verdict on the L4 checksum of the IPv4 datagram at `ipOff`; undefined when not computable. */
export function verifyL4(bytes: Uint8Array, ipOff: number, limit = bytes.length): boolean | undefined {
  return l4ChecksumInfo(bytes, ipOff, limit)?.valid;
}
