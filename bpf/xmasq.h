/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The one header for everything the BPF programs share with each other and with
 * user space. `npm run build:bpf` reads the structs, enums and exported
 * constants off the built objects' BTF into dataplane/generated/objects.ts,
 * which dataplane/maps.ts imports: change both or tsc and the tests go red.
 */
#ifndef XMASQ_H
#define XMASQ_H

#include <linux/types.h>

/*
 * Wire format (see README "Wire format"):
 *  - masqueraded packet: IPv4 reserved flag (RF, 0x8000 of frag_off) set, ECN =
 *    the pod's own ECN bits, and the RECEIVER's key for this pod pair in
 *    DSCP when it is narrow (1..63), or, when it is wide (64..16383), in a
 *    header word of a whole datagram that restore can give back: the TCP
 *    urgent pointer (URG clear) or the UDP length, with DSCP 0, or the
 *    code of an ICMP echo (high 8 bits) with DSCP (low 6 bits).
 *  - learning signal: on the OUTER IPv4 header of an overlay (VXLAN/Geneve)
 *    packet: RF set, DF = "I know your key", and the SENDER's key in DSCP when
 *    narrow, or DSCP 0 and the key in the outer IPv4 ID when wide. The
 *    overlay strips the outer header, so pods never see a signal.
 * A conforming IPv4 stack never sets RF (RFC 791), which is what keeps host
 * traffic (even ECN-CE with any DSCP, any urgent pointer, length or code) from ever being
 * taken for ours.
 */
#define XMASQ_IP_RF 0x8000
#define XMASQ_IP_DF 0x4000
#define XMASQ_IP_MF 0x2000
#define XMASQ_IP_OFFSET 0x1fff

/* Narrow keys are 1..63, a 6-bit DSCP: they carry every protocol. 0 means "no key". */
#define XMASQ_KEY_MIN 1
#define XMASQ_KEY_MAX 63
#define XMASQ_KEY_COUNT (XMASQ_KEY_MAX - XMASQ_KEY_MIN + 1)
/*
 * Wide keys are 64..16383, 14 bits: what the smallest carrier holds (an ICMP
 * echo's code byte above the 6 bits of DSCP; packet.h, wide carriers).
 */
#define XMASQ_WIDE_KEY_MIN 64
#define XMASQ_WIDE_KEY_MAX 16383
#define XMASQ_WIDE_KEY_COUNT (XMASQ_WIDE_KEY_MAX - XMASQ_WIDE_KEY_MIN + 1)
/* Random draws for a free key before a pair gives up and stays on the overlay. */
#define XMASQ_KEY_TRIES 9

/* config.flags: init gives pairs wide keys (off: the 6-bit design, narrow keys only). */
#define XMASQ_CFG_WIDE_KEYS 0x1
/* config.flags: masq reads egress_filter's second half (maps.h); the agent switches it. */
#define XMASQ_CFG_FILTER_HALF1 0x2

/*
 * Policy walk (policy.h): a verdict, or where the walk goes on: the byte of
 * the packet's key to read next (bits 24-31) and the table of policy_table to
 * read it in (bits 0-23; table 0 is never used, so no "go on" is 0). ALLOW is
 * also what an unwritten slot holds.
 */
#define XMASQ_POLICY_ALLOW 0
#define XMASQ_POLICY_DENY 0xffffffff
#define XMASQ_POLICY_POS_SHIFT 24
#define XMASQ_POLICY_TABLE_MASK 0xffffff
/* A table: one slot per value of a byte. */
#define XMASQ_POLICY_TABLE_SLOTS 256
/*
 * The key a walk reads, one byte a step, each byte at most once and in order:
 * src (0-3), dst (4-7), protocol (8), dport (9-10), sport (11-12), addresses
 * and ports in network order. So a walk is at most 13 array lookups.
 */
#define XMASQ_POLICY_KEY_BYTES 13

/* pod_info: pod IPv4 (network order) -> the pod as the host sees it. */
struct pod_info {
	__u32 ifindex; /* host-side veth of the pod */
	__u8 mac[6];   /* the pod's own eth0 MAC */
	__u8 pad[2];
	/*
	 * The host's network namespace as the pod's own sees it, for masq_rpeer,
	 * which runs in the pod's namespace and must consult the host's conntrack
	 * (conntrack.h): the id the pod's namespace gives the host's (the agent
	 * asks with RTM_GETNSID there, assigning one if there is none; -1:
	 * unknown, masq_rpeer admits nothing) and the host namespace's inode
	 * number, which the entry found must be in. veth mode: -1 and 0, unread.
	 */
	__s32 host_netns_id;
	__u32 host_netns_ino;
};

