/* SPDX-License-Identifier: GPL-2.0 */
/*
 * init — NIC, TC egress. Learns from overlay packets our pods send, as this
 * host encapsulated them, towards a node of the overlay: the outer
 * headers of the path to the remote pod's host, and a key under which that
 * host may later send us masqueraded packets. It tells the peer the key in
 * the outer IPv4 header of the same overlay packet.
 * Twin: sim/model/init.ts.
 */
#ifndef XMASQ_INIT_H
#define XMASQ_INIT_H

#include "maps.h"
#include "packet.h"
#include "policy.h"
#include "verdict.h"

/* masq can carry a pod packet only if its DSCP is 0 and it can fix its checksums. */
static __always_inline int fast_path_eligible(const struct config *cfg, const struct hdrs *h)
{
	return (h->tos >> 2) == 0 && rewritable(h) &&
	       !(h->proto == IPPROTO_UDP && h->l4_ok && is_tunnel_port(cfg, h->dport));
}

/*
 * An ingress entry is ours only if it still restores to this very pod pair (a
 * deleted pod's tombstone, ifindex 0, never does). Telling the peer the key
 * again promises that it restores, so the entry is refreshed too: it must not
 * idle out, and its key go to another pair, while the peer, which the signal
 * keeps sending under it, still masquerades with it.
 */
static __always_inline int key_still_ours(__u32 remote_host, __u16 key, __u32 local_pod,
					  __u32 remote_pod, __u64 now)
{
	struct ingress_key ik = { .remote_host = remote_host, .key = key };
	struct path *r = bpf_map_lookup_elem(&ingress_cache, &ik);
	if (!r || r->ifindex == 0 || r->local_ip != local_pod || r->remote_ip != remote_pod)
		return 0;
	r->last_seen = now;
	return 1;
}

