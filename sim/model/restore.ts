/**
 * Twin of bpf/restore.h — NIC, TC ingress. Restores masqueraded packets into
 * their pods, learns peers' keys from signals, passes everything else.
 */
import { IP_DF, IP_RF, PolicyDir, WIDE_KEY_MAX, WIDE_KEY_MIN } from '../../dataplane/maps.ts';
import {
  IPPROTO_UDP, SPORT_OFF, carriedWideKey, carrierFreeValue, carriesWideKey, Hdrs, Tunnel, isTunnel, loadEthIpv4, loadTunnel, rewritable, rewritePacket,
  rewritePort,
} from './packet.ts';
import { macToBytes } from '../../dataplane/layout.ts';
import { policyDenied, policyDrop } from './policy.ts';
import { CT_ADMIT, CT_CURRENT_NETNS, NatSide, ctAdmit, newCtTo } from './conntrack.ts';
import { egressLookupOrCreate, isPeerNode, xmasqNow, type DatapathState } from './maps.ts';
import { TC_CONTINUE, TC_ACT_REDIRECT, TC_ACT_SHOT, copyPacket, newEffects, type Env, type RunEffects, type RunResult } from './state.ts';
import { pass } from './verdict.ts';

/** The program's own copy of the packet, as BPF_PROG_TEST_RUN runs it. */
export function restore(input: Buffer, s: DatapathState, env: Env): RunResult {
  const pkt = copyPacket(input);
  const fx = newEffects();
  return { verdict: restoreInPlace(pkt, s, env, fx), packet: pkt, effects: fx };
}

/** restore on the caller's frame, in place; adds to fx.counters and sets fx.redirect (masqInPlace). */
export function restoreInPlace(pkt: Buffer, s: DatapathState, env: Env, fx: RunEffects): number {
  return xmasqRestore(pkt, s, env, fx);
}

/**
 * C: to_host_stack. A restored pod packet the host stack must handle goes to
 * the overlay device's ingress, addressed to its MAC; without one, up the
 * stack at the NIC.
 */
function toHostStack(pkt: Buffer, s: DatapathState, fx: RunEffects): number {
  const cfg = s.config;
  if (cfg.overlay_ifindex === 0) return TC_CONTINUE;
  macToBytes(cfg.overlay_mac, pkt, 0);
  fx.redirect = { ifindex: cfg.overlay_ifindex, kind: 'INGRESS' };
  return TC_ACT_REDIRECT;
}

function restoreMiss(fx: RunEffects): number {
  fx.counters.RESTORE_MISS++;
  return TC_ACT_SHOT;
}

/** carrier: the value the pod sent (masq took a wide key only from a free one). */
function restoreMasqueraded(pkt: Buffer, s: DatapathState, env: Env, fx: RunEffects, h: Hdrs, key: number, carrier: number): number {
  // 1. Only a masqueraded packet carries RF; one we cannot restore is dropped.
  //    Only a node masquerades, under a key init gave it, and the agent tombstones the
  //    entries of an address that stops being a peer node (caches.ts sweepNodes): a hit
  //    needs no node lookup. On a miss the node set says which counter: a forgery from
  //    an address that is no node, or a miss.
  const ik = { remote_host: h.saddr, key };
  const r = s.ingress_cache.lookupElem(ik);
  // ifindex 0: a deleted pod's tombstone, which keeps its key taken (caches.ts).
  if (!r || r.ifindex === 0 || !rewritable(h)) {
    if (!isPeerNode(s, h.saddr)) {
      fx.counters.MARKED_NOT_NODE++;
      return TC_ACT_SHOT;
    }
    return restoreMiss(fx);
  }

  // 2. Policy on the packet as the pod will see it.
  if (policyDenied(s, r.remote_ip, r.local_ip, h, PolicyDir.INGRESS)) return policyDrop(fx);

  // 3. Whether the host's conntrack admits the flow, before the rewrite, which takes
  //    a Service's address from it: a backend's reply leaves with the Service's as its source.
  const now = xmasqNow(s, env);
  const to = newCtTo();
  const admit = ctAdmit(s, env, h, r.remote_ip, r.local_ip, CT_CURRENT_NETNS, 0, NatSide.SRC, to);
  const src = admit === CT_ADMIT ? to.saddr : r.remote_ip;

  // 4. Back to the pod packet: pod MACs and IPs, DSCP 0, no RF, its carrier.
  if (rewritePacket(pkt, h, r.local_mac, r.remote_mac, h.tos & 3, h.frag & ~IP_RF, src, r.local_ip, carrier)) return restoreMiss(fx);
  if (admit === CT_ADMIT && to.sport !== h.sport && rewritePort(pkt, h, SPORT_OFF, h.sport, to.sport)) return restoreMiss(fx);
  r.last_seen = now;

  // 5. A flow the host's conntrack does not admit goes up the host stack as the pod packet it now is.
  if (admit !== CT_ADMIT) {
    fx.counters[admit]++;
    return toHostStack(pkt, s, fx);
  }
  if (src !== r.remote_ip || to.sport !== h.sport) fx.counters.SERVICE_NAT++;

  // 6. Into the pod's namespace.
  fx.counters.RESTORED++;
  fx.redirect = { ifindex: r.ifindex, kind: 'PEER' };
  return TC_ACT_REDIRECT;
}

