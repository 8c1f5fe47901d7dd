/* SPDX-License-Identifier: GPL-2.0 */
/* Every map of the datapath. The agent pins them all under /sys/fs/bpf/xmasq/. */
#ifndef XMASQ_MAPS_H
#define XMASQ_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "xmasq.h"

/*
 * The test build shrinks the tables so that the differential tests can fill
 * them to the brim in every case; layouts are the same in both builds.
 */
#ifdef XMASQ_TEST
#define XMASQ_MAX_PODS 16
#define XMASQ_MAX_PATHS 64
/* 32 tables: rule sets of a few rules, as the differential draws them */
#define XMASQ_MAX_POLICY_SLOTS (32 * XMASQ_POLICY_TABLE_SLOTS)
#define XMASQ_MAX_CT_PENDING 16
#define XMASQ_MAX_CT_ADMITTED 16
/* 8 slots: the differential's flows share them often (index collisions) */
#define XMASQ_CT_RECENT_SLOTS 8
#define XMASQ_MAX_NODES 16
#define XMASQ_FILTER_HALF_BLOCKS 1 /* 4096 slots a half */
#else
#define XMASQ_MAX_PODS 1024
#define XMASQ_MAX_PATHS 65536
/* 16,384 tables (table 0 unused), 16 MiB */
#define XMASQ_MAX_POLICY_SLOTS (16384 * XMASQ_POLICY_TABLE_SLOTS)
#define XMASQ_MAX_CT_PENDING 4096
#define XMASQ_MAX_CT_ADMITTED 65536
/* 256 slots of 40 bytes a CPU (10 KiB): see ct_recent */
#define XMASQ_CT_RECENT_SLOTS 256
#define XMASQ_MAX_NODES 8192
#define XMASQ_FILTER_HALF_BLOCKS 256 /* 2^20 slots a half: ~6% of them set at a full egress_cache */
#endif

/* Written by the agent (CNI ADD/DEL); read by init, restore (learning) and masq. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XMASQ_MAX_PODS);
	__type(key, __u32);
	__type(value, struct pod_info);
} pod_info SEC(".maps");

/*
 * Written by init (outer headers, keys) and restore (peer key); read by masq.
 * Not preallocated, nor is ingress_cache: a preallocated table's elements sit
 * in one vmalloc area of 4 KiB pages (6 MiB here), so a packet's entry is a
 * TLB miss of its own on a node, where other work evicted the TLB since the
 * last packet; allocated one by one, they sit in the kernel's direct map,
 * whose huge pages a few TLB entries cover. Measured with bench:prog --cold
 * (TLB evicted), five pairs of runs side by side: init (two entries) median
 * 89 ns less, restore 50; masq not resolved; nothing hot.
 * A full table refuses a new entry either way; an allocation that fails
 * leaves the pair on the overlay, as a full table does. A freed element is
 * reused at once either way (conntrack.h), which the fast paths allow for.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, XMASQ_MAX_PATHS);
	__type(key, struct egress_key);
	__type(value, struct path);
} egress_cache SEC(".maps");

/*
 * The egress entries' presence filter: a bit per slot of a hash of the pod
 * pair (egress_filter_slot), in two halves of XMASQ_FILTER_HALF_BLOCKS blocks.
 * Set in both halves by egress_lookup_or_create, the only place an egress
 * entry is created, and never cleared by a program; masq reads the half
 * config.flags names (XMASQ_CFG_FILTER_HALF1) and passes a packet whose bit
 * is clear without looking egress_cache up, a helper call and a hash: most of
 * what a pod sends has no entry. The agent rebuilds the half masq does not
 * read from the live entries and then switches halves (dataplane/agent/
 * filter.ts), so that bits of gone pairs do not pile up. An array: its
 * lookups are inlined by the verifier, no helper call.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * XMASQ_FILTER_HALF_BLOCKS);
	__type(key, __u32);
	__type(value, struct egress_filter_block);
} egress_filter SEC(".maps");

/* Written by init (when it allocates a key); read and refreshed by restore. Not preallocated: egress_cache. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, XMASQ_MAX_PATHS);
	__type(key, struct ingress_key);
	__type(value, struct path);
} ingress_cache SEC(".maps");

/* Written by the agent; read by every program before it forwards a pod packet. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

/*
 * Deny rules compiled by the agent (dataplane/agent/policy.ts, xmasq policy
 * add/del) into tables of 256 slots, one per value of a byte of the packet's
 * key (policy.h); read by every program. An array, so that a step of the walk
 * is an inlined lookup; unwritten slots (0) allow.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XMASQ_MAX_POLICY_SLOTS);
	__type(key, __u32);
	__type(value, struct policy_slot);
} policy_table SEC(".maps");

/* Where each direction's walk starts, switched by the agent once new tables are whole. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct policy_start);
} policy_start SEC(".maps");

/*
 * TCP flows to make liberal (conntrack.h), written by masq and restore, drained
 * by the agent every few milliseconds. A plain hash, not an LRU: when full, a
 * flow waits for the next packet after the agent has drained it.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XMASQ_MAX_CT_PENDING);
	__type(key, struct ct_tuple);
	__type(value, __u32);
} ct_pending SEC(".maps");

/*
 * Flows conntrack admitted a moment ago (conntrack.h), written by masq and
 * restore; the agent deletes entries past XMASQ_CT_RECHECK_NS so that the
 * table keeps room. A plain hash: when full, flows are looked up every packet.
 * Preallocated: a freed element is reused at once either way (conntrack.h),
 * which is why a program copies an entry and checks the copy
 * (ct_admitted_copy) instead of reading it in place.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XMASQ_MAX_CT_ADMITTED);
	__type(key, struct ct_tuple);
	__type(value, struct ct_admission);
} ct_admitted SEC(".maps");

/*
 * Each CPU's first-level admission cache in front of ct_admitted (conntrack.h
 * ct_admit): direct-mapped by a hash of the flow (ct_recent_slot), written and
 * read by masq and restore on their own CPU only. A per-CPU array, so that
 * the verifier inlines its lookup (no helper call, ~30 ns here with the
 * return thunk, as a hash lookup costs) and no CPU writes another's cache
 * lines. 256 slots: a CPU's flows of the last 200 ms rarely share one (a
 * shared slot only costs the ct_admitted lookup of today), in 10 KiB a CPU.
 * Not pinned: a cache, empty in every new load; the programs of an earlier
 * load keep theirs until they are replaced, and no slot answers past the
 * admission it copies.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XMASQ_CT_RECENT_SLOTS);
	__type(key, __u32);
	__type(value, struct ct_recent);
} ct_recent SEC(".maps");

/*
 * A flow's slot of ct_recent: murmur3's 32-bit finalizer over the tuple as
 * the programs hold it (network order words and ports), so that the flows of
 * one pod pair, which differ in a port, spread over the slots. The model
 * computes the same (sim/model/conntrack.ts ctRecentSlot).
 */
