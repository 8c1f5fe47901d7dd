/**
 * Twin of bpf/masq.h — a pod's packets on their way out. A packet of a fully
 * learned pair becomes a host-to-host packet sent straight to the NIC.
 */
import { IP_RF, NO_SERVICES, PolicyDir, WIDE_KEY_MIN, type RedirectKindName } from '../../dataplane/maps.ts';
import { DPORT_OFF, IPPROTO_UDP, carrierFreeValue, carrierWithKey, carriesWideKey, dscpWithKey, Hdrs, isEcho, loadEthIpv4Hdr, loadL4, readMac, rewritePacket, rewritePort, wideCarrier } from './packet.ts';
import { fastPathEligible } from './init.ts';
import { policyDenied, policyDrop } from './policy.ts';
import { CT_ADMIT, CT_CURRENT_NETNS, CT_NO_NETNS, NatSide, ctAdmit, ipWord, newCtTo, type CtVerdict } from './conntrack.ts';
import { egressFilterHas, xmasqNow, type DatapathState } from './maps.ts';
import { TC_CONTINUE, TC_ACT_REDIRECT, TC_ACT_SHOT, copyPacket, newEffects, type Env, type RunEffects, type RunResult } from './state.ts';
import { pass } from './verdict.ts';

/**
 * The same rewrite serves both attach points; only the redirect differs:
 * 'EGRESS' is bpf_redirect from the host-side veth, 'RPEER' the rpeer kfunc.
 * The program's own copy of the packet, as BPF_PROG_TEST_RUN runs it.
 */
export function masq(input: Buffer, s: DatapathState, env: Env, kind: RedirectKindName = 'EGRESS'): RunResult {
  const pkt = copyPacket(input);
  const fx = newEffects();
  return { verdict: masqInPlace(pkt, s, env, fx, kind), packet: pkt, effects: fx };
}

/**
 * masq on the caller's frame, rewritten in place, as the kernel runs it on an
 * skb: the counters it bumps are added to fx.counters (as to the counters
 * map), and fx.redirect is set when it redirects.
 */
export function masqInPlace(pkt: Buffer, s: DatapathState, env: Env, fx: RunEffects, kind: RedirectKindName = 'EGRESS'): number {
  return xmasqMasq(pkt, s, env, fx, kind);
}

/** C: XMASQ_CT_UNCHECKED. */
const CT_UNCHECKED = 'UNCHECKED';

/**
 * C: cfg->service_mask && (h.daddr & cfg->service_mask) == cfg->service_net. The
 * model's config holds the range as text (maps.ts Config): its words are read here,
 * at each packet, rather than kept between runs.
 */
function inServiceRange(net: string, mask: string, daddr: number): boolean {
  if (mask === NO_SERVICES.service_mask) return false;
  const m = ipWord(mask);
  return m !== 0 && ((daddr & m) >>> 0) === ipWord(net);
}

