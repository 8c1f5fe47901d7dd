// SPDX-License-Identifier: GPL-2.0
/*
 * Test-only object for dataplane/libbpf.test.ts and dataplane/btf.test.ts.
 * The tests compile it into a temp dir; nothing ships it.
 *
 *   -DPROBE_BAD  adds a program the verifier must reject (unchecked packet read),
 *                so the tests can see the verifier log in the thrown Error.
 *   -DPROBE_PIN  adds a map pinned by name, so the tests can exercise pinRoot
 *                without the plain build ever pinning anything.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

/* The btf test holds these layouts against the numbers in the comments. */
struct probe_key {
	__u32 addr;   /* 0 */
	__u16 port;   /* 4 */
	__u8 proto;   /* 6 */
	/* 1 byte of tail padding: sizeof == 8 */
};

struct probe_inner {
	__u16 lo;     /* 0, then 2 bytes of padding */
	__u32 hi;     /* 4 */
};                    /* sizeof == 8 */

enum probe_kind {
	PROBE_KIND_NONE = 0,
	PROBE_KIND_SEEN = 1,
	PROBE_KIND_DROPPED = 7,
	PROBE_KIND_BOGUS = -1,
};

typedef __u16 probe_port_t;

struct probe_value {
	__u8 flag;                 /* 0, then 7 bytes of padding */
	__u64 bytes;               /* 8 */
	__u8 mac[6];               /* 16, then 2 bytes of padding */
	struct probe_inner inner;  /* 24 */
	enum probe_kind kind;      /* 32 */
	__u32 small : 3;           /* 36, bits 0..2 of the unit */
	__u32 wide : 13;           /* 36, bits 3..15 */
	probe_port_t tail;         /* 38: fits after the 16 bitfield bits */
	volatile __u32 words[2];   /* 40 */
};                                 /* sizeof == 48 (8-aligned by bytes) */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct probe_key);
	__type(value, struct probe_value);
} probe_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32);
} probe_array SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} probe_counters SEC(".maps");

/* A 4-byte per-CPU value: user space sees each CPU's copy rounded up to 8. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u32);
} probe_percpu_hash SEC(".maps");

#ifdef PROBE_PIN
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} probe_pinned SEC(".maps");
#endif

/*
 * Counts runs per CPU, records the first packet byte in probe_array[0],
 * rewrites byte 1 to byte0 ^ 0x5a, bumps skb->mark (so ctx_out differs from
 * ctx_in), and drops packets whose first byte is 0xff.
 */
SEC("tc")
int probe_prog(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 zero = 0;
	__u64 *count = bpf_map_lookup_elem(&probe_counters, &zero);

	if (count)
		*count += 1;
	skb->mark += 1;

	__u8 *p = data;
	if ((void *)(p + 2) > data_end)
		return TC_ACT_OK;

	__u32 first = p[0];
	bpf_map_update_elem(&probe_array, &zero, &first, BPF_ANY);
	if (first == 0xff)
		return TC_ACT_SHOT;
	p[1] = p[0] ^ 0x5a;
	return TC_ACT_OK;
}

SEC("tc")
int probe_pass(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

#ifdef PROBE_BAD
SEC("tc")
int probe_bad(struct __sk_buff *skb)
{
	__u8 *p = (void *)(long)skb->data;

	/* No check against data_end: the verifier must refuse this. */
	return p[20];
}
#endif

char LICENSE[] SEC("license") = "GPL";