/* egress cache key: a local pod talking to a remote pod (both network order). */
struct egress_key {
	__u32 local_pod;
	__u32 remote_pod;
};

/* ingress cache key: the remote HOST that masquerades towards us, and our key. */
struct ingress_key {
	__u32 remote_host;
	__u16 key;
	__u16 pad;
};

/*
 * A learned path. In the egress cache "local" is our host (MAC, IP) and
 * "remote" the peer host, with ifindex the local pod's host-side veth (as
 * pod_info has it; 0 in an entry from before masq read it here); in the
 * ingress cache "local" is our pod and "remote" the peer pod, with ifindex
 * the pod's host-side veth (0: a deleted pod's tombstone).
 */
struct path {
	__u64 last_seen;    /* xmasq_now() (CLOCK_MONOTONIC_COARSE nanoseconds) of the last use: a tick of resolution is plenty for idle expiry */
	__u8 local_mac[6];
	__u8 remote_mac[6];
	__u32 local_ip;
	__u32 remote_ip;
	__u32 ifindex;
	__u16 local_key;    /* our key: the peer writes it into what it masquerades to us */
	__u16 remote_key;   /* the peer's key: we write it into what we masquerade */
	__u8 remote_ready;  /* 0 once the peer said it does not know our key yet */
	__u8 pad[3];
};

/*
 * nodes: the overlay's nodes (README "Threat model"), by underlay IPv4
 * address (network order), written by the agent from its config and the
 * overlay device's FDB before any program is attached. init learns only
 * toward a peer node; restore takes signals and masqueraded packets only from
 * one. An entry flagged XMASQ_NODE_SELF is one of this host's own addresses:
 * the source of every overlay packet it encapsulates, never a peer.
 */
#define XMASQ_NODE_SELF 0x1

struct node_info {
	__u32 flags; /* XMASQ_NODE_* */
};

/* config (one slot): written by the agent before any program is attached. */
struct config {
	__u32 nic_ifindex;     /* where masq redirects to */
	__u32 flags;           /* XMASQ_CFG_* */
	/*
	 * The overlay's device (VXLAN/Geneve) and its MAC: restore hands a pod
	 * packet the host stack must see to it, as if the overlay had delivered
	 * it. 0: to the stack at the NIC instead (see restore.h).
	 */
	__u32 overlay_ifindex;
	__u8 overlay_mac[6];
	__u8 pad[2];
	/*
	 * The cluster's Service range (kube-proxy's ClusterIPs), network order;
	 * mask 0: none. masq looks up a packet to it in conntrack before the pair,
	 * to take it to the backend conntrack chose (masq.h).
	 */
	__u32 service_net;
	__u32 service_mask;
	/*
	 * The overlay's UDP ports, network order, 0: none. The agent reads them
	 * off the overlay's devices (Flannel's Port, Calico's vxlanPort) or takes
	 * them from its flags (Antrea's tunnelPort, which has no device). A
	 * datagram to one is overlay traffic: init learns from it, restore reads
	 * signals on it, masq never carries a pod's.
	 */
	__u16 vxlan_port;
	__u16 geneve_port;
};

/*
 * clock (one slot, maps.h): what xmasq_now() turns jiffies into
 * CLOCK_MONOTONIC_COARSE nanoseconds with, written by the agent
 * (dataplane/agent/clock.ts) from a run of clock_probe: the coarse time
 * base_ns at jiffies base_jiffies, and the length of a jiffy. tick_ns 0: not
 * calibrated (a new map, an agent of an earlier version, a kernel whose tick
 * the agent could not tell): the programs read the coarse clock instead.
 */
struct xmasq_clock {
	__u64 base_ns;
	__u64 base_jiffies;
	__u64 tick_ns;
};

/* clock_probe's output, in the __sk_buff's cb[] words (a test run gives them back). */
enum xmasq_probe_cb {
	XMASQ_PROBE_JIFFIES_LO = 0,
	XMASQ_PROBE_JIFFIES_HI = 1,
	XMASQ_PROBE_COARSE_LO = 2,
	XMASQ_PROBE_COARSE_HI = 3,
};

/*
 * egress_filter's value (maps.h): the bits of 4096 slots in u64 words. Blocks
 * this large, not a word per element, because the agent reads and writes the
 * filter through the syscall, which copies an array element at a time.
 */
#define XMASQ_FILTER_BLOCK_WORDS 64
struct egress_filter_block {
	__u64 words[XMASQ_FILTER_BLOCK_WORDS];
};

enum xmasq_policy_dir {
	XMASQ_DIR_EGRESS = 0,  /* leaving a local pod */
	XMASQ_DIR_INGRESS = 1, /* entering a local pod */
};

