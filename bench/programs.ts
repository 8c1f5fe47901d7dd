/**
 * npm run bench:prog [-- --json] [-- --repeat N --runs K] [-- --profile] [-- --cold]
 *
 * ns/packet of every program path with BPF_PROG_TEST_RUN on the bench build
 * (production map sizes plus the bench_* wrappers of bpf/bench.bpf.c), next to
 * an empty program. Every row is checked before it is timed (one run with
 * repeat=1: verdict and output packet) and after (the big run's verdict, final
 * packet and counters), so a number is never reported for a path the packets
 * did not take.
 *
 * --cold adds what a big run hides: a program on a node runs once between
 * other work, which has taken its map pages out of the TLB and its lines out
 * of the caches, where a run of a million packets keeps them all warm.
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { BpfObject, type BpfMap, type BpfProgram } from '../dataplane/libbpf.ts';
import { clockFor, measureTick, probeSettled } from '../dataplane/agent/clock.ts';
import { Conntrack, IPS_ASSURED, IPS_SEEN_REPLY, TCP_CONNTRACK_ESTABLISHED, unshareNetns } from '../dataplane/conntrack.ts';
import { FLANNEL_PORTS, NO_OVERLAY,
  COUNTER_COUNT, COUNTER_NAMES, MAX_ENTRIES, NodeFlag, arrayIndex, clock, config, counterValue,
  egressKey, ingressKey, nodeInfo, nodeIp, path, podInfo, podIp,
  NO_HOST_NETNS, POLICY_KEY_BYTES, type CounterName,
} from '../dataplane/maps.ts';
import { PolicyTable, compile, describeRule, normaliseRule, policyKey, walkTables } from '../dataplane/agent/policy.ts';
import { fillEgressFilter } from '../dataplane/agent/filter.ts';
import type { PolicyRuleSpec } from '../dataplane/agent/protocol.ts';
import { buildFrame, type FrameSpec, type Ipv4Spec } from '../testing/packet/build.ts';
import { checksumProblems, decodeFrame, flattenFrame } from '../testing/packet/decode.ts';
import { u32ToIp, ipToU32 } from '../testing/packet/addr.ts';
import { commandLine } from '../testing/args.ts';
import { machine, median, type Machine } from '../testing/measure.ts';
import { PROFILE_FREQ, Recording, breakdown, renderBreakdown } from './prog-profile.ts';

export const BENCH_OBJECT = fileURLToPath(new URL('../bpf/build/xmasq.bench.bpf.o', import.meta.url));

/** bench.bpf.c's BENCH_RESET_LEN: how much of the packet every wrapper writes back. */
const RESET_LEN = 128;

/** XMASQ_CONTINUE (bpf/verdict.h): what every program returns for a packet it leaves alone. */
const TC_ACT_UNSPEC = -1;
const TC_ACT_SHOT = 2;
const TC_ACT_REDIRECT = 7;

export const DEFAULTS = { repeat: 1_000_000, runs: 5 } as const;

// ---- the scene: one learned pair, as fixtures/generate.ts sets it up ----

const HERE = { ip: '192.0.2.1', mac: '02:00:c0:00:02:01' };
const PEER = { ip: '192.0.2.2', mac: '02:00:c0:00:02:02' };
// ifindex 1, lo: BPF_PROG_TEST_RUN runs a packet on lo, and masq holds a packet's
// source to the pod veth its pair's entry records (init writes it from pod_info).
const POD = { ip: '10.244.1.5', mac: '0a:58:0a:f4:01:05', ifindex: 1 };
const REMOTE_POD = '10.244.2.7';
/** A remote pod our pod has not talked to: no egress entry. */
const UNKNOWN_POD = '10.244.3.9';
const GW_MAC = '0a:58:0a:f4:01:01';
const VTEP_MAC = 'aa:bb:cc:00:02:02';
const NIC = 2;
const OUR_KEY = 9;
const THEIR_KEY = 23;
const POD_SPORT = 40000;
const POD_DPORT = 80;

// Every frame must cover the 128 bytes the wrappers restore; a 100-byte TCP
// payload gets the smallest of them (a pod packet) to 154.
const PAYLOAD = { len: 100, fill: 'counter' as const };

const tcp = (sport: number, dport: number): Ipv4Spec['l4'] =>
  ({ tcp: { sport, dport, seq: 1, ack: 2, flags: 'PA', payload: PAYLOAD } });

/** A pod packet as it leaves the pod (masq's input). */
const podPacket = (dst = REMOTE_POD, sport = POD_SPORT, dport = POD_DPORT): FrameSpec =>
  ({ eth: { src: POD.mac, dst: GW_MAC }, ipv4: { src: POD.ip, dst, id: 0x1234, df: true, l4: tcp(sport, dport) } });

/** A Service the pod talks to on another connection: CLUSTER_IP:SVC_PORT, DNATed to REMOTE_POD:POD_DPORT. */
const CLUSTER_IP = '10.96.0.10';
const SVC_PORT = 443;
const SVC_SPORT = POD_SPORT + 7;

/** The same pod packet in the overlay, at our NIC's egress (init's input). */
const overlayOut = (): FrameSpec => ({
  eth: { src: HERE.mac, dst: PEER.mac },
  ipv4: {
    src: HERE.ip, dst: PEER.ip, id: 0x4321,
    l4: { udp: { sport: 51000, dport: 8472, checksum: 'none', payload: { vxlan: { vni: 1 }, inner: { ...podPacket(), eth: { src: POD.mac, dst: VTEP_MAC } } } } },
  },
});

/** The peer's masqueraded reply, at our NIC's ingress (restore's input). */
const masqueraded = (dport = POD_SPORT): FrameSpec => ({
  eth: { src: PEER.mac, dst: HERE.mac },
  ipv4: { src: PEER.ip, dst: HERE.ip, id: 0x77, df: true, rf: true, tos: OUR_KEY << 2, l4: tcp(POD_DPORT, dport) },
});

/** Host-to-host traffic, ours or the peer's. */
const hostPacket = (src: string, dst: string): FrameSpec => ({
  eth: { src: src === HERE.ip ? HERE.mac : PEER.mac, dst: src === HERE.ip ? PEER.mac : HERE.mac },
  ipv4: { src, dst, id: 0x99, df: true, l4: tcp(22, 50022) },
});

