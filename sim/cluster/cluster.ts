/**
 * The discrete-event simulator: N hosts × M pods on a Flannel-style VXLAN
 * overlay, with the XMasq programs at their hooks (masq at each pod's
 * host-side veth ingress, init at the NIC's TC egress, restore at its TC
 * ingress), the agent's control loops, and an underlay with latency, jitter
 * (hence reordering) and loss.
 *
 * Overlay path:  pod → veth (masq: pass) → cni0 → host stack → flannel.1
 *                encap → NIC egress (init) → wire → NIC ingress (restore:
 *                pass) → vxlan decap → host stack → cni0 → pod
 * Fast path:     pod → veth (masq: rewrite, redirect) → NIC egress (init:
 *                pass) → wire → NIC ingress (restore: rewrite, redirect peer) → pod
 * Host stack:    conntrack, a Service's DNAT, routing (TTL−1), FORWARD
 *                (ESTABLISHED first, deny rules, INVALID dropped), the reply's
 *                DNAT reversed (podStack). masq and restore read its conntrack:
 *                what it does not admit stays on the overlay, or is restored
 *                and handed to the stack.
 *
 * Everything inside a host happens at one instant; only the wire takes time.
 */
import { COUNTER_NAMES, NodeFlag, type CounterName } from '../../dataplane/maps.ts';
import { readIpv4 } from '../model/packet.ts';
import { NO_REDIRECT, TC_CONTINUE, TC_ACT_REDIRECT, TC_ACT_SHOT, newEffects, type DatapathState, type Env, type RunEffects } from '../model/index.ts';
import { DEFAULT_CT_DRAIN_NS, SimAgent, type AgentFaults } from './agent.ts';
import { CT_INVALID, CT_NEW, HostConntrack, LINUX_CT_TIMEOUTS } from './conntrack.ts';
import { keyScheme, type KeyScheme } from './datapath.ts';
import { Lanes } from './events.ts';
import { ETH_HLEN, FrameSlot, decreaseTtl, dstMacIs, fillSlot, get16, get32, ipHeaderValid, MacTable, natRewrite, putMac, vxlanDecap, vxlanEncapHeader, writePacketId, type Encap } from './frames.ts';
import { Checker, PacketRecord, denied, ruleMatches, tupleStr, type Tuple, type Violation } from './invariants.ts';
import { Rng } from './rng.ts';
import { PROTO_NUMBER, SERVICE_RANGE, serviceIp, type ChurnSpec, type FlowSpec, type HostFlowSpec, type PodRef, type PolicySpec, type Scenario, type ServiceSpec } from './scenario.ts';
import {
  FIRST_POD_HOST_BYTE, FIRST_VETH_IFINDEX, LAST_POD_HOST_BYTE, NIC_IFINDEX, VXLAN_PORT,
  hostAddresses, ipToU32, macBytes, podMac, subnetHost, u32ToIp, type HostAddresses,
} from './topology.ts';
import {
  EXPECT_AT_A, EXPECT_AT_B, FLAGS_FINACK, FLAGS_PA, FLAGS_SYN, FLAGS_SYNACK, SENT_A, SENT_B,
  buildTemplate, flowPorts, flowTemplate, forward, type Flow, type Template, type TrafficGenerator,
} from './traffic.ts';
import type { PolicyRuleRecord } from '../../dataplane/agent/protocol.ts';

export interface Pod {
  uid: number;
  name: string;
  host: number;
  slot: number;
  ip: number;
  ipStr: string;
  mac: Buffer;
  ifindex: number;
  deletedAt?: number;
}

// Simulated times are numbers of ns, past 2^31 and often fractional. Every
// field that holds one starts as a double (NaN, or -0 where it must read as
// 0): V8 keeps a field whose first value was a small integer as a tagged
// value, and each store of a time into it then allocates a heap number (~30
// bytes of garbage a packet, with write barriers, before they started so).

/**
 * What the kernel gives a host's programs: its clock and random draws. The
 * clock is the kernel's u64 of ns, a bigint (Env), set before each program run.
 */
class HostEnv implements Env {
  now = 0n;
  readonly vlanPresent = false;
  /** The host's table, which masq and restore consult; undefined runs the programs without the check (a planted bug, RunOptions.bypassAdmission). */
  conntrack: HostConntrack | undefined = undefined;
  /** The device the program runs on: masq's pod veth (set before each masq run). */
  ifindex = 0;

  constructor(private readonly rng: Rng) {}

  random(): number {
    return this.rng.u32();
  }
}

export class Host {
  readonly addr: HostAddresses;
  readonly ip: number;
  readonly nicMac: Buffer;
  readonly vtepMac: Buffer;
  readonly cniMac: Buffer;
  readonly state: DatapathState;
  readonly env: HostEnv;
  readonly agent: SimAgent;
  /** The host stack's conntrack, and its FORWARD deny rules (Scenario.hostPolicy). */
  readonly ct: HostConntrack;
  forwardRules: HostRule[] = [];
  readonly podsByIp = new Map<number, Pod>();
  readonly podsByIfindex = new Map<number, Pod>();
  /** Live pods by MAC: cni0's forwarding table. */
  readonly podsByMac = new MacTable<Pod>();
  /** flannel.1's outer headers to each host, by index. */
  readonly encapTo: Encap[] = [];
  /** The pod in each slot, and the IP the slot last had (peers keep sending to it while the slot is empty). */
  readonly slots: Array<Pod | undefined> = [];
  readonly slotIp: number[] = [];
  /** What the programs did: the counters add up over the run, as in the counters map; redirect is the last call's. */
  readonly fx: RunEffects = newEffects();
  private nextHostByte = FIRST_POD_HOST_BYTE;
  private nextIfindex = FIRST_VETH_IFINDEX;
  private readonly freeIfindex: number[] = [];
  ipId = 0;

  constructor(readonly index: number, scheme: KeyScheme, sc: Scenario, faults: AgentFaults, rng: Rng, bypassAdmission: boolean) {
    this.addr = hostAddresses(index);
    this.ip = ipToU32(this.addr.ip);
    this.nicMac = macBytes(this.addr.nicMac);
    this.vtepMac = macBytes(this.addr.vtepMac);
    this.cniMac = macBytes(this.addr.cniMac);
    this.state = scheme.newState();
    this.state.config.nic_ifindex = NIC_IFINDEX;
    // The agent reads the port off the host's VXLAN device.
    this.state.config.vxlan_port = VXLAN_PORT;
    if (sc.serviceRange !== false) Object.assign(this.state.config, SERVICE_RANGE);
    this.env = new HostEnv(rng);
    this.ct = new HostConntrack(sc.ctTimeouts ?? LINUX_CT_TIMEOUTS);
    if (!bypassAdmission) this.env.conntrack = this.ct;
    this.agent = new SimAgent(this.state, sc.timing, faults, this.ct);
  }

