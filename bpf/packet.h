/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Header parsing and checksum arithmetic shared by the programs.
 * sim/model/packet.ts is the TypeScript twin: same names, same order of checks.
 *
 * Parsing rule: a header is used only if it is complete inside the frame AND
 * inside the datagram that encloses it; anything else makes the caller pass
 * the packet untouched. Lengths come from skb->len, not data_end, because a
 * GSO packet's linear part may hold only its first headers; when a header we
 * need lies past the linear part we pull it in (bpf_skb_pull_data), which
 * invalidates every packet pointer, so all readers re-derive their pointers.
 */
#ifndef XMASQ_PACKET_H
#define XMASQ_PACKET_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "xmasq.h"

/* No header we read starts past this offset; it bounds offsets for the verifier. */
#define XMASQ_MAX_HDR_OFF 512

#define TCP_CSUM_OFF 16
#define TCP_FLAGS_OFF 13
#define TCP_URG_PTR_OFF 18
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_URG 0x20
#define UDP_LEN_OFF 4
#define UDP_CSUM_OFF 6
#define ICMP_CSUM_OFF 2
#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8

/* What the programs know about one IPv4 datagram (outer or inner). */
struct hdrs {
	__u32 l3;    /* offset of the IPv4 header */
	__u32 l4;    /* offset of the L4 header */
	__u32 end;   /* offset just past the datagram (l3 + tot_len) */
	__u32 saddr; /* network order */
	__u32 daddr; /* network order */
	__u16 frag;  /* frag_off in host order, flags included */
	__u16 id;    /* network order */
	__u16 sport; /* network order; 0 when not readable */
	__u16 dport; /* network order; 0 when not readable */
	__u16 carrier; /* host order: the L4 word a wide key can ride in (TCP urgent
			* pointer, UDP length, ICMP type and code); 0 when not readable */
	__u8 tcp_flags; /* 0 when not TCP or not readable */
	__u8 tos;
	__u8 proto;
	__u8 l4_ok;  /* the whole L4 header this protocol needs is present */
};

/*
 * skb->data as a pointer the compiler cannot see through: with a plain
 * (void *)(long)skb->data, clang may re-zero-extend the loaded 32-bit value
 * with shifts after a branch merge, which the verifier rejects as pointer
 * arithmetic.
 */
static __always_inline void *skb_data(const struct __sk_buff *skb)
{
	void *p;
	asm volatile("%0 = *(u32 *)(%1 + %2)"
		     : "=r"(p)
		     : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, data)));
	return p;
}

static __always_inline void *skb_data_end(const struct __sk_buff *skb)
{
	void *p;
	asm volatile("%0 = *(u32 *)(%1 + %2)"
		     : "=r"(p)
		     : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, data_end)));
	return p;
}

static __always_inline int ensure_linear(struct __sk_buff *skb, __u32 len)
{
	void *data = skb_data(skb);
	void *data_end = skb_data_end(skb);
	if (data + len <= data_end)
		return 0;
	return bpf_skb_pull_data(skb, len) ? -1 : 0;
}

static __always_inline int is_first_fragment(const struct hdrs *h)
{
	return (h->frag & XMASQ_IP_OFFSET) == 0;
}

static __always_inline int is_fragment(const struct hdrs *h)
{
	return (h->frag & (XMASQ_IP_MF | XMASQ_IP_OFFSET)) != 0;
}

/* Bytes of L4 header a protocol must carry for us to read ports and checksum. */
static __always_inline __u32 l4_header_need(__u8 proto)
{
	switch (proto) {
	case IPPROTO_TCP:
		return 20;
	case IPPROTO_UDP:
		return 8;
	case IPPROTO_ICMP:
		return 4;
	default:
		return 0;
	}
}

/* Where the carrier and the checksum covering it sit in the L4 header. */
static __always_inline __u32 carrier_off(__u8 proto)
{
	return proto == IPPROTO_TCP ? TCP_URG_PTR_OFF : proto == IPPROTO_UDP ? UDP_LEN_OFF : 0;
}

static __always_inline __u32 l4_csum_off(__u8 proto)
{
	return proto == IPPROTO_TCP ? TCP_CSUM_OFF : proto == IPPROTO_UDP ? UDP_CSUM_OFF : ICMP_CSUM_OFF;
}

