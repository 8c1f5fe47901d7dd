/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Deny rules. Every installed rule denies; no match allows. The agent compiles
 * the rules (CIDR blocks with exceptions, port ranges, protocols, per
 * direction) into tables in policy_table: a walk reads the packet's key
 * (src, dst, protocol, dport, sport: 13 bytes) one byte a step, each step an
 * array lookup in the table the previous one named, which gives the verdict or
 * the next byte and table. The agent skips the bytes no remaining rule looks
 * at (a field no rule names, an address's bytes past its longest block), so a
 * step never reads a byte before the one it read last: a verdict costs at most
 * XMASQ_POLICY_KEY_BYTES inlined lookups whatever the rules (an LPM trie
 * lookup costs a helper call and a node per nested prefix on the key's path),
 * and none without rules in that direction. No verdict cache to fill or purge.
 */
#ifndef XMASQ_POLICY_H
#define XMASQ_POLICY_H

#include "maps.h"
#include "packet.h"
#include "verdict.h"

static __always_inline __u32 policy_start_of(__u8 dir)
{
	__u32 zero = 0;
	struct policy_start *r = bpf_map_lookup_elem(&policy_start, &zero);
	if (!r)
		return XMASQ_POLICY_ALLOW;
	return dir == XMASQ_DIR_INGRESS ? r->ingress : r->egress;
}

/*
 * The walk is a global function: the verifier checks it once, on its own,
 * instead of once per path that reaches it (each program forks into a path
 * per protocol and kind of key). Hence scalars only: ports packs
 * sport | dport << 16, each in network order as the header holds it.
 */
__noinline int policy_walk(__u32 next, __u32 src, __u32 dst, __u32 ports, __u8 proto)
{
	/* The key's bytes 0-7 and 8-12, first byte highest, so byte p is one shift away. */
	__u64 hi = (__u64)bpf_ntohl(src) << 32 | bpf_ntohl(dst);
	__u64 lo = (__u64)proto << 56 | (__u64)bpf_ntohs((__u16)(ports >> 16)) << 40 |
		   (__u64)bpf_ntohs((__u16)ports) << 24;

	for (int i = 0; i < XMASQ_POLICY_KEY_BYTES; i++) {
		if (next == XMASQ_POLICY_ALLOW || next == XMASQ_POLICY_DENY)
			break;
		__u32 pos = next >> XMASQ_POLICY_POS_SHIFT;
		__u32 byte = ((pos < 8 ? hi : lo) >> (56 - 8 * (pos & 7))) & 0xff;
		__u32 slot = (next & XMASQ_POLICY_TABLE_MASK) * XMASQ_POLICY_TABLE_SLOTS + byte;
		struct policy_slot *s = bpf_map_lookup_elem(&policy_table, &slot);
		next = s ? s->next : XMASQ_POLICY_ALLOW;
	}
	/* The agent ends every walk by the key's last byte; a walk going on past it counts as a miss. */
	return next == XMASQ_POLICY_DENY;
}

/* Without rules in this direction, the usual case, no call at all. */
static __always_inline int policy_denied(__u32 src, __u32 dst, const struct hdrs *h,
					 __u8 dir)
{
	__u32 start = policy_start_of(dir);
	if (start == XMASQ_POLICY_ALLOW)
		return 0;
	return policy_walk(start, src, dst, h->sport | ((__u32)h->dport << 16), h->proto);
}

static __always_inline int policy_drop(void)
{
	count(XMASQ_CNT_POLICY_DROP);
	return TC_ACT_SHOT;
}

#endif /* XMASQ_POLICY_H */