const PACKETS = {
  pod: buildFrame(podPacket()),
  podUnknownPair: buildFrame(podPacket(UNKNOWN_POD)),
  /** A learned pair, but a connection the host's conntrack does not know. */
  podUnknownFlow: buildFrame(podPacket(REMOTE_POD, POD_SPORT + 1)),
  serviceRequest: buildFrame(podPacket(CLUSTER_IP, SVC_SPORT, SVC_PORT)),
  serviceReply: buildFrame(masqueraded(SVC_SPORT)),
  overlayOut: buildFrame(overlayOut()),
  masqueraded: buildFrame(masqueraded()),
  hostOut: buildFrame(hostPacket(HERE.ip, PEER.ip)),
  hostIn: buildFrame(hostPacket(PEER.ip, HERE.ip)),
};

const ZERO = arrayIndex.encode({ index: 0 });

const noPath = {
  last_seen: 0n, local_mac: '00:00:00:00:00:00', remote_mac: '00:00:00:00:00:00', local_ip: '0.0.0.0',
  remote_ip: '0.0.0.0', ifindex: 0, local_key: 0, remote_key: 0, remote_ready: 0,
};

interface Maps {
  pod_info: BpfMap; egress_cache: BpfMap; egress_filter: BpfMap; ingress_cache: BpfMap; config: BpfMap;
  policy_table: BpfMap; policy_start: BpfMap; counters: BpfMap; bench_packet: BpfMap; nodes: BpfMap; clock: BpfMap;
}

/** The kernel's tick, found once a process (it blocks CALIBRATION_GAP_MS), as the agent finds it at start. */
let tickNs: bigint | undefined;

/**
 * The clock map calibrated as the agent keeps it (dataplane/agent/clock.ts),
 * so that the programs read jiffies, not the coarse clock: what they cost on
 * a node. A kernel whose tick cannot be told stops the run rather than
 * measure the fallback under the same names.
 */
function calibrateClock(map: BpfMap, probe: BpfProgram): void {
  if (tickNs === undefined) {
    const t = measureTick(probe).tick;
    if ('why' in t) throw new BenchError(`cannot calibrate the clock map as the agent would (${t.why}): the programs would read the coarse clock`);
    tickNs = t.tickNs;
  }
  map.update(ZERO, clock.encode(clockFor(probeSettled(probe), tickNs)));
}

/** The pod, the NIC, and a pod pair learned both ways: what every object starts from. */
function learnedPair(m: Maps): void {
  m.pod_info.update(podIp.encode({ ip: POD.ip }), podInfo.encode({ ifindex: POD.ifindex, mac: POD.mac, ...NO_HOST_NETNS }), 'noexist');
  // A Kubernetes node's agent knows the Service range (--service-cidr).
  m.config.update(ZERO, config.encode({ nic_ifindex: NIC, flags: 0, ...NO_OVERLAY, service_net: '10.96.0.0', service_mask: '255.240.0.0', ...FLANNEL_PORTS }));
  // The node set (README "Threat model"): init learns and restore listens only with it.
  m.nodes.update(nodeIp.encode({ ip: HERE.ip }), nodeInfo.encode({ flags: NodeFlag.SELF }), 'noexist');
  m.nodes.update(nodeIp.encode({ ip: PEER.ip }), nodeInfo.encode({ flags: 0 }), 'noexist');
  m.egress_cache.update(
    egressKey.encode({ local_pod: POD.ip, remote_pod: REMOTE_POD }),
    path.encode({ ...noPath, local_mac: HERE.mac, remote_mac: PEER.mac, local_ip: HERE.ip, remote_ip: PEER.ip, ifindex: POD.ifindex, local_key: OUR_KEY, remote_key: THEIR_KEY, remote_ready: 1 }),
    'noexist',
  );
  // (ifindex: the pod's veth, which init records and its fast path requires.)
  // The pair's bit in egress_filter, as init sets it when it creates the entry.
  fillEgressFilter(m.egress_cache, m.egress_filter);
  m.ingress_cache.update(
    ingressKey.encode({ remote_host: PEER.ip, key: OUR_KEY }),
    path.encode({ ...noPath, local_mac: POD.mac, remote_mac: VTEP_MAC, local_ip: POD.ip, remote_ip: REMOTE_POD, ifindex: POD.ifindex, local_key: OUR_KEY }),
    'noexist',
  );
}

// ---- policy states ----
//
// Rule sets as the agent stores them, compiled and written by the agent's own
// PolicyTable. The "N masks" rows keep the rule sets (and names) of the hash
// design they were measured on: rules naming N distinct sets of fields.

const F = { SRC_IP: 1, DST_IP: 2, SRC_PORT: 4, DST_PORT: 8, PROTOCOL: 16 } as const;
/** "deny tcp to ip:port", the commonest shape of rule, and the one the 1-mask rows use. */
const DST_SERVICE = F.DST_IP | F.DST_PORT | F.PROTOCOL;

const ip = (base: string, i: number) => u32ToIp(ipToU32(base) + i);

/**
 * Rule i naming the fields of mask m. Every field named is set to a value
 * injective in i, never "any", and never the bench packet's own, so no rule
 * matches the packet.
 */
function missRule(mask: number, i: number): PolicyRuleSpec {
  if (mask === F.PROTOCOL && i >= 249) throw new Error(`missRule: ${i + 1} protocol-only rules: there are not that many protocols besides TCP`);
  const proto = !(mask & F.PROTOCOL) ? undefined : mask !== F.PROTOCOL ? 17 : i < 5 ? 1 + i : 2 + i;
  return {
    dir: 'egress',
    src: mask & F.SRC_IP ? ip('10.96.0.1', i) : undefined,
    dst: mask & F.DST_IP ? ip('10.97.0.1', i) : undefined,
    sport: mask & F.SRC_PORT ? 1024 + i : undefined,
    dport: mask & F.DST_PORT ? 20000 + i : undefined,
    proto,
  };
}

/** Many services: distinct dst IPs, tcp:443. */
function serviceRules(n: number): PolicyRuleSpec[] {
  return Array.from({ length: n }, (_, i) => ({ dir: 'egress', dst: ip('10.97.0.1', i), dport: 443, proto: 'tcp' }));
}

function perMask(masks: number[], each: number): PolicyRuleSpec[] {
  return masks.flatMap((m) => Array.from({ length: each }, (_, i) => missRule(m, i)));
}

