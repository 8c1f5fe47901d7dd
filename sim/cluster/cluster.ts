/**
 * The discrete-event simulator: N hosts × M pods on a Flannel-style VXLAN
 * overlay, with the XMasq programs at their hooks (masq at each pod's
 * host-side veth ingress, init at the NIC's TC egress, restore at its TC
 * ingress), the agent's control loops, and an underlay with latency, jitter
 * (hence reordering) and loss.
 *
 * Overlay path:  pod → veth (masq: pass) → cni0 → route, TTL−1 → flannel.1
 *                encap → NIC egress (init) → wire → NIC ingress (restore:
 *                pass) → host stack → vxlan decap → route, TTL−1 → cni0 → pod
 * Fast path:     pod → veth (masq: rewrite, redirect) → NIC egress (init:
 *                pass) → wire → NIC ingress (restore: rewrite, redirect peer) → pod
 *
 * Everything inside a host happens at one instant; only the wire takes time.
 */
import { COUNTER_NAMES, NodeFlag, type CounterName } from '../../dataplane/maps.ts';
import { NO_REDIRECT, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, newEffects, type DatapathState, type Env, type RunEffects } from '../model/index.ts';
import { SimAgent, type AgentFaults } from './agent.ts';
import { keyScheme, type KeyScheme } from './datapath.ts';
import { Lanes } from './events.ts';
import { ETH_HLEN, FrameSlot, decreaseTtl, dstMacIs, fillSlot, get16, get32, ipHeaderValid, MacTable, putMac, vxlanDecap, vxlanEncapHeader, writePacketId, type Encap } from './frames.ts';
import { Checker, PacketRecord, denied, type Violation } from './invariants.ts';
import { Rng } from './rng.ts';
import type { ChurnSpec, FlowSpec, HostFlowSpec, PodRef, PolicySpec, Scenario } from './scenario.ts';
import {
  FIRST_POD_HOST_BYTE, FIRST_VETH_IFINDEX, LAST_POD_HOST_BYTE, NIC_IFINDEX,
  hostAddresses, ipToU32, macBytes, podMac, subnetHost, u32ToIp, type HostAddresses,
} from './topology.ts';
import { buildTemplate, forward, podTemplate, type Flow, type Template, type TrafficGenerator } from './traffic.ts';

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
 * clock is a whole number of ns (the model's Stamp as a number: a run's
 * simulated time stays far below 2^53 ns), set before each program run.
 */
class HostEnv implements Env {
  now = Number.NaN;
  readonly vlanPresent = false;

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

