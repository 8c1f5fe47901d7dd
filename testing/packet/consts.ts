/**
 * Protocol numbers shared by the builder and the decoder. Kept separate from
 * dataplane/ on purpose: this library checks the datapath, so it must not
 * inherit a wrong constant from the code under test.
 */

export const ETH_HLEN = 14;
export const ETH_P_IPV4 = 0x0800;
export const ETH_P_ARP = 0x0806;
export const ETH_P_IPV6 = 0x86dd;
export const ETH_P_8021Q = 0x8100;
export const ETH_P_8021AD = 0x88a8;
/** Pre-standard QinQ outer tag, still emitted by some switches. */
export const ETH_P_QINQ_OLD = 0x9100;
/** IEEE local experimental ethertype: the default when a frame has no L3 layer. */
export const ETH_P_EXPERIMENTAL = 0x88b5;
/** Transparent Ethernet bridging: Geneve's protocol type for an inner Ethernet frame. */
export const ETH_P_TEB = 0x6558;

export const IPPROTO_ICMP = 1;
export const IPPROTO_TCP = 6;
export const IPPROTO_UDP = 17;
/** RFC 3692 experimental protocol: the default for an IPv4 payload without an L4 spec. */
export const IPPROTO_EXPERIMENTAL = 253;
export const IPPROTO_NONE = 59;

export const IP_RF = 0x8000;
export const IP_DF = 0x4000;
export const IP_MF = 0x2000;
export const IP_OFFSET = 0x1fff;

export const UDP_PORT_VXLAN = 4789;
/** Port the Linux vxlan driver used before IANA assigned 4789; flannel still defaults to it. */
export const UDP_PORT_VXLAN_LINUX = 8472;
export const UDP_PORT_GENEVE = 6081;

export const VXLAN_FLAG_I = 0x08;

export const TCP_FLAGS = { F: 0x01, S: 0x02, R: 0x04, P: 0x08, A: 0x10, U: 0x20, E: 0x40, C: 0x80 } as const;
