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

char LICENSE[] SEC("license") = "GPL";

/*
 * Gives struct xmasq_btf_export (xmasq.h) its BTF. A section of its own that
 * libbpf skips ("unrecognized data section"): no map is created for it and no
 * program can reach it, so the loaded datapath is the same without it.
 */
struct xmasq_btf_export xmasq_btf_export SEC(".xmasq.btf") __attribute__((used));
