/* SPDX-License-Identifier: GPL-2.0 */
/* How a program ends: counted, and in the test build traced. */
#ifndef XMASQ_VERDICT_H
#define XMASQ_VERDICT_H

#include <linux/pkt_cls.h>
#include "maps.h"

static __always_inline void count(__u32 counter)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &counter);
	/* Per-CPU slots: no other CPU writes this one, so no atomic is needed. */
	if (v)
		*v += 1;
}

/*
 * A packet left to what comes next on the hook: TC_ACT_UNSPEC lets a program
 * behind ours run (cls_bpf's next filter; tcx's TCX_NEXT is the same -1), and
 * with none the packet goes on as with TC_ACT_OK. Every verdict of ours that
 * is not a drop or a redirect is this one, so another project's programs on
 * the same hook keep working.
 */
#define XMASQ_CONTINUE TC_ACT_UNSPEC

static __always_inline int pass(void)
{
	count(XMASQ_CNT_PASSED);
	return XMASQ_CONTINUE;
}

static __always_inline void trace_redirect(__u32 ifindex, __u32 kind)
{
#ifdef XMASQ_TEST
	__u32 zero = 0;
	struct redirect_trace *t = bpf_map_lookup_elem(&redirect_trace, &zero);
	if (t) {
		t->ifindex = ifindex;
		t->kind = kind;
	}
#endif
}
#endif /* XMASQ_VERDICT_H */
