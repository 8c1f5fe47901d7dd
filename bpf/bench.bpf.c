// SPDX-License-Identifier: GPL-2.0
/*
 * Benchmark build: the production programs plus wrappers for
 * BPF_PROG_TEST_RUN with a large repeat count. The kernel runs every
 * iteration on the packet the previous one left behind, so a program that
 * rewrites would take its full path once and its pass-through path ever after.
 * Each bench_* wrapper first writes the original headers back (bench_reset),
 * and bench_reset_only measures that cost alone so it can be taken out.
 */
#include "xmasq.bpf.c"

#define BENCH_RESET_LEN 128

struct bench_packet {
	__u8 bytes[BENCH_RESET_LEN];
};

/* Written by bench/programs.ts: the first bytes of the packet under test. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bench_packet);
} bench_packet SEC(".maps");

static __always_inline int bench_reset(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct bench_packet *p = bpf_map_lookup_elem(&bench_packet, &zero);
	if (!p)
		return -1;
	return bpf_skb_store_bytes(skb, 0, p->bytes, BENCH_RESET_LEN, 0);
}

SEC("tc")
int bench_empty(struct __sk_buff *skb)
{
	return XMASQ_CONTINUE;
}

SEC("tc")
int bench_reset_only(struct __sk_buff *skb)
{
	if (bench_reset(skb))
		return TC_ACT_SHOT;
	return XMASQ_CONTINUE;
}

SEC("tc")
int bench_init(struct __sk_buff *skb)
{
	if (bench_reset(skb))
		return TC_ACT_SHOT;
	return xmasq_init(skb);
}

SEC("tc")
int bench_restore(struct __sk_buff *skb)
{
	if (bench_reset(skb))
		return TC_ACT_SHOT;
	return xmasq_restore(skb);
}

SEC("tc")
int bench_masq(struct __sk_buff *skb)
{
	if (bench_reset(skb))
		return TC_ACT_SHOT;
	__u32 nic = 0;
	int verdict = xmasq_masq(skb, &nic, 0);
	if (verdict != TC_ACT_REDIRECT)
		return verdict;
	return bpf_redirect(nic, 0);
}

/* A new flow's policy verdict alone: parse, then the walk (up to one trie lookup a field). */
SEC("tc")
int bench_policy(struct __sk_buff *skb)
{
	struct hdrs h = {};
	if (load_eth_ipv4(skb, &h))
		return XMASQ_CONTINUE;
	return policy_denied(h.saddr, h.daddr, &h, XMASQ_DIR_EGRESS) ? TC_ACT_SHOT : XMASQ_CONTINUE;
}