/*
 * A slot of policy_table, at table * XMASQ_POLICY_TABLE_SLOTS + the key's
 * byte: XMASQ_POLICY_ALLOW, _DENY, or where the walk goes on (byte and table).
 */
struct policy_slot {
	__u32 next;
};

/* policy_start (one slot): where each direction's walk starts; ALLOW: no rules, DENY: deny all. */
struct policy_start {
	__u32 egress;
	__u32 ingress;
};

enum xmasq_counter {
	XMASQ_CNT_MASQUERADED = 0, /* masq rewrote and redirected a pod packet */
	XMASQ_CNT_RESTORED,        /* restore rewrote and redirected into a pod */
	XMASQ_CNT_LEARNED,         /* init signalled or restore learned a key */
	XMASQ_CNT_FELL_BACK,       /* a known pair stayed on the overlay */
	XMASQ_CNT_KEY_EXHAUSTED,   /* no free key for a pair */
	XMASQ_CNT_POLICY_DROP,     /* a deny rule matched */
	XMASQ_CNT_PASSED,          /* not ours: left untouched */
	XMASQ_CNT_RESTORE_MISS,    /* marked packet with no ingress entry: dropped */
	/*
	 * Host authority (conntrack.h): a pod packet of a learned pair whose flow
	 * the host's conntrack does not admit. masq leaves it on the overlay;
	 * restore restores it and hands it to the host stack.
	 */
	XMASQ_CNT_CT_REFUSED,      /* no established entry, or a packet only the stack may see */
	XMASQ_CNT_CT_NAT,          /* the host NATs the flow in a way the program does not carry (SNAT): the stack must */
	XMASQ_CNT_CT_PENDING,      /* established TCP not yet liberal: queued for the agent */
	/*
	 * Trust (README "Threat model"): what a program refuses to learn from or
	 * carry because it did not come from where it must.
	 */
	XMASQ_CNT_NOT_OURS,        /* init: an overlay packet this host did not encapsulate (a forwarded datagram): not learned from */
	XMASQ_CNT_PEER_NOT_NODE,   /* init: an overlay packet of ours towards an address that is no node: not learned from */
	XMASQ_CNT_SIGNAL_NOT_NODE, /* restore: a signal from an address that is no node: ignored */
	XMASQ_CNT_SIGNAL_WRONG_NODE, /* restore: a signal for a pair whose peer is another node: ignored */
	XMASQ_CNT_MARKED_NOT_NODE, /* restore: a masqueraded packet from an address that is no node: dropped */
	XMASQ_CNT_POD_MARKED,      /* masq: a pod packet carrying our marker (RF): dropped */
	XMASQ_CNT_SERVICE_NAT,     /* masqueraded to a Service's backend, or restored from it with the Service's address (also MASQUERADED/RESTORED) */
	XMASQ_CNT_SRC_NOT_POD,     /* masq: a packet of a learned pair whose source is not the pod it came from (a pod sending as its neighbour): left on the overlay */
	XMASQ_CNT_MAX,
};

/* ct_admit's verdict when the flow may take the fast path (else a counter). */
#define XMASQ_CT_ADMIT (-1)
/* masq: not looked up yet (a Service's flow is looked up before the pair). */
#define XMASQ_CT_UNCHECKED (-2)

/* What the programs read of a conntrack entry (include/uapi/linux/netfilter/nf_conntrack_common.h). */
#define XMASQ_IPS_SEEN_REPLY 0x2
#define XMASQ_IPS_SRC_NAT 0x10
#define XMASQ_IPS_DST_NAT 0x20
#define XMASQ_TCP_CONNTRACK_ESTABLISHED 3
/* ip_ct_tcp_state.flags: window tracking off for that direction (nf_conntrack_tcp.h). */
#define XMASQ_CT_TCP_FLAG_BE_LIBERAL 0x08

/*
 * A flow as a packet of it travels (network order): the key of ct_pending (a
 * TCP flow whose established conntrack entry the agent is to make liberal)
 * and of ct_admitted (a flow conntrack admitted a moment ago).
 */
struct ct_tuple {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 protocol;
	__u8 pad[3];
};

/*
 * ct_admitted value: when conntrack last admitted the flow
 * (xmasq_now, maps.h), and the flow as the host sends it on (a
 * Service's DNAT applied or reversed; else the key's own addresses and
 * ports). For XMASQ_CT_RECHECK_NS after that, its packets are admitted without
 * a lookup (~180 ns a packet otherwise); conntrack.h.
 */
struct ct_admission {
	__u64 checked;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 pad[4];
};
#define XMASQ_CT_RECHECK_NS (200ULL * 1000 * 1000)