  get name(): string {
    return `h${this.index}`;
  }

  /** host-local: the next free address, round-robin, or the one asked for. */
  allocateIp(want?: number): number {
    if (want !== undefined && !this.podsByIp.has(want)) return want;
    for (let i = 0; i <= LAST_POD_HOST_BYTE - FIRST_POD_HOST_BYTE; i++) {
      const b = this.nextHostByte;
      this.nextHostByte = b >= LAST_POD_HOST_BYTE ? FIRST_POD_HOST_BYTE : b + 1;
      const ip = this.addr.subnet + b;
      if (!this.podsByIp.has(ip)) return ip;
    }
    throw new Error(`host ${this.name}: pod subnet ${u32ToIp(this.addr.subnet)}/24 is full`);
  }

  allocateIfindex(reuse: boolean): number {
    if (reuse && this.freeIfindex.length) {
      this.freeIfindex.sort((a, b) => a - b);
      return this.freeIfindex.shift()!;
    }
    return this.nextIfindex++;
  }

  releaseIfindex(i: number): void {
    this.freeIfindex.push(i);
  }
}

// Events. Each is an object the run keeps and schedules again, so a packet's
// way through the simulator allocates no event: a flow has one (its next
// packet), a packet on the wire is its own record (PacketRecord.t, .at), a
// host flow, a host's agent scan and the traffic generator have one each.

/** The next packet of a flow. */
class FlowEvent {
  t = Number.NaN;
  constructor(readonly flow: Flow) {
    this.t = flow.spec.at;
  }
}

const HOST_FLOW = 0, SCAN = 1, CHURN = 2, POD_ADD = 3, POLICY = 4, GENERATE = 5, CT_DRAIN = 6, HOST_POLICY = 7;

/** A FORWARD deny rule on a host: the rule (addresses as text, for the checker) and its address words (for the stack). */
interface HostRule {
  id: number;
  rule: PolicyRuleRecord;
  src: number | undefined;
  dst: number | undefined;
  addedAt: number;
}

/** Everything but packets: host flows (their template built once), agent scans, churn, policy, the traffic generator. */
class ControlEvent {
  k = 0;
  ip = 0;
  template: Template | undefined;
  t = Number.NaN;
  constructor(
    t: number,
    readonly kind: number,
    readonly index: number,
    readonly spec?: HostFlowSpec | ChurnSpec | PolicySpec,
  ) {
    this.t = t;
  }
}

export interface RunStats {
  /** Simulated packets: every packet a pod or a host sent. */
  packets: number;
  /** Pod packets by where they go (a Service request: decided by its DNAT, in service), host packets; unsent: a pod gone, or a server with nothing heard to answer. */
  sent: { cross: number; local: number; service: number; host: number; unsent: number };
  masqueraded: number;
  /** viaStack: masqueraded, restored, then handed to the host stack (conntrack did not admit it). */
  delivered: { fast: number; overlay: number; local: number; host: number; viaStack: number };
  drops: Record<string, number>;
  flows: { cross: number; crossFast: number };
  /** From measureFromNs on: cross-host pod packets sent and masqueraded, the same for 'stream' flows alone; cross-host flows started, and those that reached the fast path. */
  window: { cross: number; fast: number; flows: number; fastFlows: number; stream: number; streamFast: number };
  /** Counter totals over all hosts, as the datapath's counters map would hold them. */
  counters: Record<CounterName, number>;
  expired: { egress: number; ingress: number; unanswered: number };
  modelCalls: number;
  /** Wall time inside the model programs, when timeModel is set. */
  modelMs: number;
  events: number;
  simulatedNs: number;
}

export interface RunResult {
  stats: RunStats;
  /** The first violations in full (with hops when tracing). */
  violations: Violation[];
  /** Every violation of the run, by rule. */
  violationCounts: Record<string, number>;
}

export interface RunOptions {
  /** Record every packet's hops, for readable failures (slower). */
  trace?: boolean;
  faults?: AgentFaults;
  generator?: TrafficGenerator;
  /** Stop after this many packets (the benchmark). */
  maxPackets?: number;
  /** Count stats.window only from this time on (a study's warm-up is left out). */
  measureFromNs?: number;
  /** Measure the wall time spent inside the model programs (stats.modelMs). */
  timeModel?: boolean;
  /** A planted bug: the programs run without the hosts' conntrack (the build without the check), while the host stacks keep tracking. */
  bypassAdmission?: boolean;
}

/** Where IPv4 starts in an untagged frame. */
const L3 = ETH_HLEN;
const IPPROTO_ICMP = 1, IPPROTO_TCP = 6, IPPROTO_UDP = 17;
/** Where a pod packet enters the host stack (podStack). */
const BRIDGED = 0, FROM_POD = 1, FROM_OVERLAY = 2, FROM_RESTORE = 3;

/** The model's word (readIpv4: the address's bytes read little-endian) of an address the simulator holds as a number (big-endian). */
function wordOf(ip: number): number {
  return (((ip & 0xff) << 24) | ((ip & 0xff00) << 8) | ((ip >>> 8) & 0xff00) | (ip >>> 24)) >>> 0;
}

/** With timeModel, one model call in this many is timed and counted this many times (a clock read costs as much as a short call). */
const TIME_ONE_IN = 16;

const fmtT = (t: number) => `${(t / 1e6).toFixed(3)}ms`;

/** The counters one program run bumped. */
function counterText(before: Record<CounterName, number>, after: Record<CounterName, number>): string {
  return COUNTER_NAMES.filter((n) => after[n] !== before[n]).join(',');
}

export class Cluster {
  readonly hosts: Host[];
  readonly checker: Checker;
  private readonly scheme: KeyScheme;
  /** Packets on the wire in one lane, everything else in the other (events.ts Lanes). */
  private readonly q = new Lanes<PacketRecord, FlowEvent | ControlEvent>();
  private readonly rng: Rng;
  private readonly wireRng: Rng;
  /** Hosts by NIC MAC: the wire's switch table. */
  private readonly byNicMac = new MacTable<{ mac: Buffer; index: number }>();
  /**
   * Flows started so far (their ids). The run does not keep its flows: a
   * flow counts in stats.flows and stats.window when it sends its first
   * cross-host packet and when masq first carries one. Kept, they were an
   * old space growing by ~100,000 objects a run, whose marking took the
   * other core from a parallel run (2 clusters at once, 7-17% fewer packets).
   */
  private flowCount = 0;
  private readonly policyIds: Array<{ host: number; id: number } | undefined> = [];
  private readonly hostPolicyIds: Array<{ host: number; id: number } | undefined> = [];
  private nextHostRule = 1;
  /** FORWARD rules added so far on any host (the checker's host-policy oracle runs only when there are some). */
  private hostRulesEver = 0;
  private readonly services: ServiceSpec[];
  /** Records (each with its frame's slot) by frame length, reused once their packet is done. */
  private readonly freeRecords: PacketRecord[][] = [];
  /** Why the last program run that returned TC_ACT_SHOT dropped its packet. */
  private shotReason = '';
  private readonly trace: boolean;
  private readonly measureFrom: number;
  private now = -0;
  private nextPacketId = 1;
  private nextUid = 1;
  private readonly stats: RunStats;

