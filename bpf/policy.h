/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Deny rules. Every installed rule denies; no match allows. The agent compiles
 * the rules (CIDR blocks with exceptions, port ranges, protocols, per
 * direction) into a classifier in policy_trie: from the direction's root
 * node, each field of the packet in turn (src, dst, protocol and dport,
 * sport) is matched by longest prefix under the current node, which gives the
 * verdict or the node for the next field. So a verdict costs at most
 * XMASQ_POLICY_FIELDS trie lookups whatever the rules, and none without
 * rules in that direction. There is no verdict cache to fill or to purge.
 */
#ifndef XMASQ_POLICY_H
#define XMASQ_POLICY_H

#include "maps.h"
#include "packet.h"
#include "verdict.h"

static __always_inline __u32 policy_root_node(__u8 dir)
{
	__u32 zero = 0;
	struct policy_root *r = bpf_map_lookup_elem(&policy_root, &zero);
	if (!r)
		return XMASQ_POLICY_ALLOW;
	return dir == XMASQ_DIR_INGRESS ? r->ingress : r->egress;
}

/* One field: true when the walk is over, *node then holding its verdict. */
static __always_inline int policy_step(__u32 *node, __u32 field)
{
	struct policy_lpm_key k = { .prefixlen = 64, .node = *node, .field = field };
	struct policy_next *n = bpf_map_lookup_elem(&policy_trie, &k);
	*node = n ? n->next : XMASQ_POLICY_ALLOW;
	return *node == XMASQ_POLICY_ALLOW || *node == XMASQ_POLICY_DENY;
}

/*
 * The walk is a global function: the verifier checks it once, on its own,
 * instead of once per path that reaches it (each program forks into a path
 * per protocol and kind of key). Hence scalars only: ports packs
 * sport | dport << 16, each in network order as the header holds it, so that
 * on this little-endian target dport << 16 puts dport's bytes last in the
 * field, where the key wants them (xmasq.h, struct policy_lpm_key).
 */
__noinline int policy_walk(__u32 node, __u32 src, __u32 dst, __u32 ports, __u8 proto)
{
	if (policy_step(&node, src) || policy_step(&node, dst) ||
	    policy_step(&node, (__u32)proto << 8 | (ports & 0xffff0000)) ||
	    policy_step(&node, ports << 16))
		return node == XMASQ_POLICY_DENY;
	/* The agent ends every walk by the last field; a node past it counts as a miss. */
	return 0;
}

/* Without rules in this direction, the usual case, no call at all. */
static __always_inline int policy_denied(__u32 src, __u32 dst, const struct hdrs *h,
					 __u8 dir)
{
	__u32 root = policy_root_node(dir);
	if (root == XMASQ_POLICY_ALLOW)
		return 0;
	return policy_walk(root, src, dst, h->sport | ((__u32)h->dport << 16), h->proto);
}

static __always_inline int policy_drop(void)
{
	count(XMASQ_CNT_POLICY_DROP);
	return TC_ACT_SHOT;
}

#endif /* XMASQ_POLICY_H */