/**
 * 1,000 rules as NetworkPolicies make them: for each of 100 local pods (the
 * bench pod among them), egress denied to 10 peer blocks of prefix lengths
 * 8 to 26, each with an exception, on a TCP port range. nested: the blocks all
 * hold the bench packet's destination (the deepest path an LPM walk can take
 * through them); else they are apart, one of them holding it. Either way the
 * packet's walk matches its pod and a block, and misses on the port range.
 */
function kubernetesRules(nested: boolean): PolicyRuleSpec[] {
  const out: PolicyRuleSpec[] = [];
  for (let pod = 0; pod < 100; pod++) {
    const src = pod === 0 ? POD.ip : ip('10.244.1.100', pod);
    for (let peer = 0; peer < 10; peer++) {
      const len = 8 + 2 * peer;
      const at = nested || peer === 9 ? ipToU32(REMOTE_POD) : ipToU32(`${20 + 10 * peer}.0.0.0`);
      const net = (at & (0xffffffff << (32 - len))) >>> 0;
      // the half of the block the destination is not in
      const half = ((net | (~at & (1 << (31 - len)))) >>> 0) & (0xffffffff << (31 - len));
      out.push({ dir: 'egress', src, dst: `${u32ToIp(net)}/${len}`, dstExcept: [`${u32ToIp(half >>> 0)}/${len + 1}`], dport: 3000 + 100 * peer, dportEnd: 3050 + 100 * peer, proto: 'tcp' });
    }
  }
  return out;
}

/**
 * The longest walk there is, whatever the rules: all 13 bytes of the key
 * (bpf/policy.h reads each at most once). The packet matches the rule's source,
 * destination, protocol and destination port, and misses its source port range
 * on the last byte (40001-40100 shares 40000's first byte).
 */
const DEEPEST: PolicyRuleSpec[] = [{ dir: 'egress', src: POD.ip, dst: REMOTE_POD, dport: POD_DPORT, sport: POD_SPORT + 1, sportEnd: POD_SPORT + 100, proto: 'tcp' }];

/** One BPF object per map state, so rows can be interleaved without refilling tables between runs. */
const STATES = {
  base: undefined,
  rules1: serviceRules(1),
  rules1000: serviceRules(1000),
  rules60000: serviceRules(60000),
  masks5: perMask([DST_SERVICE, F.DST_IP, F.SRC_IP, F.SRC_IP | F.DST_IP, F.DST_PORT | F.PROTOCOL], 200),
  masks31: perMask(Array.from({ length: 31 }, (_, i) => i + 1), 32),
  k8s1000: kubernetesRules(false),
  k8sNested: kubernetesRules(true),
  deepest: DEEPEST,
  masq2masks: perMask([DST_SERVICE, F.SRC_IP], 500),
  /** The unknown pair's bit set in egress_filter, with no entry: a gone pair's bit, or a colliding pair's. */
  staleBit: undefined,
  /** The clock map uncalibrated (tick_ns 0): the programs call bpf_ktime_get_coarse_ns(), as before the map. */
  coarseClock: undefined,
} satisfies Record<string, PolicyRuleSpec[] | undefined>;
type StateName = keyof typeof STATES;

// ---- rows ----

export type Kind = 'baseline' | 'full' | 'pass' | 'policy';

/** The most a row may cost, as a multiple of the empty program (the goals). */
const GOALS: Record<Kind, number | null> = { baseline: null, full: 3, pass: 1.5, policy: 4 };

interface RowDef {
  name: string;
  kind: Kind;
  state: StateName;
  program: string;
  packet: Buffer;
  /** Runs through a bench_* wrapper, which restores the packet from bench_packet. */
  resets: boolean;
  /** Problems with a single run's verdict and output; none means it took the path the row names. */
  check(retval: number, out: Buffer, input: Buffer): string[];
  /** The counter this path bumps once per packet (none for the bench-only programs). */
  counter?: CounterName;
  /** Other counters it bumps once per packet too (a Service's NAT: MASQUERADED or RESTORED). */
  also?: CounterName[];
}

type Fields = Record<string, string | number | boolean>;

function expectFields(out: Buffer, want: Fields): string[] {
  const got = flattenFrame(decodeFrame(out));
  const bad = Object.entries(want)
    .filter(([k, v]) => got[k] !== v)
    .map(([k, v]) => `${k} is ${JSON.stringify(got[k])}, want ${JSON.stringify(v)}`);
  return [...bad, ...checksumProblems(out)];
}

function expectRetval(retval: number, want: number): string[] {
  return retval === want ? [] : [`returned ${retval}, want ${want}`];
}

const untouched = (retval: number, out: Buffer, input: Buffer): string[] => [
  ...expectRetval(retval, TC_ACT_UNSPEC),
  ...(out.equals(input) ? [] : ['changed the packet, want it untouched']),
];

