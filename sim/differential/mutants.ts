/**
 * Proof that the differential run bites: each mutant is a deliberate bug
 * planted in a copy of sim/model/ (source text, so the model itself carries no
 * test hooks). Every mutant must make the differential run report a mismatch.
 */
import { cpSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { commandLine, intOption, usageError } from '../../testing/args.ts';
import type { ModelProgram } from './compare.ts';
import { differentialRun } from './run.ts';
import type { ProgramName } from './statespec.ts';

export interface Mutant {
  name: string;
  file: string; // in sim/model/
  from: string; // must occur exactly once
  to: string;
}

export const MUTANTS: Mutant[] = [
  { name: 'skip the L4 checksum update', file: 'packet.ts',
    from: 'if (!isFirstFragment(h) || !h.l4_ok) return 0;', to: 'return 0;' },
  { name: 'wrong key bits in masq', file: 'masq.ts',
    from: '(dscp << 2) | (h.tos & 3)', to: '(dscp << 1) | (h.tos & 3)' },
  { name: 'forget the policy check in masq', file: 'masq.ts',
    from: 'if (policyDenied(s, h.saddr, h.daddr, h, PolicyDir.EGRESS)) return policyDrop(fx);', to: '' },
  { name: 'forget the policy check in restore', file: 'restore.ts',
    from: 'if (policyDenied(s, r.remote_ip, r.local_ip, h, PolicyDir.INGRESS)) return policyDrop(fx);', to: '' },
  { name: "policy: an address's last byte not read (addresses matched to /24 at best)", file: 'policy.ts',
    from: 'const byte = pos < 8 ? key[pos] : key[8 + (pos & 7)];', to: 'const byte = pos === 3 || pos === 7 ? 0 : pos < 8 ? key[pos] : key[8 + (pos & 7)];' },
  { name: 'policy: the walk ignores the ports (a rule for one port denies every port)', file: 'policy.ts',
    from: 'proto, dport >>> 8, dport & 255, sport >>> 8, sport & 255, 0, 0, 0];', to: 'proto, 0, 0, 0, 0, 0, 0, 0];' },
  { name: 'policy: the source port read as the destination port', file: 'policy.ts',
    from: 'proto, dport >>> 8, dport & 255, sport >>> 8, sport & 255, 0, 0, 0];', to: 'proto, sport >>> 8, sport & 255, sport >>> 8, sport & 255, 0, 0, 0];' },
  { name: 'policy: the protocol left out of the key (every packet taken for TCP)', file: 'policy.ts',
    from: 'proto, dport >>> 8, dport & 255, sport >>> 8, sport & 255, 0, 0, 0];', to: '6, dport >>> 8, dport & 255, sport >>> 8, sport & 255, 0, 0, 0];' },
  { name: "policy: one direction's start for both", file: 'policy.ts',
    from: 'return dir === PolicyDir.INGRESS ? s.policy_start.ingress : s.policy_start.egress;', to: 'return s.policy_start.egress;' },
  { name: 'policy: a step reads the byte after the one its slot names', file: 'policy.ts',
    from: 'const pos = next >>> POLICY_POS_SHIFT;', to: 'const pos = (next >>> POLICY_POS_SHIFT) + 1;' },
  { name: 'policy: the walk stops one step short (no sport for a rule naming all five)', file: 'policy.ts',
    from: 'for (let i = 0; i < POLICY_KEY_BYTES; i++) {', to: 'for (let i = 0; i < POLICY_KEY_BYTES - 1; i++) {' },
  { name: 'policy: a start of DENY taken for no rules (a deny-all rule allows)', file: 'policy.ts',
    from: 'if (start === POLICY_ALLOW) return false;', to: 'if (start === POLICY_ALLOW || start === POLICY_DENY) return false;' },
  { name: 'policy: addresses looked up in memory byte order', file: 'policy.ts',
    from: 'policyWalk(s, start, addrValue(src), addrValue(dst),', to: 'policyWalk(s, start, src, dst,' },
  { name: 'wrong MAC order in restore', file: 'restore.ts',
    from: 'rewritePacket(pkt, h, r.local_mac, r.remote_mac,', to: 'rewritePacket(pkt, h, r.remote_mac, r.local_mac,' },
  { name: 'accept key 0 in restore', file: 'restore.ts',
    from: 'if (h.tos >> 2) return', to: 'if ((h.tos >> 2) || !carriesWideKey(h)) return' },
  { name: 'draw key 0 in init', file: 'init.ts',
    from: '(env.random() % n) + min', to: '(env.random() % (n + 1)) + min - 1' },
  { name: 'ignore IPv4 options (assume IHL 5)', file: 'packet.ts',
    from: 'const hlen = ihl * 4;', to: 'const hlen = 20;' },
  { name: 'rewrite L4 of non-first fragments', file: 'packet.ts',
    from: 'if (!isFirstFragment(h) || !h.l4_ok) return 0;', to: 'if (!h.l4_ok && isFirstFragment(h)) return 0;' },
  { name: 'lose the pod ECN bits in masq', file: 'masq.ts',
    from: '(dscp << 2) | (h.tos & 3)', to: '(dscp << 2)' },
  { name: 'ignore remote_ready in masq', file: 'masq.ts',
    from: '!e.local_key || !e.remote_key || !e.remote_ready', to: '!e.local_key || !e.remote_key' },
  { name: 'inverted DF in the signal', file: 'init.ts',
    from: 'if (e.remote_key) frag |= IP_DF;', to: 'if (!e.remote_key) frag |= IP_DF;' },
  { name: 'no UDP length check on the tunnel', file: 'packet.ts',
    from: 'if (ulen < 8 || l4 + ulen > outer.end) return -1;', to: '' },
  // The wide keys: carriers (urgent pointer, UDP length, echo code), outer ID, the flag.
  { name: 'carrier not restored', file: 'restore.ts',
    from: 'key, carrierFreeValue(h));', to: 'key, h.carrier);' },
  { name: 'carrier change not in the checksum', file: 'packet.ts',
    from: 'if (carrierChanged) l4CsumReplace2(', to: 'if (false) l4CsumReplace2(' },
  { name: "UDP's no-checksum 0 mangled by the carrier", file: 'packet.ts',
    from: 'h.carrier, carrier, h.proto === IPPROTO_UDP);', to: 'h.carrier, carrier, false);' },
  { name: 'wide key in a pointer URG makes meaningful', file: 'packet.ts',
    from: 'return !(h.tcp_flags & TCP_FLAG_URG);', to: 'return true;' },
  { name: 'wide key over a carrier the pod uses', file: 'masq.ts',
    from: ' || h.carrier !== carrierFreeValue(h)', to: '' },
  { name: 'wide key in the length of a UDP GSO packet', file: 'masq.ts',
    from: ' || (h.proto === IPPROTO_UDP && !!env.gsoSize)', to: '' },
  { name: 'narrow key on an echo with a code', file: 'masq.ts',
    from: ': isEcho(h) && carriesWideKey(h)) {', to: ': false) {' },
  { name: 'wide key in any ICMP message', file: 'packet.ts',
    from: 'return h.proto === IPPROTO_UDP || isEcho(h);', to: 'return h.proto === IPPROTO_UDP || h.proto === IPPROTO_ICMP;' },
  { name: 'wide key bits out of DSCP', file: 'packet.ts',
    from: 'return ((h.carrier & 0xff) << 6) | (h.tos >> 2);', to: 'return (h.carrier & 0xff) << 6;' },
  { name: 'carrier below the wide keys restored', file: 'restore.ts',
    from: 'if (key < WIDE_KEY_MIN || key > WIDE_KEY_MAX || (h.proto', to: 'if (key > WIDE_KEY_MAX || (h.proto' },
  { name: 'a GRO-merged UDP datagram restored', file: 'restore.ts',
    from: ' || (h.proto === IPPROTO_UDP && !!env.gsoSize)) return restoreMiss(fx);', to: ') return restoreMiss(fx);' },
  { name: 'outer ID below the wide keys taken as a signal', file: 'restore.ts',
    from: 'if (key < WIDE_KEY_MIN || key > WIDE_KEY_MAX) return pass(fx);', to: 'if (key === 0 || key > WIDE_KEY_MAX) return pass(fx);' },
  { name: 'wide keys only for TCP', file: 'init.ts',
    from: 'const wide = (s.config.flags & ConfigFlag.WIDE_KEYS) !== 0;', to: 'const wide = (s.config.flags & ConfigFlag.WIDE_KEYS) !== 0 && t.inner.proto === 6;' },
  { name: 'wide keys whatever the config says', file: 'init.ts',
    from: 'const wide = (s.config.flags & ConfigFlag.WIDE_KEYS) !== 0;', to: 'const wide = true;' },
  { name: 'wide signal on a GSO packet', file: 'init.ts',
    from: 'if (env.gsoSize) {', to: 'if (false) {' },
  // Stale keys: tombstones and refreshes (the cluster simulator's finds).
  { name: 'restore through a tombstone', file: 'restore.ts',
    from: 'if (!r || r.ifindex === 0 || !rewritable(h))', to: 'if (!r || !rewritable(h))' },
  { name: 'a tombstone taken for the pair\'s key', file: 'init.ts',
    from: 'if (!r || r.ifindex === 0 || r.local_ip', to: 'if (!r || r.local_ip' },
  { name: 'a key signalled again not refreshed', file: 'init.ts',
    from: '  r.last_seen = now;\n  return true;', to: '  return true;' },
  { name: 'init refreshes an entry holding a peer\'s key', file: 'init.ts',
    from: 'if (!e.remote_key) e.last_seen = now;', to: 'e.last_seen = now;' },
  // Host authority: conntrack admits a flow, or the host stack handles it.
  { name: 'conntrack check skipped in masq', file: 'masq.ts',
    from: 'admit = ctAdmit(s, env, h, h.saddr, h.daddr, netnsId, netnsIno, NatSide.NONE, to);', to: 'admit = CT_ADMIT;' },
  { name: 'conntrack check skipped in restore', file: 'restore.ts',
    from: 'const admit = ctAdmit(s, env, h, r.remote_ip, r.local_ip, CT_CURRENT_NETNS, 0, NatSide.SRC, to);', to: 'const admit = CT_ADMIT;' },
  { name: 'an SNATed flow put on the fast path', file: 'conntrack.ts',
    from: 'if (e.status & CtBits.IPS_SRC_NAT)', to: 'if (false)' },
  { name: 'a DNATed flow carried as it came (NAT ignored)', file: 'conntrack.ts',
    from: 'if (verdict === CT_ADMIT && e.status & CtBits.IPS_DST_NAT) {', to: 'if (false) {' },
  { name: 'restore looks the flow up the wrong way round', file: 'restore.ts',
    from: 'ctAdmit(s, env, h, r.remote_ip, r.local_ip, CT_CURRENT_NETNS, 0, NatSide.SRC, to)', to: 'ctAdmit(s, env, h, r.local_ip, r.remote_ip, CT_CURRENT_NETNS, 0, NatSide.SRC, to)' },
  // Host authority, Services: the NAT conntrack recorded, reproduced exactly.
  { name: "a Service's reply not given the Service's address back", file: 'restore.ts',
    from: 'const src = admit === CT_ADMIT ? to.saddr : r.remote_ip;', to: 'const src = r.remote_ip;' },
  { name: "a Service's reply not given the Service's port back", file: 'restore.ts',
    from: 'if (admit === CT_ADMIT && to.sport !== h.sport && rewritePort(pkt, h, SPORT_OFF, h.sport, to.sport)) return restoreMiss(fx);', to: '' },
  { name: "a Service's request sent without the backend's port", file: 'masq.ts',
    from: 'if (h.dport !== wireDport && rewritePort(pkt, h, DPORT_OFF, wireDport, h.dport)) return TC_ACT_SHOT;', to: '' },
  { name: 'NAT applied in the wrong direction (the reply tuple always)', file: 'conntrack.ts',
    from: '? e.reply : o;', to: '? e.reply : e.reply;' },
  { name: 'NAT applied in the wrong direction (a tuple taken as it is, not reversed)', file: 'conntrack.ts',
    from: '  to.saddr = other.dst;\n  to.sport = other.dport;\n  to.daddr = other.src;\n  to.dport = other.sport;', to: '  to.saddr = other.src;\n  to.sport = other.sport;\n  to.daddr = other.dst;\n  to.dport = other.dport;' },
  { name: 'masq lets the NAT move the source', file: 'conntrack.ts',
    from: 'if (side === NatSide.DST) return srcKept;', to: 'if (side === NatSide.DST) return true;' },
  { name: 'restore lets the NAT move the destination', file: 'conntrack.ts',
    from: 'if (side === NatSide.SRC) return dstKept;', to: 'if (side === NatSide.SRC) return true;' },
  { name: 'a cached translation not checked against the caller', file: 'conntrack.ts',
    from: "    if (!natAllowed(k, to, side)) return 'CT_NAT';\n", to: '' },
  { name: "a Service request not taken to its backend", file: 'masq.ts',
    from: '    h.daddr = to.daddr;\n    h.dport = to.dport;\n', to: '' },
  { name: 'a UDP flow without a reply admitted', file: 'conntrack.ts',
    from: "verdict = e.status & CtBits.IPS_SEEN_REPLY ? CT_ADMIT : 'CT_REFUSED';", to: 'verdict = CT_ADMIT;' },
  { name: 'liberal in one direction taken for both', file: 'conntrack.ts',
    from: 'e.flags[0] & e.flags[1] & CtBits.TCP_FLAG_BE_LIBERAL', to: 'e.flags[0] & CtBits.TCP_FLAG_BE_LIBERAL' },
  { name: 'a FIN or RST admitted past conntrack', file: 'conntrack.ts',
    from: 'if (h.proto === IPPROTO_TCP && (h.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)))', to: 'if (h.proto === IPPROTO_TCP && (h.tcp_flags & TCP_FLAG_SYN))' },
  { name: 'a cached admission ignored', file: 'conntrack.ts',
    from: 'if (seen && now >= seen.checked && now - seen.checked < CT_RECHECK_NS) {', to: 'if (false) {' },
  { name: 'a cached admission never rechecked', file: 'conntrack.ts',
    from: 'if (seen && now >= seen.checked && now - seen.checked < CT_RECHECK_NS) {', to: 'if (seen) {' },
  { name: 'a refused flow keeps its cached admission', file: 'conntrack.ts',
    from: '  // No longer admitted: the cached admission must not outlive the entry\'s change.\n  if (seen) s.ct_admitted.deleteElem(k);', to: '' },
  // The per-CPU first-level admission cache (ct_recent).
  { name: 'a ct_recent slot answers past its recheck time', file: 'conntrack.ts',
    from: 'if (mine && now >= r.admitted.checked && now - r.admitted.checked < CT_RECHECK_NS) {', to: 'if (mine) {' },
  { name: 'a ct_recent slot ignored', file: 'conntrack.ts',
    from: 'if (mine && now >= r.admitted.checked && now - r.admitted.checked < CT_RECHECK_NS) {', to: 'if (false) {' },
  { name: 'a ct_recent slot written with now on a ct_admitted hit (an admission outliving its check)', file: 'conntrack.ts',
    from: 'ctRecentPut(r, k, seen.checked, to);', to: 'ctRecentPut(r, k, now, to);' },
  { name: 'a ct_recent slot not written on a ct_admitted hit', file: 'conntrack.ts',
    from: 'ctRecentPut(r, k, seen.checked, to);', to: '' },
  { name: 'a ct_recent slot not written after the lookup admits', file: 'conntrack.ts',
    from: 'ctRecentPut(r, k, now, to);', to: '' },
  { name: 'a ct_recent slot matched without the protocol', file: 'conntrack.ts',
    from: 'return a.protocol === b.protocol && ', to: 'return ' },
  { name: 'a ct_recent slot matched without the source port', file: 'conntrack.ts',
    from: ' && a.sport === b.sport && ', to: ' && ' },
  { name: 'a ct_recent slot matched without the destination port', file: 'conntrack.ts',
    from: ' && a.dport === b.dport;', to: ';' },
  { name: 'a ct_recent slot matched without the source address', file: 'conntrack.ts',
    from: ' && a.saddr === b.saddr && ', to: ' && ' },
  { name: 'a ct_recent slot matched without the destination address', file: 'conntrack.ts',
    from: ' && a.daddr === b.daddr && ', to: ' && ' },
  { name: "a ct_recent slot's translation not checked against the caller", file: 'conntrack.ts',
    from: "    ctAdmissionApply(r.admitted, to);\n    return natAllowed(k, to, side) ? CT_ADMIT : 'CT_NAT';", to: '    ctAdmissionApply(r.admitted, to);\n    return CT_ADMIT;' },
  { name: 'a flow conntrack no longer has keeps its ct_recent slot', file: 'conntrack.ts',
    from: "    if (mine) s.ct_recent[slot] = emptyCtRecent();\n    return 'CT_REFUSED';", to: "    return 'CT_REFUSED';" },
  { name: 'a flow conntrack refuses keeps its ct_recent slot', file: 'conntrack.ts',
    from: '  if (seen) s.ct_admitted.deleteElem(k);\n  if (mine) s.ct_recent[slot] = emptyCtRecent();\n', to: '  if (seen) s.ct_admitted.deleteElem(k);\n' },
  { name: 'a ct_recent slot trusted before the SYN/FIN/RST refusal', file: 'conntrack.ts',
    from: "  if (h.proto === IPPROTO_TCP && (h.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST))) return 'CT_REFUSED';",
    to: "  if (h.proto === IPPROTO_TCP && (h.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST))) {\n"
      + '    const r0 = s.ct_recent[ctRecentSlot({ saddr: src, daddr: dst, sport: h.sport, dport: h.dport, protocol: h.proto }, s.ct_recent.length)];\n'
      + '    const hit = r0.flow.protocol === h.proto && r0.flow.saddr === src && r0.flow.daddr === dst && r0.flow.sport === h.sport\n'
      + '      && r0.flow.dport === h.dport && xmasqNow(s, env) >= r0.admitted.checked && xmasqNow(s, env) - r0.admitted.checked < CT_RECHECK_NS;\n'
      + "    if (!hit) return 'CT_REFUSED';\n  }" },
  { name: 'the stack handed the packet at the NIC despite an overlay device', file: 'restore.ts',
    from: 'if (cfg.overlay_ifindex === 0) return TC_CONTINUE;', to: 'return TC_CONTINUE;' },
  { name: "the overlay device's MAC not written", file: 'restore.ts',
    from: '  macToBytes(cfg.overlay_mac, pkt, 0);\n', to: '' },
  { name: 'a TCP entry past ESTABLISHED admitted', file: 'conntrack.ts',
    from: 'else if (e.tcpState !== CtBits.TCP_CONNTRACK_ESTABLISHED)', to: 'else if (false)' },
  // Tunnel ports from configuration (issue 14, item 6).
  { name: 'the tunnel ports built in, not configured', file: 'packet.ts',
    from: 'return dport !== 0 && (dport === cfg.vxlan_port || dport === cfg.geneve_port);', to: 'return dport === 4789 || dport === 8472 || dport === 6081;' },
  { name: 'Geneve taken for VXLAN', file: 'packet.ts',
    from: 'if (outer.dport === cfg.geneve_port) {', to: 'if (outer.dport === 6081) {' },
  { name: 'a port of 0 taken for an unset tunnel port', file: 'packet.ts',
    from: 'return dport !== 0 && (dport === cfg.vxlan_port', to: 'return (dport === cfg.vxlan_port' },
  // Trust: learn only from our own encapsulation towards nodes; signals and marked packets only from nodes.
  { name: 'init learns from a datagram the host forwards', file: 'init.ts',
    from: 'if ((env.ingressIfindex ?? 0) !== 0 || !isSelf(s, t.outer.saddr)) {', to: 'if (!isSelf(s, t.outer.saddr)) {' },
  { name: 'init learns whatever the outer source', file: 'init.ts',
    from: 'if ((env.ingressIfindex ?? 0) !== 0 || !isSelf(s, t.outer.saddr)) {', to: 'if ((env.ingressIfindex ?? 0) !== 0) {' },
  { name: 'init learns towards any address', file: 'init.ts',
    from: 'if (!isPeerNode(s, t.outer.daddr)) {', to: 'if (false) {' },
  // The clock map (xmasq_now): jiffies through the agent's calibration, the coarse clock at tick_ns 0.
  { name: 'the clock map ignored (the coarse clock always)', file: 'maps.ts',
    from: 'if (c.tick_ns === 0n) return env.now;', to: 'return env.now;' },
  { name: 'no fallback at tick_ns 0 (an uncalibrated map read as a clock)', file: 'maps.ts',
    from: 'if (c.tick_ns === 0n) return env.now;', to: '' },
  { name: "the clock's base_jiffies ignored", file: 'maps.ts',
    from: '((env.jiffies - c.base_jiffies) & U64)', to: 'env.jiffies' },
  { name: 'a jiffy taken for 1 ms whatever tick_ns says', file: 'maps.ts',
    from: ' * c.tick_ns) & U64;', to: ' * 1_000_000n) & U64;' },
  { name: 'jiffies before the base jiffy taken for the base (no u64 wrap)', file: 'maps.ts',
    from: '((env.jiffies - c.base_jiffies) & U64)', to: '(env.jiffies > c.base_jiffies ? env.jiffies - c.base_jiffies : 0n)' },
  { name: 'this host taken for a peer node', file: 'maps.ts',
    from: 'return n !== undefined && (n.flags & NodeFlag.SELF) === 0;', to: 'return n !== undefined;' },
  { name: 'restore takes signals from anyone', file: 'restore.ts',
    from: 'if (!isPeerNode(s, from)) {', to: 'if (false) {' },
  { name: 'restore takes a signal for a pair from any node', file: 'restore.ts',
    from: 'if (e && e.remote_ip && e.remote_ip !== from) {', to: 'if (false) {' },
  { name: "the first signal's node not recorded", file: 'restore.ts',
    from: 'if (!e.remote_ip) e.remote_ip = from;', to: '' },
  { name: 'restore consults no node set on a miss (a forgery from a non-node counted as a miss)', file: 'restore.ts',
    from: 'if (!isPeerNode(s, h.saddr)) {', to: 'if (false) {' },
  { name: 'restore asks the node set before the lookup (a hit from a non-node dropped, as before the sweep)', file: 'restore.ts',
    from: '  const ik = { remote_host: h.saddr, key };\n',
    to: '  if (!isPeerNode(s, h.saddr)) {\n    fx.counters.MARKED_NOT_NODE++;\n    return TC_ACT_SHOT;\n  }\n  const ik = { remote_host: h.saddr, key };\n' },
  // init's fast path for a learned pair (its entry holds the outer addresses and the pod's veth).
  { name: "init's fast path without the address match", file: 'init.ts',
    from: 'if (!e || !e.ifindex || !e.local_ip || e.local_ip !== t.outer.saddr || !e.remote_ip || e.remote_ip !== t.outer.daddr) {',
    to: 'if (!e || !e.ifindex) {' },
  { name: "init's fast path matching the local address only", file: 'init.ts',
    from: 'if (!e || !e.ifindex || !e.local_ip || e.local_ip !== t.outer.saddr || !e.remote_ip || e.remote_ip !== t.outer.daddr) {',
    to: 'if (!e || !e.ifindex || !e.local_ip || e.local_ip !== t.outer.saddr) {' },
  { name: "init's fast path matching the remote address only", file: 'init.ts',
    from: 'if (!e || !e.ifindex || !e.local_ip || e.local_ip !== t.outer.saddr || !e.remote_ip || e.remote_ip !== t.outer.daddr) {',
    to: 'if (!e || !e.ifindex || !e.remote_ip || e.remote_ip !== t.outer.daddr) {' },
  { name: "init's fast path for an entry without the pod's veth", file: 'init.ts',
    from: 'if (!e || !e.ifindex || !e.local_ip',
    to: 'if (!e || !e.local_ip' },
  { name: "init's fast path for a datagram the host forwards", file: 'init.ts',
    from: 'let e = (env.ingressIfindex ?? 0) === 0 ? s.egress_cache.lookupElem(ek) : undefined;',
    to: 'let e = s.egress_cache.lookupElem(ek);' },
  { name: "init's checks not recording the pod's veth (the fast path never taken)", file: 'init.ts',
    from: '  if (pod) e.ifindex = pod.ifindex;\n', to: '' },
  { name: "a pod's marker passed on by masq", file: 'masq.ts',
    from: '    fx.counters.POD_MARKED++;\n    return TC_ACT_SHOT;', to: '    return pass(fx);' },
  // The source check: veth mode holds the source to the veth the pair's entry records.
  { name: 'masq carries a pod sending as its neighbour (source not held to the veth)', file: 'masq.ts',
    from: "e.ifindex !== (env.ifindex || 1)", to: 'false' },
  { name: 'masq holds the source to the device the packet came in on (ingress_ifindex), not the one it runs on', file: 'masq.ts',
    from: "e.ifindex !== (env.ifindex || 1)", to: 'e.ifindex !== (env.ingressIfindex ?? 0)' },
  { name: "masq holds the source to pod_info's veth, not the entry's", file: 'masq.ts',
    from: "e.ifindex !== (env.ifindex || 1)", to: 's.pod_info.lookupElem(h.saddr)?.ifindex !== (env.ifindex || 1)' },
  { name: "masq counts an entry without a veth (an older version's) as a pod sending as its neighbour", file: 'masq.ts',
    from: "if (kind !== 'RPEER' && e.ifindex === 0) fx.counters.FELL_BACK++;", to: 'if (false) fx.counters.FELL_BACK++;' },
  { name: "init writes the device it runs on (the NIC) as the pair's veth", file: 'init.ts',
    from: 'e.ifindex = pod.ifindex;', to: 'e.ifindex = env.ifindex || 1;' },
  { name: "restore's learning does not write the local pod's veth into the pair's entry", file: 'restore.ts',
    from: 'e.ifindex = pod.ifindex;', to: '' },
  { name: "restore's learning writes the overlay device as the pair's veth", file: 'restore.ts',
    from: 'e.ifindex = pod.ifindex;', to: 'e.ifindex = s.config.overlay_ifindex;' },
  // The egress entries' presence filter (bpf/maps.h egress_filter).
  { name: "a new egress entry's filter bit not set (init, restore)", file: 'maps.ts',
    from: "if (s.egress_cache.updateElem(ek, zeroPath(), 'noexist') === 0) egressFilterAdd(s, ek.local_pod, ek.remote_pod);",
    to: "s.egress_cache.updateElem(ek, zeroPath(), 'noexist');" },
  { name: "masq checks the reverse pair's filter bit", file: 'masq.ts',
    from: '!toService && !egressFilterHas(s, h.saddr, h.daddr)', to: '!toService && !egressFilterHas(s, h.daddr, h.saddr)' },
  { name: 'masq looks the entry up whatever the filter says', file: 'masq.ts',
    from: 'if (!toService && !egressFilterHas(s, h.saddr, h.daddr)) return pass(fx);', to: '' },
  { name: "masq filters a Service's request under the Service's address", file: 'masq.ts',
    from: 'if (!toService && !egressFilterHas(s, h.saddr, h.daddr))', to: 'if (!egressFilterHas(s, h.saddr, h.daddr))' },
  { name: "masq looks a Service's backend pair up whatever the filter says", file: 'masq.ts',
    from: '    if (!egressFilterHas(s, h.saddr, h.daddr)) return pass(fx);\n', to: '' },
  { name: "masq never reads the L4 header past the filter", file: 'masq.ts',
    from: 'if (loadL4(pkt, h) || !fastPathEligible(cfg, h))', to: 'if (!fastPathEligible(cfg, h))' },
  { name: 'masq reads the half of the filter config does not name', file: 'maps.ts',
    from: 'ConfigFlag.FILTER_HALF1 ? halfU32(s) : 0)', to: 'ConfigFlag.FILTER_HALF1 ? 0 : halfU32(s))' },
  { name: "a new egress entry's bit set in the first half only", file: 'maps.ts',
    from: 'for (let half = 0; half < 2; half++)', to: 'for (let half = 0; half < 1; half++)' },
];

const MODEL_DIR = fileURLToPath(new URL('../model/', import.meta.url));

/** Writes the mutated model beside the real one (same depth, so imports resolve) and loads it. */
export async function loadMutant(m: Mutant, tag: string): Promise<Record<ProgramName, ModelProgram>> {
  const dir = fileURLToPath(new URL(`../.mutant-${tag}/`, import.meta.url));
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  for (const f of readdirSync(MODEL_DIR)) if (f.endsWith('.ts') && !f.endsWith('.test.ts')) cpSync(MODEL_DIR + f, dir + f);
  const src = readFileSync(dir + m.file, 'utf8');
  const at = src.indexOf(m.from);
  if (at < 0 || src.indexOf(m.from, at + 1) >= 0) {
    throw new Error(`mutant "${m.name}": "${m.from}" must occur exactly once in sim/model/${m.file}; update the mutant to the model`);
  }
  writeFileSync(dir + m.file, src.slice(0, at) + m.to + src.slice(at + m.from.length));
  const url = (f: string) => pathToFileURL(dir + f).href;
  const { init } = await import(url('init.ts'));
  const { restore } = await import(url('restore.ts'));
  const { masq } = await import(url('masq.ts'));
  return { init, restore, masq: (p, s, e) => masq(p, s, e, 'EGRESS') };
}

/**
 * The programs whose model runs the code of file (in sim/model/): those whose
 * file imports it, at run time (an `import type` runs nothing), directly or
 * not. A mutant of a file init never runs cannot change init's outcome, so its
 * check need not spend init's cases (a conntrack mutant then takes half the time).
 */
export function programsRunning(file: string, dir = MODEL_DIR): ProgramName[] {
  const imports = (f: string) => [...readFileSync(dir + f, 'utf8').matchAll(/^import\s+(type\s+)?[^;]*?from\s+'\.\/([^']+)'/gm)]
    .filter((m) => !m[1]).map((m) => m[2]);
  const reaches = (from: string, seen = new Set<string>()): boolean => {
    if (from === file) return true;
    if (seen.has(from)) return false;
    seen.add(from);
    return imports(from).some((f) => reaches(f, seen));
  };
  return (['init', 'restore', 'masq'] as const).filter((p) => reaches(`${p}.ts`));
}

export function removeMutants(tags: string[]): void {
  for (const t of tags) rmSync(fileURLToPath(new URL(`../.mutant-${t}/`, import.meta.url)), { recursive: true, force: true });
}

export interface MutantResult { name: string; caught: boolean; example?: string }

export async function checkMutants(perProgram: number, seed: number, log: (s: string) => void = () => {}): Promise<MutantResult[]> {
  const results: MutantResult[] = [];
  const tags: string[] = [];
  try {
    for (const [i, m] of MUTANTS.entries()) {
      const tag = `${process.pid}-${i}`;
      tags.push(tag);
      const model = await loadMutant(m, tag);
      const s = await differentialRun({ perProgram, seed, model, stopAtFirst: true, report: 1, programs: programsRunning(m.file) });
      const caught = s.mismatches > 0;
      results.push({ name: m.name, caught, example: s.reports[0] });
      log(`${caught ? 'caught  ' : 'SURVIVED'} ${m.name}`);
    }
  } finally {
    removeMutants(tags);
  }
  return results;
}

const USAGE = `usage: npm run test:mutants -- [--cases N] [--help] [--version]

Plants each known bug in a copy of the model and checks that the differential run
catches it, with N generated cases per program (default 5000). Needs root.
Exit status 1 if a mutant survives.`;

async function main(argv: string[]): Promise<number> {
  const line = commandLine('test:mutants', USAGE, argv, { cases: { type: 'string' } });
  if (typeof line === 'number') return line;
  let perProgram: number;
  try {
    perProgram = intOption('--cases', line.values.cases, 5000, 1);
  } catch (e) {
    return usageError('test:mutants', USAGE, e as Error);
  }
  const results = await checkMutants(perProgram, 1, (s) => console.log(s));
  const survived = results.filter((r) => !r.caught).length;
  console.log(`mutants: ${results.length - survived}/${results.length} caught`);
  return survived ? 1 : 0;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  process.exitCode = await main(process.argv.slice(2));
}
