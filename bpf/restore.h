/* SPDX-License-Identifier: GPL-2.0 */
/*
 * restore — NIC, TC ingress. (a) Turns a masqueraded packet back into the pod
 * packet it was and puts it straight into the pod with bpf_redirect_peer.
 * (b) Learns the peer's key from a signal on an incoming overlay packet.
 * Both only from nodes of the overlay (the agent's node set), a signal only
 * from the node the pair's peer pod lives on.
 * Everything else passes untouched.
 * Twin: sim/model/restore.ts.
 */
#ifndef XMASQ_RESTORE_H
#define XMASQ_RESTORE_H

#include "maps.h"
#include "packet.h"
#include "policy.h"
#include "verdict.h"
#include "conntrack.h"

/*
 * A restored pod packet the host stack must handle (conntrack.h), handed to it
 * as the overlay would have: received on the overlay device, addressed to its
 * MAC. The stack then sees the interface and addresses it always sees for
 * this pod pair: conntrack reverses a Service's NAT, FORWARD's rules and
 * rp_filter (strict mode included: the route to the remote pod is the
 * overlay's) apply as without XMasq. Without an overlay device configured, it
 * goes up the stack at the NIC, where a strict rp_filter would drop it.
 */
static __always_inline int to_host_stack(struct __sk_buff *skb, const struct config *cfg)
{
	if (!cfg || cfg->overlay_ifindex == 0)
		return XMASQ_CONTINUE;
	if (bpf_skb_store_bytes(skb, 0, cfg->overlay_mac, ETH_ALEN, 0))
		return TC_ACT_SHOT;
	trace_redirect(cfg->overlay_ifindex, XMASQ_REDIRECT_INGRESS);
	return bpf_redirect(cfg->overlay_ifindex, BPF_F_INGRESS);
}

static __always_inline int restore_miss(void)
{
	count(XMASQ_CNT_RESTORE_MISS);
	return TC_ACT_SHOT;
}

/* carrier: the value the pod sent (masq took a wide key only from a free one). */
static __always_inline int restore_masqueraded(struct __sk_buff *skb, const struct config *cfg,
					       struct hdrs *h, __u16 key, __u16 carrier)
{
	/*
	 * 1. Only a masqueraded packet carries RF, so it is not host traffic;
	 * one we cannot restore is dropped, never handed to the host stack,
	 * where it could reach a host socket bound to the pod's port. Only a
	 * node of the overlay masquerades, under a key init gave that node: the
	 * ingress key is (node, key), and init creates entries only towards a
	 * peer node. The agent tombstones a node's entries when a scan finds it
	 * no longer a peer (dataplane/agent/caches.ts sweepNodes), so a live
	 * entry's host is a peer node and a hit needs no node lookup (README
	 * "Threat model"). What cannot be restored is dropped either way; the
	 * node set only says which counter: a forgery from an address that is no
	 * node, or a miss.
	 */
	struct ingress_key ik = { .remote_host = h->saddr, .key = key };
	struct path *r = bpf_map_lookup_elem(&ingress_cache, &ik);
	/* ifindex 0: a deleted pod's tombstone, which keeps its key taken (caches.ts). */
	if (!r || r->ifindex == 0 || !rewritable(h)) {
		if (!is_peer_node(h->saddr)) {
			count(XMASQ_CNT_MARKED_NOT_NODE);
			return TC_ACT_SHOT;
		}
		return restore_miss();
	}

	/* 2. Policy on the packet as the pod will see it. */
	if (policy_denied(r->remote_ip, r->local_ip, h, XMASQ_DIR_INGRESS))
		return policy_drop();

	/*
	 * 3. Whether the host's conntrack admits the flow (conntrack.h), before
	 * the rewrite, which takes a Service's address from it: a backend's
	 * reply to a client of ours leaves the host with the Service's address
	 * and port as its source.
	 */
	__u64 now = xmasq_now();
	struct ct_tuple to;
	int admit = ct_admit(skb, h, r->remote_ip, r->local_ip, now, XMASQ_CT_CURRENT_NETNS, 0,
			     XMASQ_NAT_SRC, &to);
	__u32 src = admit == XMASQ_CT_ADMIT ? to.saddr : r->remote_ip;

	/* 4. Back to the pod packet: pod MACs and IPs, DSCP 0 (the pod's own), no RF, its carrier. */
	if (rewrite_packet(skb, h, r->local_mac, r->remote_mac, h->tos & 3,
			   h->frag & ~XMASQ_IP_RF, src, r->local_ip, carrier))
		return restore_miss();
	if (admit == XMASQ_CT_ADMIT && to.sport != h->sport &&
	    rewrite_port(skb, h, XMASQ_SPORT_OFF, h->sport, to.sport))
		return restore_miss();
	r->last_seen = now;