  constructor(readonly sc: Scenario, private readonly opts: RunOptions = {}) {
    if (!Number.isInteger(sc.hosts) || sc.hosts < 2 || sc.hosts > 250) throw new Error(`hosts = ${sc.hosts}: want 2..250`);
    if (!Number.isInteger(sc.podsPerHost) || sc.podsPerHost < 1 || sc.podsPerHost > 200) throw new Error(`podsPerHost = ${sc.podsPerHost}: want 1..200`);
    this.scheme = keyScheme(sc.scheme);
    this.rng = new Rng(sc.seed);
    this.wireRng = new Rng(sc.seed ^ 0x5bd1e995);
    this.checker = new Checker(() => this.now);
    this.trace = opts.trace === true;
    this.measureFrom = opts.measureFromNs ?? 0;
    this.hosts = [];
    for (let h = 0; h < sc.hosts; h++) {
      const host = new Host(h, this.scheme, sc, opts.faults ?? {}, new Rng(sc.seed * 31 + h), opts.bypassAdmission === true);
      this.hosts.push(host);
      this.byNicMac.set({ mac: host.nicMac, index: h });
    }
    for (const host of this.hosts) {
      for (const peer of this.hosts) {
        host.encapTo.push({ srcMac: host.nicMac, dstMac: peer.nicMac, srcIp: host.ip, dstIp: peer.ip });
        // The agent's node set (README "Threat model"): every host, this one flagged SELF.
        host.state.nodes.update(peer.addr.ip, { flags: peer === host ? NodeFlag.SELF : 0 });
      }
      for (let s = 0; s < sc.podsPerHost; s++) this.addPod(host, s, undefined);
    }
    this.services = sc.services ?? [];
    this.stats = {
      packets: 0, sent: { cross: 0, local: 0, service: 0, host: 0, unsent: 0 }, masqueraded: 0,
      delivered: { fast: 0, overlay: 0, local: 0, host: 0, viaStack: 0 }, drops: this.checker.drops,
      flows: { cross: 0, crossFast: 0 }, window: { cross: 0, fast: 0, flows: 0, fastFlows: 0, stream: 0, streamFast: 0 }, counters: Object.fromEntries(COUNTER_NAMES.map((n) => [n, 0])) as Record<CounterName, number>,
      expired: { egress: 0, ingress: 0, unanswered: 0 }, modelCalls: 0, modelMs: 0, events: 0, simulatedNs: 0,
    };
  }

  // ---- setup and control plane ----

  private addPod(host: Host, slot: number, ip: number | undefined): Pod {
    const uid = this.nextUid++;
    const a = host.allocateIp(ip);
    const pod: Pod = {
      uid, name: `${host.name}-p${slot}#${uid}`, host: host.index, slot, ip: a, ipStr: u32ToIp(a),
      mac: macBytes(podMac(uid)), ifindex: host.allocateIfindex(this.sc.ifindex === 'reuse'),
    };
    host.slots[slot] = pod;
    host.slotIp[slot] = a;
    host.podsByIp.set(a, pod);
    host.podsByIfindex.set(pod.ifindex, pod);
    host.podsByMac.set(pod);
    host.agent.addPod(pod.ipStr, podMac(uid), pod.ifindex, this.clock(host));
    return pod;
  }

  /** CNI DEL: the agent purges, then the veth goes and IPAM frees the IP. */
  private deletePod(host: Host, slot: number): Pod | undefined {
    const pod = host.slots[slot];
    if (!pod) return undefined;
    host.agent.delPod(pod.ipStr, this.clock(host));
    host.slots[slot] = undefined;
    pod.deletedAt = this.now;
    host.podsByIp.delete(pod.ip);
    host.podsByIfindex.delete(pod.ifindex);
    host.podsByMac.delete(pod);
    host.releaseIfindex(pod.ifindex);
    return pod;
  }

  /** The host's clock, now: its programs' (HostEnv) and its conntrack's set to the simulated time, in whole ns. */
  private setHostClock(h: Host): bigint {
    const ns = Math.round(this.now);
    h.ct.now = ns;
    return (h.env.now = BigInt(ns));
  }

  /** The host's clock as the agent reads it: a u64 bigint. */
  private clock(h: Host): bigint {
    return this.setHostClock(h);
  }

  /** Nothing new starts after the run's end; packets already on the wire still arrive. */
  private schedule(e: FlowEvent | ControlEvent): void {
    if (e.t <= this.sc.durationNs) this.q.b.push(e);
  }

  // ---- the run ----

  run(): RunResult {
    const sc = this.sc;
    for (const f of sc.flows) this.startFlow(f);
    const gen = this.opts.generator;
    if (gen) {
      for (const f of gen.initial()) this.startFlow(f);
      this.schedule(new ControlEvent(0, GENERATE, 0));
    }
    sc.hostFlows.forEach((spec, i) => this.schedule(new ControlEvent(spec.at, HOST_FLOW, i, spec)));
    for (const c of sc.churn) this.schedule(new ControlEvent(c.at, CHURN, 0, c));
    sc.policy.forEach((spec, index) => this.schedule(new ControlEvent(spec.at, POLICY, index, spec)));
    (sc.hostPolicy ?? []).forEach((spec, index) => this.schedule(new ControlEvent(spec.at, HOST_POLICY, index, spec)));
    // Each agent scans on its own phase, as agents started at different times do.
    for (const h of this.hosts) this.schedule(new ControlEvent(this.rng.next() * sc.timing.scanIntervalNs, SCAN, h.index));
    // And drains ct_pending on its own phase (drawn after the scans': runs without conntrack draw as before).
    for (const h of this.hosts) this.schedule(new ControlEvent(this.rng.next() * this.drainNs, CT_DRAIN, h.index));

    const maxPackets = this.opts.maxPackets ?? Infinity;
    for (;;) {
      const e = this.q.pop();
      if (!e || this.stats.packets >= maxPackets) break;
      this.now = e.t;
      this.stats.events++;
      if (e instanceof FlowEvent) this.flowPacket(e);
      else if (e instanceof PacketRecord) this.nicIngress(this.hosts[e.at], e);
      else this.control(e);
    }
    return { stats: this.finishStats(), violations: this.checker.violations, violationCounts: this.checker.violationCounts };
  }