/*
 * Parses the IPv4 header at off, inside a datagram or frame ending at limit,
 * and leaves the L4 fields empty (load_l4 reads them). Returns 0 when the
 * header is sound, -1 to make the caller pass.
 */
static __always_inline int load_ipv4_hdr(struct __sk_buff *skb, __u32 off, __u32 limit,
					 struct hdrs *h)
{
	if (off > XMASQ_MAX_HDR_OFF || off + sizeof(struct iphdr) > limit)
		return -1;
	if (ensure_linear(skb, off + sizeof(struct iphdr)))
		return -1;

	void *data = skb_data(skb);
	void *data_end = skb_data_end(skb);
	struct iphdr *ip = data + off;
	if ((void *)(ip + 1) > data_end)
		return -1;

	if (ip->version != 4 || ip->ihl < 5)
		return -1;
	__u32 hlen = ip->ihl * 4;
	__u32 tot = bpf_ntohs(ip->tot_len);
	if (tot < hlen || off + tot > limit)
		return -1;

	h->l3 = off;
	h->l4 = off + hlen;
	h->end = off + tot;
	h->saddr = ip->saddr;
	h->daddr = ip->daddr;
	h->frag = bpf_ntohs(ip->frag_off);
	h->id = ip->id;
	h->tos = ip->tos;
	h->proto = ip->protocol;
	h->sport = 0;
	h->dport = 0;
	h->carrier = 0;
	h->tcp_flags = 0;
	h->l4_ok = 0;
	return 0;
}

/*
 * Reads the ports, the carrier and the TCP flags of h's datagram, whose IPv4
 * header load_ipv4_hdr parsed, when it carries them whole (l4_ok). Returns 0,
 * or -1 to make the caller pass.
 */
static __always_inline int load_l4(struct __sk_buff *skb, struct hdrs *h)
{
	/* Only a first fragment carries the L4 header. */
	if (!is_first_fragment(h))
		return 0;
	__u32 need = l4_header_need(h->proto);
	if (need == 0 || h->l4 + need > h->end)
		return 0;
	if (ensure_linear(skb, h->l4 + need))
		return -1;
	void *data = skb_data(skb);
	void *data_end = skb_data_end(skb);
	__u32 l4 = h->l4;
	if (l4 > XMASQ_MAX_HDR_OFF)
		return -1;
	__u16 *ports = data + l4;
	if ((void *)(ports + 2) > data_end)
		return -1;
	if (h->proto != IPPROTO_ICMP) {
		h->sport = ports[0];
		h->dport = ports[1];
	}
	__u8 *b = data + l4;
	__u32 coff = carrier_off(h->proto);
	if ((void *)(b + coff + 2) > data_end)
		return -1;
	h->carrier = (b[coff] << 8) | b[coff + 1];
	if (h->proto == IPPROTO_TCP) {
		if ((void *)(b + 20) > data_end)
			return -1;
		h->tcp_flags = b[TCP_FLAGS_OFF];
	}
	h->l4_ok = 1;
	return 0;
}

/* load_ipv4_hdr, then load_l4: the whole of what a program reads of a datagram. */
static __always_inline int load_ipv4(struct __sk_buff *skb, __u32 off, __u32 limit,
				     struct hdrs *h)
{
	if (load_ipv4_hdr(skb, off, limit, h))
		return -1;
	return load_l4(skb, h);
}

/*
 * Wide carriers. A wide key rides in an L4 header word that a whole datagram
 * (a fragment may lack the header) does not need as the pod sent it, and that
 * restore can give back:
 *  - TCP with URG clear: the urgent pointer, which then means nothing
 *    (RFC 9293) and which Linux sends as 0; DSCP 0.
 *  - UDP: the length, which the IPv4 total length repeats; DSCP 0.
 *  - ICMP echo and echo reply: the code, always 0 (RFC 792), holds the key's
 *    high 8 bits, DSCP its low 6. The code is thus never 0 under a wide key,
 *    which tells it from a narrow key in DSCP.
 * wide_carrier: the packet has such a word.
 */
static __always_inline int is_echo(const struct hdrs *h)
{
	__u8 type = h->carrier >> 8;
	return h->proto == IPPROTO_ICMP && (type == ICMP_ECHO || type == ICMP_ECHOREPLY);
}