static __always_inline __u32 ct_recent_slot(const struct ct_tuple *k)
{
	__u32 x = k->saddr ^ (k->daddr * 0x9e3779b1) ^
		  ((((__u32)k->sport << 16) | k->dport) * 0x85ebca6b) ^ k->protocol;

	x ^= x >> 16;
	x *= 0x85ebca6b;
	x ^= x >> 13;
	x *= 0xc2b2ae35;
	x ^= x >> 16;
	return x & (XMASQ_CT_RECENT_SLOTS - 1);
}
/* config's one slot (NULL only to the verifier: an array's slot 0 always exists). */
static __always_inline struct config *config_get(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&config, &zero);
}

/*
 * The programs' clock (xmasq.h struct xmasq_clock), written by the agent. An
 * array: its lookup is inlined, as bpf_jiffies64() is on x86-64 (a load of
 * jiffies), where bpf_ktime_get_coarse_ns() is a helper call (~15 ns of a
 * full path's ~150 here, bench:prog).
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xmasq_clock);
} clock SEC(".maps");

/*
 * Now, in CLOCK_MONOTONIC_COARSE nanoseconds: every clock read of the
 * programs (last_seen, ct_admitted's and ct_recent's checked), and what the
 * agent compares last_seen with (its idle expiry). The coarse clock and
 * jiffies both move at the tick, so base_ns + (jiffies - base_jiffies) *
 * tick_ns stays within a tick or so of it; the agent re-bases the map at
 * every scan so that no drift adds up. Every comparison of times holds
 * either way. Stamps a little ahead of the coarse clock: the programs'
 * `now >= checked && now - checked < XMASQ_CT_RECHECK_NS` (conntrack.h)
 * reads a checked in the future as stale (a conntrack lookup more, never
 * an admission kept past its time), and the agent, which compares with
 * the coarse clock, takes a stamp ahead of it for fresh, which it is. A
 * little behind: an entry looks a tick younger to the agent, an admission a
 * tick younger to the programs (200 ms against a few ms). Plain u64
 * arithmetic: a base far off or a tick_ns that wraps gives a time the same
 * comparisons take for stale or fresh, never a crash (the model computes the
 * same, sim/model/maps.ts xmasqNow). tick_ns 0: the coarse clock itself.
 */