const ROWS: RowDef[] = [
  { name: 'empty', kind: 'baseline', state: 'base', program: 'bench_empty', packet: PACKETS.hostOut, resets: false, check: untouched },
  { name: 'reset', kind: 'baseline', state: 'base', program: 'bench_reset_only', packet: PACKETS.hostOut, resets: true, check: untouched },
  {
    name: 'init (learn, known key)', kind: 'full', state: 'base', program: 'bench_init', packet: PACKETS.overlayOut, resets: true, counter: 'LEARNED',
    check: (retval, out, input) => [
      ...expectRetval(retval, TC_ACT_UNSPEC),
      // The signal: RF, our key in DSCP, DF because we know the peer's key.
      ...expectFields(out, { 'ipv4.rf': true, 'ipv4.df': true, 'ipv4.tos': OUR_KEY << 2, 'ipv4.src': HERE.ip, 'ipv4.dst': PEER.ip, 'inner.ipv4.src': POD.ip, 'inner.ipv4.rf': false }),
      ...(out.subarray(34).equals(input.subarray(34)) ? [] : ['changed more than the outer IPv4 header']),
    ],
  },
  {
    name: 'restore (masqueraded → pod)', kind: 'full', state: 'base', program: 'bench_restore', packet: PACKETS.masqueraded, resets: true, counter: 'RESTORED',
    check: (retval, out) => [
      ...expectRetval(retval, TC_ACT_REDIRECT),
      ...expectFields(out, { 'eth.src': VTEP_MAC, 'eth.dst': POD.mac, 'ipv4.src': REMOTE_POD, 'ipv4.dst': POD.ip, 'ipv4.rf': false, 'ipv4.tos': 0 }),
    ],
  },
  {
    name: 'masq (pod → NIC)', kind: 'full', state: 'base', program: 'bench_masq', packet: PACKETS.pod, resets: true, counter: 'MASQUERADED',
    check: (retval, out) => [
      ...expectRetval(retval, TC_ACT_REDIRECT),
      ...expectFields(out, { 'eth.src': HERE.mac, 'eth.dst': PEER.mac, 'ipv4.src': HERE.ip, 'ipv4.dst': PEER.ip, 'ipv4.rf': true, 'ipv4.tos': THEIR_KEY << 2 }),
    ],
  },
  {
    name: 'masq, Service request (DNAT to the pair)', kind: 'full', state: 'base', program: 'bench_masq', packet: PACKETS.serviceRequest, resets: true, counter: 'SERVICE_NAT', also: ['MASQUERADED'],
    check: (retval, out) => [
      ...expectRetval(retval, TC_ACT_REDIRECT),
      ...expectFields(out, { 'ipv4.src': HERE.ip, 'ipv4.dst': PEER.ip, 'ipv4.rf': true, 'ipv4.tos': THEIR_KEY << 2, 'tcp.sport': SVC_SPORT, 'tcp.dport': POD_DPORT }),
    ],
  },
  {
    name: 'restore, Service reply (from the ClusterIP)', kind: 'full', state: 'base', program: 'bench_restore', packet: PACKETS.serviceReply, resets: true, counter: 'SERVICE_NAT', also: ['RESTORED'],
    check: (retval, out) => [
      ...expectRetval(retval, TC_ACT_REDIRECT),
      ...expectFields(out, { 'eth.dst': POD.mac, 'ipv4.src': CLUSTER_IP, 'ipv4.dst': POD.ip, 'ipv4.rf': false, 'tcp.sport': SVC_PORT, 'tcp.dport': SVC_SPORT }),
    ],
  },
  { name: 'init pass (host packet)', kind: 'pass', state: 'base', program: 'init', packet: PACKETS.hostOut, resets: false, counter: 'PASSED', check: untouched },
  { name: 'restore pass (host TCP, no RF)', kind: 'pass', state: 'base', program: 'restore', packet: PACKETS.hostIn, resets: false, counter: 'PASSED', check: untouched },
  { name: 'masq pass (no egress entry)', kind: 'pass', state: 'base', program: 'masq', packet: PACKETS.podUnknownPair, resets: false, counter: 'PASSED', check: untouched },
  {
    name: 'masq pass (no entry, its filter bit set: one hash miss)', kind: 'pass', state: 'staleBit', program: 'masq', packet: PACKETS.podUnknownPair, resets: false,
    counter: 'PASSED', check: untouched,
  },
  { name: 'masq, flow unknown to conntrack (overlay)', kind: 'pass', state: 'base', program: 'masq', packet: PACKETS.podUnknownFlow, resets: false, counter: 'CT_REFUSED', check: untouched },
  ...([
    ['policy: 0 rules', 'base'],
    ['policy: 1 mask, 1 rule', 'rules1'],
    ['policy: 1 mask, 1000 rules', 'rules1000'],
    ['policy: 1 mask, 60000 rules', 'rules60000'],
    ['policy: 5 masks, 1000 rules', 'masks5'],
    ['policy: 31 masks, 992 rules', 'masks31'],
    ['policy: 1000 Kubernetes-style rules', 'k8s1000'],
    ['policy: 1000 Kubernetes-style rules, nested blocks', 'k8sNested'],
    ['policy: deepest walk (13 lookups, every byte of the key)', 'deepest'],
  ] as const).map(([name, state]): RowDef => ({ name, kind: 'policy', state, program: 'bench_policy', packet: PACKETS.pod, resets: false, check: untouched })),
  {
    name: 'masq + 1000 rules / 2 masks', kind: 'full', state: 'masq2masks', program: 'bench_masq', packet: PACKETS.pod, resets: true, counter: 'MASQUERADED',
    check: (retval, out) => [
      ...expectRetval(retval, TC_ACT_REDIRECT),
      ...expectFields(out, { 'ipv4.src': HERE.ip, 'ipv4.dst': PEER.ip, 'ipv4.rf': true, 'ipv4.tos': THEIR_KEY << 2 }),
    ],
  },
];
// The full paths once more with the clock map uncalibrated (the fallback, what an agent of an
// earlier version leaves): the clock's share of each, side by side in every run.
ROWS.push(...['init (learn, known key)', 'restore (masqueraded → pod)', 'masq (pod → NIC)'].map((n): RowDef => (
  { ...ROWS.find((r) => r.name === n)!, name: `${n}, coarse clock (tick_ns 0)`, state: 'coarseClock' })));

export const ROW_NAMES = ROWS.map((r) => r.name);

// ---- running ----

export class BenchError extends Error {}

interface Loaded { obj: BpfObject; maps: Maps; programs: Map<string, BpfProgram>; policy?: PolicyTable }

const MAP_NAMES = ['pod_info', 'egress_cache', 'egress_filter', 'ingress_cache', 'config', 'policy_table', 'policy_start', 'counters', 'bench_packet', 'nodes', 'clock'] as const;

/**
 * Whether an object (--object, or the default build) is a bench build this file can
 * measure, checked on the opened object before anything loads: a file that is no BPF
 * object, the production or test build (no bench_* wrappers), or one with other table
 * sizes is refused with what it lacks, not met halfway through the rows.
 */
function checkBenchObject(objectPath: string): void {
  let obj: BpfObject;
  try {
    obj = BpfObject.open(objectPath);
  } catch (e) {
    throw new BenchError(`${objectPath} cannot be opened as a BPF object: ${(e as Error).message.split('\n')[0]}`);
  }
  try {
    const maps = new Set(obj.maps());
    const programs = new Set(obj.programs());
    const lacks = [
      ...MAP_NAMES.filter((m) => !maps.has(m)).map((m) => `map ${m}`),
      ...[...new Set([...ROWS.map((r) => r.program), 'clock_probe'])].filter((p) => !programs.has(p)).map((p) => `program ${p}`),
    ];
    if (lacks.length > 0) {
      throw new BenchError(`${objectPath} is not a bench build (make -C bpf builds one from bpf/bench.bpf.c): it lacks ${lacks.join(', ')}`);
    }
    // The point of the bench object is production-sized tables (hash buckets, cache footprint).
    const want = MAX_ENTRIES.production;
    const got = { pods: obj.map('pod_info').maxEntries, paths: obj.map('egress_cache').maxEntries, policySlots: obj.map('policy_table').maxEntries };
    if (got.pods !== want.pods || got.paths !== want.paths || got.policySlots !== want.policySlots) {
      throw new BenchError(`${objectPath} has map sizes ${JSON.stringify(got)}, want the production ${JSON.stringify(want)}`);
    }
    const packet = obj.map('bench_packet').valueSize;
    if (packet !== RESET_LEN) {
      throw new BenchError(`${objectPath}: bench_packet holds ${packet} bytes, bench/programs.ts assumes ${RESET_LEN} (BENCH_RESET_LEN)`);
    }
  } finally {
    obj.close();
  }
}

