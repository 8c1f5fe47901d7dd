// SPDX-License-Identifier: GPL-2.0
/*
 * Test-only (dataplane/ct-admitted.test.ts): ct_admitted_copy (bpf/conntrack.h)
 * on an element the kernel frees and reuses between a program's lookup and
 * its read, as another CPU would. One program run plays both CPUs: it looks
 * flow A up, then deletes A and inserts an entry (for B, or for A again),
 * which takes the element A's lookup returned, then reads through that
 * lookup's pointer. Built with the test build's maps (-DXMASQ_TEST).
 */
#include "conntrack.h"

/* What each run saw: [0] the checked read in place, [1] the copy's verdict, [2] the copy's checked, [3] its saddr. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} reuse_out SEC(".maps");

static const struct ct_tuple flow_a = { .saddr = 0x0100000a, .daddr = 0x0200000a, .sport = 0x3930, .dport = 0x5000, .protocol = IPPROTO_TCP };
static const struct ct_tuple flow_b = { .saddr = 0x0300000a, .daddr = 0x0400000a, .sport = 0x3930, .dport = 0x5000, .protocol = IPPROTO_UDP };

static __always_inline void put(__u32 i, __u64 v)
{
	__u64 *o = bpf_map_lookup_elem(&reuse_out, &i);
	if (o)
		*o = v;
}

/*
 * A is admitted at 1000 towards 10.0.0.2; then next (for B, or A again) is
 * inserted at 2000 towards 10.0.0.9 after A's delete, unless next is NULL.
 */
static __always_inline int reuse(const struct ct_tuple *next)
{
	struct ct_tuple a = flow_a;
	struct ct_admission first = { .checked = 1000, .saddr = 0x0100000a, .daddr = 0x0200000a, .sport = 0x3930, .dport = 0x5000 };
	struct ct_admission later = { .checked = 2000, .saddr = 0x0100000a, .daddr = 0x0900000a, .sport = 0x3930, .dport = 0x5000 };

	if (bpf_map_update_elem(&ct_admitted, &a, &first, BPF_NOEXIST))
		return 1;
	struct ct_admission *seen = bpf_map_lookup_elem(&ct_admitted, &a);
	if (!seen)
		return 1;
	if (next) {
		struct ct_tuple n = *next;
		bpf_map_delete_elem(&ct_admitted, &a);
		if (bpf_map_update_elem(&ct_admitted, &n, &later, BPF_NOEXIST))
			return 1;
	}
	put(0, seen->checked);
	struct ct_admission c = {};
	put(1, ct_admitted_copy(&a, seen, &c));
	put(2, c.checked);
	put(3, c.daddr);
	struct ct_tuple b = flow_b;
	bpf_map_delete_elem(&ct_admitted, &a);
	bpf_map_delete_elem(&ct_admitted, &b);
	return 0;
}

SEC("tc")
int untouched(struct __sk_buff *skb)
{
	return reuse(NULL);
}

SEC("tc")
int reused_for_another(struct __sk_buff *skb)
{
	return reuse(&flow_b);
}

SEC("tc")
int reused_for_the_same(struct __sk_buff *skb)
{
	return reuse(&flow_a);
}

char LICENSE[] SEC("license") = "GPL";