  constructor(readonly index: number, scheme: KeyScheme, sc: Scenario, faults: AgentFaults, rng: Rng) {
    this.addr = hostAddresses(index);
    this.ip = ipToU32(this.addr.ip);
    this.nicMac = macBytes(this.addr.nicMac);
    this.vtepMac = macBytes(this.addr.vtepMac);
    this.cniMac = macBytes(this.addr.cniMac);
    this.state = scheme.newState();
    this.state.config.nic_ifindex = NIC_IFINDEX;
    this.env = new HostEnv(rng);
    this.agent = new SimAgent(this.state, sc.timing, faults);
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

const HOST_FLOW = 0, SCAN = 1, CHURN = 2, POD_ADD = 3, POLICY = 4, GENERATE = 5;

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
  sent: { cross: number; local: number; host: number; unsent: number };
  masqueraded: number;
  delivered: { fast: number; overlay: number; local: number; host: number };
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
}

/** Where IPv4 starts in an untagged frame. */
const L3 = ETH_HLEN;

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
      const host = new Host(h, this.scheme, sc, opts.faults ?? {}, new Rng(sc.seed * 31 + h));
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
    this.stats = {
      packets: 0, sent: { cross: 0, local: 0, host: 0, unsent: 0 }, masqueraded: 0,
      delivered: { fast: 0, overlay: 0, local: 0, host: 0 }, drops: this.checker.drops,
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

  /** The host's clock, now: its programs' (HostEnv) set to the simulated time, in whole ns. */
  private setHostClock(h: Host): number {
    return (h.env.now = Math.round(this.now));
  }

  /** The host's clock as the agent reads it: a u64 bigint. */
  private clock(h: Host): bigint {
    return BigInt(this.setHostClock(h));
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
    // Each agent scans on its own phase, as agents started at different times do.
    for (const h of this.hosts) this.schedule(new ControlEvent(this.rng.next() * sc.timing.scanIntervalNs, SCAN, h.index));

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

  private control(e: ControlEvent): void {
    switch (e.kind) {
      case HOST_FLOW: return this.hostPacket(e);
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

  // ---- traffic ----

  private startFlow(spec: FlowSpec): void {
    const flow: Flow = { id: ++this.flowCount, spec, next: 0, sentCross: 0, fast: 0, pods: [undefined, undefined], templates: [undefined, undefined] };
    this.schedule(new FlowEvent(flow));
  }

  /** Whether a pod of the flow was deleted more than the scenario's grace ago (the flow then ends). */
  private goneTooLong(p: { deletedAt?: number } | undefined, grace: number): boolean {
    return p !== undefined && p.deletedAt !== undefined && this.now > p.deletedAt + grace;
  }

  private flowPacket(ev: FlowEvent): void {
    const flow = ev.flow;
    const spec = flow.spec;
    if (flow.next === 0) flow.pods = [this.hosts[spec.a.host].slots[spec.a.slot], this.hosts[spec.b.host].slots[spec.b.slot]];
    const grace = this.sc.deadPeerGraceNs;
    if (grace !== undefined && (this.goneTooLong(flow.pods[0], grace) || this.goneTooLong(flow.pods[1], grace))) return;
    const k = flow.next++;
    const fwd = forward(spec, k);
    const tpls = flow.templates;
    if (flow.next < spec.packets) {
      ev.t = this.now + spec.gapNs;
      this.schedule(ev);
    }
    const from = fwd ? spec.a : spec.b;
    const to = fwd ? spec.b : spec.a;
    const src = this.hosts[from.host];
    const pod = src.slots[from.slot];
    this.stats.packets++;
    if (!pod) {
      this.stats.sent.unsent++;
      return;
    }
    const dstHost = this.hosts[to.host];
    const dstIp = dstHost.slotIp[to.slot];
    const tpl = podTemplate(flow, fwd, pod.ip, dstIp);
    // A flow's last packet lets its templates go (packets still on the wire keep theirs through their records).
    if (flow.next === spec.packets) tpls[0] = tpls[1] = undefined;
    const id = this.nextPacketId++;
    const cross = from.host !== to.host;
    const rec = this.takeRecord(tpl).start(
      id, 'pod', cross, tpl, this.now, to.host, dstIp,
      cross && denied(src.agent.policy, 'egress', tpl.tuple),
      this.trace ? [`${fmtT(this.now)} ${pod.name} sends ${tpl.tuple.src} → ${tpl.tuple.dst} (flow ${flow.id}, packet ${k})`] : undefined,
    );
    const frame = rec.frame;
    putMac(frame, 6, pod.mac);
    writePacketId(frame, tpl.idOffset, id);
    const counted = this.now >= this.measureFrom;
    if (cross) {
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
      const v = verdict === TC_ACT_OK ? 'OK' : verdict === TC_ACT_SHOT ? 'SHOT' : verdict === TC_ACT_REDIRECT ? `REDIRECT ${fx.redirect.kind} ${fx.redirect.ifindex}` : String(verdict);
      this.checker.hop(rec, `${fmtT(this.now)} ${h.name} ${prog}: ${v} [${counterText(before, c)}]`);
    }
    return verdict;
  }

  /** masq at the TC ingress of the pod's host-side veth. */
  private podEgress(h: Host, pod: Pod, rec: PacketRecord, flow: Flow): void {
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

  /** cni0: a frame for a local pod's MAC is switched; one for the gateway is routed. */
  private bridge(h: Host, rec: PacketRecord, from: Pod): void {
    const frame = rec.frame;
    if (dstMacIs(frame, h.cniMac)) return this.route(h, rec);
    const p = h.podsByMac.forDst(frame);
    if (p !== undefined && p !== from) {
      this.stats.delivered.local++;
      return this.deliverToPod(h, p, rec, frame);
    }
    this.drop(rec, 'bridge-unknown-mac');
  }

  /** Host routing of a pod packet: to a local pod through cni0, to another host's pod subnet through flannel.1. */
  private route(h: Host, rec: PacketRecord): void {
    const frame = rec.frame;
    const dst = get32(frame, L3 + 16);
    const g = subnetHost(dst, this.hosts.length);
    if (g < 0) return this.drop(rec, 'no-route');
    if (!decreaseTtl(frame, L3)) return this.drop(rec, 'ttl-exceeded');
    if (g === h.index) {
      const p = h.podsByIp.get(dst);
      if (!p) return this.drop(rec, 'no-neighbour');
      putMac(frame, 6, h.cniMac);
      putMac(frame, 0, p.mac);
      this.stats.delivered.local++;
      return this.deliverToPod(h, p, rec, frame);
    }
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
    if (verdict !== TC_ACT_OK) return this.drop(rec, 'init-bad-verdict');
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
    const verdict = this.runProgram(h, 'restore', this.scheme.restore, rec);
    if (verdict === TC_ACT_SHOT) return this.drop(rec, this.shotReason, h);
    if (verdict === TC_ACT_REDIRECT) {
      // bpf_redirect_peer: into the namespace of the veth's peer, if that veth still exists.
      const p = h.podsByIfindex.get(h.fx.redirect.ifindex);
      if (h.fx.redirect.kind !== 'PEER' || !p) return this.drop(rec, 'redirect-to-unknown-device');
      this.stats.delivered.fast++;
      return this.deliverToPod(h, p, rec, rec.frame);
    }
    this.hostStack(h, rec);
  }

  private hostStack(h: Host, rec: PacketRecord): void {
    const frame = rec.frame;
    if (!dstMacIs(frame, h.nicMac) || get16(frame, 12) !== 0x0800) return this.drop(rec, 'not-for-this-host');
    if (!ipHeaderValid(frame, L3)) return this.drop(rec, 'bad-ip-checksum');
    if (get32(frame, L3 + 16) !== h.ip) return this.drop(rec, 'not-for-this-host');
    const inner = vxlanDecap(frame, rec.slot);
    if (!inner) {
      this.stats.delivered.host++;
      const first = !rec.done;
      this.checker.hostReceived(rec, frame, h.index);
      if (first) this.giveRecord(rec);
      return;
    }
    // flannel.1 receives the inner frame: for its own MAC only, then routed to cni0.
    if (!dstMacIs(inner, h.vtepMac) || get16(inner, 12) !== 0x0800) return this.drop(rec, 'vxlan-not-for-vtep');
    if (!ipHeaderValid(inner, L3)) return this.drop(rec, 'bad-ip-checksum');
    const dst = get32(inner, L3 + 16);
    if (subnetHost(dst, this.hosts.length) !== h.index) return this.drop(rec, 'no-route');
    const p = h.podsByIp.get(dst);
    if (!p) return this.drop(rec, 'no-neighbour');
    if (!decreaseTtl(inner, L3)) return this.drop(rec, 'ttl-exceeded');
    putMac(inner, 6, h.cniMac);
    putMac(inner, 0, p.mac);
    this.stats.delivered.overlay++;
    this.deliverToPod(h, p, rec, inner);
  }

  private deliverToPod(h: Host, p: Pod, rec: PacketRecord, frame: Buffer): void {
    // Hops are kept only when tracing: the text is not built for every packet otherwise.
    if (this.trace) this.checker.hop(rec, `${fmtT(this.now)} delivered into pod ${p.name} (${p.ipStr})`);
    // The record is reused once its packet is done (giveRecord).
    const first = !rec.done;
    this.checker.podReceived(rec, frame, p, h.agent.policy);
    if (first) this.giveRecord(rec);
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