function loadState(objectPath: string, name: StateName, log: (s: string) => void): Loaded {
  const obj = BpfObject.open(objectPath);
  try {
    obj.load();
    const maps = {} as Maps;
    for (const m of MAP_NAMES) maps[m] = obj.map(m);
    if (name !== 'coarseClock') calibrateClock(maps.clock, obj.program('clock_probe'));
    learnedPair(maps);
    if (name === 'staleBit') {
      // An entry for the unknown pair, its bit set, then the entry gone (expired, purged).
      const k = egressKey.encode({ local_pod: POD.ip, remote_pod: UNKNOWN_POD });
      maps.egress_cache.update(k, path.encode(noPath), 'noexist');
      fillEgressFilter(maps.egress_cache, maps.egress_filter);
      maps.egress_cache.delete(k);
    }
    const setup = STATES[name];
    let policy: PolicyTable | undefined;
    if (setup) {
      if (setup.length > 5000) log(`bench:prog: compiling ${setup.length} policy rules…`);
      policy = new PolicyTable(maps.policy_table, maps.policy_start, setup.map((r, i) => normaliseRule(r, () => i + 1)));
      policy.sync();
    }
    return { obj, maps, programs: new Map(), policy };
  } catch (e) {
    obj.close();
    throw e;
  }
}

function counters(m: Maps): Record<CounterName, bigint> {
  const out = {} as Record<CounterName, bigint>;
  for (let i = 0; i < COUNTER_COUNT; i++) {
    const all = m.counters.lookup(arrayIndex.encode({ index: i }));
    if (!all) throw new BenchError(`counters[${i}] is missing`);
    let sum = 0n;
    for (let off = 0; off < all.length; off += 8) sum += counterValue.decode(all.subarray(off, off + 8)).value;
    out[COUNTER_NAMES[i]] = sum;
  }
  return out;
}

class Runner {
  private readonly loaded = new Map<StateName, Loaded>();

  constructor(private readonly objectPath: string, private readonly log: (s: string) => void) {}

  state(name: StateName): Loaded {
    let l = this.loaded.get(name);
    if (!l) {
      l = loadState(this.objectPath, name, this.log);
      this.loaded.set(name, l);
    }
    return l;
  }

  program(row: RowDef): BpfProgram {
    const l = this.state(row.state);
    let p = l.programs.get(row.program);
    if (!p) {
      p = l.obj.program(row.program);
      l.programs.set(row.program, p);
    }
    return p;
  }

  /** One test run of a row; wrappers share their object's bench_packet, so it is written every time. */
  run(row: RowDef, repeat: number) {
    const l = this.state(row.state);
    if (row.resets) l.maps.bench_packet.update(ZERO, row.packet.subarray(0, RESET_LEN));
    return this.program(row).testRun({ data: row.packet, repeat });
  }

  close(): void {
    for (const l of this.loaded.values()) l.obj.close();
    this.loaded.clear();
  }
}

function guard(row: RowDef, what: string, problems: string[]): void {
  if (problems.length) {
    throw new BenchError(`row "${row.name}" (${row.program}): ${what}:\n  ${problems.join('\n  ')}\nits number would not measure the path it names, so nothing is reported`);
  }
}

/**
 * A policy row measures nothing if the walk never reaches the rules (a
 * mis-encoded key, a wrong root): a rule matching the packet, added through
 * the same PolicyTable, must drop it.
 */
function positiveControl(runner: Runner, row: RowDef): void {
  const policy = runner.state(row.state).policy;
  if (!policy) return;
  if (row.state === 'deepest') {
    const rules = STATES.deepest.map((r, i) => normaliseRule(r, () => i + 1));
    const { read } = walkTables(compile(rules), 'egress', policyKey(ipToU32(POD.ip), ipToU32(REMOTE_POD), 6, POD_DPORT, POD_SPORT));
    guard(row, `the walk reads ${read.length} bytes of the key, want all ${POLICY_KEY_BYTES}`, read.length === POLICY_KEY_BYTES ? [] : ['not the deepest walk']);
  }
  const hit = policy.add({ dir: 'egress', src: POD.ip, dst: REMOTE_POD, sport: POD_SPORT, dport: POD_DPORT, proto: 'tcp' });
  try {
    const r = runner.run(row, 1);
    guard(row, `a rule matching the packet (${describeRule(hit)}) did not drop it`, expectRetval(r.retval, TC_ACT_SHOT));
  } finally {
    policy.remove(hit.id);
  }
}


export interface RowResult {
  name: string;
  kind: Kind;
  ns: { median: number; min: number; max: number };
  /** full paths: the wrapper minus bench_reset_only, paired run by run. */
  net_ns?: number;
  /** Median over runs of (this row / empty of the same run); for full paths, of net / empty. */
  ratio: number;
  /** Most ratio allowed by the issue; null for the baselines. */
  goal: number | null;
  met: boolean | null;
  /** --cold, the rows of the base state: one packet a test run (measureCold). */
  cold?: ColdResult;
}

/** A median over rounds for each load of the object, then the median, least and most of those. */
export interface Spread { median: number; min: number; max: number }

export interface ColdResult {
  /**
   * ns of one packet alone in a test run, net as the hot figure is (full paths: − reset, the
   * others: − empty, paired round by round; the baselines: their own ns, the test run's timer
   * and setup around one packet), with only the test-run syscall's own work in between.
   */
  alone: Spread;
  /** The same, with COLD.pages pages touched just before each packet (the TLBs and L1d evicted). */
  evicted: Spread;
  /** Full paths: evicted's median over the hot net_ns; null for the other rows. */
  evicted_x_hot: number | null;
}