  private finishStats(): RunStats {
    const s = this.stats;
    s.simulatedNs = this.now;
    for (const n of COUNTER_NAMES) s.counters[n] = this.hosts.reduce((a, h) => a + h.fx.counters[n], 0);
    s.expired = { egress: 0, ingress: 0, unanswered: 0 };
    for (const h of this.hosts) {
      s.expired.egress += h.agent.expired.egress;
      s.expired.ingress += h.agent.expired.ingress;
      s.expired.unanswered += h.agent.expired.unanswered;
    }
    return s;
  }

  private get drainNs(): number {
    return this.sc.timing.ctDrainNs ?? DEFAULT_CT_DRAIN_NS;
  }

  private control(e: ControlEvent): void {
    switch (e.kind) {
      case HOST_FLOW: return this.hostPacket(e);
      case CT_DRAIN: {
        const h = this.hosts[e.index];
        h.agent.drainConntrack(this.clock(h));
        e.t = this.now + this.drainNs;
        return this.schedule(e);
      }
      case HOST_POLICY: return this.hostPolicyEvent(e.spec as PolicySpec, e.index);
      case SCAN: {
        const h = this.hosts[e.index];
        h.agent.scan(this.clock(h));
        e.t = this.now + this.sc.timing.scanIntervalNs;
        return this.schedule(e);
      }
      case CHURN: {
        const spec = e.spec as ChurnSpec;
        const gone = this.deletePod(this.hosts[spec.pod.host], spec.pod.slot);
        if (gone) {
          const add = new ControlEvent(this.now + spec.gapNs, POD_ADD, 0, spec);
          add.ip = gone.ip;
          this.schedule(add);
        }
        return;
      }
      case POD_ADD: {
        const spec = e.spec as ChurnSpec;
        const h = this.hosts[spec.pod.host];
        if (!h.slots[spec.pod.slot]) this.addPod(h, spec.pod.slot, spec.sameIp ? e.ip : undefined);
        return;
      }
      case POLICY: return this.policyEvent(e.spec as PolicySpec, e.index);
      case GENERATE: {
        const f = this.opts.generator!.next(this.now);
        this.startFlow(f);
        e.t = f.at;
        return this.schedule(e);
      }
    }
  }

  private policyEvent(p: PolicySpec, index: number): void {
    const agent = this.hosts[p.host].agent;
    if (p.op === 'remove') {
      const target = p.removes === undefined ? undefined : this.policyIds[p.removes];
      if (target && target.host === p.host) agent.removeRule(target.id);
      return;
    }
    const ipOf = (r: PodRef | undefined) => (r ? u32ToIp(this.hosts[r.host].slotIp[r.slot]) : undefined);
    const spec = { dir: p.dir, src: ipOf(p.src), dst: ipOf(p.dst), dport: p.dport, proto: p.proto };
    try {
      this.policyIds[index] = { host: p.host, id: agent.addRule(spec) };
    } catch {
      // A rule the agent refuses (a duplicate, a port without tcp/udp) is refused in the scenario too.
    }
  }

  /** A FORWARD deny rule added or removed (pods by slot, resolved to the IPs the slots have now). */
  private hostPolicyEvent(p: PolicySpec, index: number): void {
    const h = this.hosts[p.host];
    if (p.op === 'remove') {
      const target = p.removes === undefined ? undefined : this.hostPolicyIds[p.removes];
      if (target && target.host === p.host) h.forwardRules = h.forwardRules.filter((r) => r.id !== target.id);
      return;
    }
    const ipOf = (r: PodRef | undefined) => (r ? this.hosts[r.host].slotIp[r.slot] : undefined);
    const src = ipOf(p.src), dst = ipOf(p.dst);
    const id = this.nextHostRule++;
    const rule: PolicyRuleRecord = {
      id, dir: p.dir ?? 'ingress', src: src === undefined ? undefined : u32ToIp(src), dst: dst === undefined ? undefined : u32ToIp(dst),
      dport: p.dport, proto: p.proto === undefined ? undefined : PROTO_NUMBER[p.proto],
    };
    // A new array: a packet's pass reads the list it started with.
    h.forwardRules = [...h.forwardRules, { id, rule, src: src === undefined ? undefined : wordOf(src), dst: dst === undefined ? undefined : wordOf(dst), addedAt: this.now }];
    this.hostPolicyIds[index] = { host: p.host, id };
    this.hostRulesEver++;
  }

  // ---- traffic ----

  private startFlow(spec: FlowSpec): void {
    const proto = spec.service === undefined ? spec.proto : this.services[spec.service].proto;
    const flow: Flow = {
      id: ++this.flowCount, spec, next: 0, sentCross: 0, fast: 0, pods: [undefined, undefined], templates: [], flagged: [], proto,
      heardA: false, heardB: false, bData: false, server: undefined, aIp: -1, bIp: -1,
    };
    this.schedule(new FlowEvent(flow));
  }

  /** Whether a pod of the flow was deleted more than the scenario's grace ago (the flow then ends). */
  private goneTooLong(p: { deletedAt?: number } | undefined, grace: number): boolean {
    return p !== undefined && p.deletedAt !== undefined && this.now > p.deletedAt + grace;
  }

