/**
 * Twin of bpf/init.h — NIC, TC egress. Learns from overlay packets our pods
 * send, as this host encapsulated them towards a node, allocates our key for the pair and signals it on the outer header.
 */
import { ConfigFlag, IP_DF, IP_RF, KEY_COUNT, KEY_MIN, KEY_TRIES, PolicyDir, WIDE_KEY_COUNT, WIDE_KEY_MIN } from '../../dataplane/maps.ts';
import {
  Hdrs, IPPROTO_UDP, Tunnel, isTunnelPort, type TunnelPorts, loadEthIpv4, loadTunnel, readMac, rewritable, rewriteIpv4,
} from './packet.ts';
import { policyDenied, policyDrop } from './policy.ts';
import { egressLookupOrCreate, isPeerNode, isSelf, xmasqNow, type DatapathState } from './maps.ts';
import { TC_CONTINUE, copyPacket, newEffects, type Env, type ModelIngressKey, type ModelPath, type ModelPodInfo, type RunEffects, type RunResult } from './state.ts';
import { pass } from './verdict.ts';

/** C: fast_path_eligible. masq carries only DSCP-0 packets whose checksums it can fix. */
export function fastPathEligible(cfg: TunnelPorts, h: Hdrs): boolean {
  return (h.tos >> 2) === 0 && rewritable(h) &&
    !(h.proto === IPPROTO_UDP && h.l4_ok && isTunnelPort(cfg, h.dport));
}

/**
 * C: key_still_ours. An ingress entry is ours only if it still restores to this pod pair (a
 * tombstone, ifindex 0, never does); signalling the key again refreshes it.
 */
function keyStillOurs(s: DatapathState, remoteHost: number, key: number, localPod: number, remotePod: number, now: bigint): boolean {
  const ik: ModelIngressKey = { remote_host: remoteHost, key };
  const r = s.ingress_cache.lookupElem(ik);
  if (!r || r.ifindex === 0 || r.local_ip !== localPod || r.remote_ip !== remotePod) return false;
  r.last_seen = now;
  return true;
}

/** The program's own copy of the packet, as BPF_PROG_TEST_RUN runs it. */
export function init(input: Buffer, s: DatapathState, env: Env): RunResult {
  const pkt = copyPacket(input);
  const fx = newEffects();
  return { verdict: initInPlace(pkt, s, env, fx), packet: pkt, effects: fx };
}

/** init on the caller's frame, in place; adds to fx.counters (masqInPlace). */
export function initInPlace(pkt: Buffer, s: DatapathState, env: Env, fx: RunEffects): number {
  return xmasqInit(pkt, s, env, fx);
}

