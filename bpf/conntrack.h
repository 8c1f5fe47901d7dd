/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Flow admission by the host's conntrack (README "Host authority").
 *
 * The fast path goes around the host's stack, which is where Service NAT,
 * NetworkPolicy and conntrack live. So a pod packet may take it only when the
 * host stack has already accepted its flow and would do nothing to it that we
 * skip: conntrack holds an established entry for the flow (its first packets
 * crossed the stack, its policy rules and NAT), and that entry is not NATed.
 * Everything else goes through the stack: masq leaves it on the overlay,
 * restore restores it and hands it to the host stack instead of redirecting
 * it into the pod.
 *
 * TCP more strictly: only while conntrack says ESTABLISHED, never a SYN, FIN
 * or RST (so conntrack sees every change of state, and a closed connection's
 * entry leaves within its short timeouts), and only once the entry tracks its
 * windows liberally in both directions. The segments we carry bypass
 * conntrack's window tracking; a flow that later comes back to the stack
 * (pair retired, entries expired, agent restarted, FIN) would otherwise look
 * out of window, INVALID, and die at kube-proxy's "ctstate INVALID -j DROP".
 * We cannot set the liberal flag from BPF, so an established entry without it
 * is queued in ct_pending and the agent sets it over ctnetlink
 * (dataplane/conntrack.ts); its packets keep crossing the stack until then.
 *
 * A lookup costs ~180 ns, more than the rest of a fast path. So a flow that
 * conntrack admitted is admitted again without one for XMASQ_CT_RECHECK_NS
 * (ct_admitted): a change of its entry (deleted by a policy engine, timed
 * out, closed) takes effect within that time. Control segments, fragments
 * and other protocols are refused before the cache, every time.
 *
 * Twin: sim/model/conntrack.ts.
 */
#ifndef XMASQ_CONNTRACK_H
#define XMASQ_CONNTRACK_H

#include "maps.h"
#include "packet.h"
#include "verdict.h"

#ifndef XMASQ_NO_CONNTRACK
/*
 * The kernel's types, as far as we read them: CO-RE relocates each field to
 * its offset in the running kernel's BTF (vmlinux or the nf_conntrack module).
 */
struct ip_ct_tcp_state {
	__u8 flags;
} __attribute__((preserve_access_index));

struct ip_ct_tcp {
	struct ip_ct_tcp_state seen[2];
	__u8 state;
} __attribute__((preserve_access_index));

union nf_conntrack_proto {
	struct ip_ct_tcp tcp;
} __attribute__((preserve_access_index));

struct nf_conn {
	unsigned long status;
	union nf_conntrack_proto proto;
} __attribute__((preserve_access_index));

/* The kfuncs' options; 12 bytes is the size every kernel since 6.0 accepts. */
struct bpf_ct_opts {
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u8 reserved[2];
};
#define XMASQ_CT_OPTS_SZ 12
#define XMASQ_CT_CURRENT_NETNS (-1)

extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
					 __u32 tuple__sz, struct bpf_ct_opts *opts,
					 __u32 opts__sz) __ksym;
extern void bpf_ct_release(struct nf_conn *ct) __ksym;
#endif

/*
 * Whether the host's conntrack admits the flow of a pod packet from src to
 * dst (network order; ports and protocol from h): XMASQ_CT_ADMIT, or the
 * reason it does not, which is also the counter bumped. now: the caller's
 * clock read, which also stamps its cache entry (one read per packet).
 */
static __always_inline int ct_admit(struct __sk_buff *skb, const struct hdrs *h, __u32 src,
				    __u32 dst, __u64 now)
{
#ifdef XMASQ_NO_CONNTRACK
	return XMASQ_CT_ADMIT;
#else
	/*
	 * Only a whole TCP or UDP datagram: the kfunc tracks nothing else, and a
	 * fragment goes through the stack's defragmentation, as without us.
	 */
	if ((h->proto != IPPROTO_TCP && h->proto != IPPROTO_UDP) || !h->l4_ok || is_fragment(h))
		return XMASQ_CNT_CT_REFUSED;
	if (h->proto == IPPROTO_TCP && (h->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)))
		return XMASQ_CNT_CT_REFUSED;

	struct ct_tuple k = {
		.saddr = src, .daddr = dst, .sport = h->sport, .dport = h->dport, .protocol = h->proto,
	};
	struct ct_admission *seen = bpf_map_lookup_elem(&ct_admitted, &k);
	if (seen && now >= seen->checked && now - seen->checked < XMASQ_CT_RECHECK_NS)
		return XMASQ_CT_ADMIT;

	struct bpf_sock_tuple tuple = {};
	tuple.ipv4.saddr = src;
	tuple.ipv4.daddr = dst;
	tuple.ipv4.sport = h->sport;
	tuple.ipv4.dport = h->dport;
	struct bpf_ct_opts opts = { .netns_id = XMASQ_CT_CURRENT_NETNS, .l4proto = h->proto };
	struct nf_conn *ct = bpf_skb_ct_lookup(skb, &tuple, sizeof(tuple.ipv4), &opts,
					       XMASQ_CT_OPTS_SZ);
	if (!ct) {
		if (seen)
			bpf_map_delete_elem(&ct_admitted, &k);
		return XMASQ_CNT_CT_REFUSED;
	}

	__u64 status = ct->status;
	int verdict = XMASQ_CT_ADMIT;
	if (status & (XMASQ_IPS_SRC_NAT | XMASQ_IPS_DST_NAT))
		verdict = XMASQ_CNT_CT_NAT;
	else if (h->proto == IPPROTO_UDP)
		verdict = (status & XMASQ_IPS_SEEN_REPLY) ? XMASQ_CT_ADMIT : XMASQ_CNT_CT_REFUSED;
	else if (ct->proto.tcp.state != XMASQ_TCP_CONNTRACK_ESTABLISHED)
		verdict = XMASQ_CNT_CT_REFUSED;
	else if (!(ct->proto.tcp.seen[0].flags & ct->proto.tcp.seen[1].flags &
		   XMASQ_CT_TCP_FLAG_BE_LIBERAL))
		verdict = XMASQ_CNT_CT_PENDING;
	bpf_ct_release(ct);

	if (verdict == XMASQ_CT_ADMIT) {
		struct ct_admission a = { .checked = now };
		bpf_map_update_elem(&ct_admitted, &k, &a, BPF_ANY);
		return verdict;
	}
	/* No longer admitted: the cached admission must not outlive the entry's change. */
	if (seen)
		bpf_map_delete_elem(&ct_admitted, &k);
	if (verdict == XMASQ_CNT_CT_PENDING) {
		__u32 one = 1;
		bpf_map_update_elem(&ct_pending, &k, &one, BPF_ANY);
	}
	return verdict;
#endif
}

#endif /* XMASQ_CONNTRACK_H */
