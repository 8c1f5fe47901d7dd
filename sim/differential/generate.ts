/**
 * Seeded random cases for the differential run. Packets and map states are
 * drawn together so that the deep paths are taken often: a masqueraded packet
 * usually meets the ingress entry it needs, an overlay packet usually comes
 * from a pod the host knows. Around them: every header variant the parsers
 * must survive (options, fragments, VLAN tags, IPv6, ARP, truncation, byte
 * flips), full tables, exhausted key spaces, stale entries and policy rules
 * that match or nearly match. Both key designs: wide keys on or off in the
 * config, narrow and wide keys in the tables, urgent pointers and outer IDs
 * that carry a key or look like one, GSO overlay packets.
 */
import { buildFrame, truncate, type FrameSpec, type Ipv4Spec, type L4Spec, type UdpSpec } from '../../testing/packet/build.ts';
import {
  CT_RECHECK_NS, ConfigFlag, FLANNEL_PORTS, NO_OVERLAY, NO_SERVICES, KEY_MAX, KEY_MIN, MAX_ENTRIES, NodeFlag, WIDE_KEY_MAX, WIDE_KEY_MIN, PORT_GENEVE, PORT_VXLAN, PORT_VXLAN_LINUX, PolicyDir,
  NO_HOST_NETNS, egressFilterSlot, type Path,
} from '../../dataplane/maps.ts';
import { emptyState, type DatapathState } from '../model/index.ts';
import { ctRecentSlot, ipWord } from '../model/conntrack.ts';
import type { Case } from './compare.ts';
import { monotonicCoarseNs } from '../../dataplane/agent/native.ts';
import { clockFor, type ClockSample } from '../../dataplane/agent/clock.ts';
import {
  IPS_ASSURED, IPS_SEEN_REPLY, TCP_CONNTRACK_ESTABLISHED, TCP_CONNTRACK_FIN_WAIT, TCP_CONNTRACK_SYN_SENT, inverse,
  type CtEntrySpec, type CtTuple,
} from '../../dataplane/conntrack.ts';
import { minTestRunLength } from './kernel.ts';
import { installPolicy, putEgress, type ProgramName, type SkbContext } from './statespec.ts';
import { normaliseRule } from '../../dataplane/agent/policy.ts';
import type { PolicyRuleRecord } from '../../dataplane/agent/protocol.ts';

/** xorshift32: small, fast, and the same sequence for the same seed everywhere. */
export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = (seed ^ 0x9e3779b9) >>> 0 || 1;
  }
  u32(): number {
    let x = this.s;
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    this.s = x;
    return x;
  }
  int(n: number): number {
    return this.u32() % n;
  }
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
  chance(p: number): boolean {
    return this.u32() / 0x1_0000_0000 < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)];
  }
  bytes(n: number): Uint8Array {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i++) b[i] = this.int(256);
    return b;
  }
}

// ---- the world the cases live in (addresses only: no packet leaves the kernel's test_run) ----
const SIZES = MAX_ENTRIES.test;
export const LOCAL_HOST = '10.99.0.1';
export const LOCAL_MAC = '02:99:00:00:00:01';
export const PEERS = ['10.99.0.2', '10.99.0.3', '10.99.0.4'];
/** An address on the underlay that is no node: its signals and marked packets are forgeries. */
const STRANGER = '10.99.0.77';
const peerMac = (h: number) => `02:99:00:00:00:0${h + 2}`;
const LOCAL_PODS = Array.from({ length: 20 }, (_, i) => ({
  ip: `10.244.0.${2 + i}`, ifindex: 100 + i, mac: `0a:58:0a:f4:00:${(2 + i).toString(16).padStart(2, '0')}`,
}));
const remotePod = (h: number, i: number) => `10.244.${h + 1}.${2 + i}`;
const GATEWAY_MAC = '0a:58:0a:f4:00:01';
const VTEP_MAC = (h: number) => `aa:bb:cc:00:00:0${h + 2}`;
const TUNNEL_PORTS = [PORT_VXLAN_LINUX, PORT_VXLAN, PORT_GENEVE];

interface Focus {
  local: (typeof LOCAL_PODS)[number];
  peer: number;
  remote: string;
  /** The 5-tuple's ports and protocol, for policy rules that match it. */
  sport: number;
  dport: number;
  proto: number;
  /** masq: the pod sent to this Service, which its host DNATs to remote:dport (genConntrack). */
  service?: { ip: string; port: number };
}

/** The cluster's Service range in the generated configs, and a ClusterIP inside it. */
const SERVICE_RANGE = { service_net: '10.96.0.0', service_mask: '255.240.0.0' } as const;
const CLUSTER_IP = '10.96.0.10';

/** A narrow key (DSCP) or a wide one (carrier, outer ID), the wide ones near the bounds too. */
function anyKey(rng: Rng): number {
  if (rng.chance(0.5)) return rng.range(KEY_MIN, KEY_MAX);
  return rng.chance(0.2) ? rng.pick([WIDE_KEY_MIN, WIDE_KEY_MIN + 1, WIDE_KEY_MAX]) : rng.range(WIDE_KEY_MIN, WIDE_KEY_MAX);
}

function randomPath(rng: Rng, over: Partial<Path> = {}): Path {
  return {
    last_seen: BigInt(rng.range(1, 1_000_000)),
    local_mac: rng.chance(0.8) ? LOCAL_MAC : macOf(rng),
    remote_mac: rng.chance(0.8) ? peerMac(rng.int(3)) : macOf(rng),
    local_ip: LOCAL_HOST,
    remote_ip: rng.pick(PEERS),
    ifindex: rng.range(1, 200),
    local_key: rng.chance(0.2) ? 0 : anyKey(rng),
    remote_key: rng.chance(0.2) ? 0 : anyKey(rng),
    remote_ready: rng.chance(0.7) ? 1 : 0,
    ...over,
  };
}

function macOf(rng: Rng): string {
  return Array.from(rng.bytes(6), (b, i) => (i === 0 ? b & 0xfe : b).toString(16).padStart(2, '0')).join(':');
}

