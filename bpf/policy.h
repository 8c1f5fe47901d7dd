/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Deny rules. Every installed rule denies; no match allows. A rule is a 5-tuple
 * with 0 for "any", so the fields it names form its mask. Since any match
 * denies, the masks can be tried in any order; policy_masks lists only the ones
 * in use, so a packet costs one lookup per distinct mask and nothing without
 * rules. There is no verdict cache to fill up or to purge.
 */
#ifndef XMASQ_POLICY_H
#define XMASQ_POLICY_H

#include "maps.h"
#include "packet.h"
#include "verdict.h"

static __always_inline struct policy_masks *policy_masks_in_use(void)
{
	__u32 zero = 0;
	struct policy_masks *pm = bpf_map_lookup_elem(&policy_masks, &zero);
	return pm && pm->count ? pm : 0;
}

/*
 * The mask loop is a global function: the verifier checks it once, on its
 * own, instead of once per path that reaches it (each program forks into a
 * path per protocol and kind of key; walking the loop on every one of them
 * exceeds the verifier's budget). Hence scalars only: ports packs
 * sport | dport << 16 (network order, as the rules hold them).
 */
__noinline int policy_denied_tuple(__u32 src, __u32 dst, __u32 ports, __u8 proto, __u8 dir)
{
	struct policy_masks *pm = policy_masks_in_use();
	if (!pm)
		return 0;
	__u32 n = pm->count;

	for (__u32 i = 0; i < XMASQ_POLICY_MAX_MASKS; i++) {
		if (i >= n)
			break;
		__u8 m = pm->mask[i];
		struct policy_key k = {
			.src_ip = (m & XMASQ_PF_SRC_IP) ? src : 0,
			.dst_ip = (m & XMASQ_PF_DST_IP) ? dst : 0,
			.src_port = (m & XMASQ_PF_SRC_PORT) ? (__u16)ports : 0,
			.dst_port = (m & XMASQ_PF_DST_PORT) ? (__u16)(ports >> 16) : 0,
			.protocol = (m & XMASQ_PF_PROTOCOL) ? proto : 0,
			.dir = dir,
		};
		if (bpf_map_lookup_elem(&policy_rules, &k))
			return 1;
	}
	return 0;
}

/* Without rules, the usual case, no call at all. */
static __always_inline int policy_denied(__u32 src, __u32 dst, const struct hdrs *h,
					 __u8 dir)
{
	if (!policy_masks_in_use())
		return 0;
	return policy_denied_tuple(src, dst, h->sport | ((__u32)h->dport << 16), h->proto, dir);
}

static __always_inline int policy_drop(void)
{
	count(XMASQ_CNT_POLICY_DROP);
	return TC_ACT_SHOT;
}

#endif /* XMASQ_POLICY_H */
