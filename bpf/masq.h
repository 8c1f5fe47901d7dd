/* SPDX-License-Identifier: GPL-2.0 */
/*
 * masq — a pod's packets on their way out. A packet of a pod pair whose path
 * and keys are both learned is rewritten into a host-to-host packet and sent
 * straight to the NIC. Everything else continues to the overlay untouched.
 * Where it runs depends on the kernel (see xmasq.bpf.c): the pod-side veth's
 * TC egress with bpf_redirect_rpeer, or the host-side veth's TC ingress with
 * bpf_redirect. The rewrite is the same.
 * Twin: sim/model/masq.ts.
 */
#ifndef XMASQ_MASQ_H
#define XMASQ_MASQ_H

#include "maps.h"
#include "packet.h"
#include "policy.h"
#include "verdict.h"
#include "init.h"
#include "conntrack.h"

/*
 * Returns TC_ACT_REDIRECT with the NIC ifindex in *nic, or the verdict to
 * return. in_pod_netns: run in the pod's namespace (masq_rpeer), not the host's.
 */
static __always_inline int xmasq_masq(struct __sk_buff *skb, __u32 *nic, int in_pod_netns)
{
	struct hdrs h = {};

	/* 1. A pod's IPv4 packet that masq can carry: its IPv4 header first. */
	if (load_eth_ipv4_hdr(skb, &h))
		return pass();
	/*
	 * RF is our marker, which no conforming stack sets (RFC 791): a pod that
	 * sets it (a raw socket) forges a masqueraded packet or a signal, which a
	 * host masquerading pod traffic to the underlay (flannel's ip-masq) would
	 * send from its own, a node's, address. It never leaves the pod.
	 */
	if (h.frag & XMASQ_IP_RF) {
		count(XMASQ_CNT_POD_MARKED);
		return TC_ACT_SHOT;
	}
	struct config *cfg = config_get();
	if (!cfg || cfg->nic_ifindex == 0)
		return pass();
	/*
	 * A clear bit in the presence filter means no pair (maps.h): most of what
	 * a pod sends (to the internet, DNS, pods of this host) passes here, on
	 * its addresses alone, before its L4 header is read and without a hash
	 * lookup. A Service's request is filtered under the backend conntrack
	 * chose (step 2).
	 */
	int to_service = cfg->service_mask && (h.daddr & cfg->service_mask) == cfg->service_net;
	if (!to_service && !egress_filter_has(cfg, h.saddr, h.daddr))
		return pass();
	if (load_l4(skb, &h) || !fast_path_eligible(cfg, &h))
		return pass();
	/*
	 * Whose conntrack admits flows: the host's. In the pod's namespace it is
	 * named by the id the agent recorded for the source pod (xmasq.h). A pod
	 * forging another's address gets that pod's id; conntrack.h checks that
	 * the entry found is the host's all the same.
	 */
	__s32 netns_id = XMASQ_CT_CURRENT_NETNS;
	__u32 netns_ino = 0;
	struct pod_info *pod = NULL;
	if (in_pod_netns) {
		pod = bpf_map_lookup_elem(&pod_info, &h.saddr);
		netns_id = pod && pod->host_netns_id >= 0 ? pod->host_netns_id : XMASQ_CT_NO_NETNS;
		netns_ino = pod ? pod->host_netns_ino : 0;
	}

	/*
	 * 2. A Service's request goes where the host would send it: to the
	 * backend conntrack chose for the flow (its DNAT), if conntrack admits
	 * the flow. From here on h is the packet as the host would forward it,
	 * the port it carries written at step 6. Anything else to a Service
	 * stays on the overlay (through the stack, which NATs it).
	 */
	/*
	 * The clock (a map lookup and a load of jiffies; a helper call while
	 * the agent has not calibrated it) is read only by what needs it
	 * (admission, last_seen), never on the way to a pass.
	 */
	__u64 now = 0;
	struct ct_tuple to;
	int admit = XMASQ_CT_UNCHECKED;
	__u32 wire_daddr = h.daddr;
	__be16 wire_dport = h.dport;
	if (to_service) {
		now = xmasq_now();
		admit = ct_admit(skb, &h, h.saddr, h.daddr, now, netns_id, netns_ino, XMASQ_NAT_DST, &to);
		if (admit != XMASQ_CT_ADMIT)
			return pass();
		h.daddr = to.daddr;
		h.dport = to.dport;
		if (!egress_filter_has(cfg, h.saddr, h.daddr))
			return pass();
	}

	/*
	 * 3. A pair fully learned: path, both keys, and the peer knows ours. A
	 * set bit in the filter may be another pair's, or an entry gone since:
	 * the lookup decides.
	 */
	struct egress_key ek = { .local_pod = h.saddr, .remote_pod = h.daddr };
	struct path *e = bpf_map_lookup_elem(&egress_cache, &ek);
	if (!e)
		return pass();
	/*
	 * The source address must be the pod the packet came from: a pod that
	 * sends as its neighbour (a raw socket, an address it added) would
	 * otherwise ride the neighbour's pair past the host, wherever the
	 * host's conntrack admitted the neighbour's flow. Left on the overlay,
	 * not dropped: the host stack then sees it as it would without XMasq
	 * (rp_filter, the CNI's anti-spoofing, policy decide), so XMasq never
	 * changes what is delivered. veth mode runs on the pod's host-side
	 * veth, which no pod chooses, and holds the source to the veth the
	 * pair's entry records (xmasq.h) rather than look pod_info up (a
	 * helper call): init and restore write it from pod_info whenever they
	 * look the pod up, and the agent purges a pod's entries whenever its
	 * pod_info entry goes or changes. An entry pinned by an older version
	 * has ifindex 0: its packet falls back to the overlay, where init
	 * writes the veth for the next ones. masq_rpeer runs on the pod's own
	 * eth0, whose index may repeat in every pod's namespace, so it can
	 * only hold the frame's source to the pod's MAC (README "Threat
	 * model").
	 */
	if (in_pod_netns ? !pod || !eth_src_is(skb, pod->mac) : e->ifindex != skb->ifindex) {
		count(!in_pod_netns && e->ifindex == 0 ? XMASQ_CNT_FELL_BACK : XMASQ_CNT_SRC_NOT_POD);
		return XMASQ_CONTINUE;
	}
	if (!e->local_key || !e->remote_key || !e->remote_ready) {
		count(XMASQ_CNT_FELL_BACK);
		return XMASQ_CONTINUE;
	}

	/* 4. Policy, egress. */
	if (policy_denied(h.saddr, h.daddr, &h, XMASQ_DIR_EGRESS))
		return policy_drop();

	/*
	 * A wide key needs a carrier the pod left free (packet.h), and no GSO for
	 * UDP: segmentation rewrites each segment's length. A narrow key needs an
	 * echo's code left 0, which restore would read as a wide key's. (After
	 * the policy check: a denied packet counts as POLICY_DROP either way.)
	 */
	__u16 key = e->remote_key;
	int wide = key >= XMASQ_WIDE_KEY_MIN;
	if (wide ? !wide_carrier(&h) || h.carrier != carrier_free_value(&h) ||
			   (h.proto == IPPROTO_UDP && skb->gso_size)
		 : is_echo(&h) && carries_wide_key(&h)) {
		count(XMASQ_CNT_FELL_BACK);
		return XMASQ_CONTINUE;
	}

	/*
	 * 5. Only a flow the host stack has accepted, and would not NAT: the rest
	 * crosses the stack (its FORWARD rules, its conntrack) on the overlay.
	 */
	if (admit == XMASQ_CT_UNCHECKED) {
		now = xmasq_now();
		admit = ct_admit(skb, &h, h.saddr, h.daddr, now, netns_id, netns_ino, XMASQ_NAT_NONE,
				 &to);
		if (admit != XMASQ_CT_ADMIT) {
			count(admit);
			return XMASQ_CONTINUE;
		}
	}

	/*
	 * 6. Host MACs and IPs; the peer's key in DSCP (narrow) or in the
	 * carrier (wide); the pod's ECN kept; RF marks it. A Service's backend
	 * port (its address is the peer's to restore).
	 */
	__u8 dscp = wide ? dscp_with_key(&h, key) : key;
	if (rewrite_packet(skb, &h, e->remote_mac, e->local_mac, (dscp << 2) | (h.tos & 3),
			   h.frag | XMASQ_IP_RF, e->local_ip, e->remote_ip,
			   wide ? carrier_with_key(&h, key) : h.carrier))
		return TC_ACT_SHOT;
	if (h.dport != wire_dport && rewrite_port(skb, &h, XMASQ_DPORT_OFF, wire_dport, h.dport))
		return TC_ACT_SHOT;
	if (h.daddr != wire_daddr || h.dport != wire_dport)
		count(XMASQ_CNT_SERVICE_NAT);

	e->last_seen = now;
	count(XMASQ_CNT_MASQUERADED);
	*nic = cfg->nic_ifindex;
	return TC_ACT_REDIRECT;
}

#endif /* XMASQ_MASQ_H */
