// SPDX-License-Identifier: GPL-2.0
/*
 * Helper numbering: built against the machine's stock headers (linux-libc-dev's
 * linux/bpf.h, libbpf's bpf_helper_defs.h), this program calls helpers by the ids
 * those headers give them, all late in the list (155 to 208). On a kernel whose
 * patch renumbered helpers the verifier would refuse it or the calls would reach
 * other functions; each result below is one that only the named helper gives.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

enum {
	R_LOOP_RET,          /* bpf_loop (181): the number of iterations, 7 */
	R_LOOP_COUNT,        /* what the callback counted, 7 */
	R_STRNCMP_EQ,        /* bpf_strncmp (182) of equal strings: 0 */
	R_STRNCMP_GT,        /* of "rpeez" against "rpeer": > 0 */
	R_PEER_BAD_FLAGS,    /* bpf_redirect_peer (155) with flags 1: TC_ACT_SHOT */
	R_PEER_OK,           /* with flags 0: TC_ACT_REDIRECT */
	R_TSTAMP_RET,        /* bpf_skb_set_tstamp (192), mono delivery time 12345: 0 */
	R_TSTAMP,            /* skb->tstamp afterwards: 12345 */
	R_TSTAMP_BAD_TYPE,   /* bpf_skb_set_tstamp with an unknown type: -EINVAL */
	R_TAI_NS,            /* bpf_ktime_get_tai_ns (208): CLOCK_TAI, near the wall clock */
	R_MONO_NS,           /* bpf_ktime_get_ns (5): CLOCK_MONOTONIC, for contrast */
	R_COUNT
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, R_COUNT);
	__type(key, __u32);
	__type(value, __s64);
} results SEC(".maps");

/* bpf_strncmp wants its second string in read-only memory: .rodata, frozen by libbpf. */
const char expected[] = "rpeer";

static void put(__u32 slot, __s64 value)
{
	bpf_map_update_elem(&results, &slot, &value, BPF_ANY);
}

static long count(__u32 index, void *ctx)
{
	(*(__s64 *)ctx)++;
	return 0;
}

SEC("tc")
int abi(struct __sk_buff *skb)
{
	char same[8] = "rpeer", greater[8] = "rpeez";
	__s64 n = 0;

	put(R_LOOP_RET, bpf_loop(7, count, &n, 0));
	put(R_LOOP_COUNT, n);
	put(R_STRNCMP_EQ, bpf_strncmp(same, 5, expected));
	put(R_STRNCMP_GT, bpf_strncmp(greater, 5, expected));
	put(R_PEER_BAD_FLAGS, bpf_redirect_peer(1, 1));
	put(R_PEER_OK, bpf_redirect_peer(1, 0));
	put(R_TSTAMP_RET, bpf_skb_set_tstamp(skb, 12345, BPF_SKB_TSTAMP_DELIVERY_MONO));
	/* Reading tstamp_type too makes the kernel hand the program the raw tstamp. */
	put(R_TSTAMP, skb->tstamp_type == BPF_SKB_TSTAMP_DELIVERY_MONO ? (__s64)skb->tstamp : -1);
	put(R_TSTAMP_BAD_TYPE, bpf_skb_set_tstamp(skb, 1, 99));
	put(R_TAI_NS, bpf_ktime_get_tai_ns());
	put(R_MONO_NS, bpf_ktime_get_ns());
	/* TC_ACT_OK: the redirect recorded by bpf_redirect_peer above is never acted on. */
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