const ipNum = (a: string) => a.split('.').reduce((n, p) => n * 256 + Number(p), 0);
const ipStr = (n: number) => [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
const blockOf = (a: number, len: number) => `${ipStr(len === 0 ? 0 : (a & ((0xffffffff << (32 - len)) >>> 0)) >>> 0)}/${len}`;

/**
 * A block (and exceptions) around an address: holding it, holding it but
 * excepting it, or one bit off; prefixes of every length, nested ones too.
 */
function genBlock(rng: Rng, addr: string): { block?: string; except?: string[] } {
  if (rng.chance(0.35)) return rng.chance(0.2) ? { except: [blockOf(ipNum(addr), rng.range(8, 32))] } : {};
  const a = ipNum(addr);
  const len = rng.chance(0.3) ? 32 : rng.range(1, 31);
  // one bit off inside the prefix: the block is the neighbour's
  const off = rng.chance(0.25) ? (a ^ (1 << (32 - rng.range(1, len)))) >>> 0 : a;
  const out: { block?: string; except?: string[] } = { block: blockOf(off, len) };
  if (len < 32 && rng.chance(0.4)) {
    // an exception holding the address, or one beside it
    const elen = rng.range(len + 1, 32);
    const e = rng.chance(0.6) ? off : (off ^ (1 << (32 - elen))) >>> 0;
    out.except = [blockOf(e, elen)];
    if (elen < 32 && rng.chance(0.3)) out.except.push(blockOf((e ^ (1 << (32 - rng.range(elen + 1, 32)))) >>> 0, 32));
  }
  return out;
}

/** A port, or a range holding the port, or ending or starting right beside it. */
function genPorts(rng: Rng, port: number): { port?: number; end?: number } {
  if (rng.chance(0.4)) return {};
  const p = port || 1;
  switch (rng.int(5)) {
    case 0: return { port: p };
    case 1: return { port: p === 65535 ? 1 : p + 1 };
    case 2: return { port: Math.max(1, p - rng.int(300)), end: Math.min(65535, p + rng.int(300)) };
    case 3: return p > 1 ? { port: Math.max(1, p - 1 - rng.int(1000)), end: p - 1 } : { port: 2, end: 9 };
    default: return p < 65535 ? { port: p + 1, end: Math.min(65535, p + 1 + rng.int(40000)) } : { port: 1, end: 1000 };
  }
}

/** A deny rule of the focus tuple's direction mostly, each field from any to just off. */
function genRule(rng: Rng, f: Focus, dir: number, id: number): PolicyRuleRecord {
  const egress = dir === PolicyDir.EGRESS;
  const src = genBlock(rng, egress ? f.local.ip : f.remote);
  const dst = genBlock(rng, egress ? f.remote : f.local.ip);
  const sport = rng.chance(0.8) ? {} : genPorts(rng, egress ? f.sport : f.dport);
  const dport = genPorts(rng, egress ? f.dport : f.sport);
  const ports = sport.port !== undefined || dport.port !== undefined;
  const proto = ports ? rng.pick([undefined, 6, 17, f.proto === 6 || f.proto === 17 ? f.proto : 6])
    : rng.pick([undefined, f.proto, f.proto, 1, 6, 17]);
  const spec = {
    id, dir: (rng.chance(0.85) ? dir : 1 - dir) === PolicyDir.EGRESS ? 'egress' : 'ingress',
    src: src.block, srcExcept: src.except, dst: dst.block, dstExcept: dst.except,
    sport: sport.port, sportEnd: sport.end, dport: dport.port, dportEnd: dport.end, proto,
  };
  return normaliseRule(spec, () => id);
}

/** A map state drawn around the focus pair; dir is the direction policy rules should target. */
function genState(rng: Rng, f: Focus, dir: number): DatapathState {
  const s = emptyState(SIZES);

  // pod_info: usually the focus pod; sometimes every slot taken.
  if (rng.chance(0.85)) s.pod_info.update(f.local.ip, { ifindex: f.local.ifindex, mac: f.local.mac, ...NO_HOST_NETNS });
  const nPods = rng.chance(0.05) ? SIZES.pods : rng.int(6);
  for (let i = 0; i < nPods; i++) {
    const p = rng.pick(LOCAL_PODS);
    s.pod_info.update(p.ip, { ifindex: p.ifindex, mac: p.mac, ...NO_HOST_NETNS });
  }

  // egress_cache: the focus pair in any state of learning, plus noise; sometimes full.
  if (rng.chance(0.7)) {
    // Sometimes without a recorded peer (an entry a first signal made before we
    // knew the path), or with another node recorded.
    const recorded = rng.chance(0.8) ? PEERS[f.peer] : rng.chance(0.6) ? '0.0.0.0' : PEERS[(f.peer + 1) % 3];
    // The local pod's veth mostly (init records it), sometimes none (an entry from before
    // init recorded it, or one a signal made), sometimes another pod's.
    const veth = rng.chance(0.7) ? f.local.ifindex : rng.chance(0.6) ? 0 : rng.range(1, 200);
    putEgress(s, { local_pod: f.local.ip, remote_pod: f.remote }, randomPath(rng, {
      remote_ip: recorded, remote_mac: peerMac(f.peer), ifindex: veth,
      // Now and then without our address (a first signal made it) or with another one.
      ...(rng.chance(0.1) ? { local_ip: rng.pick(['0.0.0.0', STRANGER]) } : {}),
    }));
  }
  // Full more often for restore (ingress), whose learning path needs a full table to fall back.
  const nEgress = rng.chance(dir === PolicyDir.INGRESS ? 0.2 : 0.08) ? SIZES.paths : rng.int(5);
  for (let i = 0; s.egress_cache.size < SIZES.paths && i < nEgress; i++) {
    putEgress(s, { local_pod: rng.pick(LOCAL_PODS).ip, remote_pod: remotePod(rng.int(3), rng.int(40)) }, randomPath(rng));
  }

  // ingress_cache: a record for the focus pair (or a stale one under its key),
  // sometimes every key of the peer taken, sometimes the table full.
  const egressFocus = s.egress_cache.lookup({ local_pod: f.local.ip, remote_pod: f.remote });
  if (rng.chance(0.6)) {
    const key = egressFocus?.local_key || anyKey(rng);
    const stale = rng.chance(0.15);
    s.ingress_cache.update({ remote_host: PEERS[f.peer], key }, randomPath(rng, {
      local_mac: f.local.mac, remote_mac: VTEP_MAC(f.peer),
      local_ip: stale ? rng.pick(LOCAL_PODS).ip : f.local.ip,
      remote_ip: stale ? remotePod(f.peer, rng.int(40)) : f.remote,
      // Sometimes a deleted pod's tombstone (ifindex 0), which keeps the key taken.
      ifindex: rng.chance(0.15) ? 0 : f.local.ifindex, local_key: key, remote_key: 0, remote_ready: 0,
    }));
  }
  if (rng.chance(0.08)) {
    for (let k = KEY_MIN; k <= KEY_MAX && s.ingress_cache.size < SIZES.paths; k++) {
      s.ingress_cache.update({ remote_host: PEERS[f.peer], key: k }, randomPath(rng, { local_ip: rng.pick(LOCAL_PODS).ip }), 'noexist');
    }
  }
  const nIngress = rng.chance(0.05) ? SIZES.paths : rng.int(5);
  for (let i = 0; s.ingress_cache.size < SIZES.paths && i < nIngress; i++) {
    s.ingress_cache.update({ remote_host: rng.pick(PEERS), key: anyKey(rng) }, randomPath(rng));
  }

  // Now and then the stranger holds an ingress entry too (a stale one, or the node set
  // lost it): only the node check then keeps its marked packets out.
  if (rng.chance(0.15) && s.ingress_cache.size < SIZES.paths) {
    s.ingress_cache.update({ remote_host: STRANGER, key: anyKey(rng) }, randomPath(rng, {
      local_mac: f.local.mac, local_ip: f.local.ip, remote_ip: f.remote, ifindex: f.local.ifindex, remote_key: 0, remote_ready: 0,
    }), 'noexist');
  }

  genNodes(rng, s);

  s.config = {
    nic_ifindex: rng.chance(0.9) ? rng.range(2, 50) : 0, flags: rng.chance(0.5) ? ConfigFlag.WIDE_KEYS : 0,
    // Half the time an overlay device, to which restore hands what conntrack does not admit.
    ...(rng.chance(0.5) ? { overlay_ifindex: rng.range(2, 50), overlay_mac: VTEP_MAC(3) } : NO_OVERLAY),
    // Mostly the Service range; sometimes none, or one the ClusterIP is outside of.
    ...(rng.chance(0.7) ? SERVICE_RANGE : rng.chance(0.5) ? NO_SERVICES : { service_net: '10.97.0.0', service_mask: '255.255.0.0' }),
    // The overlay's ports: mostly Flannel's, or IANA's VXLAN, one kind only, another port, none.
    ...rng.pick([FLANNEL_PORTS, FLANNEL_PORTS, FLANNEL_PORTS, { vxlan_port: PORT_VXLAN, geneve_port: PORT_GENEVE },
      { vxlan_port: PORT_VXLAN_LINUX, geneve_port: 0 }, { vxlan_port: 0, geneve_port: PORT_GENEVE }, { vxlan_port: 4790, geneve_port: 6082 }, { vxlan_port: 0, geneve_port: 0 }]),
  };

  // policy: rule sets of Kubernetes' shapes around the focus tuple, some matching, some just off.
  if (rng.chance(0.3)) {
    const rules: PolicyRuleRecord[] = [];
    const nRules = rng.chance(0.2) ? rng.range(6, 14) : rng.range(1, 5);
    for (let i = 0; i < nRules; i++) rules.push(genRule(rng, f, dir, i + 1));
    // Often an exception carved out of a denied block right where the flow is:
    // only the longest prefix of the two gives the verdict.
    if (rng.chance(0.4)) {
      const a = ipNum(dir === PolicyDir.EGRESS ? f.remote : f.local.ip);
      const len = rng.range(8, 30);
      const elen = rng.range(len + 1, 32);
      const field = rng.chance(0.5) ? 'dst' : 'src';
      const addr = field === 'dst' ? a : ipNum(dir === PolicyDir.EGRESS ? f.local.ip : f.remote);
      rules.unshift(normaliseRule({ id: nRules + 1, dir: dir === PolicyDir.EGRESS ? 'egress' : 'ingress', [field]: blockOf(addr, len), [`${field}Except`]: [blockOf(addr, elen)] }, () => nRules + 1));
    }
    // Drop rules until the classifier fits the test build's trie.
    while (!installPolicy(s, rules)) rules.pop();
  }
  genFilter(rng, s, f);
  return s;
}

/**
 * egress_filter beyond its entries' bits (putEgress sets those): either half
 * the one masq reads; sometimes the focus pair's bit clear in one half or both
 * (an entry pinned by a version without the filter, or the half the agent is
 * rebuilding), sometimes bits of no entry (gone pairs, collisions).
 */
function genFilter(rng: Rng, s: DatapathState, f: Focus): void {
  if (rng.chance(0.5)) s.config.flags |= ConfigFlag.FILTER_HALF1;
  const w = s.egress_filter;
  if (rng.chance(0.2)) for (let i = rng.int(4); i > 0; i--) w[rng.int(w.length)] |= 1 << rng.int(32);
  const focus = s.egress_cache.keys.fromLayout({ local_pod: f.local.ip, remote_pod: f.remote });
  const slot = egressFilterSlot(focus.local_pod, focus.remote_pod, (w.length / 2) * 32);
  // the focus pair's bit set without its entry, or clear with it
  if (rng.chance(0.15)) for (const half of [0, 1]) w[half * (w.length / 2) + (slot >>> 5)] |= 1 << (slot & 31);
  if (rng.chance(0.12)) {
    for (const half of rng.pick([[0], [1], [0, 1]])) w[half * (w.length / 2) + (slot >>> 5)] &= ~(1 << (slot & 31));
  }
}

/**
 * The node set: mostly this host (SELF) and every peer, but a peer may be
 * missing (not a node, or not yet in the agent's set), this host missing or
 * not flagged SELF, a peer flagged SELF, the stranger a node, and sometimes
 * the table empty (an agent that has not filled it) or full.
 */
function genNodes(rng: Rng, s: DatapathState): void {
  if (rng.chance(0.04)) return;
  if (rng.chance(0.96)) s.nodes.update(LOCAL_HOST, { flags: rng.chance(0.97) ? NodeFlag.SELF : 0 });
  for (const p of PEERS) if (rng.chance(0.92)) s.nodes.update(p, { flags: rng.chance(0.03) ? NodeFlag.SELF : rng.chance(0.1) ? 0x2 : 0 });
  if (rng.chance(0.05)) s.nodes.update(STRANGER, { flags: 0 });
  if (rng.chance(0.03)) for (let i = 0; s.nodes.size < SIZES.nodes; i++) s.nodes.update(`10.98.0.${i + 1}`, { flags: 0 });
}

// ---- packets ----

function checksumChoice(rng: Rng): number | 'valid' | 'partial' {
  if (rng.chance(0.8)) return 'valid';
  if (rng.chance(0.3)) return 'partial';
  return rng.pick([0, 0xffff, rng.int(0x10000)]);
}

/** An IPv4 pod packet of any protocol and shape; proto/ports are fixed by the focus. */
function podIpv4(rng: Rng, src: string, dst: string, f: Focus, tags: string[]): Ipv4Spec {
  const spec: Ipv4Spec = {
    src, dst,
    tos: rng.chance(0.75) ? rng.int(4) : rng.int(256),
    id: rng.int(0x10000),
    df: rng.chance(0.6),
    ttl: rng.range(1, 255),
  };
  if (spec.tos! >= 4) tags.push('dscp');
  if (rng.chance(0.08)) {
    spec.options = rng.bytes(4 * rng.range(1, 10));
    tags.push('opts');
  }
  if (rng.chance(0.1)) {
    if (rng.chance(0.5)) spec.mf = true;
    else {
      spec.fragOffset = rng.range(1, 200);
      spec.mf = rng.chance(0.5);
    }
    tags.push('frag');
  }
  if (rng.chance(0.03)) {
    spec.rf = true;
    tags.push('rf');
  }
  if (rng.chance(0.05)) {
    spec.checksum = rng.int(0x10000);
    tags.push('bad-ipcsum');
  }
  spec.l4 = podL4(rng, f, tags);
  return spec;
}

function podL4(rng: Rng, f: Focus, tags: string[]): L4Spec {
  const payload = rng.bytes(rng.int(48));
  switch (f.proto) {
    case 6:
      tags.push('tcp');
      // Mostly URG clear and a zero urgent pointer, as Linux sends: what a wide key needs.
      return { tcp: {
        // Half of them a data segment of an established connection (ACK, PSH): what conntrack may admit.
        sport: f.sport, dport: f.dport, seq: rng.u32(), ack: rng.u32(),
        flags: rng.chance(0.5) ? rng.pick([0x10, 0x18]) : rng.chance(0.8) ? rng.int(256) & ~0x20 : rng.int(256),
        urgent: rng.chance(0.85) ? 0 : rng.pick([1, KEY_MAX, WIDE_KEY_MIN, rng.int(0x10000)]), checksum: checksumChoice(rng), payload,
      } };
    case 17: {
      tags.push('udp');
      const none = rng.chance(0.1);
      // Now and then a length that lies (short or long): a wide key needs the true one.
      const length = rng.chance(0.1) ? rng.pick([0, 7, 8, 8 + payload.length - 1, 8 + payload.length + 1, rng.int(0x10000)]) : undefined;
      return { udp: { sport: f.sport, dport: f.dport, length, checksum: none ? 'none' : checksumChoice(rng), payload } };
    }
    case 1:
      tags.push('icmp');
      // Echoes (code 0, as a wide key needs, or not) and messages with codes of their own.
      return { icmp: { type: rng.pick([0, 8, 8, 3, 11]), code: rng.chance(0.8) ? 0 : rng.int(256), id: rng.int(0x10000), seq: rng.int(0x10000), payload } };
    default:
      tags.push(`proto${f.proto}`);
      return { raw: { protocol: f.proto, bytes: payload } };
  }
}

function focusOf(rng: Rng): Focus {
  const peer = rng.int(3);
  const proto = rng.chance(0.9) ? rng.pick([6, 6, 17, 17, 1]) : rng.pick([47, 132, 50]);
  const tunnelDport = proto === 17 && rng.chance(0.05);
  return {
    local: LOCAL_PODS[rng.int(LOCAL_PODS.length)],
    peer,
    remote: remotePod(peer, rng.int(40)),
    sport: rng.range(1, 65535),
    // Now and then port 0, which an unset tunnel port (0) must not match.
    dport: tunnelDport ? rng.pick(TUNNEL_PORTS) : rng.chance(0.03) ? 0 : rng.pick([80, 443, 53, 8080, rng.range(1, 65535)]),
    proto,
  };
}

/** An overlay packet (host to host over UDP) around an inner pod frame. */
function overlay(rng: Rng, outerSrc: string, outerDst: string, eth: { src: string; dst: string }, inner: FrameSpec, tags: string[], outerTos = 0): FrameSpec {
  const port = rng.chance(0.92) ? rng.pick(TUNNEL_PORTS) : rng.pick([4790, 6082, 53]);
  if (!TUNNEL_PORTS.includes(port)) tags.push('not-tunnel-port');
  const geneve = port === PORT_GENEVE;
  const udp: UdpSpec = {
    sport: rng.range(32768, 60999), dport: port,
    checksum: rng.chance(0.7) ? 'none' : 'valid',
    payload: geneve
      ? { geneve: {
          vni: 1, options: rng.chance(0.3) ? rng.bytes(4 * rng.range(1, 8)) : undefined,
          protocol: rng.chance(0.95) ? 0x6558 : 0x0800, version: rng.chance(0.95) ? 0 : 1,
        }, inner }
      : { vxlan: { vni: 1, flags: rng.chance(0.95) ? 0x08 : 0x00 }, inner },
  };
  tags.push(geneve ? 'geneve' : 'vxlan');
  if (rng.chance(0.04)) {
    udp.length = rng.int(200);
    tags.push('bad-udplen');
  }
  const outer: Ipv4Spec = { src: outerSrc, dst: outerDst, tos: outerTos, id: rng.int(0x10000), df: rng.chance(0.3), l4: { udp } };
  if (rng.chance(0.04)) {
    outer.options = rng.bytes(4 * rng.range(1, 4));
    tags.push('outer-opts');
  }
  if (rng.chance(0.03)) {
    outer.mf = true;
    tags.push('outer-frag');
  }
  const frame: FrameSpec = { eth: { src: eth.src, dst: eth.dst }, ipv4: outer };
  if (rng.chance(0.03)) {
    frame.eth!.vlan = [rng.range(1, 4094)];
    tags.push('vlan');
  }
  return frame;
}

/** Other frames a NIC sees: ARP, IPv6, VLAN-tagged host traffic. */
function otherFrame(rng: Rng, tags: string[]): FrameSpec {
  const kind = rng.int(3);
  if (kind === 0) {
    tags.push('arp');
    return { arp: true };
  }
  if (kind === 1) {
    tags.push('ipv6');
    return { ipv6: { src: 'fd00::1', dst: 'fd00::2', nextHeader: 17, payload: rng.bytes(rng.int(64)) } };
  }
  tags.push('vlan-host');
  return { eth: { vlan: [rng.range(1, 4094)] }, ipv4: { src: PEERS[0], dst: LOCAL_HOST, tos: rng.int(256), rf: rng.chance(0.5), l4: { udp: { sport: 1, dport: 2 } } } };
}

/** Truncation or byte flips on a built frame, never below the 14 bytes test_run needs. */
function damage(rng: Rng, frame: Buffer, tags: string[]): Buffer {
  if (rng.chance(0.5)) {
    tags.push('trunc');
    return truncate(frame, rng.range(14, frame.length));
  }
  const out = Buffer.from(frame);
  const n = rng.range(1, 3);
  for (let i = 0; i < n; i++) out[rng.int(Math.min(out.length, 110))] = rng.chance(0.5) ? rng.int(256) : out[rng.int(out.length)] ^ (1 << rng.int(8));
  tags.push('flip');
  return out;
}

function initCase(rng: Rng, tags: string[]): { frame: FrameSpec; focus: Focus; dir: number } {
  const f = focusOf(rng);
  const innerSrc = rng.chance(0.9) ? f.local.ip : remotePod(f.peer, rng.int(40));
  const inner: FrameSpec = { eth: { src: f.local.mac, dst: VTEP_MAC(f.peer) }, ipv4: podIpv4(rng, innerSrc, f.remote, f, tags) };
  if (rng.chance(0.03)) {
    inner.eth!.vlan = [5];
    tags.push('inner-vlan');
  }
  const outerTos = rng.chance(0.8) ? rng.int(4) : rng.int(256);
  // Mostly our own encapsulation; sometimes a pod's datagram to a tunnel port as the
  // host forwards it (from the pod's address, or masqueraded to ours: then only
  // ingress_ifindex tells, see generateCase), or one towards an address that is no node.
  const outerSrc = rng.chance(0.94) ? LOCAL_HOST : rng.pick([f.local.ip, STRANGER, PEERS[rng.int(3)]]);
  const outerDst = rng.chance(0.95) ? PEERS[f.peer] : rng.pick([STRANGER, LOCAL_HOST]);
  if (outerSrc !== LOCAL_HOST) tags.push('foreign-src');
  if (outerDst !== PEERS[f.peer]) tags.push('not-node-dst');
  return { frame: overlay(rng, outerSrc, outerDst, { src: LOCAL_MAC, dst: peerMac(f.peer) }, inner, tags, outerTos), focus: f, dir: PolicyDir.EGRESS };
}

function restoreCase(rng: Rng, tags: string[]): { frame: FrameSpec; focus: Focus; dir: number; keyFrom?: 'ingress' } {
  const f = focusOf(rng);
  const kind = rng.int(10);
  if (kind < 5) {
    // A masqueraded packet from a peer host; its key is filled in once the state exists.
    tags.push('masqueraded');
    // From the pair's peer mostly; sometimes forged: from the stranger, or from this host's own address.
    const src = rng.chance(0.88) ? PEERS[f.peer] : rng.pick([STRANGER, STRANGER, LOCAL_HOST]);
    if (src !== PEERS[f.peer]) tags.push('forged-src');
    const ip = podIpv4(rng, src, LOCAL_HOST, { ...f, sport: f.dport, dport: f.sport }, tags);
    ip.rf = rng.chance(0.9);
    return { frame: { eth: { src: peerMac(f.peer), dst: LOCAL_MAC }, ipv4: ip }, focus: f, dir: PolicyDir.INGRESS, keyFrom: 'ingress' };
  }
  if (kind < 7) {
    // Host traffic, ECN-CE and DSCP included: must pass untouched.
    tags.push('host');
    const ip = podIpv4(rng, PEERS[f.peer], LOCAL_HOST, f, tags);
    ip.tos = rng.chance(0.5) ? (rng.range(KEY_MIN, KEY_MAX) << 2) | 3 : rng.int(256);
    ip.rf = false;
    // ...and an urgent pointer equal to a wide key, which only RF could make ours.
    if (ip.l4 && 'tcp' in ip.l4 && rng.chance(0.5)) ip.l4.tcp.urgent = anyKey(rng);
    return { frame: { eth: { src: peerMac(f.peer), dst: LOCAL_MAC }, ipv4: ip }, focus: f, dir: PolicyDir.INGRESS };
  }
  if (kind < 9) {
    // An overlay packet to one of our pods, signalling or not.
    const inner: FrameSpec = { eth: { src: VTEP_MAC(f.peer), dst: f.local.mac }, ipv4: podIpv4(rng, f.remote, f.local.ip, { ...f, sport: f.dport, dport: f.sport }, tags) };
    const signal = rng.chance(0.7);
    tags.push(signal ? 'signal' : 'plain-overlay');
    // A narrow signal (key in DSCP), or a wide one (DSCP 0, key in the outer ID), or DSCP 0 and an ID below the wide keys.
    const wide = signal && rng.chance(0.5);
    const outerTos = signal && !wide ? (rng.range(rng.chance(0.1) ? 0 : KEY_MIN, KEY_MAX) << 2) | rng.int(4) : rng.int(4);
    // A signal from the pair's peer mostly; sometimes from another node (not the pair's), or the stranger.
    const from = rng.chance(0.8) ? PEERS[f.peer] : rng.pick([PEERS[(f.peer + 1) % 3], STRANGER]);
    if (from !== PEERS[f.peer]) tags.push('other-src');
    const frame = overlay(rng, from, LOCAL_HOST, { src: peerMac(f.peer), dst: LOCAL_MAC }, inner, tags, outerTos);
    if (signal) {
      frame.ipv4!.rf = rng.chance(0.9);
      frame.ipv4!.df = rng.chance(0.5);
    }
    if (wide) {
      tags.push('wide');
      frame.ipv4!.id = rng.chance(0.85) ? anyKey(rng) : rng.range(0, WIDE_KEY_MIN - 1);
    }
    return { frame, focus: f, dir: PolicyDir.INGRESS };
  }
  return { frame: otherFrame(rng, tags), focus: f, dir: PolicyDir.INGRESS };
}

function masqCase(rng: Rng, tags: string[]): { frame: FrameSpec; focus: Focus; dir: number } {
  const f = focusOf(rng);
  if (rng.chance(0.05)) return { frame: otherFrame(rng, tags), focus: f, dir: PolicyDir.EGRESS };
  if (rng.chance(0.25)) {
    // A request to a Service whose backend is the remote pod: the port the Service
    // exposes, the backend's own, or another.
    f.service = { ip: CLUSTER_IP, port: rng.pick([80, f.dport, rng.range(1, 65535)]) };
    tags.push('svc');
    const ip = podIpv4(rng, f.local.ip, f.service.ip, { ...f, dport: f.service.port }, tags);
    return { frame: { eth: { src: f.local.mac, dst: GATEWAY_MAC }, ipv4: ip }, focus: f, dir: PolicyDir.EGRESS };
  }
  const ip = podIpv4(rng, f.local.ip, f.remote, f, tags);
  return { frame: { eth: { src: f.local.mac, dst: GATEWAY_MAC }, ipv4: ip }, focus: f, dir: PolicyDir.EGRESS };
}

/**
 * The host's conntrack table around the focus flow (local pod :sport <->
 * remote pod :dport): its entry in either direction, in any state the
 * admission check tells apart (no reply seen, TCP states, liberal or not in
 * each direction, a Service's DNAT whose reply is this flow), a near miss on
 * a port, and an unrelated flow.
 */
function genConntrack(rng: Rng, f: Focus, tags: string[]): CtEntrySpec[] {
  const out: CtEntrySpec[] = [];
  const proto = f.proto === 6 || f.proto === 17 ? f.proto : rng.pick([6, 17]);
  if (rng.chance(0.8)) {
    const flow: CtTuple = { src: f.local.ip, dst: f.remote, sport: f.sport, dport: f.dport, proto };
    const e: CtEntrySpec = { orig: rng.chance(0.5) ? flow : inverse(flow), status: rng.chance(0.85) ? IPS_SEEN_REPLY | (rng.chance(0.5) ? IPS_ASSURED : 0) : 0 };
    if (f.service && rng.chance(0.85)) {
      // The request's Service, DNATed by the host to the remote pod, another pod, or the
      // Service's own address and port (a DNAT that changes nothing); or the backend's own flow.
      e.orig = { src: f.local.ip, dst: f.service.ip, sport: f.sport, dport: f.service.port, proto };
      const to = rng.int(10);
      e.dnat = to < 7 ? { ip: f.remote, port: f.dport } : to < 9 ? { ip: remotePod(f.peer, 41), port: f.dport } : { ip: f.service.ip, port: f.service.port };
      const odd = rng.int(20);
      if (odd === 0) e.orig = inverse(e.orig);
      else if (odd === 1) {
        // An entry whose reply is the request: its NAT would move the request's source.
        e.orig = { src: f.service.ip, dst: '10.244.0.250', sport: f.service.port, dport: 4242, proto };
        e.dnat = { ip: f.local.ip, port: f.sport };
      } else if (odd === 2) {
        // An SNAT whose reply is the request, which reversing it would take to the remote pod.
        e.orig = { src: f.remote, dst: f.local.ip, sport: f.dport, dport: f.sport, proto };
        e.dnat = undefined;
        e.snat = { ip: f.service.ip, port: f.service.port };
      }
      tags.push('ct-svc');
    } else if (rng.chance(0.1)) {
      // A Service: the pod sent to a ClusterIP, the host DNATed it to this remote pod.
      e.orig = { src: f.local.ip, dst: '10.96.0.10', sport: f.sport, dport: 80, proto };
      e.dnat = { ip: f.remote, port: f.dport };
      tags.push('ct-dnat');
    } else if (rng.chance(0.06)) {
      // The pod's own flow, DNATed by its host to another pod (what masq must leave to the stack).
      e.orig = flow;
      e.dnat = { ip: remotePod(f.peer, 41), port: f.dport };
      tags.push('ct-dnat-own');
    } else if (rng.chance(0.05)) {
      // The host SNATs the remote pod's flow (a hairpin's masquerade): only the stack may.
      e.orig = inverse(flow);
      e.snat = { ip: rng.pick([LOCAL_HOST, '10.244.0.1']), port: rng.pick([f.dport, rng.range(1024, 65535)]) };
      tags.push('ct-snat');
    } else if (rng.chance(0.06)) {
      e.orig = { ...e.orig, sport: e.orig.sport === 65535 ? 1 : e.orig.sport + 1 };
      tags.push('ct-near-miss');
    }
    if (proto === 6) {
      e.tcpState = rng.chance(0.8) ? TCP_CONNTRACK_ESTABLISHED : rng.pick([TCP_CONNTRACK_SYN_SENT, TCP_CONNTRACK_FIN_WAIT, 5, 7]);
      const both = rng.chance(0.6);
      e.liberal = [both || rng.chance(0.5), both || rng.chance(0.5)];
    }
    tags.push('ct');
    out.push(e);
  }
  if (rng.chance(0.3)) {
    out.push({ orig: { src: '10.244.0.250', dst: f.remote, sport: rng.range(1, 65535), dport: 443, proto }, status: IPS_SEEN_REPLY, tcpState: TCP_CONNTRACK_ESTABLISHED, liberal: [true, true] });
  }
  return out;
}

/** The kernel's clocks as the harness reads them (kernel.ts probe) and its tick, for calibrated clock maps. */
export interface ClockSource {
  sample(): ClockSample;
  tickNs: bigint;
}

const U64_MAX = (1n << 64n) - 1n;

/**
 * The clock map (bpf/maps.h xmasq_now): uncalibrated (tick_ns 0: the coarse
 * clock), calibrated as the agent writes it (its now within a tick of the
 * coarse clock, so that the stamps drawn around the real clock keep their
 * meaning), a base a tick either way or far back in jiffies, or odd: a base
 * far off, a base jiffy ahead of jiffies, a tick that makes now wrap. Its own
 * draws (rng), so that the other draws of a seed stay what they were.
 */
function genClock(rng: Rng, state: DatapathState, clock: ClockSource, tags: string[]): void {
  const r = rng.int(20);
  if (r < 7) {
    tags.push('clock-uncalibrated');
    return;
  }
  const s = clock.sample();
  const t = clock.tickNs;
  if (r < 16) {
    tags.push('clock-calibrated');
    const c = clockFor(s, t);
    // At most back to the boot: a base_ns below 0 is no u64 (a machine up for less
    // than the drawn 1,000,000 ticks, 17-67 min, as a fresh CI machine is).
    const drawn = BigInt(rng.int(1_000_000));
    const back = drawn * t <= c.base_ns ? drawn : c.base_ns / t;
    state.clock = rng.pick([
      c, c, c,
      { ...c, base_ns: c.base_ns - t }, { ...c, base_ns: c.base_ns + t },
      // an older base: an agent that calibrated long ago and re-based base_ns since
      { base_ns: c.base_ns - back * t, base_jiffies: c.base_jiffies - back, tick_ns: t },
    ]);
    return;
  }
  tags.push('clock-odd');
  const u64 = () => (BigInt(rng.range(0, 0x7fffffff)) << 33n) ^ BigInt(rng.range(0, 0x7fffffff));
  state.clock = rng.pick([
    { base_ns: u64(), base_jiffies: s.jiffies, tick_ns: t },
    { base_ns: 0n, base_jiffies: 0n, tick_ns: t },
    { base_ns: s.coarseNs, base_jiffies: s.jiffies + BigInt(rng.range(1, 1000)), tick_ns: t },
    { base_ns: s.coarseNs, base_jiffies: s.jiffies - BigInt(rng.int(1000)), tick_ns: (1n << 63n) + BigInt(rng.int(1000)) },
    { base_ns: U64_MAX - BigInt(rng.int(1000)), base_jiffies: s.jiffies - BigInt(rng.range(1, 100)), tick_ns: u64() | 1n },
    { base_ns: s.coarseNs, base_jiffies: 0n, tick_ns: 1n },
  ]);
}

/** One random case for a program; its clock map drawn from clockRng (genClock). */
export function generateCase(program: ProgramName, rng: Rng, index: number, clock?: { rng: Rng; source: ClockSource }): Case {
  const tags: string[] = [];
  let frame: FrameSpec, focus: Focus, dir: number, keyFrom: string | undefined;
  if (program === 'init') ({ frame, focus, dir } = initCase(rng, tags));
  else if (program === 'restore') ({ frame, focus, dir, keyFrom } = restoreCase(rng, tags));
  else ({ frame, focus, dir } = masqCase(rng, tags));

  const state = genState(rng, focus, dir);
  // An overlay frame mostly meets an overlay configured with its port (the random ports
  // above alone would leave most overlay frames no overlay packet at all).
  const udp = frame.ipv4?.l4 && 'udp' in frame.ipv4.l4 ? frame.ipv4.l4.udp : undefined;
  const tunnelKind = udp?.payload && typeof udp.payload === 'object' && !(udp.payload instanceof Uint8Array)
    ? ('vxlan' in udp.payload ? 'vxlan_port' : 'geneve' in udp.payload ? 'geneve_port' : undefined) : undefined;
  if (udp && tunnelKind && rng.chance(0.85)) state.config[tunnelKind] = udp.dport;
  // Cases the wide keys decide: init drawing with them on, masq towards a wide key.
  if (program === 'init' && state.config.flags & ConfigFlag.WIDE_KEYS) tags.push('wide');
  const focusEgress = state.egress_cache.lookup({ local_pod: focus.local.ip, remote_pod: focus.remote });
  if (program === 'masq' && focusEgress && focusEgress.remote_key >= WIDE_KEY_MIN) tags.push('wide');

  // A masqueraded packet mostly carries a key that has an ingress entry for its
  // sender: a narrow one in DSCP, a wide one in its carrier.
  if (keyFrom === 'ingress' && frame.ipv4) {
    // In the order the generator's odds were set with (whatever order the table
    // files them in): the narrow keys ascending, then the wide ones as they came.
    const live = state.ingress_cache.entries().filter(([k]) => k.remote_host === frame.ipv4!.src).map(([k]) => k.key)
      .sort((x, y) => Math.min(x, WIDE_KEY_MIN) - Math.min(y, WIDE_KEY_MIN));
    const key = live.length && rng.chance(0.85) ? rng.pick(live) : rng.chance(0.05) ? 0 : anyKey(rng);
    // A key that restores, from an address the node set does not hold as a peer: restore no
    // longer asks the node set on a hit (the agent's sweep keeps such entries from existing).
    const hit = state.ingress_cache.lookup({ remote_host: frame.ipv4.src, key });
    const sender = state.nodes.lookup(frame.ipv4.src);
    if (hit && hit.ifindex !== 0 && (sender === undefined || (sender.flags & NodeFlag.SELF) !== 0)) tags.push('hit-not-node');
    const l4 = frame.ipv4.l4;
    // Now and then a narrow key (or none) where a wide one goes: a forged or damaged carrier.
    if (key > KEY_MAX || rng.chance(key === 0 ? 0.5 : 0.1)) {
      tags.push('wide');
      frame.ipv4.tos = rng.int(4);
      if (l4 && 'tcp' in l4) l4.tcp.urgent = key;
      else if (l4 && 'udp' in l4) l4.udp.length = key;
      else if (l4 && 'icmp' in l4) {
        l4.icmp.code = key >> 6;
        frame.ipv4.tos = ((key & 63) << 2) | rng.int(4);
      }
    } else {
      frame.ipv4.tos = (key << 2) | rng.int(4);
    }
  }
  // Overlay packets of a TSO stream are GSO packets: init sends no wide signal on them.
  let ctx: SkbContext | undefined = rng.chance(0.15) ? { gso_size: rng.pick([1398, 1448, 8948]) } : undefined;
  if (ctx) tags.push('gso');
  // masq runs on a pod's host-side veth: mostly the sending pod's own; now and then a
  // neighbour's (a pod sending as the focus pod), or lo (test_run's default device).
  // It holds the source to the veth the pair's entry records: mostly the focus pod's;
  // sometimes 0 (an entry from before masq read it there), the very device masq runs
  // on (half the time when that is not the focus pod's, so that a packet from the veth
  // the entry records is carried whoever's it is), a neighbour's veth, or anything.
  if (program === 'masq') {
    const r = rng.int(16);
    const ifindex = r === 0 ? 1 : r === 1 ? rng.pick(LOCAL_PODS).ifindex : focus.local.ifindex;
    ctx = { ...ctx, ifindex };
    const spoofed = ifindex !== focus.local.ifindex;
    if (spoofed) tags.push('spoofed');
    if (focusEgress) {
      const e = rng.int(20);
      const recorded = spoofed && rng.chance(0.5) ? ifindex
        : e < 13 ? focus.local.ifindex : e < 15 ? 0 : e < 17 ? ifindex : e < 19 ? rng.pick(LOCAL_PODS).ifindex : rng.range(1, 200);
      // Its filter bits as genState left them (either half, or clear): only the veth changes.
      putEgress(state, { local_pod: focus.local.ip, remote_pod: focus.remote }, { ...focusEgress, ifindex: recorded }, { filter: false });
      if (recorded === 0) tags.push('unfilled');
    }
  }
  // A forwarded packet keeps the device it came in on (a pod's datagram to a tunnel
  // port); our own encapsulation has none. Mostly for init, which reads it.
  let ctxOut = ctx;
  if (rng.chance(program === 'init' ? 0.06 : 0.03)) {
    ctxOut = { ...ctx, ingress_ifindex: rng.pick([3, 7, 100 + rng.int(20)]) };
    tags.push('forwarded');
  }

  // init's fast path (a learned pair's entry holds the outer addresses and the pod's veth):
  // taken or not, and taken where the node set or pod_info no longer agrees (only the
  // agent's sweep keeps them in step: the program must do what the model says all the same).
  if (program === 'init' && frame.ipv4 && !ctxOut?.ingress_ifindex) {
    const e = state.egress_cache.lookup({ local_pod: focus.local.ip, remote_pod: focus.remote });
    const outerSrc = frame.ipv4.src, outerDst = frame.ipv4.dst;
    if (e && e.ifindex !== 0 && e.local_ip !== '0.0.0.0' && e.local_ip === outerSrc && e.remote_ip !== '0.0.0.0' && e.remote_ip === outerDst) {
      tags.push('fast');
      const self = state.nodes.lookup(outerSrc), peer = state.nodes.lookup(outerDst);
      const agrees = self !== undefined && (self.flags & NodeFlag.SELF) !== 0 && peer !== undefined && (peer.flags & NodeFlag.SELF) === 0;
      if (!agrees || !state.pod_info.lookup(focus.local.ip)) tags.push('fast-stale');
    }
  }
  const built = buildFrame(frame);
  let packet = rng.chance(0.12) ? damage(rng, built, tags) : built;
  // Below this the kernel's test_run refuses the frame (see minTestRunLength).
  if (packet.length < minTestRunLength(packet)) packet = Buffer.concat([packet, built.subarray(packet.length, minTestRunLength(packet))]);
  const conntrack = program === 'init' ? [] : genConntrack(rng, focus, tags);
  // Sometimes flows already queued for the agent, sometimes the queue full.
  if (program !== 'init' && rng.chance(0.15)) {
    const n = rng.chance(0.3) ? SIZES.ctPending : rng.int(4);
    for (let i = 0; i < n; i++) {
      state.ct_pending.update({ saddr: rng.pick(LOCAL_PODS).ip, daddr: remotePod(rng.int(3), rng.int(40)), sport: rng.range(1, 65535), dport: 80, protocol: 6 }, { queued: 1 });
    }
  }
  // Admissions conntrack gave a moment ago: stamps around the real clock (the kernel's, read
  // now; the case runs a few ms later), fresh, just past the recheck time, ancient, or ahead.
  if (program !== 'init' && rng.chance(0.3)) {
    const now = monotonicCoarseNs();
    const stamp = () => rng.pick([
      now - BigInt(rng.int(20_000_000)), now - BigInt(rng.int(20_000_000)), now - CT_RECHECK_NS - BigInt(rng.int(1_000_000_000)),
      BigInt(rng.range(1, 1_000_000)), now + 5_000_000_000n,
    ]);
    const proto = focus.proto === 17 ? 17 : 6;
    const mine = { saddr: focus.local.ip, daddr: focus.remote, sport: focus.sport, dport: focus.dport, protocol: proto };
    const theirs = { saddr: focus.remote, daddr: focus.local.ip, sport: focus.dport, dport: focus.sport, protocol: proto };
    // What a Service's flow caches: the request's backend, the reply's Service address.
    const svc = focus.service ?? { ip: CLUSTER_IP, port: 80 };
    const request = { saddr: focus.local.ip, daddr: svc.ip, sport: focus.sport, dport: svc.port, protocol: proto };
    const cached = (k: typeof mine) => {
      const same = { saddr: k.saddr, daddr: k.daddr, sport: k.sport, dport: k.dport };
      const pick = rng.int(10);
      // Mostly as conntrack would have it; sometimes NATed at the end the caller must not move.
      const to = pick < 7 ? same
        : k === request ? { ...same, daddr: focus.remote, dport: focus.dport }
        : pick < 9 ? { ...same, saddr: svc.ip, sport: svc.port } : { ...same, daddr: remotePod(focus.peer, 41), dport: 8080 };
      return { checked: stamp(), ...to };
    };
    for (const k of [mine, theirs, request]) if (rng.chance(k === request ? (focus.service ? 0.6 : 0) : 0.6)) state.ct_admitted.update(k, cached(k));
    const n = rng.chance(0.2) ? SIZES.ctAdmitted : rng.int(3);
    for (let i = 0; state.ct_admitted.size < SIZES.ctAdmitted && i < n; i++) {
      const k = { saddr: rng.pick(LOCAL_PODS).ip, daddr: remotePod(rng.int(3), rng.int(40)), sport: rng.range(1, 65535), dport: 443, protocol: 6 };
      state.ct_admitted.update(k, { checked: stamp(), saddr: k.saddr, daddr: k.daddr, sport: k.sport, dport: k.dport });
    }
    tags.push('ct-cached');
  }
  if (program !== 'init' && rng.chance(0.35)) recentSlots(rng, state, focus, tags);
  if (clock) genClock(clock.rng, state, clock.source, tags);
  return { name: `#${index} ${tags.join(' ')}`, program, packet, state, ctx: ctxOut, conntrack };
}

/**
 * This CPU's ct_recent slots (every CPU's, as kernel.ts loads them): the focus
 * flow's own slot, in either direction and as a Service's request, holding it
 * fresh, stale, ahead of the clock, NATed at either end, or holding a flow that
 * differs in one field of the tuple or in all (another flow on the same slot);
 * and now and then other slots holding random flows.
 */
function recentSlots(rng: Rng, state: DatapathState, focus: Focus, tags: string[]): void {
  const now = monotonicCoarseNs();
  const proto = focus.proto === 17 ? 17 : 6;
  const svc = focus.service ?? { ip: CLUSTER_IP, port: 80 };
  const [local, remote] = [ipWord(focus.local.ip), ipWord(focus.remote)];
  const flows = [
    { saddr: local, daddr: remote, sport: focus.sport, dport: focus.dport, protocol: proto },
    { saddr: remote, daddr: local, sport: focus.dport, dport: focus.sport, protocol: proto },
    { saddr: local, daddr: ipWord(svc.ip), sport: focus.sport, dport: svc.port, protocol: proto },
  ];
  const n = state.ct_recent.length;
  for (const k of flows) {
    if (!rng.chance(0.6)) continue;
    const slot = ctRecentSlot(k, n);
    const held = { ...k };
    const which = rng.int(10);
    // Another flow in the slot: one field of the tuple changed, or a flow of its own.
    if (which === 0) held.protocol = proto === 6 ? 17 : 6;
    else if (which === 1) held.sport = (k.sport + 1) & 0xffff;
    else if (which === 2) held.dport = (k.dport + 1) & 0xffff;
    else if (which === 3) held.saddr = ipWord(remotePod(rng.int(3), 42));
    else if (which === 4) held.daddr = ipWord(remotePod(rng.int(3), 43));
    else if (which === 5) Object.assign(held, { saddr: ipWord(rng.pick(LOCAL_PODS).ip), daddr: ipWord(remotePod(rng.int(3), rng.int(40))), sport: rng.range(1, 65535) });
    const checked = rng.pick([now - BigInt(rng.int(20_000_000)), now - BigInt(rng.int(20_000_000)), now - BigInt(rng.int(20_000_000)),
      now - CT_RECHECK_NS - BigInt(rng.int(1_000_000_000)), BigInt(rng.range(1, 1_000_000)), now + 5_000_000_000n]);
    // As conntrack would have it (40%), or NATed at an end the caller may or may not move
    // (60%; at 40%, once the clock map's draws came in, no case of the clean-clone CI's
    // mutant run had masq refuse one):
    // the destination to another pod's port (a Service request's DNAT; for the pair's own flows
    // a move masq must refuse), or the source to the Service's address (a reply's).
    const pick = rng.int(10);
    const to = pick < 4 ? { saddr: held.saddr, daddr: held.daddr, sport: held.sport, dport: held.dport }
      : pick < 8 ? { saddr: held.saddr, daddr: ipWord(remotePod(focus.peer, 41)), sport: held.sport, dport: 8080 }
      : { saddr: ipWord(svc.ip), daddr: held.daddr, sport: svc.port, dport: held.dport };
    state.ct_recent[slot] = { flow: held, admitted: { checked, ...to } };
  }
  for (let i = rng.chance(0.3) ? rng.int(n) : 0; i > 0; i--) {
    const k = { saddr: ipWord(rng.pick(LOCAL_PODS).ip), daddr: ipWord(remotePod(rng.int(3), rng.int(40))), sport: rng.range(1, 65535), dport: 443, protocol: 6 };
    state.ct_recent[rng.int(n)] = { flow: k, admitted: { checked: now - BigInt(rng.int(20_000_000)), saddr: k.saddr, daddr: k.daddr, sport: k.sport, dport: k.dport } };
  }
  tags.push('ct-recent');
}

export function* generateCases(program: ProgramName, count: number, seed: number, clock: ClockSource): Generator<Case> {
  const p = program === 'init' ? 1 : program === 'restore' ? 2 : 3;
  const rng = new Rng(seed * 7 + p);
  const clockRng = new Rng(seed * 7 + p + 1_000_003);
  for (let i = 0; i < count; i++) yield generateCase(program, rng, i, { rng: clockRng, source: clock });
}
