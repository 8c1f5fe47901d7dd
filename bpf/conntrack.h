/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Flow admission by the host's conntrack (README "Host authority").
 *
 * The fast path goes around the host's stack, which is where Service NAT,
 * NetworkPolicy and conntrack live. So a pod packet may take it only when the
 * host stack has already accepted its flow, and then only with what the stack
 * would do to it: conntrack holds an established entry for the flow (its
 * first packets crossed the stack, its policy rules and NAT), and the only
 * NAT on it is a DNAT the caller reproduces. A Service's DNAT is the one we
 * carry: masq sends a request to the backend conntrack chose (XMASQ_NAT_DST),
 * restore gives a reply the Service's address back (XMASQ_NAT_SRC), each from
 * the entry's other direction, as conntrack itself rewrites. SNAT never.
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
 * A ct_admitted entry is read through the pointer its lookup returned, and
 * the kernel reuses a hash element at once: another CPU that deletes the flow
 * (a refusal, the agent's sweep) or replaces its entry puts the element on
 * a free list, and the next insert there, of any flow, writes that very
 * memory (kernel/bpf/hashtab.c free_htab_elem: the preallocated freelist;
 * bpf_mem_cache_free's per-CPU free_llist for BPF_F_NO_PREALLOC since 6.1,
 * so that flag does not help). A reader could then copy another flow's
 * checked and translation, and ct_recent would keep them for 200 ms. So the
 * entry is copied and checked (ct_admitted_copy) before anything trusts it.
 *
 * ct_admitted's lookup is itself a helper call (~30 ns here), on every packet.
 * So each CPU keeps the flows it admitted last in ct_recent (maps.h), whose
 * lookup the verifier inlines, and asks it first. A slot holds exactly what an
 * ADMIT rested on: the time of the conntrack lookup (now after the kfunc, the
 * ct_admitted entry's own time on its hit, never a later one), so no slot
 * answers past XMASQ_CT_RECHECK_NS after the real check it copies, the bound
 * ct_admitted gives. A refusal clears ct_admitted and this CPU's slot; another
 * CPU's slot for the flow may still answer until its own time + 200 ms, as
 * ct_admitted itself did before the refusal: a change of the entry takes
 * effect within XMASQ_CT_RECHECK_NS on every CPU.
 *
 * Two programs never write one CPU's slot at once, so no slot is ever torn
 * (half one flow's tuple, half another's admission): only TC programs (masq,
 * restore) touch ct_recent, and TC runs with bottom halves disabled, egress in
 * __dev_queue_xmit's rcu_read_lock_bh(), ingress in the NET_RX softirq (or a
 * section a driver disabled them for: netif_receive_skb "may only be called
 * from softirq context"); never from a hard interrupt or an NMI, the only
 * contexts that could nest in one. The map is not pinned, so no user space
 * writes it either.
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

struct ns_common {
	unsigned int inum; /* what stat(2) gives as the inode of /proc/<pid>/ns/net */
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
} __attribute__((preserve_access_index));

typedef struct {
	struct net *net;
} __attribute__((preserve_access_index)) possible_net_t;

union nf_inet_addr {
	__be32 ip;
} __attribute__((preserve_access_index));

union nf_conntrack_man_proto {
	__be16 all;
} __attribute__((preserve_access_index));

struct nf_conntrack_man {
	union nf_inet_addr u3;
	union nf_conntrack_man_proto u;
} __attribute__((preserve_access_index));

struct nf_conntrack_tuple {
	struct nf_conntrack_man src;
	struct {
		union nf_inet_addr u3;
		union {
			__be16 all;
		} __attribute__((preserve_access_index)) u;
	} __attribute__((preserve_access_index)) dst;
} __attribute__((preserve_access_index));

struct nf_conntrack_tuple_hash {
	struct nf_conntrack_tuple tuple;
} __attribute__((preserve_access_index));

struct nf_conn {
	possible_net_t ct_net;
	unsigned long status;
	struct nf_conntrack_tuple_hash tuplehash[2]; /* IP_CT_DIR_ORIGINAL, IP_CT_DIR_REPLY */
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

extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
					 __u32 tuple__sz, struct bpf_ct_opts *opts,
					 __u32 opts__sz) __ksym;
extern void bpf_ct_release(struct nf_conn *ct) __ksym;

/*
 * Where a packet of the flow k goes once the host has NATed it: a packet of
 * the original direction leaves with the reply tuple reversed, one of the
 * reply direction with the original tuple reversed (how conntrack's NAT
 * rewrites). Indices are constants: CO-RE relocates the field offsets, not an
 * index scaled by our own, shorter, struct.
 */
#define CT_TUPLE_REVERSED(ct, dir, to)                                       \
	do {                                                                 \
		(to)->saddr = (ct)->tuplehash[dir].tuple.dst.u3.ip;          \
		(to)->sport = (ct)->tuplehash[dir].tuple.dst.u.all;          \
		(to)->daddr = (ct)->tuplehash[dir].tuple.src.u3.ip;          \
		(to)->dport = (ct)->tuplehash[dir].tuple.src.u.all;          \
	} while (0)

static __always_inline void ct_translated(struct nf_conn *ct, const struct ct_tuple *k,
					  struct ct_tuple *to)
{
	if (ct->tuplehash[0].tuple.src.u3.ip == k->saddr &&
	    ct->tuplehash[0].tuple.src.u.all == k->sport &&
	    ct->tuplehash[0].tuple.dst.u3.ip == k->daddr &&
	    ct->tuplehash[0].tuple.dst.u.all == k->dport)
		CT_TUPLE_REVERSED(ct, 1, to);
	else
		CT_TUPLE_REVERSED(ct, 0, to);
}
#endif

/*
 * Whose conntrack ct_admit consults, as the kfunc names a namespace: the
 * program's own (init, restore and masq run in the host's), or the id the
 * program's namespace gives the host's (masq_rpeer runs in the pod's).
 * XMASQ_CT_NO_NETNS: the host's has no id there; nothing is admitted.
 */
#define XMASQ_CT_CURRENT_NETNS (-1)
#define XMASQ_CT_NO_NETNS (-2)

/* Which end of a flow the caller lets the host's NAT move (ct_admit). */
enum xmasq_nat_side {
	XMASQ_NAT_NONE = 0, /* neither: the packet must leave as it is */
	XMASQ_NAT_DST = 1,  /* masq: a Service request, to the backend conntrack chose */
	XMASQ_NAT_SRC = 2,  /* restore: a backend's reply, from the Service's address */
};

/* Whether the flow k, NATed into to, moved only the end side allows. */
static __always_inline int nat_allowed(const struct ct_tuple *k, const struct ct_tuple *to,
				       int side)
{
	int src_kept = to->saddr == k->saddr && to->sport == k->sport;
	int dst_kept = to->daddr == k->daddr && to->dport == k->dport;
	if (side == XMASQ_NAT_DST)
		return src_kept;
	if (side == XMASQ_NAT_SRC)
		return dst_kept;
	return src_kept && dst_kept;
}

/* Whether a and b are one flow (field by field: BPF has no memcmp to call). */
static __always_inline int ct_tuple_eq(const struct ct_tuple *a, const struct ct_tuple *b)
{
	return a->protocol == b->protocol && a->saddr == b->saddr && a->daddr == b->daddr &&
	       a->sport == b->sport && a->dport == b->dport;
}

/* The admission of a flow the host sends on as to, by a conntrack lookup made at checked. */
static __always_inline struct ct_admission ct_admission_of(const struct ct_tuple *to, __u64 checked)
{
	return (struct ct_admission){
		.checked = checked,
		.saddr = to->saddr, .daddr = to->daddr, .sport = to->sport, .dport = to->dport,
	};
}

/* The flow as admission a says the host sends it on, into to (protocol kept). */
static __always_inline void ct_admission_apply(const struct ct_admission *a, struct ct_tuple *to)
{
	to->saddr = a->saddr;
	to->daddr = a->daddr;
	to->sport = a->sport;
	to->dport = a->dport;
}

/*
 * This CPU's slot r (may be NULL, to the verifier) now holds the flow k,
 * admitted as to by the conntrack lookup made at checked.
 */
static __always_inline void ct_recent_put(struct ct_recent *r, const struct ct_tuple *k,
					  __u64 checked, const struct ct_tuple *to)
{
	if (!r)
		return;
	r->flow = *k;
	r->admitted = ct_admission_of(to, checked);
}

/*
 * Copies the ct_admitted entry seen, which the lookup of k returned, into
 * *out: 1 if the copy is one admission of k, whole; 0 if the element was
 * freed under the read (the caller then asks conntrack).
 *
 * What this rests on. The kernel writes an element only before it links it
 * into its bucket (alloc_htab_elem copies key and value, then
 * htab_map_update_elem adds it with hlist_nulls_add_head_rcu: an update
 * without BPF_F_LOCK, which nothing here uses, always inserts a new element
 * and never writes a linked one), and unlinks it before it frees it for
 * reuse. No program writes through seen. x86-64 keeps one CPU's loads in
 * order and all stores in one order (TSO), and the JIT emits our loads in
 * the order written here; the lookup between them is a call, which clang
 * does not move loads across. So: the lookup after the first copy finds
 * seen under k only if seen was linked under k when it looked, and then
 * the first copy read nothing written after that link's removal; the second
 * read, after that lookup, reads what that link published or later writes.
 * Equal copies are that admission of k, unless the element was freed and
 * reused twice within these few loads and the two foreign admissions agree
 * byte for byte where they differ from k's.
 */
static __always_inline int ct_admitted_copy(const struct ct_tuple *k,
					    const struct ct_admission *seen,
					    struct ct_admission *out)
{
	*out = *seen;
	if (bpf_map_lookup_elem(&ct_admitted, k) != seen)
		return 0;
	return out->checked == seen->checked && out->saddr == seen->saddr &&
	       out->daddr == seen->daddr && out->sport == seen->sport && out->dport == seen->dport;
}

/*
 * Whether the host's conntrack admits the flow of a pod packet from src to
 * dst (network order; ports and protocol from h): XMASQ_CT_ADMIT, or the
 * reason it does not, which is also the counter bumped. When admitted, *to is
 * the flow as the host would send it on: the same, or NATed at the end side
 * allows (a NAT elsewhere is XMASQ_CNT_CT_NAT). now: the caller's clock read,
 * which also stamps its cache entry (one read per packet). netns_id: the
 * host's namespace, XMASQ_CT_CURRENT_NETNS or its id from where the program
 * runs, whose inode netns_ino the entry found must then be in.
 */
static __always_inline int ct_admit(struct __sk_buff *skb, const struct hdrs *h, __u32 src,
				    __u32 dst, __u64 now, __s32 netns_id, __u32 netns_ino,
				    int side, struct ct_tuple *to)
{
	to->saddr = src;
	to->daddr = dst;
	to->sport = h->sport;
	to->dport = h->dport;
	to->protocol = h->proto;
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
	if (netns_id < XMASQ_CT_CURRENT_NETNS)
		return XMASQ_CNT_CT_REFUSED;

	struct ct_tuple k = {
		.saddr = src, .daddr = dst, .sport = h->sport, .dport = h->dport, .protocol = h->proto,
	};
	/* This CPU's slot first: an inlined array lookup, no helper call. */
	__u32 slot = ct_recent_slot(&k);
	struct ct_recent *r = bpf_map_lookup_elem(&ct_recent, &slot);
	int mine = r && ct_tuple_eq(&r->flow, &k);
	if (mine && now >= r->admitted.checked && now - r->admitted.checked < XMASQ_CT_RECHECK_NS) {
		ct_admission_apply(&r->admitted, to);
		return nat_allowed(&k, to, side) ? XMASQ_CT_ADMIT : XMASQ_CNT_CT_NAT;
	}

	/* seen only says whether k had an entry: what it held is a's, copied and checked. */
	struct ct_admission *seen = bpf_map_lookup_elem(&ct_admitted, &k);
	struct ct_admission a;
	if (seen && ct_admitted_copy(&k, seen, &a) && now >= a.checked &&
	    now - a.checked < XMASQ_CT_RECHECK_NS) {
		ct_admission_apply(&a, to);
		if (!nat_allowed(&k, to, side))
			return XMASQ_CNT_CT_NAT;
		/* The entry's own time: the slot must not outlive the check it copies. */
		ct_recent_put(r, &k, a.checked, to);
		return XMASQ_CT_ADMIT;
	}

	struct bpf_sock_tuple tuple = {};
	tuple.ipv4.saddr = src;
	tuple.ipv4.daddr = dst;
	tuple.ipv4.sport = h->sport;
	tuple.ipv4.dport = h->dport;
	struct bpf_ct_opts opts = { .netns_id = netns_id, .l4proto = h->proto };
	struct nf_conn *ct = bpf_skb_ct_lookup(skb, &tuple, sizeof(tuple.ipv4), &opts,
					       XMASQ_CT_OPTS_SZ);
	/*
	 * An id is a number of the program's namespace, not the host's name: a
	 * pod forging another pod's source address is looked up with that pod's
	 * id, which its own namespace may give to a namespace it controls (its
	 * CAP_NET_ADMIN there is enough for RTM_NEWNSID), conntrack entries
	 * included. So the entry must be in the host's namespace, by its inode.
	 */
	if (ct && netns_id != XMASQ_CT_CURRENT_NETNS && ct->ct_net.net->ns.inum != netns_ino) {
		bpf_ct_release(ct);
		ct = NULL;
	}
	if (!ct) {
		if (seen)
			bpf_map_delete_elem(&ct_admitted, &k);
		if (mine)
			__builtin_memset(r, 0, sizeof(*r));
		return XMASQ_CNT_CT_REFUSED;
	}

	__u64 status = ct->status;
	int verdict = XMASQ_CT_ADMIT;
	if (status & XMASQ_IPS_SRC_NAT)
		verdict = XMASQ_CNT_CT_NAT;
	else if (h->proto == IPPROTO_UDP)
		verdict = (status & XMASQ_IPS_SEEN_REPLY) ? XMASQ_CT_ADMIT : XMASQ_CNT_CT_REFUSED;
	else if (ct->proto.tcp.state != XMASQ_TCP_CONNTRACK_ESTABLISHED)
		verdict = XMASQ_CNT_CT_REFUSED;
	else if (!(ct->proto.tcp.seen[0].flags & ct->proto.tcp.seen[1].flags &
		   XMASQ_CT_TCP_FLAG_BE_LIBERAL))
		verdict = XMASQ_CNT_CT_PENDING;
	if (verdict == XMASQ_CT_ADMIT && (status & XMASQ_IPS_DST_NAT)) {
		ct_translated(ct, &k, to);
		if (!nat_allowed(&k, to, side))
			verdict = XMASQ_CNT_CT_NAT;
	}
	bpf_ct_release(ct);

	if (verdict == XMASQ_CT_ADMIT) {
		struct ct_admission fresh = ct_admission_of(to, now);
		bpf_map_update_elem(&ct_admitted, &k, &fresh, BPF_ANY);
		ct_recent_put(r, &k, now, to);
		return verdict;
	}
	/* No longer admitted: the cached admission must not outlive the entry's change. */
	if (seen)
		bpf_map_delete_elem(&ct_admitted, &k);
	if (mine)
		__builtin_memset(r, 0, sizeof(*r));
	if (verdict == XMASQ_CNT_CT_PENDING) {
		__u32 one = 1;
		bpf_map_update_elem(&ct_pending, &k, &one, BPF_ANY);
	}
	return verdict;
#endif
}

#endif /* XMASQ_CONNTRACK_H */
