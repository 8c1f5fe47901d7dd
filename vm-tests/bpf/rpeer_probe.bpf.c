// SPDX-License-Identifier: GPL-2.0
/*
 * bpf_redirect_rpeer on its own, for the refusal tests: every packet is sent with
 * the target and flags the test wrote into `settings`, and the program counts the
 * packets it saw and keeps the kfunc's last return value.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

/* The kfunc of kernel-patch/ (found by name in the kernel's BTF). */
extern long bpf_redirect_rpeer(__u32 ifindex, __u64 flags) __ksym;

enum { S_TARGET_IFINDEX, S_FLAGS, S_COUNT };
enum { R_RUNS, R_LAST_RET, R_COUNT };

/* Written by the test before sending: the target ifindex and the flags. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, S_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} settings SEC(".maps");

/* Read by the test: packets seen, last return value of the kfunc. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, R_COUNT);
	__type(key, __u32);
	__type(value, __s64);
} results SEC(".maps");

static __u64 setting(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&settings, &slot);
	return v ? *v : 0;
}

SEC("tc")
int rpeer_probe(struct __sk_buff *skb)
{
	__u32 slot = R_RUNS;
	__s64 *runs = bpf_map_lookup_elem(&results, &slot);
	__s64 ret;

	if (runs)
		__sync_fetch_and_add(runs, 1);
	ret = bpf_redirect_rpeer(setting(S_TARGET_IFINDEX), setting(S_FLAGS));
	slot = R_LAST_RET;
	bpf_map_update_elem(&results, &slot, &ret, BPF_ANY);
	return ret;
}

char LICENSE[] SEC("license") = "GPL";