export interface BenchReport {
  machine: Machine; date: string; repeat: number; runs: number; rows: RowResult[];
  /** The object measured (--object or the default build), and its SHA-256: what a side-by-side record compares. */
  object: { path: string; sha256: string };
  /** --cold: how it was measured. */
  cold?: { loads: number; rounds: number; pages: number };
}

export interface BenchOptions {
  repeat?: number;
  runs?: number;
  objectPath?: string;
  /** Progress lines; stderr by default. */
  log?: (line: string) => void;
  /**
   * After the timed runs, each row once more with this many packets, its start and end
   * (CLOCK_MONOTONIC, as `perf record -k CLOCK_MONOTONIC` stamps samples) pushed to
   * `windows`: what --profile attributes a recording's samples by (bench/prog-profile.ts).
   */
  profile?: { repeat: number; windows: RowWindow[] };
  /** Then the base state's rows one packet at a time (measureCold). */
  cold?: { loads: number; rounds: number; pages: number };
}

/** One row's profiling run: when it ran and how many packets it ran. */
export interface RowWindow { name: string; kind: Kind; startNs: bigint; endNs: bigint; packets: number }

export function runBench(opts: BenchOptions = {}): BenchReport {
  const repeat = opts.repeat ?? DEFAULTS.repeat;
  const runs = opts.runs ?? DEFAULTS.runs;
  const objectPath = opts.objectPath ?? BENCH_OBJECT;
  const log = opts.log ?? ((s: string) => process.stderr.write(`${s}\n`));
  if (!Number.isInteger(repeat) || repeat < 1 || repeat > 0x7fffffff) throw new BenchError(`repeat ${repeat}: want an integer from 1 to 2^31-1`);
  if (!Number.isInteger(runs) || runs < 1) throw new BenchError(`runs ${runs}: want a positive integer`);
  if (process.getuid?.() !== 0) {
    throw new BenchError('not root: loading BPF programs and BPF_PROG_TEST_RUN need CAP_BPF + CAP_NET_ADMIN; run it as root (sudo npm run bench:prog)');
  }
  if (!existsSync(objectPath)) {
    throw new BenchError(objectPath === BENCH_OBJECT ? `${objectPath} is missing: build it with 'make -C bpf' (npm run bench:prog does this first)` : `${objectPath} (--object) does not exist`);
  }
  checkBenchObject(objectPath);
  // Hashed before it loads: the report names the bytes that were measured.
  const object = { path: objectPath, sha256: createHash('sha256').update(readFileSync(objectPath)).digest('hex') };
  for (const r of ROWS) {
    if (r.resets && r.packet.length < RESET_LEN) throw new BenchError(`row "${r.name}": a ${r.packet.length}-byte packet is shorter than the ${RESET_LEN} bytes the wrapper restores`);
  }

  // The full paths consult the host's conntrack (bpf/conntrack.h): they run in a network
  // namespace of this thread's own, whose table holds the pair's connection as established
  // and liberal, as the agent leaves it. BPF_PROG_TEST_RUN looks it up there.
  unshareNetns();
  const ct = new Conntrack();
  try {
    ct.create({
      orig: { src: POD.ip, dst: REMOTE_POD, sport: POD_SPORT, dport: POD_DPORT, proto: 6 },
      status: IPS_SEEN_REPLY | IPS_ASSURED, tcpState: TCP_CONNTRACK_ESTABLISHED, liberal: [true, true],
    });
    // A connection to the Service, which the host DNATed to the same remote pod.
    ct.create({
      orig: { src: POD.ip, dst: CLUSTER_IP, sport: SVC_SPORT, dport: SVC_PORT, proto: 6 }, dnat: { ip: REMOTE_POD, port: POD_DPORT },
      status: IPS_SEEN_REPLY | IPS_ASSURED, tcpState: TCP_CONNTRACK_ESTABLISHED, liberal: [true, true],
    });
  } finally {
    ct.close();
  }
  const runner = new Runner(objectPath, log);
  try {
    const states = [...new Set(ROWS.map((r) => r.state))];
    log(`bench:prog: loading ${objectPath} ${states.length} times, one per map state…`);
    for (const s of states) runner.state(s);

    // Before timing anything: each row once, its verdict and output checked.
    const single = new Map<RowDef, { retval: number; data: Buffer }>();
    for (const row of ROWS) {
      positiveControl(runner, row);
      const r = runner.run(row, 1);
      guard(row, 'a single run did not take its path', row.check(r.retval, r.data, row.packet));
      single.set(row, { retval: r.retval, data: Buffer.from(r.data) });
    }

    // Warms caches and the CPU clock; not counted.
    for (const row of ROWS) runner.run(row, Math.min(repeat, 100_000));

    const ns = new Map<RowDef, number[]>(ROWS.map((r) => [r, []]));
    for (let k = 0; k < runs; k++) {
      log(`bench:prog: run ${k + 1}/${runs} (${repeat} packets per row)`);
      // Interleaved, A B C … A B C …, so that a noisy moment hits one run of every row, not every run of one.
      for (const row of ROWS) {
        const m = runner.state(row.state).maps;
        const before = row.counter ? counters(m) : undefined;
        const r = runner.run(row, repeat);
        const s = single.get(row)!;
        const problems = [
          ...(r.retval === s.retval ? [] : [`returned ${r.retval}, the single run ${s.retval}`]),
          ...(r.data.equals(s.data) ? [] : ['left a final packet that differs from the single run\'s']),
        ];
        if (before) {
          // Per packet exactly one bump of this counter and none of any other: every iteration took the path.
          const after = counters(m);
          for (const c of COUNTER_NAMES) {
            const want = c === row.counter || row.also?.includes(c) ? BigInt(repeat) : 0n;
            if (after[c] - before[c] !== want) problems.push(`counter ${c} moved by ${after[c] - before[c]}, want ${want}`);
          }
        }
        guard(row, `the run of ${repeat} packets did not all take the single run's path`, problems);
        ns.get(row)!.push(r.durationNs);
      }
    }

    const byName = (n: string) => ROWS.find((r) => r.name === n)!;
    const empty = ns.get(byName('empty'))!;
    const reset = ns.get(byName('reset'))!;
    const rows = ROWS.map((row): RowResult => {
      const xs = ns.get(row)!;
      const goal = GOALS[row.kind];
      // Paired run by run: a wrapper and the reset it contains ran seconds apart, under the same conditions.
      const full = row.kind === 'full';
      const net = full ? xs.map((x, k) => x - reset[k]) : xs;
      const ratio = median(net.map((x, k) => x / empty[k]));
      return {
        name: row.name, kind: row.kind, ns: { median: median(xs), min: Math.min(...xs), max: Math.max(...xs) },
        ...(full ? { net_ns: median(net) } : {}),
        ratio, goal, met: goal === null ? null : ratio <= goal,
      };
    });
    if (opts.profile) {
      const { repeat: n, windows } = opts.profile;
      log(`bench:prog: profiling run (${n} packets per row)`);
      for (const row of ROWS) {
        const startNs = process.hrtime.bigint();
        const r = runner.run(row, n);
        const endNs = process.hrtime.bigint();
        guard(row, 'the profiling run did not take the single run\'s path', r.retval === single.get(row)!.retval ? [] : [`returned ${r.retval}`]);
        windows.push({ name: row.name, kind: row.kind, startNs, endNs, packets: n });
      }
    }
    if (opts.cold) {
      const cold = measureCold(objectPath, opts.cold, single, log);
      for (const r of rows) {
        const c = cold.get(r.name);
        if (!c) continue;
        // Full paths only: a pass-through's hot figure net of the empty program is a few ns, and a ratio to it says little.
        const hot = r.kind === 'full' ? r.net_ns! : null;
        r.cold = { ...c, evicted_x_hot: hot === null ? null : c.evicted.median / hot };
      }
    }
    return { machine: machine(), date: new Date().toISOString(), repeat, runs, object, rows, ...(opts.cold ? { cold: opts.cold } : {}) };
  } finally {
    runner.close();
  }
}