  /**
   * The next packet of a flow. a speaks first; b (a Service's backend) only
   * answers once it has heard a packet of the flow, to the address it heard
   * from. TCP: a sends SYN until it has heard b, b sends SYN-ACK until it has
   * heard more than a SYN, then both PSH-ACK; the flow's last packet is a FIN.
   */
  private flowPacket(ev: FlowEvent): void {
    const flow = ev.flow;
    const spec = flow.spec;
    const service = spec.service;
    if (flow.next === 0) flow.pods = [this.hosts[spec.a.host].slots[spec.a.slot], service === undefined ? this.hosts[spec.b.host].slots[spec.b.slot] : undefined];
    const grace = this.sc.deadPeerGraceNs;
    if (grace !== undefined && (this.goneTooLong(flow.pods[0], grace) || this.goneTooLong(flow.pods[1], grace))) return;
    const k = flow.next++;
    const fwd = forward(spec, k);
    if (flow.next < spec.packets) {
      ev.t = this.now + spec.gapNs;
      this.schedule(ev);
    }
    this.stats.packets++;
    // b's side: the pod in b's slot, or the Service's backend that heard the flow.
    const bRef: PodRef | undefined = service === undefined ? spec.b : flow.server;
    if (!fwd && (!flow.heardB || bRef === undefined)) {
      this.stats.sent.unsent++;
      return;
    }
    const from = fwd ? spec.a : bRef!;
    const src = this.hosts[from.host];
    // A Service's backend answers only as the pod that heard (a pod since put in its slot never did).
    const pod = service !== undefined && !fwd && flow.server!.deletedAt !== undefined ? undefined : src.slots[from.slot];
    if (!pod) {
      this.stats.sent.unsent++;
      return;
    }
    // A pod on another IP in a's (or b's) slot is another connection: it starts with its handshake, and a Service picks a backend for it again.
    const aIp = this.hosts[spec.a.host].slotIp[spec.a.slot];
    const bIp = service === undefined ? this.hosts[spec.b.host].slotIp[spec.b.slot] : -1;
    if (aIp !== flow.aIp || bIp !== flow.bIp) {
      flow.aIp = aIp;
      flow.bIp = bIp;
      if (flow.next > 1) {
        flow.heardA = flow.heardB = flow.bData = false;
        flow.server = undefined;
        if (!fwd) {
          this.stats.sent.unsent++;
          return;
        }
      }
    }
    const last = flow.next === spec.packets;
    const flags = fwd ? (flow.heardA ? (last ? FLAGS_FINACK : FLAGS_PA) : FLAGS_SYN) : (flow.bData ? (last ? FLAGS_FINACK : FLAGS_PA) : FLAGS_SYNACK);
    const ports = flowPorts(flow.id);
    let tpl: Template, expect: Template, dstIp: number, toHost: number;
    if (service === undefined) {
      toHost = fwd ? spec.b.host : spec.a.host;
      dstIp = fwd ? this.hosts[spec.b.host].slotIp[spec.b.slot] : aIp;
      tpl = expect = fwd ? flowTemplate(flow, SENT_A, pod.ip, dstIp, ports.client, ports.server, flags)
        : flowTemplate(flow, SENT_B, pod.ip, dstIp, ports.server, ports.client, flags);
    } else {
      const v = this.services[service];
      if (fwd) {
        // To the ClusterIP; what the backend must receive is made when one does (deliverToPod).
        toHost = -1;
        dstIp = serviceIp(service);
        tpl = expect = flowTemplate(flow, SENT_A, pod.ip, dstIp, ports.client, v.port, flags);
      } else {
        // The backend answers the client it heard; the client must see the answer come from the ClusterIP.
        toHost = spec.a.host;
        dstIp = aIp;
        tpl = flowTemplate(flow, SENT_B, pod.ip, aIp, v.targetPort, ports.client, flags);
        expect = flowTemplate(flow, EXPECT_AT_A, serviceIp(service), aIp, v.port, ports.client, flags);
      }
    }
    // A flow's last packet lets its templates go (packets still on the wire keep theirs through their records).
    if (last) {
      flow.templates.length = 0;
      flow.flagged.length = 0;
    }
    const id = this.nextPacketId++;
    const cross = toHost >= 0 && from.host !== toHost;
    const rec = this.takeRecord(tpl).start(
      id, 'pod', cross, tpl, this.now, toHost, dstIp,
      cross && denied(src.agent.policy, 'egress', tpl.tuple),
      this.trace ? [`${fmtT(this.now)} ${pod.name} sends ${tupleStr(tpl.tuple)} flags 0x${flags.toString(16)} (flow ${flow.id}, packet ${k})`] : undefined,
    );
    rec.expect = expect;
    rec.flow = flow;
    rec.fwd = fwd;
    const frame = rec.frame;
    putMac(frame, 6, pod.mac);
    writePacketId(frame, tpl.idOffset, id);
    const counted = this.now >= this.measureFrom;
    if (toHost < 0) this.stats.sent.service++;
    else if (cross) {
      this.stats.sent.cross++;
      if (flow.sentCross++ === 0) {
        this.stats.flows.cross++;
        if (spec.at >= this.measureFrom) this.stats.window.flows++;
      }
      if (counted) {
        this.stats.window.cross++;
        if (spec.pattern === 'stream') this.stats.window.stream++;
      }
    } else this.stats.sent.local++;
    // The pod's own routing: its /24 is on-link (ARP for the peer), everything else via the cni0 gateway.
    if (subnetHost(dstIp, this.hosts.length) === src.index) {
      const peer = src.podsByIp.get(dstIp);
      if (!peer) return this.drop(rec, 'no-neighbour');
      putMac(frame, 0, peer.mac);
    } else putMac(frame, 0, src.cniMac);
    this.podEgress(src, pod, rec, flow);
  }

  private hostPacket(e: ControlEvent): void {
    const spec = e.spec as HostFlowSpec;
    const k = e.k++;
    if (e.k < spec.packets) {
      e.t = this.now + spec.gapNs;
      this.schedule(e);
    }
    const a = this.hosts[spec.from], b = this.hosts[spec.to];
    const index = e.index;
    const tpl = e.template ??= buildTemplate(a.ip, b.ip, spec.proto, 20000 + index, 5000 + (index % 100), spec.tos, spec.df, true, index, { src: a.nicMac, dst: b.nicMac });
    const id = this.nextPacketId++;
    this.stats.packets++;
    this.stats.sent.host++;
    const rec = this.takeRecord(tpl).start(
      id, 'host', false, tpl, this.now, b.index, b.ip, false,
      this.trace ? [`${fmtT(this.now)} host ${a.name} sends ${spec.proto} tos 0x${spec.tos.toString(16)} to ${b.name} (packet ${k})`] : undefined,
    );
    writePacketId(rec.frame, tpl.idOffset, id);
    this.nicEgress(a, rec);
  }

  /** A record whose slot holds a copy of the template's frame. */
  private takeRecord(tpl: Template): PacketRecord {
    const len = tpl.frame.length;
    const rec = this.freeRecords[len]?.pop() ?? new PacketRecord(new FrameSlot(len));
    fillSlot(rec.slot, tpl.frame, tpl.words);
    return rec;
  }

  /** The record and its slot are reused once the packet is done (a packet done twice is the checker's violation, not a record given twice). */
  private giveRecord(rec: PacketRecord): void {
    (this.freeRecords[rec.slot.len] ??= []).push(rec);
  }

  // ---- the datapath at its hooks ----