static __always_inline int wide_carrier(const struct hdrs *h)
{
	if (!h->l4_ok || is_fragment(h))
		return 0;
	if (h->proto == IPPROTO_TCP)
		return !(h->tcp_flags & TCP_FLAG_URG);
	return h->proto == IPPROTO_UDP || is_echo(h);
}

/* The carrier as the pod sends it when it can take a key; restore puts it back. */
static __always_inline __u16 carrier_free_value(const struct hdrs *h)
{
	if (h->proto == IPPROTO_TCP)
		return 0;
	if (h->proto == IPPROTO_UDP)
		return h->end - h->l4;
	return h->carrier & 0xff00; /* the echo's type, code 0 */
}

/* The carrier holding wide key `key`. */
static __always_inline __u16 carrier_with_key(const struct hdrs *h, __u16 key)
{
	if (h->proto == IPPROTO_ICMP)
		return (h->carrier & 0xff00) | (key >> 6);
	return key;
}

/* The DSCP that goes with it: an echo's low 6 bits of the key, else 0. */
static __always_inline __u8 dscp_with_key(const struct hdrs *h, __u16 key)
{
	return h->proto == IPPROTO_ICMP ? key & 0x3f : 0;
}

/*
 * A masqueraded packet (RF) under a wide key: DSCP 0 and the key in the
 * carrier, or an echo whose code is set. Anything else with RF is narrow.
 */
static __always_inline int carries_wide_key(const struct hdrs *h)
{
	if (!wide_carrier(h))
		return 0;
	return is_echo(h) ? (h->carrier & 0xff) != 0 : (h->tos >> 2) == 0;
}

static __always_inline __u16 carried_wide_key(const struct hdrs *h)
{
	if (h->proto == IPPROTO_ICMP)
		return ((h->carrier & 0xff) << 6) | (h->tos >> 2);
	return h->carrier;
}

/*
 * An Ethernet frame carrying IPv4 directly (no VLAN tag): its IPv4 header, as
 * load_ipv4_hdr. A tag may not be in the frame at all: the receive path moves
 * it into the skb (skb_vlan_untag) before TC ingress runs, and NICs strip it
 * on receive, so a tagged frame looks untagged here but for skb->vlan_present.
 */
static __always_inline int load_eth_ipv4_hdr(struct __sk_buff *skb, struct hdrs *h)
{
	if (skb->vlan_present)
		return -1;
	if (skb->len < ETH_HLEN || ensure_linear(skb, ETH_HLEN))
		return -1;
	void *data = skb_data(skb);
	void *data_end = skb_data_end(skb);
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	return load_ipv4_hdr(skb, ETH_HLEN, skb->len, h);
}

/* load_eth_ipv4_hdr, then load_l4. */
static __always_inline int load_eth_ipv4(struct __sk_buff *skb, struct hdrs *h)
{
	if (load_eth_ipv4_hdr(skb, h))
		return -1;
	return load_l4(skb, h);
}

/* The frame's Ethernet source is mac (a frame too short for it is not). */
static __always_inline int eth_src_is(struct __sk_buff *skb, const __u8 mac[6])
{
	__u8 src[6];
	if (bpf_skb_load_bytes(skb, 6, src, 6))
		return 0;
	for (int i = 0; i < 6; i++)
		if (src[i] != mac[i])
			return 0;
	return 1;
}

/* One of the overlay's UDP ports (config.vxlan_port, geneve_port). */
static __always_inline int is_tunnel_port(const struct config *cfg, __u16 dport_be)
{
	return cfg && dport_be && (dport_be == cfg->vxlan_port || dport_be == cfg->geneve_port);
}

/* A UDP datagram to an overlay port, whole and unfragmented. */
static __always_inline int is_tunnel(const struct config *cfg, const struct hdrs *h)
{
	return h->proto == IPPROTO_UDP && h->l4_ok && !is_fragment(h) &&
	       is_tunnel_port(cfg, h->dport);
}

/* An overlay packet: outer IPv4/UDP, VXLAN or Geneve, inner Ethernet + IPv4. */
struct tunnel {
	struct hdrs outer;
	struct hdrs inner;
	__u32 inner_eth; /* offset of the inner Ethernet header */
};

#define GENEVE_PROTO_ETH 0x6558
#define VXLAN_FLAG_VNI 0x08