static __always_inline __u64 xmasq_now(void)
{
	__u32 zero = 0;
	struct xmasq_clock *c = bpf_map_lookup_elem(&clock, &zero);

	if (!c || !c->tick_ns)
		return bpf_ktime_get_coarse_ns();
	return c->base_ns + (bpf_jiffies64() - c->base_jiffies) * c->tick_ns;
}

/* The overlay's nodes (xmasq.h), written by the agent; read by init and restore. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XMASQ_MAX_NODES);
	__type(key, __u32); /* underlay IPv4, network order */
	__type(value, struct node_info);
} nodes SEC(".maps");

/* Whether addr is a node of the overlay other than this host. */
static __always_inline int is_peer_node(__u32 addr)
{
	struct node_info *n = bpf_map_lookup_elem(&nodes, &addr);
	return n && !(n->flags & XMASQ_NODE_SELF);
}

/* Whether addr is one of this host's own underlay addresses. */
static __always_inline int is_self(__u32 addr)
{
	struct node_info *n = bpf_map_lookup_elem(&nodes, &addr);
	return n && (n->flags & XMASQ_NODE_SELF);
}

/* Bumped by every program; read by the agent's /metrics. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XMASQ_CNT_MAX);
	__type(key, __u32); /* enum xmasq_counter; the kernel wants a plain u32 array key */
	__type(value, __u64);
} counters SEC(".maps");

#ifdef XMASQ_TEST
/* Written by every redirect in the test build; read by the differential harness. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct redirect_trace);
} redirect_trace SEC(".maps");
#endif

/*
 * A pod pair's slot in each half of egress_filter: murmur3's 32-bit finalizer
 * over the two addresses as the programs hold them (network order words), so
 * that the pairs of one pod (its address in every key) spread over the half.
 * The agent computes the same (dataplane/maps.ts egressFilterSlot).
 */
static __always_inline __u32 egress_filter_slot(__u32 local_pod, __u32 remote_pod)
{
	__u32 x = local_pod ^ (remote_pod * 0x9e3779b1);

	x ^= x >> 16;
	x *= 0x85ebca6b;
	x ^= x >> 13;
	x *= 0xc2b2ae35;
	x ^= x >> 16;
	return x & (XMASQ_FILTER_HALF_BLOCKS * XMASQ_FILTER_BLOCK_WORDS * 64 - 1);
}

/* The word of a half holding a slot's bit (the block, then the word in it). */
static __always_inline __u64 *egress_filter_word(__u32 half, __u32 slot)
{
	__u32 i = half * XMASQ_FILTER_HALF_BLOCKS + slot / (XMASQ_FILTER_BLOCK_WORDS * 64);
	struct egress_filter_block *b = bpf_map_lookup_elem(&egress_filter, &i);

	return b ? &b->words[(slot / 64) % XMASQ_FILTER_BLOCK_WORDS] : NULL;
}

/* Whether the pair's bit is set in the half masq reads: clear means no egress entry. */
static __always_inline int egress_filter_has(const struct config *cfg, __u32 local_pod, __u32 remote_pod)
{
	__u32 slot = egress_filter_slot(local_pod, remote_pod);
	__u64 *w = egress_filter_word(cfg->flags & XMASQ_CFG_FILTER_HALF1 ? 1 : 0, slot);

	return w && (*w & (1ULL << (slot % 64)));
}

/*
 * Sets the pair's bit in both halves: the agent may switch halves at any
 * moment. An atomic OR, against another CPU setting another bit of the word,
 * and only where the bit is clear, so that CPUs creating entries do not take
 * a word's cache line from each other for nothing.
 */
static __always_inline void egress_filter_add(__u32 local_pod, __u32 remote_pod)
{
	__u32 slot = egress_filter_slot(local_pod, remote_pod);
	__u64 bit = 1ULL << (slot % 64);

	for (__u32 half = 0; half < 2; half++) {
		__u64 *w = egress_filter_word(half, slot);
		if (w && !(*w & bit))
			__sync_fetch_and_or(w, bit);
	}
}

/*
 * The egress entry for a pod pair, created empty if new. NULL when the table
 * is full. EEXIST from the insert means another CPU created it first (and
 * sets the bit), which is just as good. The bit is set after the insert, never
 * before: the agent's rebuild relies on it (dataplane/agent/filter.ts).
 */
static __always_inline struct path *egress_lookup_or_create(struct egress_key *ek)
{
	struct path *e = bpf_map_lookup_elem(&egress_cache, ek);
	if (e)
		return e;
	struct path empty = {};
	if (bpf_map_update_elem(&egress_cache, ek, &empty, BPF_NOEXIST) == 0)
		egress_filter_add(ek->local_pod, ek->remote_pod);
	return bpf_map_lookup_elem(&egress_cache, ek);
}

#endif /* XMASQ_MAPS_H */
