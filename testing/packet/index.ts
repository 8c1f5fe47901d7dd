export {
  ipToBytes, bytesToIp, ipToU32, u32ToIp, ip6ToBytes, bytesToIp6, macToBytes, bytesToMac,
  hexToBytes, bytesToHex, toBytes, type Bytes,
} from './addr.ts';
export {
  onesComplementSum, internetChecksum, ipv4HeaderChecksum, verifyIpv4Header, pseudoHeaderSum,
  l4Checksum, udpChecksum, l4ChecksumInfo, verifyL4, type L4ChecksumInfo,
} from './checksum.ts';
export {
  buildFrame, buildIpv4, truncate, frameHex, parseTcpFlags, DEFAULT_SRC_MAC, DEFAULT_DST_MAC,
  type FrameSpec, type EthSpec, type VlanTag, type Ipv4Spec, type Ipv6Spec, type ArpSpec, type L4Spec,
  type UdpSpec, type TcpSpec, type IcmpSpec, type ChecksumSpec, type TunnelSpec, type VxlanSpec, type GeneveSpec,
} from './build.ts';
export {
  decodeFrame, findLayer, flattenFrame, checksumProblems, formatField, tcpFlagsString,
  type DecodedFrame, type DecodeOptions, type Layer, type FieldValue,
} from './decode.ts';
export { diffFrames, describeFrame, assertFramesEqual, type DiffOptions } from './diff.ts';
export { fixChecksums, fragmentIpv4 } from './edit.ts';
export * from './consts.ts';