static __always_inline int load_tunnel(struct __sk_buff *skb, const struct config *cfg,
				       struct hdrs *outer, struct tunnel *t)
{
	if (!cfg || !is_tunnel(cfg, outer))
		return -1;
	t->outer = *outer;

	/* The UDP length bounds the tunnel payload, as the UDP stack would trim it. */
	__u32 l4 = outer->l4;
	if (l4 > XMASQ_MAX_HDR_OFF)
		return -1;
	void *data = skb_data(skb);
	void *data_end = skb_data_end(skb);
	__u16 *udp = data + l4;
	if ((void *)(udp + 4) > data_end)
		return -1;
	__u32 ulen = bpf_ntohs(udp[2]);
	if (ulen < 8 || l4 + ulen > outer->end)
		return -1;
	__u32 limit = l4 + ulen;

	__u32 tun = l4 + 8;
	if (tun + 8 > limit || ensure_linear(skb, tun + 8))
		return -1;
	data = skb_data(skb);
	data_end = skb_data_end(skb);
	if (tun > XMASQ_MAX_HDR_OFF)
		return -1;
	__u8 *th = data + tun;
	if ((void *)(th + 8) > data_end)
		return -1;

	__u32 inner_eth;
	if (outer->dport == cfg->geneve_port) {
		/* Geneve: version 0, options of 4-byte words, then an Ethernet frame. */
		if ((th[0] >> 6) != 0)
			return -1;
		if (((th[2] << 8) | th[3]) != GENEVE_PROTO_ETH)
			return -1;
		inner_eth = tun + 8 + (th[0] & 0x3f) * 4;
	} else {
		if (!(th[0] & VXLAN_FLAG_VNI))
			return -1;
		inner_eth = tun + 8;
	}