// ---- cold: one packet at a time ----

/**
 * 4,096 pages (16 MiB), one cache line touched in each, a different line of
 * each page so that the touches spread over every cache set: more pages than
 * this CPU's data TLBs hold (64 + 2,048 entries on a Zen; other x86 have
 * fewer), and 256 KiB of lines, four times L1d, a quarter of L2 here. What
 * the rest of a node's work does to a program between two of its packets,
 * roughly; a real node's may do more (L2, L3) or less.
 */
export const COLD = { loads: 3, rounds: 1000, pages: 4096 } as const;
const PAGE = 4096;

/**
 * A buffer whose pages are 4 KiB: with transparent huge pages "always" it
 * would sit in a few 2 MiB pages and evict nothing from the TLB.
 */
function evictor(pages: number): Buffer {
  let thp = '';
  try {
    thp = readFileSync('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8');
  } catch {
    // No THP in this kernel: every page is 4 KiB.
  }
  if (thp.includes('[always]')) {
    throw new BenchError('--cold touches 4 KiB pages to evict the TLB, and transparent huge pages are "always" here ' +
      '(/sys/kernel/mm/transparent_hugepage/enabled): its buffer would sit in a few huge pages; set it to madvise for the run');
  }
  const buf = Buffer.alloc(pages * PAGE);
  buf.fill(1); // every page faulted in now, not during the measurement
  return buf;
}

function touch(buf: Buffer): void {
  for (let i = 0, off = 0; off < buf.length; i++, off += PAGE) buf[off + ((i * 64) % PAGE)]++;
}

const spread = (xs: number[]): Spread => ({ median: median(xs), min: Math.min(...xs), max: Math.max(...xs) });

/**
 * The base state's rows, one packet per test run, alone and right after the
 * evictor, interleaved row by row and round by round; on `loads` fresh loads
 * of the object, because where the kernel puts a load's maps moves these
 * figures by more than a run's noise (measured: the same full path's median
 * up to 1.5× apart between two loads of one run). Every run's verdict is checked against the row's
 * single run: a cold figure is never one of another path.
 */
function measureCold(objectPath: string, opts: { loads: number; rounds: number; pages: number },
  single: Map<RowDef, { retval: number }>, log: (s: string) => void): Map<string, Omit<ColdResult, 'evicted_x_hot'>> {
  const rows = ROWS.filter((r) => r.state === 'base');
  const empty = rows.find((r) => r.name === 'empty')!;
  const reset = rows.find((r) => r.name === 'reset')!;
  const buf = evictor(opts.pages);
  const perLoad = { alone: new Map<RowDef, number[]>(), evicted: new Map<RowDef, number[]>() };
  for (let l = 0; l < opts.loads; l++) {
    log(`bench:prog: cold, load ${l + 1}/${opts.loads} (${opts.rounds} rounds, ${opts.pages} pages touched before each evicted packet)`);
    const runner = new Runner(objectPath, log);
    try {
      const ns = { alone: new Map<RowDef, number[]>(rows.map((r) => [r, []])), evicted: new Map<RowDef, number[]>(rows.map((r) => [r, []])) };
      for (let k = 0; k < opts.rounds; k++) {
        for (const row of rows) {
          for (const mode of k % 2 ? (['evicted', 'alone'] as const) : (['alone', 'evicted'] as const)) {
            if (row.resets) runner.state(row.state).maps.bench_packet.update(ZERO, row.packet.subarray(0, RESET_LEN));
            if (mode === 'evicted') touch(buf);
            const r = runner.program(row).testRun({ data: row.packet, repeat: 1 });
            const want = single.get(row)!.retval;
            guard(row, `a cold run (${mode}) did not take the single run's path`, r.retval === want ? [] : [`returned ${r.retval}, want ${want}`]);
            ns[mode].get(row)!.push(r.durationNs);
          }
        }
      }
      for (const mode of ['alone', 'evicted'] as const) {
        for (const row of rows) {
          const xs = ns[mode].get(row)!;
          const base = row.kind === 'baseline' ? undefined : ns[mode].get(row.resets ? reset : empty)!;
          const net = base ? xs.map((x, k) => x - base[k]) : xs;
          const acc = perLoad[mode].get(row) ?? [];
          acc.push(median(net));
          perLoad[mode].set(row, acc);
        }
      }
    } finally {
      runner.close();
    }
  }
  return new Map(rows.map((r) => [r.name, { alone: spread(perLoad.alone.get(r)!), evicted: spread(perLoad.evicted.get(r)!) }]));
}

// ---- output ----

const fmtNs = (x: number) => (Number.isInteger(x) ? String(x) : x.toFixed(1));