function learnFromOverlay(pkt: Buffer, s: DatapathState, env: Env, fx: RunEffects, outer: Hdrs): number {
  const t = new Tunnel();

  // 1. An overlay packet for one of our pods.
  if (loadTunnel(pkt, s.config, outer, t)) return pass(fx);
  const local = t.inner.daddr, remote = t.inner.saddr;
  const pod = s.pod_info.lookupElem(local);
  if (!pod) return pass(fx);

  // 2. Policy, ingress: the overlay path is enforced too, from the first packet.
  if (policyDenied(s, remote, local, t.inner, PolicyDir.INGRESS)) return policyDrop(fx);

  // 3. No signal: plain overlay traffic. A wide key rides in the ID under DSCP 0.
  if (!(t.outer.frag & IP_RF)) return pass(fx);
  let key = t.outer.tos >> 2;
  if (key === 0) {
    key = t.outer.id;
    if (key < WIDE_KEY_MIN || key > WIDE_KEY_MAX) return pass(fx);
  }

  // 4. Only the node the pair's peer pod lives on may tell us its key: the node our
  //    entry records, and a first signal only from a node of the overlay.
  const from = t.outer.saddr;
  if (!isPeerNode(s, from)) {
    fx.counters.SIGNAL_NOT_NODE++;
    return TC_CONTINUE;
  }
  const ek = { local_pod: local, remote_pod: remote };
  let e = s.egress_cache.lookupElem(ek);
  if (e && e.remote_ip && e.remote_ip !== from) {
    fx.counters.SIGNAL_WRONG_NODE++;
    return TC_CONTINUE;
  }

  // 5. The peer's key, into our egress entry for the reverse direction.
  if (!e) e = egressLookupOrCreate(s, ek);
  if (!e) {
    fx.counters.FELL_BACK++;
    return TC_CONTINUE;
  }
  if (!e.remote_ip) e.remote_ip = from;
  // The local pod's veth, which masq holds the source to.
  e.ifindex = pod.ifindex;
  e.remote_key = key;
  // The peer lacks our key: keep using the overlay, whose signals teach it.
  if (!(t.outer.frag & IP_DF)) e.remote_ready = 0;
  e.last_seen = xmasqNow(s, env);
  fx.counters.LEARNED++;
  return TC_CONTINUE;
}

function xmasqRestore(pkt: Buffer, s: DatapathState, env: Env, fx: RunEffects): number {
  const h = new Hdrs();

  if (loadEthIpv4(pkt, h, env.vlanPresent)) return pass(fx);
  // Overlay packets carry signals, never masqueraded pod packets (masq skips them).
  if (isTunnel(s.config, h)) return learnFromOverlay(pkt, s, env, fx, h);
  if (!(h.frag & IP_RF)) return pass(fx);
  // A wide key in the carrier: out of range it was damaged on the way; a UDP
  // datagram GRO merged had its length (the key) rewritten.
  if (carriesWideKey(h)) {
    const key = carriedWideKey(h);
    if (key < WIDE_KEY_MIN || key > WIDE_KEY_MAX || (h.proto === IPPROTO_UDP && !!env.gsoSize)) return restoreMiss(fx);
    return restoreMasqueraded(pkt, s, env, fx, h, key, carrierFreeValue(h));
  }
  // A narrow key in DSCP; the carrier is the pod's.
  if (h.tos >> 2) return restoreMasqueraded(pkt, s, env, fx, h, h.tos >> 2, h.carrier);
  return pass(fx);
}