  /** Runs a program on the packet's frame, in place; its effects are in h.fx. */
  private runProgram(h: Host, prog: 'masq' | 'init' | 'restore', program: KeyScheme['masq'], rec: PacketRecord): number {
    this.setHostClock(h);
    const fx = h.fx, c = fx.counters;
    const policyDrops = c.POLICY_DROP, misses = c.RESTORE_MISS;
    const before = this.trace ? { ...c } : undefined;
    fx.redirect = NO_REDIRECT;
    const timed = this.opts.timeModel === true && this.stats.modelCalls % TIME_ONE_IN === 0;
    const t0 = timed ? performance.now() : 0;
    const verdict = program(rec.frame, h.state, h.env, fx);
    if (timed) this.stats.modelMs += (performance.now() - t0) * TIME_ONE_IN;
    this.stats.modelCalls++;
    if (verdict === TC_ACT_SHOT) this.shotReason = c.POLICY_DROP !== policyDrops ? 'policy' : c.RESTORE_MISS !== misses ? 'restore-miss' : `${prog}-shot`;
    if (before) {
      const v = verdict === TC_CONTINUE ? 'CONTINUE' : verdict === TC_ACT_SHOT ? 'SHOT' : verdict === TC_ACT_REDIRECT ? `REDIRECT ${fx.redirect.kind} ${fx.redirect.ifindex}` : String(verdict);
      this.checker.hop(rec, `${fmtT(this.now)} ${h.name} ${prog}: ${v} [${counterText(before, c)}]`);
    }
    return verdict;
  }

  /** masq at the TC ingress of the pod's host-side veth. */
  private podEgress(h: Host, pod: Pod, rec: PacketRecord, flow: Flow): void {
    h.env.ifindex = pod.ifindex;
    const verdict = this.runProgram(h, 'masq', this.scheme.masq, rec);
    if (verdict === TC_ACT_SHOT) return this.drop(rec, this.shotReason);
    if (verdict === TC_ACT_REDIRECT) {
      if (h.fx.redirect.ifindex !== NIC_IFINDEX) return this.drop(rec, 'redirect-to-unknown-device');
      this.stats.masqueraded++;
      if (rec.sentAt >= this.measureFrom) {
        this.stats.window.fast++;
        if (flow.spec.pattern === 'stream') this.stats.window.streamFast++;
      }
      if (flow.fast++ === 0 && flow.sentCross > 0) {
        this.stats.flows.crossFast++;
        if (flow.spec.at >= this.measureFrom) this.stats.window.fastFlows++;
      }
      return this.nicEgress(h, rec);
    }
    this.bridge(h, rec, pod);
  }

  /**
   * cni0: a frame for the gateway's MAC goes up the host stack to be routed;
   * one for a local pod's MAC is switched, through the stack's conntrack and
   * FORWARD rules all the same (br_netfilter, as on a Kubernetes node).
   */
  private bridge(h: Host, rec: PacketRecord, from: Pod): void {
    const frame = rec.frame;
    if (dstMacIs(frame, h.cniMac)) return this.podStack(h, rec, frame, FROM_POD);
    const p = h.podsByMac.forDst(frame);
    if (p !== undefined && p !== from) return this.podStack(h, rec, frame, BRIDGED);
    this.drop(rec, 'bridge-unknown-mac');
  }

  /**
   * A pod packet through the host stack, as Linux takes it on a Kubernetes
   * node: conntrack (nf_conntrack_in), a Service's DNAT for a new connection
   * (kube-proxy, nat PREROUTING) or the entry's NAT, routing, FORWARD
   * (ESTABLISHED accepted first, then the deny rules of Scenario.hostPolicy,
   * then kube-proxy's INVALID drop), the entry confirmed, the reply's DNAT
   * reversed (POSTROUTING); then out through cni0 or flannel.1. from:
   * BRIDGED, a frame cni0 switched from one local pod to another (not routed:
   * no TTL decrement); FROM_POD, one a local pod sent to its gateway;
   * FROM_OVERLAY, one flannel.1 decapsulated; FROM_RESTORE, one restore
   * restored and handed up. The frame is Ethernet + IPv4 at offset 0.
   */
  private podStack(h: Host, rec: PacketRecord, frame: Buffer, from: number): void {
    if (this.trace) this.checker.hop(rec, `${fmtT(this.now)} ${h.name} host stack`);
    this.setHostClock(h);
    const ct = h.ct;
    const proto = frame[L3 + 9];
    const l4 = L3 + (frame[L3] & 0x0f) * 4;
    let sport = 0, dport = 0, tcpFlags = 0, icmpType = 0;
    if (proto === IPPROTO_TCP || proto === IPPROTO_UDP) {
      sport = get16(frame, l4);
      dport = get16(frame, l4 + 2);
      if (proto === IPPROTO_TCP) tcpFlags = frame[l4 + 13];
    } else if (proto === IPPROTO_ICMP) {
      icmpType = frame[l4];
      sport = get16(frame, l4 + 4);
    }
    const st = ct.track(readIpv4(frame, L3 + 12), readIpv4(frame, L3 + 16), sport, dport, proto, tcpFlags, icmpType);
    if (st === CT_INVALID) return this.drop(rec, 'ct-invalid');
    if (ct.entry < 0 && (proto === IPPROTO_TCP || proto === IPPROTO_UDP)) {
      const v = this.serviceAt(get32(frame, L3 + 16), dport, proto);
      if (v >= 0) {
        const backend = this.pickBackend(this.services[v]);
        if (backend === undefined) return this.drop(rec, 'no-endpoints');
        ct.dnat(wordOf(backend), this.services[v].targetPort);
      }
    }
    const nat = ct.isDnat();
    // nat PREROUTING: the original direction goes to the backend.
    if (nat && ct.dir === 0) {
      dport = ct.word(5) >>> 16;
      natRewrite(frame, L3 + 16, l4 + 2, ct.word(3), dport);
    }
    const dst = get32(frame, L3 + 16);
    const g = subnetHost(dst, this.hosts.length);
    if (g < 0) return this.drop(rec, 'no-route');
    // filter FORWARD: -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT first, then the policy's drops.
    if (st === CT_NEW && h.forwardRules.length > 0 && this.forwardDenied(h, frame, dst, g, dport, proto)) return this.drop(rec, 'host-policy');
    ct.confirm();
    // nat POSTROUTING: a reply leaves from the address the client asked for.
    if (nat && ct.dir === 1) natRewrite(frame, L3 + 12, l4, ct.word(1), ct.word(2) & 0xffff);
    if (rec.dstHost < 0) this.serviceRequestRouted(h, rec, g);
    if (g !== h.index) return this.toOverlay(h, rec, g);
    const p = h.podsByIp.get(dst);
    if (!p) return this.drop(rec, 'no-neighbour');
    if (from !== BRIDGED) {
      if (!decreaseTtl(frame, L3)) return this.drop(rec, 'ttl-exceeded');
      putMac(frame, 6, h.cniMac);
      putMac(frame, 0, p.mac);
    }
    const d = this.stats.delivered;
    if (from === FROM_OVERLAY) d.overlay++;
    else if (from === FROM_RESTORE) d.viaStack++;
    else d.local++;
    this.deliverToPod(h, p, rec, frame);
  }