export function formatTable(r: BenchReport): string {
  const head = ['row', 'ns/pkt', 'min–max', 'net ns', '×empty', 'goal', 'met?'];
  const body = r.rows.map((row) => [
    row.name,
    fmtNs(row.ns.median),
    `${row.ns.min}–${row.ns.max}`,
    row.net_ns === undefined ? '' : fmtNs(row.net_ns),
    `${row.ratio.toFixed(2)}×`,
    row.goal === null ? '' : `≤ ${row.goal}×`,
    row.met === null ? '' : row.met ? 'yes' : 'NO',
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ').trimEnd();
  return [
    `XMasq programs under BPF_PROG_TEST_RUN: ${r.repeat} packets per run, median of ${r.runs} interleaved runs`,
    `machine: ${r.machine.cpu}, ${r.machine.cores} cores, kernel ${r.machine.kernel}; ${r.date}`,
    `object: ${r.object.path} (sha256 ${r.object.sha256.slice(0, 12)}…)`,
    '',
    line(head),
    line(widths.map((w) => '-'.repeat(w))),
    ...body.map(line),
    '',
    'full: through a bench_* wrapper; net = wrapper − reset of the same run, ×empty = net / empty.',
    'pass, policy: ×empty = ns / empty. Ratios are medians of per-run ratios; ns are the kernel\'s',
    'whole-ns averages per packet. Goals (issue): full ≤ 3×, pass-through ≤ 1.5×, policy new flow ≤ 4×.',
    ...(r.cold ? ['', formatCold(r)] : []),
  ].join('\n');
}

const fmtSpread = (s: Spread) => `${fmtNs(s.median)} (${fmtNs(s.min)}–${fmtNs(s.max)})`;

function formatCold(r: BenchReport): string {
  const c = r.cold!;
  const head = ['row', 'hot net ns', 'alone', 'evicted', 'evicted × hot'];
  const body = r.rows.filter((row) => row.cold).map((row) => [
    row.name,
    row.kind === 'baseline' ? '' : fmtNs(row.net_ns ?? row.ns.median - r.rows.find((x) => x.name === 'empty')!.ns.median),
    fmtSpread(row.cold!.alone),
    fmtSpread(row.cold!.evicted),
    row.cold!.evicted_x_hot === null ? '' : `${row.cold!.evicted_x_hot.toFixed(1)}×`,
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (cells: string[]) => cells.map((x, i) => (i === 0 ? x.padEnd(widths[i]) : x.padStart(widths[i]))).join('  ').trimEnd();
  return [
    `Cold: one packet per test run, ${c.rounds} rounds on each of ${c.loads} loads; ns net as above (the baselines: their own ns,`,
    `the test run's timer around one packet); median of the loads' medians (their least–most). alone: nothing between`,
    `two packets but the syscall; evicted: ${c.pages} pages touched just before each (the TLBs and L1d evicted).`,
    '',
    line(head),
    line(widths.map((w) => '-'.repeat(w))),
    ...body.map(line),
  ].join('\n');
}

const USAGE = `usage: npm run bench:prog -- [--json] [--repeat N] [--runs K] [--profile] [--cold] [--object PATH] [--help] [--version]

ns/packet of each XMasq program path with BPF_PROG_TEST_RUN on bpf/build/xmasq.bench.bpf.o
(production map sizes), next to an empty program. Run as root.

  --json        print only the JSON report on stdout (progress still goes to stderr)
  --repeat N    packets per test run (default ${DEFAULTS.repeat})
  --runs K      interleaved runs per row; the median is reported (default ${DEFAULTS.runs})
  --profile     then run every row once more under \`perf record\` and print where its
                nanoseconds go: the program's own instructions, each kind of helper or
                map operation it calls, the test-run loop (bench/prog-profile.ts; needs perf)
  --cold        then the base rows one packet per test run, alone and with ${COLD.pages} pages touched
                before each (the TLBs evicted), on ${COLD.loads} loads of the object: what a program
                costs in place on a node, where its maps' pages and lines are cold (~1 min more)
  --object PATH another bench build to measure (default bpf/build/xmasq.bench.bpf.o): another
                tree's, for a side-by-side run; the report names it by path and SHA-256
  --help        this text
  --version     the checkout's version`;

function positiveInt(flag: string, v: string | undefined, dflt: number): number {
  if (v === undefined) return dflt;
  if (!/^\d+$/.test(v) || Number(v) < 1) throw new BenchError(`${flag} ${v}: want a positive integer\n\n${USAGE}`);
  return Number(v);
}

export async function main(argv: string[]): Promise<number> {
  const line = commandLine('bench:prog', USAGE, argv, { json: { type: 'boolean' }, repeat: { type: 'string' }, runs: { type: 'string' }, profile: { type: 'boolean' }, cold: { type: 'boolean' }, object: { type: 'string' } });
  if (typeof line === 'number') return line;
  const args = line.values;
  let recording: Recording | undefined;
  try {
    const repeat = positiveInt('--repeat', args.repeat, DEFAULTS.repeat);
    const runs = positiveInt('--runs', args.runs, DEFAULTS.runs);
    const windows: RowWindow[] = [];
    if (args.profile) {
      try {
        recording = await Recording.start();
      } catch (e) {
        throw new BenchError((e as Error).message);
      }
    }
    const report = runBench({ repeat, runs, ...(args.object ? { objectPath: resolve(args.object) } : {}), ...(recording ? { profile: { repeat, windows } } : {}), ...(args.cold ? { cold: COLD } : {}) });
    let where: ReturnType<typeof breakdown> | undefined;
    if (recording) {
      const samples = await recording.stop();
      recording = undefined;
      where = breakdown(samples, windows);
    }
    if (args.json) {
      // One document: the profile, if any, as ns per packet by place, per row.
      const profile = where && { freq: PROFILE_FREQ, repeat, rows: Object.fromEntries([...where].map(([row, m]) => [row, Object.fromEntries(m)])) };
      process.stdout.write(`${JSON.stringify({ ...report, ...(profile ? { profile } : {}) }, null, 2)}\n`);
    } else {
      process.stdout.write(`${formatTable(report)}\n`);
      if (where) {
        process.stdout.write(`\nWhere the time goes (perf, cpu-clock at ${PROFILE_FREQ} Hz, ns per packet of one more run of ${repeat} packets per row;\n` +
          `wrapped rows include the reset row's work):\n\n${renderBreakdown(where, windows)}\n`);
      }
    }
    return 0;
  } catch (e) {
    if (e instanceof BenchError) {
      process.stderr.write(`bench:prog: ${e.message}\n`);
      return 1;
    }
    throw e;
  } finally {
    await recording?.stop().catch(() => undefined);
  }
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.exitCode = await main(process.argv.slice(2));
}