/*
 * A slot of ct_recent, a CPU's first-level admission cache (conntrack.h): the
 * flow the CPU last admitted in this slot and that admission (its checked is
 * the time of the conntrack lookup it rests on, never later). Zero: no flow
 * (protocol 0 matches none, ct_admit reaches the slot only for TCP and UDP).
 */
struct ct_recent {
	struct ct_tuple flow;
	struct ct_admission admitted;
};

enum xmasq_redirect_kind {
	XMASQ_REDIRECT_NONE = 0,
	XMASQ_REDIRECT_EGRESS = 1, /* bpf_redirect(ifindex, 0) */
	XMASQ_REDIRECT_PEER = 2,   /* bpf_redirect_peer(ifindex, 0) */
	XMASQ_REDIRECT_RPEER = 3,  /* bpf_redirect_rpeer(ifindex, 0) */
	XMASQ_REDIRECT_INGRESS = 4, /* bpf_redirect(ifindex, BPF_F_INGRESS): received on that device */
};

/* Test build only: the redirect a program asked for, which test_run cannot show. */
struct redirect_trace {
	__u32 ifindex;
	enum xmasq_redirect_kind kind;
};

/*
 * The #define constants user space needs, as enum values: #defines leave no
 * trace in BTF, enums do once a variable's type names them (xmasq.bpf.c,
 * xmasq_btf_export). `npm run build:bpf` reads them off each built object into
 * dataplane/generated/objects.ts; the programs keep using the #defines.
 */
enum xmasq_btf_consts {
	XMASQ_BTF_IP_RF = XMASQ_IP_RF,
	XMASQ_BTF_IP_DF = XMASQ_IP_DF,
	XMASQ_BTF_IP_MF = XMASQ_IP_MF,
	XMASQ_BTF_IP_OFFSET = XMASQ_IP_OFFSET,
	XMASQ_BTF_KEY_MIN = XMASQ_KEY_MIN,
	XMASQ_BTF_KEY_MAX = XMASQ_KEY_MAX,
	XMASQ_BTF_KEY_COUNT = XMASQ_KEY_COUNT,
	XMASQ_BTF_WIDE_KEY_MIN = XMASQ_WIDE_KEY_MIN,
	XMASQ_BTF_WIDE_KEY_MAX = XMASQ_WIDE_KEY_MAX,
	XMASQ_BTF_WIDE_KEY_COUNT = XMASQ_WIDE_KEY_COUNT,
	XMASQ_BTF_KEY_TRIES = XMASQ_KEY_TRIES,
	XMASQ_BTF_CFG_WIDE_KEYS = XMASQ_CFG_WIDE_KEYS,
	XMASQ_BTF_CFG_FILTER_HALF1 = XMASQ_CFG_FILTER_HALF1,
	XMASQ_BTF_POLICY_ALLOW = XMASQ_POLICY_ALLOW,
	XMASQ_BTF_POLICY_DENY = XMASQ_POLICY_DENY,
	XMASQ_BTF_POLICY_POS_SHIFT = XMASQ_POLICY_POS_SHIFT,
	XMASQ_BTF_POLICY_TABLE_MASK = XMASQ_POLICY_TABLE_MASK,
	XMASQ_BTF_POLICY_TABLE_SLOTS = XMASQ_POLICY_TABLE_SLOTS,
	XMASQ_BTF_POLICY_KEY_BYTES = XMASQ_POLICY_KEY_BYTES,
	XMASQ_BTF_NODE_SELF = XMASQ_NODE_SELF,
	XMASQ_BTF_IPS_SEEN_REPLY = XMASQ_IPS_SEEN_REPLY,
	XMASQ_BTF_IPS_SRC_NAT = XMASQ_IPS_SRC_NAT,
	XMASQ_BTF_IPS_DST_NAT = XMASQ_IPS_DST_NAT,
	XMASQ_BTF_TCP_CONNTRACK_ESTABLISHED = XMASQ_TCP_CONNTRACK_ESTABLISHED,
	XMASQ_BTF_CT_TCP_FLAG_BE_LIBERAL = XMASQ_CT_TCP_FLAG_BE_LIBERAL,
	XMASQ_BTF_CT_RECHECK_NS = XMASQ_CT_RECHECK_NS,
};

/* Types only user space reads: one member per enum no map or program variable names. */
struct xmasq_btf_export {
	enum xmasq_btf_consts consts;
	enum xmasq_counter counter;
	enum xmasq_policy_dir policy_dir;
	enum xmasq_redirect_kind redirect_kind;
	enum xmasq_probe_cb probe_cb;
};

#endif /* XMASQ_H */