  /** A Service request after its DNAT: where it goes now decides whether it crosses hosts, and the egress rules of its sender then apply (the agent's policy oracle). */
  private serviceRequestRouted(h: Host, rec: PacketRecord, g: number): void {
    rec.dstHost = g;
    rec.cross = g !== h.index;
    if (rec.cross && h.agent.policy.length > 0) {
      const f = rec.frame;
      const t: Tuple = { ...rec.sent.tuple, dst: u32ToIp(get32(f, L3 + 16)), dport: rec.sent.tuple.proto === IPPROTO_ICMP ? 0 : get16(f, L3 + (f[L3] & 0x0f) * 4 + 2) };
      rec.deniedAtSend = denied(h.agent.policy, 'egress', t);
    }
  }

  /** The Service whose ClusterIP:port and protocol the packet is for, or -1. */
  private serviceAt(dst: number, dport: number, proto: number): number {
    const n = (dst - serviceIp(0)) >>> 0;
    if (n >= this.services.length) return -1;
    const v = this.services[n];
    return v.port === dport && PROTO_NUMBER[v.proto] === proto ? n : -1;
  }

  /** kube-proxy's choice among the endpoints, at random (statistic mode random): the backend slots that hold a pod. */
  private pickBackend(v: ServiceSpec): number | undefined {
    const ready: number[] = [];
    for (const b of v.backends) if (this.hosts[b.host].slots[b.slot]) ready.push(this.hosts[b.host].slotIp[b.slot]);
    return ready.length ? ready[Math.floor(this.rng.next() * ready.length)] : undefined;
  }

  /** Whether a deny rule of the host's FORWARD chain matches a new connection's packet: ingress rules for a pod of this host, egress rules for one sending from it. */
  private forwardDenied(h: Host, frame: Buffer, dst: number, dstHost: number, dport: number, proto: number): boolean {
    const srcW = readIpv4(frame, L3 + 12), dstW = wordOf(dst);
    const fromHere = subnetHost(get32(frame, L3 + 12), this.hosts.length) === h.index;
    for (const r of h.forwardRules) {
      const x = r.rule;
      if (x.dir === 'ingress' ? dstHost !== h.index : !fromHere) continue;
      if ((r.src === undefined || r.src === srcW) && (r.dst === undefined || r.dst === dstW)
        && (x.dport === undefined || x.dport === dport) && (x.proto === undefined || x.proto === proto)) return true;
    }
    return false;
  }

  /** flannel.1: the routed pod frame (TTL − 1), encapsulated to the host whose pod subnet holds its destination. */
  private toOverlay(h: Host, rec: PacketRecord, g: number): void {
    const frame = rec.frame;
    if (!decreaseTtl(frame, L3)) return this.drop(rec, 'ttl-exceeded');
    // flannel.1: the inner frame goes from our VTEP MAC to theirs (neighbour entry), to their host IP (FDB).
    const peer = this.hosts[g];
    putMac(frame, 6, h.vtepMac);
    putMac(frame, 0, peer.vtepMac);
    // Encapsulation in the slot's headroom: the pod frame stays where it is.
    if (frame !== rec.slot.inner) throw new Error(`packet ${rec.id}: a pod frame to encapsulate is not at the start of its slot`);
    vxlanEncapHeader(rec.slot.outer, h.encapTo[g], h.ipId++);
    rec.frame = rec.slot.outer;
    this.nicEgress(h, rec);
  }

  /** init at the NIC's TC egress, then the wire. */
  private nicEgress(h: Host, rec: PacketRecord): void {
    const verdict = this.runProgram(h, 'init', this.scheme.init, rec);
    if (verdict === TC_ACT_SHOT) return this.drop(rec, this.shotReason);
    if (verdict !== TC_CONTINUE) return this.drop(rec, 'init-bad-verdict');
    this.wire(rec);
  }

  private wire(rec: PacketRecord): void {
    const nic = this.byNicMac.forDst(rec.frame);
    if (nic === undefined) return this.drop(rec, 'wire-unknown-mac');
    const to = nic.index;
    const l = this.sc.link;
    if (l.loss > 0 && this.wireRng.next() < l.loss) return this.drop(rec, 'wire-loss');
    const delay = l.latencyNs + (l.jitterNs > 0 ? this.wireRng.next() * l.jitterNs : 0);
    // The record is the arrival event; packets already on the wire arrive after the run's end too.
    rec.t = this.now + delay;
    rec.at = to;
    this.q.a.push(rec);
  }

  /** restore at the NIC's TC ingress; what it passes goes to the host stack. */
  private nicIngress(h: Host, rec: PacketRecord): void {
    // eth_type_trans ran before TC: whether the frame was for our NIC is decided on the wire's MAC.
    const forUs = dstMacIs(rec.frame, h.nicMac);
    const verdict = this.runProgram(h, 'restore', this.scheme.restore, rec);
    if (verdict === TC_ACT_SHOT) return this.drop(rec, this.shotReason, h);
    if (verdict === TC_ACT_REDIRECT) {
      // bpf_redirect_peer: into the namespace of the veth's peer, if that veth still exists.
      const p = h.podsByIfindex.get(h.fx.redirect.ifindex);
      if (h.fx.redirect.kind !== 'PEER' || !p) return this.drop(rec, 'redirect-to-unknown-device');
      this.stats.delivered.fast++;
      return this.deliverToPod(h, p, rec, rec.frame);
    }
    this.hostStack(h, rec, forUs);
  }

  private hostStack(h: Host, rec: PacketRecord, forUs: boolean): void {
    const frame = rec.frame;
    if (!forUs || get16(frame, 12) !== 0x0800) return this.drop(rec, 'not-for-this-host');
    if (!ipHeaderValid(frame, L3)) return this.drop(rec, 'bad-ip-checksum');
    const dst = get32(frame, L3 + 16);
    if (dst !== h.ip) {
      // A pod packet restore restored and handed up (conntrack did not admit it): forwarded like any other.
      if (subnetHost(dst, this.hosts.length) !== h.index) return this.drop(rec, 'not-for-this-host');
      return this.podStack(h, rec, frame, FROM_RESTORE);
    }
    const inner = vxlanDecap(frame, rec.slot);
    if (!inner) {
      this.stats.delivered.host++;
      const first = !rec.done;
      this.checker.hostReceived(rec, frame, h.index);
      if (first) this.giveRecord(rec);
      return;
    }
    // flannel.1 receives the inner frame: for its own MAC only, then into the host stack.
    if (!dstMacIs(inner, h.vtepMac) || get16(inner, 12) !== 0x0800) return this.drop(rec, 'vxlan-not-for-vtep');
    if (!ipHeaderValid(inner, L3)) return this.drop(rec, 'bad-ip-checksum');
    if (subnetHost(get32(inner, L3 + 16), this.hosts.length) !== h.index) return this.drop(rec, 'no-route');
    this.podStack(h, rec, inner, FROM_OVERLAY);
  }

