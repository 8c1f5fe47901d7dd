// SPDX-License-Identifier: GPL-2.0
/*
 * The XMasq datapath: one object, every program, every map.
 * Built three ways (see Makefile): production, test (small maps and a
 * redirect trace) and, with XMASQ_RPEER, for kernels with bpf_redirect_rpeer.
 */
#include "init.h"
#include "restore.h"
#include "masq.h"

SEC("tc")
int init(struct __sk_buff *skb)
{
	return xmasq_init(skb);
}

SEC("tc")
int restore(struct __sk_buff *skb)
{
	return xmasq_restore(skb);
}

/*
 * Stock kernels: attached at the TC ingress of the pod's HOST-side veth, where
 * the pod's packets arrive after one veth crossing, and sent to the NIC's egress.
 */
SEC("tc")
int masq(struct __sk_buff *skb)
{
	__u32 nic = 0;
	int verdict = xmasq_masq(skb, &nic, 0);
	if (verdict != TC_ACT_REDIRECT)
		return verdict;
	trace_redirect(nic, XMASQ_REDIRECT_EGRESS);
	return bpf_redirect(nic, 0);
}

#ifdef XMASQ_RPEER
/* Declared by kernel-patch/: a kfunc, so no uapi helper id moves. */
extern long bpf_redirect_rpeer(__u32 ifindex, __u64 flags) __ksym;

/*
 * rpeer kernels: attached at the TC egress of the pod's own eth0, inside the
 * pod's namespace; the helper sends the packet to the NIC's egress in the
 * namespace of the veth's peer, without crossing the veth at all.
 */
SEC("tc")
int masq_rpeer(struct __sk_buff *skb)
{
	__u32 nic = 0;
	int verdict = xmasq_masq(skb, &nic, 1);
	if (verdict != TC_ACT_REDIRECT)
		return verdict;
	trace_redirect(nic, XMASQ_REDIRECT_RPEER);
	return bpf_redirect_rpeer(nic, 0);
}
#endif

/*
 * Never attached: the agent runs it with BPF_PROG_TEST_RUN to calibrate the
 * clock map (dataplane/agent/clock.ts). jiffies and the coarse clock read in
 * one run, a few instructions apart, into cb[] (enum xmasq_probe_cb), which
 * the test run hands back.
 */
SEC("tc")
int clock_probe(struct __sk_buff *skb)
{
	__u64 j = bpf_jiffies64();
	__u64 ns = bpf_ktime_get_coarse_ns();

	skb->cb[XMASQ_PROBE_JIFFIES_LO] = (__u32)j;
	skb->cb[XMASQ_PROBE_JIFFIES_HI] = (__u32)(j >> 32);
	skb->cb[XMASQ_PROBE_COARSE_LO] = (__u32)ns;
	skb->cb[XMASQ_PROBE_COARSE_HI] = (__u32)(ns >> 32);
	return XMASQ_CONTINUE;
}

char LICENSE[] SEC("license") = "GPL";

/*
 * Gives struct xmasq_btf_export (xmasq.h) its BTF. A section of its own that
 * libbpf skips ("unrecognized data section"): no map is created for it and no
 * program can reach it, so the loaded datapath is the same without it.
 */
struct xmasq_btf_export xmasq_btf_export SEC(".xmasq.btf") __attribute__((used));