	if (inner_eth + ETH_HLEN > limit || ensure_linear(skb, inner_eth + ETH_HLEN))
		return -1;
	data = skb_data(skb);
	data_end = skb_data_end(skb);
	if (inner_eth > XMASQ_MAX_HDR_OFF)
		return -1;
	struct ethhdr *ieth = data + inner_eth;
	if ((void *)(ieth + 1) > data_end)
		return -1;
	if (ieth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	t->inner_eth = inner_eth;
	return load_ipv4(skb, inner_eth + ETH_HLEN, limit, &t->inner);
}

/* One's complement arithmetic, as the kernel's csum_fold does it. */
static __always_inline __u16 csum_fold32(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/*
 * A sum of up to 2^32 32-bit words folded to 32 bits: what the kernel's
 * csum_add gives adding them one at a time with an end-around carry (the
 * sum modulo 2^32 - 1; 0 only when every word was 0, else 1..2^32-1, which
 * makes the results equal bit for bit, so an inline IPv4 header update
 * equals csum_replace_by_diff()). One 64-bit add a word and two folds, not a
 * compare and a carry a word, each also zero-extended on the JIT's 64-bit
 * registers: rewrite_ipv4's chain of those was a tenth of masq's own time.
 */
static __always_inline __u32 csum_fold64(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	return (__u32)s;
}

/*
 * Rewrites an IPv4 header's tos, ID, flags and addresses, and fixes its
 * checksum. Returns the diff of the address change for the L4 pseudo header.
 * The caller has checked that the header is linear and in bounds.
 */
static __always_inline __u32 rewrite_ipv4(struct iphdr *ip, __u8 tos, __u16 id_be,
					  __u16 frag_host, __u32 saddr, __u32 daddr)
{
	/*
	 * The first two header words are read with memcpy: reading them through a
	 * __u32 pointer while writing tos and frag_off through narrower types would
	 * let the compiler reorder the loads across the stores (strict aliasing).
	 */
	__u32 w0, w1, n0, n1;
	__u32 s = ip->saddr, d = ip->daddr;
	__u32 check = ip->check;
	__builtin_memcpy(&w0, ip, 4);
	__builtin_memcpy(&w1, (void *)ip + 4, 4);

	ip->tos = tos;
	ip->id = id_be;
	ip->frag_off = bpf_htons(frag_host);
	ip->saddr = saddr;
	ip->daddr = daddr;

	__builtin_memcpy(&n0, ip, 4);
	__builtin_memcpy(&n1, (void *)ip + 4, 4);
	/* Each old word subtracted (its complement added), each new one added. */
	__u64 addr = (__u64)(__u32)~s + saddr + (__u32)~d + daddr;
	__u64 all = addr + (__u32)~w0 + n0 + (__u32)~w1 + n1 + (__u32)~check;
	ip->check = csum_fold32(csum_fold64(all));
	return csum_fold64(addr);
}

/*
 * Fixes the TCP/UDP checksum for an address change. The kernel helper knows
 * whether the checksum is partial (offloaded: the field holds the pseudo-header
 * sum) or full, which a program cannot see. UDP's "no checksum" 0 stays 0.
 */
static __always_inline int fix_l4_checksum(struct __sk_buff *skb, const struct hdrs *h,
					   __u32 addr_diff)
{
	if (!is_first_fragment(h) || !h->l4_ok)
		return 0;
	if (h->proto == IPPROTO_TCP)
		return bpf_l4_csum_replace(skb, h->l4 + TCP_CSUM_OFF, 0, addr_diff,
					   BPF_F_PSEUDO_HDR);
	if (h->proto == IPPROTO_UDP)
		return bpf_l4_csum_replace(skb, h->l4 + UDP_CSUM_OFF, 0, addr_diff,
					   BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0);
	return 0;
}

/*
 * masq's and restore's rewrite: Ethernet addresses, then tos, flags and IP
 * addresses, and the carrier (host order; h->carrier keeps the old value),
 * with every checksum kept valid. 0, or -1 if a helper failed.
 */
static __always_inline int rewrite_packet(struct __sk_buff *skb, const struct hdrs *h,
					  const __u8 *dst_mac, const __u8 *src_mac, __u8 tos,
					  __u16 frag_host, __u32 saddr, __u32 daddr, __u16 carrier)
{
	void *data = skb_data(skb);
	void *data_end = skb_data_end(skb);
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return -1;
	/* Only a wide key changes the carrier, and only on a whole datagram (load_ipv4 pulled its header in). */
	int carrier_changed = carrier != h->carrier;
	if (carrier_changed) {
		__u32 at = h->l4 + carrier_off(h->proto);
		if (at > XMASQ_MAX_HDR_OFF + TCP_URG_PTR_OFF)
			return -1;
		__u8 *w = data + at;
		if ((void *)(w + 2) > data_end)
			return -1;
		w[0] = carrier >> 8;
		w[1] = carrier & 0xff;
	}
	__builtin_memcpy(eth->h_dest, dst_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src_mac, ETH_ALEN);
	__u32 addr_diff = rewrite_ipv4(ip, tos, h->id, frag_host, saddr, daddr);
	if (fix_l4_checksum(skb, h, addr_diff))
		return -1;
	/*
	 * The carrier is not in the pseudo header (the UDP checksum's length
	 * there is the true one, as the sender summed it): a plain 2-byte update,
	 * which the helper leaves alone on a partial checksum (the device sums
	 * the final bytes) and applies to a full one. UDP's "no checksum" stays 0.
	 */
	__u64 flags = 2 | (h->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);
	if (carrier_changed &&
	    bpf_l4_csum_replace(skb, h->l4 + l4_csum_off(h->proto), bpf_htons(h->carrier),
				bpf_htons(carrier), flags))
		return -1;
	return 0;
}

/*
 * A TCP or UDP port of a whole datagram (off: 0 source, 2 destination) from
 * old to new, both network order, for a Service's NAT. Ports are not in the
 * pseudo header: a plain 2-byte checksum update, like the carrier's.
 */
static __always_inline int rewrite_port(struct __sk_buff *skb, const struct hdrs *h, __u32 off,
					__be16 old, __be16 new)
{
	if (bpf_skb_store_bytes(skb, h->l4 + off, &new, sizeof(new), 0))
		return -1;
	__u64 flags = 2 | (h->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);
	return bpf_l4_csum_replace(skb, h->l4 + l4_csum_off(h->proto), old, new, flags);
}
#define XMASQ_SPORT_OFF 0
#define XMASQ_DPORT_OFF 2

/* The protocols whose checksums masq and restore know how to keep valid. */
static __always_inline int rewritable(const struct hdrs *h)
{
	if (h->proto != IPPROTO_TCP && h->proto != IPPROTO_UDP && h->proto != IPPROTO_ICMP)
		return 0;
	/* A first fragment must hold its whole L4 header, or we cannot fix it. */
	return !is_first_fragment(h) || h->l4_ok;
}

#endif /* XMASQ_PACKET_H */