  private deliverToPod(h: Host, p: Pod, rec: PacketRecord, frame: Buffer): void {
    // Hops are kept only when tracing: the text is not built for every packet otherwise.
    if (this.trace) this.checker.hop(rec, `${fmtT(this.now)} delivered into pod ${p.name} (${p.ipStr})`);
    // The record is reused once its packet is done (giveRecord).
    const first = !rec.done;
    const flow = rec.flow as Flow | undefined;
    if (flow !== undefined && first && !this.flowChecks(h, p, rec, flow, frame)) {
      this.checker.dropped(rec, 'checked');
    } else if (this.checker.podReceived(rec, frame, p, h.agent.policy) && flow !== undefined && this.ofCurrentConnection(rec, flow)) {
      // What the pod learnt of its connection.
      const fwd = rec.fwd;
      if (fwd) {
        if (flow.spec.service !== undefined && flow.server === undefined) flow.server = p;
        flow.heardB = true;
        if (flow.proto !== 'tcp' || (frame[L3 + (frame[L3] & 0x0f) * 4 + 13] & 0x02) === 0) flow.bData = true;
      } else flow.heardA = true;
    }
    if (first) this.giveRecord(rec);
  }

  /** Whether a packet belongs to the flow's connection of now, not to one of a pod its slot held before (churn). */
  private ofCurrentConnection(rec: PacketRecord, flow: Flow): boolean {
    const t = rec.sent as Template;
    return rec.fwd ? t.srcIp === flow.aIp : t.dstIp === flow.aIp;
  }

  /**
   * The checks of a pod packet that need its flow, before the checker's own:
   * - a Service connection never breaks: a request reaches a backend of the
   *   Service (the connection's own, once it has one) at its targetPort, the
   *   frame the client sent but for the DNATed destination; a reply reaches
   *   the client from the ClusterIP:port it asked, never from the backend's own
   *   address (the reply's expected frame says so; the checker compares);
   * - a denied flow never arrives: no packet of a connection reaches a pod
   *   while a FORWARD deny rule matching the connection's first packet (its
   *   original direction, after DNAT) is in force since before the connection
   *   began: an egress rule on the client's host, an ingress rule on the
   *   server's. (Rules added later may leave an established connection alone:
   *   ESTABLISHED is accepted first, as without XMasq.)
   * False after a violation (the packet counts as checked, not delivered).
   */
  private flowChecks(h: Host, p: Pod, rec: PacketRecord, flow: Flow, frame: Buffer): boolean {
    const spec = flow.spec;
    const v = spec.service;
    if (v === undefined && this.hostRulesEver === 0) return true;
    let serverIp: number, serverHost: number, serverPort: number;
    const ports = flowPorts(flow.id);
    if (v !== undefined) {
      const svc = this.services[v];
      serverPort = svc.targetPort;
      if (rec.fwd) {
        const own = flow.server;
        const isBackend = svc.backends.some((b) => b.host === p.host && this.hosts[b.host].slots[b.slot] === p);
        if (!isBackend || (own !== undefined && own.ip !== p.ip && this.ofCurrentConnection(rec, flow))) {
          this.checker.violation(rec, 'a Service connection never breaks', `request ${rec.id} of flow ${flow.id} to service #${v} reached pod ${p.name} (${p.ipStr}), ${isBackend ? `not the connection's backend ${u32ToIp(own!.ip)}` : 'not a backend of the Service'}`);
          return false;
        }
        // The client's frame, DNATed to this backend.
        rec.expect = flowTemplate(flow, EXPECT_AT_B, (rec.sent as Template).srcIp, p.ip, ports.client, svc.targetPort, frame[L3 + (frame[L3] & 0x0f) * 4 + 13]);
        rec.dstIp = p.ip;
        rec.dstHost = p.host;
        serverIp = p.ip;
        serverHost = p.host;
      } else {
        const want = serviceIp(v);
        const got = get32(frame, L3 + 12);
        if (got !== want) {
          this.checker.violation(rec, 'a Service connection never breaks', `reply ${rec.id} of flow ${flow.id} reached client ${p.name} from ${u32ToIp(got)}, not from the ClusterIP ${u32ToIp(want)} it asked (its backend's own address, the DNAT not reversed)`);
          return false;
        }
        // A reply of a connection its client has since left (churn) has no backend to judge by any more.
        const srv = flow.server;
        if (srv === undefined) return true;
        serverIp = srv.ip;
        serverHost = srv.host;
      }
    } else {
      serverIp = this.hosts[spec.b.host].slotIp[spec.b.slot];
      serverHost = spec.b.host;
      serverPort = ports.server;
    }
    if (this.hostRulesEver === 0) return true;
    const clientHost = spec.a.host;
    const proto = PROTO_NUMBER[flow.proto];
    const icmp = flow.proto === 'icmp';
    const t: Tuple = { src: u32ToIp(this.hosts[clientHost].slotIp[spec.a.slot]), dst: u32ToIp(serverIp), sport: icmp ? 0 : ports.client, dport: icmp ? 0 : serverPort, proto };
    for (const [host, dir] of [[clientHost, 'egress'], [serverHost, 'ingress']] as const) {
      for (const r of this.hosts[host].forwardRules) {
        // Strictly before: a rule added at the very instant the connection starts may come after its first packet.
        if (r.addedAt < spec.at && ruleMatches(r.rule, dir, t)) {
          this.checker.violation(rec, 'a denied flow never arrives', `packet ${rec.id} of flow ${flow.id} (${tupleStr(t)}) reached pod ${p.name} though FORWARD rule ${r.id} on h${host} (${dir}) denies the connection and was in force before it began`);
          return false;
        }
      }
    }
    return true;
  }

  private drop(rec: PacketRecord, reason: string, at?: Host): void {
    if (this.trace) this.checker.hop(rec, `${fmtT(this.now)} dropped: ${reason}`);
    const first = !rec.done;
    this.checker.dropped(rec, reason, at?.agent.policy);
    if (first) this.giveRecord(rec);
  }

  // ---- for tests and the study ----

  /** A readable line per violation, with the packet's hops. */
  static describe(v: Violation): string {
    return [`${fmtT(v.t)} [${v.rule}] ${v.detail}`, ...v.hops.map((h) => `    ${h}`)].join('\n');
  }

  /** Live ingress entries per remote host on host h (the keys in use per host pair). */
  keysInUse(h: number): Map<string, number> {
    const m = new Map<string, number>();
    for (const [k] of this.hosts[h].state.ingress_cache.entries()) m.set(k.remote_host, (m.get(k.remote_host) ?? 0) + 1);
    return m;
  }
}