function xmasqMasq(pkt: Buffer, s: DatapathState, env: Env, fx: RunEffects, kind: RedirectKindName): number {
  const h = new Hdrs();
  const to = newCtTo();

  // 1. A pod's IPv4 packet that masq can carry: its IPv4 header first.
  if (loadEthIpv4Hdr(pkt, h, env.vlanPresent)) return pass(fx);
  // RF is our marker, which no conforming stack sets: a pod that sets it forges a
  // masqueraded packet or a signal. It never leaves the pod.
  if (h.frag & IP_RF) {
    fx.counters.POD_MARKED++;
    return TC_ACT_SHOT;
  }
  const cfg = s.config;
  if (cfg.nic_ifindex === 0) return pass(fx);
  // A clear bit in the presence filter means no pair: pass on the addresses alone,
  // before the L4 header is read. A Service's request is filtered under its backend.
  const toService = inServiceRange(cfg.service_net, cfg.service_mask, h.daddr);
  if (!toService && !egressFilterHas(s, h.saddr, h.daddr)) return pass(fx);
  if (loadL4(pkt, h) || !fastPathEligible(cfg, h)) return pass(fx);
  // Whose conntrack admits flows: the host's. In the pod's namespace (RPEER) it is
  // named by the id the agent recorded for the source pod; conntrack.ts checks
  // that the entry found is the host's all the same.
  let netnsId = CT_CURRENT_NETNS, netnsIno = 0;
  const pod = kind === 'RPEER' ? s.pod_info.lookupElem(h.saddr) : undefined;
  if (kind === 'RPEER') {
    netnsId = pod && pod.host_netns_id >= 0 ? pod.host_netns_id : CT_NO_NETNS;
    netnsIno = pod ? pod.host_netns_ino : 0;
  }

  // 2. A Service's request goes where the host would send it: to the backend
  //    conntrack chose (its DNAT), if conntrack admits the flow. From here on h is
  //    the packet as the host would forward it; the port it carries is written at step 6.
  const now = xmasqNow(s, env);
  let admit: CtVerdict | typeof CT_UNCHECKED = CT_UNCHECKED;
  const wireDaddr = h.daddr, wireDport = h.dport;
  if (toService) {
    admit = ctAdmit(s, env, h, h.saddr, h.daddr, netnsId, netnsIno, NatSide.DST, to);
    if (admit !== CT_ADMIT) return pass(fx);
    h.daddr = to.daddr;
    h.dport = to.dport;
    if (!egressFilterHas(s, h.saddr, h.daddr)) return pass(fx);
  }

  // 3. A pair fully learned: path, both keys, and the peer knows ours. A set bit may
  //    be another pair's, or an entry gone since: the lookup decides.
  const ek = { local_pod: h.saddr, remote_pod: h.daddr };
  const e = s.egress_cache.lookupElem(ek);
  if (!e) return pass(fx);
  // The source must be the pod the packet came from (a pod sending as its neighbour
  // is left on the overlay, where the host sees it as without XMasq): veth mode
  // holds it to the device it runs on, which must be the local pod's veth the entry
  // records (init and restore write it from pod_info; 0 in an entry of an older
  // version, which falls back), masq_rpeer to the pod's MAC.
  if (kind === 'RPEER' ? !pod || readMac(pkt, 6) !== pod.mac : e.ifindex !== (env.ifindex || 1)) {
    if (kind !== 'RPEER' && e.ifindex === 0) fx.counters.FELL_BACK++;
    else fx.counters.SRC_NOT_POD++;
    return TC_CONTINUE;
  }
  if (!e.local_key || !e.remote_key || !e.remote_ready) {
    fx.counters.FELL_BACK++;
    return TC_CONTINUE;
  }

  // 4. Policy, egress.
  if (policyDenied(s, h.saddr, h.daddr, h, PolicyDir.EGRESS)) return policyDrop(fx);

  // A wide key needs a carrier the pod left free, and no GSO for UDP; a narrow
  // key needs an echo's code left 0. (After policy: a denied packet counts POLICY_DROP.)
  const key = e.remote_key;
  const wide = key >= WIDE_KEY_MIN;
  if (wide ? !wideCarrier(h) || h.carrier !== carrierFreeValue(h) || (h.proto === IPPROTO_UDP && !!env.gsoSize)
    : isEcho(h) && carriesWideKey(h)) {
    fx.counters.FELL_BACK++;
    return TC_CONTINUE;
  }

  // 5. Only a flow the host stack has accepted, and would not NAT.
  if (admit === CT_UNCHECKED) {
    admit = ctAdmit(s, env, h, h.saddr, h.daddr, netnsId, netnsIno, NatSide.NONE, to);
    if (admit !== CT_ADMIT) {
      fx.counters[admit]++;
      return TC_CONTINUE;
    }
  }

  // 6. Host MACs and IPs; the peer's key in DSCP (narrow) or in the carrier
  //    (wide); the pod's ECN kept; RF marks it. A Service's backend port.
  const dscp = wide ? dscpWithKey(h, key) : key;
  if (rewritePacket(pkt, h, e.remote_mac, e.local_mac, (dscp << 2) | (h.tos & 3), h.frag | IP_RF, e.local_ip, e.remote_ip,
    wide ? carrierWithKey(h, key) : h.carrier)) return TC_ACT_SHOT;
  if (h.dport !== wireDport && rewritePort(pkt, h, DPORT_OFF, wireDport, h.dport)) return TC_ACT_SHOT;
  if (h.daddr !== wireDaddr || h.dport !== wireDport) fx.counters.SERVICE_NAT++;

  e.last_seen = now;
  fx.counters.MASQUERADED++;
  fx.redirect = { ifindex: cfg.nic_ifindex, kind };
  return TC_ACT_REDIRECT;
}