function xmasqInit(pkt: Buffer, s: DatapathState, env: Env, fx: RunEffects): number {
  const outer = new Hdrs();
  const t = new Tunnel();

  // 1. An overlay packet, from a pod of ours (2) or of a pair we learned (fast path).
  if (loadEthIpv4(pkt, outer, env.vlanPresent) || loadTunnel(pkt, s.config, outer, t)) return pass(fx);
  const src = t.inner.saddr, dst = t.inner.daddr;
  const ek = { local_pod: src, remote_pod: dst };
  let pod: ModelPodInfo | undefined;

  // A learned pair's fast path: our own encapsulation (ingress_ifindex 0) of a pair whose
  // egress entry holds these very outer addresses and the pod's veth. Only a packet that
  // passed 2 and 3 wrote such an entry, and the agent deletes it when they stop holding
  // (caches.ts sweepNodes, purgePod): pod_info and both node lookups are skipped. An entry
  // without the veth (0) takes the checks, which record it.
  let e = (env.ingressIfindex ?? 0) === 0 ? s.egress_cache.lookupElem(ek) : undefined;
  if (!e || !e.ifindex || !e.local_ip || e.local_ip !== t.outer.saddr || !e.remote_ip || e.remote_ip !== t.outer.daddr) {
    pod = s.pod_info.lookupElem(src);
    if (!pod) return pass(fx);

    // 2. Only an overlay packet this host encapsulated itself (a tunnel device's transmit
    //    clears skb_iif), from one of its own addresses: not a pod's datagram to a tunnel
    //    port that the host forwards, whose payload is the pod's to write.
    if ((env.ingressIfindex ?? 0) !== 0 || !isSelf(s, t.outer.saddr)) {
      fx.counters.NOT_OURS++;
      return TC_CONTINUE;
    }
    // 3. Only towards a node of the overlay (the agent's node set).
    if (!isPeerNode(s, t.outer.daddr)) {
      fx.counters.PEER_NOT_NODE++;
      return TC_CONTINUE;
    }
  }

  // 4. Policy, egress: a denied flow loses its very first packet.
  if (policyDenied(s, src, dst, t.inner, PolicyDir.EGRESS)) return policyDrop(fx);

  // 5. Learn only pairs masq could carry.
  if (!fastPathEligible(s.config, t.inner)) return pass(fx);

  // 6. The egress entry for (our pod, remote pod), created empty if new.
  if (!e) e = egressLookupOrCreate(s, ek);
  if (!e) {
    fx.counters.FELL_BACK++;
    return TC_CONTINUE;
  }

  // 7. Remember the outer headers masq will write for this pair.
  const now = xmasqNow(s, env);
  e.local_mac = readMac(pkt, 6);
  e.remote_mac = readMac(pkt, 0);
  e.local_ip = t.outer.saddr;
  e.remote_ip = t.outer.daddr;
  // The local pod's veth, which masq holds the source to and the fast path requires (the checks just found the pod).
  if (pod) e.ifindex = pod.ifindex;
  // last_seen keeps the peer's key alive: only masq's packets and the peer's signals,
  // which also keep the peer's ingress entry alive, may refresh it while we hold one.
  if (!e.remote_key) e.last_seen = now;

  // 8. Our key for the pair; a key whose ingress entry is gone is drawn again.
  //    With wide keys on, every pair draws a wide key (TCP, UDP and ICMP echo carry them).
  if (e.local_key && !keyStillOurs(s, t.outer.daddr, e.local_key, src, dst, now)) e.local_key = 0;
  if (e.local_key === 0) {
    // The key's ingress entry restores into the pod: its veth and MAC (the fast path skipped them).
    if (!pod) pod = s.pod_info.lookupElem(src);
    if (!pod) return pass(fx);
    // C: a designated initializer; every field in struct order, as zeroPath gives them.
    const r: ModelPath = {
      last_seen: now,
      local_mac: pod.mac,
      remote_mac: readMac(pkt, t.inner_eth),
      local_ip: src,
      remote_ip: dst,
      ifindex: pod.ifindex,
      local_key: 0,
      remote_key: 0,
      remote_ready: 0,
    };
    const ik: ModelIngressKey = { remote_host: t.outer.daddr, key: 0 };
    const wide = (s.config.flags & ConfigFlag.WIDE_KEYS) !== 0;
    const min = wide ? WIDE_KEY_MIN : KEY_MIN;
    const n = wide ? WIDE_KEY_COUNT : KEY_COUNT;
    for (let i = 0; i < KEY_TRIES; i++) {
      const k = (env.random() % n) + min;
      ik.key = k;
      r.local_key = k;
      if (s.ingress_cache.updateElem(ik, r, 'noexist') === 0) {
        e.local_key = k;
        break;
      }
    }
    if (e.local_key === 0) {
      fx.counters.KEY_EXHAUSTED++;
      return TC_CONTINUE;
    }
  }

  // 9. Optimistic: restore clears it if the peer says it lacks our key.
  e.remote_ready = 1;

  // 10. Signal on the outer header: RF marks it, DF says we know theirs; a narrow
  //    key in DSCP, a wide one in the ID with DSCP 0. Segmentation gives every
  //    segment of a GSO packet its own ID, so a GSO packet carries no wide signal.
  let key = e.local_key;
  let id = t.outer.id;
  if (key >= WIDE_KEY_MIN) {
    if (env.gsoSize) {
      fx.counters.LEARNED++;
      return TC_CONTINUE;
    }
    id = key;
    key = 0;
  }
  let frag = (t.outer.frag & ~(IP_RF | IP_DF) & 0xffff) | IP_RF;
  if (e.remote_key) frag |= IP_DF;
  rewriteIpv4(pkt, 14, ((key << 2) | (t.outer.tos & 3)) & 0xff, id, frag, t.outer.saddr, t.outer.daddr);
  fx.counters.LEARNED++;
  return TC_CONTINUE;
}