static __always_inline int xmasq_init(struct __sk_buff *skb)
{
	struct hdrs outer = {};
	struct tunnel t = {};
	struct config *cfg = config_get();

	/* 1. An overlay packet, from a pod of ours (2) or of a pair we learned (fast path). */
	if (load_eth_ipv4(skb, &outer) || load_tunnel(skb, cfg, &outer, &t))
		return pass();
	__u32 src = t.inner.saddr, dst = t.inner.daddr;
	struct egress_key ek = { .local_pod = src, .remote_pod = dst };
	struct pod_info *pod = NULL;

	/*
	 * A learned pair's fast path: our own encapsulation (ingress_ifindex 0)
	 * of a pair whose egress entry holds these very outer addresses and the
	 * pod's veth. Only a packet that passed the checks of 2 and 3 wrote such
	 * an entry (7; restore records a peer node only), and the agent deletes it
	 * when they stop holding: when a scan finds the local address no longer
	 * ours or the peer no longer a node (dataplane/agent/caches.ts
	 * sweepNodes), and when the pod is deleted (purgePod). So the pod_info
	 * lookup and both node lookups are skipped (README "Threat model"). An
	 * entry without the veth (0: written before init recorded it) takes the
	 * checks, which record it.
	 */
	struct path *e = NULL;
	if (skb->ingress_ifindex == 0)
		e = bpf_map_lookup_elem(&egress_cache, &ek);
	if (!e || !e->ifindex || !e->local_ip || e->local_ip != t.outer.saddr || !e->remote_ip ||
	    e->remote_ip != t.outer.daddr) {
		pod = bpf_map_lookup_elem(&pod_info, &src);
		if (!pod)
			return pass();

		/*
		 * 2. Only an overlay packet this host encapsulated itself. A tunnel
		 * device's transmit scrubs the skb (skb_scrub_packet clears skb_iif),
		 * so our own encapsulation leaves with ingress_ifindex 0, from one of
		 * our addresses; a pod's UDP datagram to a tunnel port, which the host
		 * forwards, keeps the device it came in on. Its payload, path and key
		 * alike, is the pod's to write: learning from it would let a pod
		 * re-point its neighbours' pairs (README "Threat model"). It goes on
		 * untouched.
		 */
		if (skb->ingress_ifindex != 0 || !is_self(t.outer.saddr)) {
			count(XMASQ_CNT_NOT_OURS);
			return XMASQ_CONTINUE;
		}
		/* 3. Only towards a node of the overlay (the agent's node set). */
		if (!is_peer_node(t.outer.daddr)) {
			count(XMASQ_CNT_PEER_NOT_NODE);
			return XMASQ_CONTINUE;
		}
	}

	/* 4. Policy, egress: a denied flow loses its very first packet. */
	if (policy_denied(src, dst, &t.inner, XMASQ_DIR_EGRESS))
		return policy_drop();

	/* 5. Learn only pairs masq could carry. */
	if (!fast_path_eligible(cfg, &t.inner))
		return pass();

	/* 6. The egress entry for (our pod, remote pod), created empty if new. */
	if (!e)
		e = egress_lookup_or_create(&ek);
	if (!e) {
		count(XMASQ_CNT_FELL_BACK);
		return XMASQ_CONTINUE;
	}

	/* 7. Remember the outer headers masq will write for this pair. */
	void *data = skb_data(skb);
	void *data_end = skb_data_end(skb);
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return pass();
	__u64 now = xmasq_now();
	__builtin_memcpy(e->local_mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(e->remote_mac, eth->h_dest, ETH_ALEN);
	e->local_ip = t.outer.saddr;
	e->remote_ip = t.outer.daddr;
	/* The local pod's veth, which masq holds the source to (masq.h) and the fast path above requires (the checks just found the pod). */
	if (pod)
		e->ifindex = pod->ifindex;
	/*
	 * last_seen keeps the entry alive, and with it the peer's key. Only what
	 * also keeps the peer's ingress entry for that key alive may refresh it:
	 * masq's packets (restore refreshes the entry as they arrive) and the
	 * peer's signals (its init refreshes it as it sends them). An overlay
	 * packet of ours does neither, so while we hold a peer's key it leaves
	 * the stamp alone: else the entry could outlive the peer's, and masq use
	 * a key the peer has since given to another pair.
	 */
	if (!e->remote_key)
		e->last_seen = now;

	/*
	 * 8. Our key for the pair. A key whose ingress entry expired or was purged
	 * (pod deleted) is dropped and drawn again, so that the peer is never told
	 * a key that no longer restores to this pair. With wide keys on, every
	 * pair draws from the 16,320 wide keys: TCP, UDP and ICMP echo carry them
	 * (packet.h); the few packets no carrier fits stay on the overlay.
	 */
	if (e->local_key && !key_still_ours(t.outer.daddr, e->local_key, src, dst, now))
		e->local_key = 0;
	if (e->local_key == 0) {
		/* The key's ingress entry restores into the pod: its veth and MAC (the fast path skipped them). */
		if (!pod)
			pod = bpf_map_lookup_elem(&pod_info, &src);
		if (!pod)
			return pass();
		__u32 ie = t.inner_eth;
		if (ie > XMASQ_MAX_HDR_OFF)
			return pass();
		struct ethhdr *ieth = data + ie;
		if ((void *)(ieth + 1) > data_end)
			return pass();
		struct path r = {
			.last_seen = now,
			.local_ip = src,
			.remote_ip = dst,
			.ifindex = pod->ifindex,
		};
		__builtin_memcpy(r.local_mac, pod->mac, ETH_ALEN);
		__builtin_memcpy(r.remote_mac, ieth->h_dest, ETH_ALEN);
		struct ingress_key ik = { .remote_host = t.outer.daddr };
		int wide = cfg && (cfg->flags & XMASQ_CFG_WIDE_KEYS);
		__u32 min = wide ? XMASQ_WIDE_KEY_MIN : XMASQ_KEY_MIN;
		__u32 n = wide ? XMASQ_WIDE_KEY_COUNT : XMASQ_KEY_COUNT;

		for (int i = 0; i < XMASQ_KEY_TRIES; i++) {
			__u16 k = bpf_get_prandom_u32() % n + min;
			ik.key = k;
			r.local_key = k;
			if (bpf_map_update_elem(&ingress_cache, &ik, &r, BPF_NOEXIST) == 0) {
				e->local_key = k;
				break;
			}
		}
		if (e->local_key == 0) {
			count(XMASQ_CNT_KEY_EXHAUSTED);
			return XMASQ_CONTINUE;
		}
	}

	/* 9. Optimistic: restore clears it if the peer says it lacks our key. */
	e->remote_ready = 1;

	/*
	 * 10. Signal on the outer header: RF marks it, DF says whether we know the
	 * peer's key; a narrow key goes in DSCP, a wide one in the ID with DSCP 0.
	 * ECN stays as the overlay set it. The outer ID is the host's own (the
	 * receiver's kernel ignores it on an unfragmented datagram), but GSO
	 * gives each segment of a GSO packet its own ID (ID, ID+1, ...), which
	 * would tell the peer wrong keys: a GSO packet carries no wide signal.
	 */
	__u16 key = e->local_key;
	__u16 id = t.outer.id;
	if (key >= XMASQ_WIDE_KEY_MIN) {
		if (skb->gso_size) {
			count(XMASQ_CNT_LEARNED);
			return XMASQ_CONTINUE;
		}
		id = bpf_htons(key);
		key = 0;
	}
	data = skb_data(skb);
	data_end = skb_data_end(skb);
	struct iphdr *oip = data + ETH_HLEN;
	if ((void *)(oip + 1) > data_end)
		return pass();
	__u16 frag = (t.outer.frag & ~(XMASQ_IP_RF | XMASQ_IP_DF)) | XMASQ_IP_RF;
	if (e->remote_key)
		frag |= XMASQ_IP_DF;
	rewrite_ipv4(oip, (key << 2) | (t.outer.tos & 3), id, frag, t.outer.saddr, t.outer.daddr);
	count(XMASQ_CNT_LEARNED);
	return XMASQ_CONTINUE;
}

#endif /* XMASQ_INIT_H */