	/*
	 * 5. A flow the host's conntrack does not admit goes up the host stack as
	 * the pod packet it now is, as if the overlay had delivered it: conntrack
	 * reverses a NAT, FORWARD's policy rules see it. It never reaches a host
	 * socket as ours: its addresses are the pods' again.
	 */
	if (admit != XMASQ_CT_ADMIT) {
		count(admit);
		return to_host_stack(skb, cfg);
	}
	if (src != r->remote_ip || to.sport != h->sport)
		count(XMASQ_CNT_SERVICE_NAT);

	/* 6. Into the pod's namespace, skipping the host stack and the veth. */
	count(XMASQ_CNT_RESTORED);
	trace_redirect(r->ifindex, XMASQ_REDIRECT_PEER);
	return bpf_redirect_peer(r->ifindex, 0);
}

static __always_inline int learn_from_overlay(struct __sk_buff *skb, const struct config *cfg,
					      struct hdrs *outer)
{
	struct tunnel t = {};

	/* 1. An overlay packet for one of our pods. */
	if (load_tunnel(skb, cfg, outer, &t))
		return pass();
	__u32 local = t.inner.daddr, remote = t.inner.saddr;
	struct pod_info *pod = bpf_map_lookup_elem(&pod_info, &local);
	if (!pod)
		return pass();

	/* 2. Policy, ingress: the overlay path is enforced too, from the first packet. */
	if (policy_denied(remote, local, &t.inner, XMASQ_DIR_INGRESS))
		return policy_drop();

	/* 3. No signal: plain overlay traffic. A wide key rides in the ID under DSCP 0. */
	if (!(t.outer.frag & XMASQ_IP_RF))
		return pass();
	__u16 key = t.outer.tos >> 2;
	if (key == 0) {
		key = bpf_ntohs(t.outer.id);
		if (key < XMASQ_WIDE_KEY_MIN || key > XMASQ_WIDE_KEY_MAX)
			return pass();
	}

	/*
	 * 4. Only the node the pair's peer pod lives on may tell us its key: the
	 * node our entry records (init's path, or the first signal's source),
	 * and a first signal only from a node of the overlay. Anyone else's
	 * signal would blackhole the pair, or point it at a key that restores
	 * into another pod (README "Threat model"). The packet itself goes on to
	 * the overlay device, as without us.
	 */
	__u32 from = t.outer.saddr;
	if (!is_peer_node(from)) {
		count(XMASQ_CNT_SIGNAL_NOT_NODE);
		return XMASQ_CONTINUE;
	}
	struct egress_key ek = { .local_pod = local, .remote_pod = remote };
	struct path *e = bpf_map_lookup_elem(&egress_cache, &ek);
	if (e && e->remote_ip && e->remote_ip != from) {
		count(XMASQ_CNT_SIGNAL_WRONG_NODE);
		return XMASQ_CONTINUE;
	}

	/* 5. The peer's key, into our egress entry for the reverse direction. */
	if (!e)
		e = egress_lookup_or_create(&ek);
	if (!e) {
		count(XMASQ_CNT_FELL_BACK);
		return XMASQ_CONTINUE;
	}
	if (!e->remote_ip)
		e->remote_ip = from;
	/* The local pod's veth, which masq holds the source to (masq.h). */
	e->ifindex = pod->ifindex;
	e->remote_key = key;
	/* The peer lacks our key: keep using the overlay, whose signals teach it. */
	if (!(t.outer.frag & XMASQ_IP_DF))
		e->remote_ready = 0;
	e->last_seen = xmasq_now();
	count(XMASQ_CNT_LEARNED);
	return XMASQ_CONTINUE;
}

static __always_inline int xmasq_restore(struct __sk_buff *skb)
{
	struct hdrs h = {};

	if (load_eth_ipv4(skb, &h))
		return pass();
	/* Overlay packets carry signals, never masqueraded pod packets (masq skips them). */
	struct config *cfg = config_get();
	if (is_tunnel(cfg, &h))
		return learn_from_overlay(skb, cfg, &h);
	if (!(h.frag & XMASQ_IP_RF))
		return pass();
	/*
	 * A wide key in the carrier. Out of range it was damaged on the way (an
	 * underlay that zeroes urgent pointers); a UDP datagram that GRO merged
	 * had its length rewritten (the key lost).
	 */
	if (carries_wide_key(&h)) {
		__u16 key = carried_wide_key(&h);
		if (key < XMASQ_WIDE_KEY_MIN || key > XMASQ_WIDE_KEY_MAX ||
		    (h.proto == IPPROTO_UDP && skb->gso_size))
			return restore_miss();
		return restore_masqueraded(skb, cfg, &h, key, carrier_free_value(&h));
	}
	/* A narrow key in DSCP; the carrier is the pod's. */
	if (h.tos >> 2)
		return restore_masqueraded(skb, cfg, &h, h.tos >> 2, h.carrier);
	return pass();
}

#endif /* XMASQ_RESTORE_H */
