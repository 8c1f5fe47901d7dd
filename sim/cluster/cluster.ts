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
import { COUNTER_NAMES, type CounterName } from '../../dataplane/maps.ts';
import { TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, type DatapathState, type Env, type RunResult as ProgramResult } from '../model/index.ts';
import { SimAgent, type AgentFaults } from './agent.ts';
import { keyScheme, type KeyScheme } from './datapath.ts';
import { EventQueue } from './events.ts';
import { ETH_HLEN, copyFrame, decreaseTtl, dstMacIs, ipHeaderValid, vxlanDecap, vxlanEncap, writePacketId } from './frames.ts';
import { Checker, denied, type PacketRecord, type Violation } from './invariants.ts';
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

export class Host {
  readonly addr: HostAddresses;
  readonly ip: number;
  readonly nicMac: Buffer;
  readonly vtepMac: Buffer;
  readonly cniMac: Buffer;
  readonly state: DatapathState;
  readonly env: Env;
  readonly agent: SimAgent;
  readonly podsByIp = new Map<number, Pod>();
  readonly podsByIfindex = new Map<number, Pod>();
  /** The pod in each slot, and the IP the slot last had (peers keep sending to it while the slot is empty). */
  readonly slots: Array<Pod | undefined> = [];
  readonly slotIp: number[] = [];
  readonly counters = Object.fromEntries(COUNTER_NAMES.map((n) => [n, 0])) as Record<CounterName, number>;
  private nextHostByte = FIRST_POD_HOST_BYTE;
  private nextIfindex = FIRST_VETH_IFINDEX;
  private readonly freeIfindex: number[] = [];
  ipId = 0;
  /** The simulated time env.now was last set for. */
  envAt = -1;

  constructor(readonly index: number, scheme: KeyScheme, sc: Scenario, faults: AgentFaults, rng: Rng) {
    this.addr = hostAddresses(index);
    this.ip = ipToU32(this.addr.ip);
    this.nicMac = macBytes(this.addr.nicMac);
    this.vtepMac = macBytes(this.addr.vtepMac);
    this.cniMac = macBytes(this.addr.cniMac);
    this.state = scheme.newState();
    this.state.config.nic_ifindex = NIC_IFINDEX;
    this.env = { now: 0n, random: () => rng.u32(), vlanPresent: false };
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

type Ev =
  | { t: number; seq: number; kind: 'flow'; flow: Flow }
  | { t: number; seq: number; kind: 'host-flow'; spec: HostFlowSpec; k: number; id: number }
  | { t: number; seq: number; kind: 'arrive'; host: number; frame: Buffer; id: number }
  | { t: number; seq: number; kind: 'scan'; host: number }
  | { t: number; seq: number; kind: 'churn'; spec: ChurnSpec }
  | { t: number; seq: number; kind: 'pod-add'; spec: ChurnSpec; ip: number }
  | { t: number; seq: number; kind: 'policy'; spec: PolicySpec; index: number }
  | { t: number; seq: number; kind: 'generate' };

type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;

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

const fmtT = (t: number) => `${(t / 1e6).toFixed(3)}ms`;

function counterText(r: ProgramResult): string {
  const c = r.effects.counters;
  return COUNTER_NAMES.filter((n) => c[n]).join(',');
}

export class Cluster {
  readonly hosts: Host[];
  readonly checker: Checker;
  private readonly scheme: KeyScheme;
  private readonly q = new EventQueue<Ev>();
  private readonly rng: Rng;
  private readonly wireRng: Rng;
  /** Host index by NIC MAC (the 48 bits as a number): the wire's switch table. */
  private readonly byNicMac = new Map<number, number>();
  private readonly flows: Flow[] = [];
  private readonly policyIds: Array<{ host: number; id: number } | undefined> = [];
  private now = 0;
  private nextPacketId = 1;
  private nextUid = 1;
  private readonly stats: RunStats;

  constructor(readonly sc: Scenario, private readonly opts: RunOptions = {}) {
    if (!Number.isInteger(sc.hosts) || sc.hosts < 2 || sc.hosts > 250) throw new Error(`hosts = ${sc.hosts}: want 2..250`);
    if (!Number.isInteger(sc.podsPerHost) || sc.podsPerHost < 1 || sc.podsPerHost > 200) throw new Error(`podsPerHost = ${sc.podsPerHost}: want 1..200`);
    this.scheme = keyScheme(sc.scheme);
    this.rng = new Rng(sc.seed);
    this.wireRng = new Rng(sc.seed ^ 0x5bd1e995);
    this.checker = new Checker();
    this.hosts = [];
    for (let h = 0; h < sc.hosts; h++) {
      const host = new Host(h, this.scheme, sc, opts.faults ?? {}, new Rng(sc.seed * 31 + h));
      this.hosts.push(host);
      this.byNicMac.set(host.nicMac.readUIntBE(0, 6), h);
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
    host.agent.addPod(pod.ipStr, podMac(uid), pod.ifindex, BigInt(Math.round(this.now)));
    return pod;
  }

  /** CNI DEL: the agent purges, then the veth goes and IPAM frees the IP. */
  private deletePod(host: Host, slot: number): Pod | undefined {
    const pod = host.slots[slot];
    if (!pod) return undefined;
    host.agent.delPod(pod.ipStr, BigInt(Math.round(this.now)));
    host.slots[slot] = undefined;
    pod.deletedAt = this.now;
    host.podsByIp.delete(pod.ip);
    host.podsByIfindex.delete(pod.ifindex);
    host.releaseIfindex(pod.ifindex);
    return pod;
  }

  private schedule(e: DistributiveOmit<Ev, 'seq'>): void {
    // Nothing new starts after the run's end; packets already on the wire still arrive.
    if (e.t <= this.sc.durationNs || e.kind === 'arrive') this.q.push(e as Ev);
  }

  // ---- the run ----

  run(): RunResult {
    const sc = this.sc;
    for (const f of sc.flows) this.startFlow(f);
    if (this.opts.generator) {
      for (const f of this.opts.generator.initial()) this.startFlow(f);
      this.schedule({ t: 0, kind: 'generate' });
    }
    sc.hostFlows.forEach((spec, i) => this.schedule({ t: spec.at, kind: 'host-flow', spec, k: 0, id: i }));
    for (const c of sc.churn) this.schedule({ t: c.at, kind: 'churn', spec: c });
    sc.policy.forEach((spec, index) => this.schedule({ t: spec.at, kind: 'policy', spec, index }));
    // Each agent scans on its own phase, as agents started at different times do.
    for (const h of this.hosts) this.schedule({ t: this.rng.next() * sc.timing.scanIntervalNs, kind: 'scan', host: h.index });

    const maxPackets = this.opts.maxPackets ?? Infinity;
    for (;;) {
      const e = this.q.pop();
      if (!e || this.stats.packets >= maxPackets) break;
      this.now = e.t;
      this.stats.events++;
      this.dispatch(e);
    }
    return { stats: this.finishStats(), violations: this.checker.violations, violationCounts: this.checker.violationCounts };
  }

  private finishStats(): RunStats {
    const s = this.stats;
    s.simulatedNs = this.now;
    s.flows.cross = 0;
    s.flows.crossFast = 0;
    s.window.flows = 0;
    s.window.fastFlows = 0;
    const from = this.opts.measureFromNs ?? 0;
    for (const f of this.flows) {
      if (f.sentCross === 0) continue;
      s.flows.cross++;
      if (f.fast > 0) s.flows.crossFast++;
      if (f.spec.at < from) continue;
      s.window.flows++;
      if (f.fast > 0) s.window.fastFlows++;
    }
    for (const n of COUNTER_NAMES) s.counters[n] = this.hosts.reduce((a, h) => a + h.counters[n], 0);
    s.expired = { egress: 0, ingress: 0, unanswered: 0 };
    for (const h of this.hosts) {
      s.expired.egress += h.agent.expired.egress;
      s.expired.ingress += h.agent.expired.ingress;
      s.expired.unanswered += h.agent.expired.unanswered;
    }
    return s;
  }

  private dispatch(e: Ev): void {
    switch (e.kind) {
      case 'flow': return this.flowPacket(e.flow);
      case 'host-flow': return this.hostPacket(e.spec, e.k, e.id);
      case 'arrive': return this.nicIngress(this.hosts[e.host], e.frame, e.id);
      case 'scan': {
        const h = this.hosts[e.host];
        h.agent.scan(BigInt(Math.round(this.now)));
        this.schedule({ t: this.now + this.sc.timing.scanIntervalNs, kind: 'scan', host: e.host });
        return;
      }
      case 'churn': {
        const h = this.hosts[e.spec.pod.host];
        const gone = this.deletePod(h, e.spec.pod.slot);
        if (gone) this.schedule({ t: this.now + e.spec.gapNs, kind: 'pod-add', spec: e.spec, ip: gone.ip });
        return;
      }
      case 'pod-add': {
        const h = this.hosts[e.spec.pod.host];
        if (!h.slots[e.spec.pod.slot]) this.addPod(h, e.spec.pod.slot, e.spec.sameIp ? e.ip : undefined);
        return;
      }
      case 'policy': return this.policyEvent(e.spec, e.index);
      case 'generate': {
        const g = this.opts.generator!;
        const f = g.next(this.now);
        this.startFlow(f);
        this.schedule({ t: f.at, kind: 'generate' });
        return;
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
    const flow: Flow = { id: this.flows.length + 1, spec, next: 0, cross: spec.a.host !== spec.b.host, sentCross: 0, fast: 0, pods: [undefined, undefined], templates: [undefined, undefined] };
    this.flows.push(flow);
    this.schedule({ t: spec.at, kind: 'flow', flow });
  }

  private flowPacket(flow: Flow): void {
    const spec = flow.spec;
    if (flow.next === 0) flow.pods = [this.hosts[spec.a.host].slots[spec.a.slot], this.hosts[spec.b.host].slots[spec.b.slot]];
    const grace = this.sc.deadPeerGraceNs;
    if (grace !== undefined && flow.pods.some((p) => p?.deletedAt !== undefined && this.now > p.deletedAt + grace)) return;
    const k = flow.next++;
    if (flow.next < spec.packets) this.schedule({ t: this.now + spec.gapNs, kind: 'flow', flow });
    const fwd = forward(spec, k);
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
    const frame = copyFrame(tpl.frame);
    pod.mac.copy(frame, 6);
    const id = this.nextPacketId++;
    writePacketId(frame, tpl.idOffset, id);
    const cross = from.host !== to.host;
    const rec: PacketRecord = {
      id, kind: 'pod', cross, template: tpl.frame, idOffset: tpl.idOffset, sentAt: this.now,
      dstHost: to.host, dstIp, tuple: tpl.tuple,
      deniedAtSend: cross && denied(src.agent.policy, 'egress', tpl.tuple),
      hops: this.opts.trace ? [`${fmtT(this.now)} ${pod.name} sends ${tpl.tuple.src} → ${tpl.tuple.dst} (flow ${flow.id}, packet ${k})`] : undefined,
    };
    this.checker.inflight.set(id, rec);
    const counted = this.now >= (this.opts.measureFromNs ?? 0);
    if (cross) {
      this.stats.sent.cross++;
      flow.sentCross++;
      if (counted) {
        this.stats.window.cross++;
        if (spec.pattern === 'stream') this.stats.window.stream++;
      }
    } else this.stats.sent.local++;
    // The pod's own routing: its /24 is on-link (ARP for the peer), everything else via the cni0 gateway.
    if (subnetHost(dstIp, this.hosts.length) === src.index) {
      const peer = src.podsByIp.get(dstIp);
      if (!peer) return this.drop(id, 'no-neighbour');
      peer.mac.copy(frame, 0);
    } else src.cniMac.copy(frame, 0);
    this.podEgress(src, pod, frame, id, rec, flow);
  }

  private hostPacket(spec: HostFlowSpec, k: number, index: number): void {
    if (k + 1 < spec.packets) this.schedule({ t: this.now + spec.gapNs, kind: 'host-flow', spec, k: k + 1, id: index });
    const a = this.hosts[spec.from], b = this.hosts[spec.to];
    const sport = 20000 + index, dport = 5000 + (index % 100);
    const tpl: Template = buildTemplate(a.addr.ip, b.addr.ip, spec.proto, sport, dport, spec.tos, spec.df, true, index, { src: a.addr.nicMac, dst: b.addr.nicMac });
    const id = this.nextPacketId++;
    const frame = copyFrame(tpl.frame);
    writePacketId(frame, tpl.idOffset, id);
    this.stats.packets++;
    this.stats.sent.host++;
    this.checker.inflight.set(id, {
      id, kind: 'host', cross: false, template: tpl.frame, idOffset: tpl.idOffset, sentAt: this.now,
      dstHost: b.index, dstIp: b.ip, tuple: tpl.tuple, deniedAtSend: false,
      hops: this.opts.trace ? [`${fmtT(this.now)} host ${a.name} sends ${spec.proto} tos 0x${spec.tos.toString(16)} to ${b.name}`] : undefined,
    });
    this.nicEgress(a, frame, id);
  }

  // ---- the datapath at its hooks ----

  private runProgram(h: Host, prog: 'masq' | 'init' | 'restore', frame: Buffer, id: number): ProgramResult {
    // A packet's hooks on one host run at one instant: the bigint clock is made once for them.
    if (h.envAt !== this.now) {
      h.envAt = this.now;
      h.env.now = BigInt(Math.round(this.now));
    }
    const t0 = this.opts.timeModel ? performance.now() : 0;
    const r = this.scheme[prog](frame, h.state, h.env);
    if (this.opts.timeModel) this.stats.modelMs += performance.now() - t0;
    this.stats.modelCalls++;
    const c = r.effects.counters;
    // for-in: a fixed-shape object's own keys, about twice as fast here as indexing it by COUNTER_NAMES.
    for (const n in c) {
      const v = c[n as CounterName];
      if (v) h.counters[n as CounterName] += v;
    }
    if (this.opts.trace) {
      const v = r.verdict === TC_ACT_OK ? 'OK' : r.verdict === TC_ACT_SHOT ? 'SHOT' : r.verdict === TC_ACT_REDIRECT ? `REDIRECT ${r.effects.redirect.kind} ${r.effects.redirect.ifindex}` : String(r.verdict);
      this.checker.hop(id, `${fmtT(this.now)} ${h.name} ${prog}: ${v} [${counterText(r)}]`);
    }
    return r;
  }

  /** masq at the TC ingress of the pod's host-side veth. */
  private podEgress(h: Host, pod: Pod, frame: Buffer, id: number, rec: PacketRecord, flow: Flow): void {
    const r = this.runProgram(h, 'masq', frame, id);
    if (r.verdict === TC_ACT_SHOT) return this.drop(id, r.effects.counters.POLICY_DROP ? 'policy' : 'masq-shot');
    if (r.verdict === TC_ACT_REDIRECT) {
      if (r.effects.redirect.ifindex !== NIC_IFINDEX) return this.drop(id, 'redirect-to-unknown-device');
      this.stats.masqueraded++;
      if (rec.sentAt >= (this.opts.measureFromNs ?? 0)) {
        this.stats.window.fast++;
        if (flow.spec.pattern === 'stream') this.stats.window.streamFast++;
      }
      flow.fast++;
      return this.nicEgress(h, r.packet, id);
    }
    this.bridge(h, r.packet, id, pod);
  }

  /** cni0: a frame for a local pod's MAC is switched; one for the gateway is routed. */
  private bridge(h: Host, frame: Buffer, id: number, from: Pod): void {
    if (dstMacIs(frame, h.cniMac)) return this.route(h, frame, id);
    for (const p of h.podsByIp.values()) {
      if (p !== from && dstMacIs(frame, p.mac)) {
        this.stats.delivered.local++;
        return this.deliverToPod(h, p, frame, id);
      }
    }
    this.drop(id, 'bridge-unknown-mac');
  }

  /** Host routing of a pod packet: to a local pod through cni0, to another host's pod subnet through flannel.1. */
  private route(h: Host, frame: Buffer, id: number): void {
    const dst = frame.readUInt32BE(L3 + 16);
    const g = subnetHost(dst, this.hosts.length);
    if (g < 0) return this.drop(id, 'no-route');
    if (!decreaseTtl(frame, L3)) return this.drop(id, 'ttl-exceeded');
    if (g === h.index) {
      const p = h.podsByIp.get(dst);
      if (!p) return this.drop(id, 'no-neighbour');
      h.cniMac.copy(frame, 6);
      p.mac.copy(frame, 0);
      this.stats.delivered.local++;
      return this.deliverToPod(h, p, frame, id);
    }
    // flannel.1: the inner frame goes from our VTEP MAC to theirs (neighbour entry), to their host IP (FDB).
    const peer = this.hosts[g];
    h.vtepMac.copy(frame, 6);
    peer.vtepMac.copy(frame, 0);
    const outer = vxlanEncap(frame, { srcMac: h.nicMac, dstMac: peer.nicMac, srcIp: h.ip, dstIp: peer.ip, ipId: h.ipId++ });
    this.nicEgress(h, outer, id);
  }

  /** init at the NIC's TC egress, then the wire. */
  private nicEgress(h: Host, frame: Buffer, id: number): void {
    const r = this.runProgram(h, 'init', frame, id);
    if (r.verdict === TC_ACT_SHOT) return this.drop(id, r.effects.counters.POLICY_DROP ? 'policy' : 'init-shot');
    if (r.verdict !== TC_ACT_OK) return this.drop(id, 'init-bad-verdict');
    this.wire(h, r.packet, id);
  }

  private wire(h: Host, frame: Buffer, id: number): void {
    const to = this.byNicMac.get(frame.readUIntBE(0, 6));
    if (to === undefined) return this.drop(id, 'wire-unknown-mac');
    const l = this.sc.link;
    if (l.loss > 0 && this.wireRng.next() < l.loss) return this.drop(id, 'wire-loss');
    const delay = l.latencyNs + (l.jitterNs > 0 ? this.wireRng.next() * l.jitterNs : 0);
    this.schedule({ t: this.now + delay, kind: 'arrive', host: to, frame, id });
  }

  /** restore at the NIC's TC ingress; what it passes goes to the host stack. */
  private nicIngress(h: Host, frame: Buffer, id: number): void {
    const r = this.runProgram(h, 'restore', frame, id);
    if (r.verdict === TC_ACT_SHOT) {
      return this.drop(id, r.effects.counters.POLICY_DROP ? 'policy' : r.effects.counters.RESTORE_MISS ? 'restore-miss' : 'restore-shot', h);
    }
    if (r.verdict === TC_ACT_REDIRECT) {
      // bpf_redirect_peer: into the namespace of the veth's peer, if that veth still exists.
      const p = h.podsByIfindex.get(r.effects.redirect.ifindex);
      if (r.effects.redirect.kind !== 'PEER' || !p) return this.drop(id, 'redirect-to-unknown-device');
      this.stats.delivered.fast++;
      return this.deliverToPod(h, p, r.packet, id);
    }
    this.hostStack(h, r.packet, id);
  }

  private hostStack(h: Host, frame: Buffer, id: number): void {
    if (!dstMacIs(frame, h.nicMac) || frame.readUInt16BE(12) !== 0x0800) return this.drop(id, 'not-for-this-host');
    if (!ipHeaderValid(frame, L3)) return this.drop(id, 'bad-ip-checksum');
    if (frame.readUInt32BE(L3 + 16) !== h.ip) return this.drop(id, 'not-for-this-host');
    const inner = vxlanDecap(frame);
    if (!inner) {
      this.stats.delivered.host++;
      this.checker.hostReceived(this.now, id, frame, h.index);
      return;
    }
    // flannel.1 receives the inner frame: for its own MAC only, then routed to cni0.
    if (!dstMacIs(inner, h.vtepMac) || inner.readUInt16BE(12) !== 0x0800) return this.drop(id, 'vxlan-not-for-vtep');
    if (!ipHeaderValid(inner, L3)) return this.drop(id, 'bad-ip-checksum');
    const dst = inner.readUInt32BE(L3 + 16);
    if (subnetHost(dst, this.hosts.length) !== h.index) return this.drop(id, 'no-route');
    const p = h.podsByIp.get(dst);
    if (!p) return this.drop(id, 'no-neighbour');
    const f = copyFrame(inner);
    if (!decreaseTtl(f, L3)) return this.drop(id, 'ttl-exceeded');
    h.cniMac.copy(f, 6);
    p.mac.copy(f, 0);
    this.stats.delivered.overlay++;
    this.deliverToPod(h, p, f, id);
  }

  private deliverToPod(h: Host, p: Pod, frame: Buffer, id: number): void {
    // Hops are kept only when tracing: the text is not built for every packet otherwise.
    if (this.opts.trace) this.checker.hop(id, `${fmtT(this.now)} delivered into pod ${p.name} (${p.ipStr})`);
    this.checker.podReceived(this.now, id, frame, { ip: p.ip, mac: p.mac, name: p.name, host: h.index }, h.agent.policy);
  }

  private drop(id: number, reason: string, at?: Host): void {
    if (this.opts.trace) this.checker.hop(id, `${fmtT(this.now)} dropped: ${reason}`);
    this.checker.dropped(this.now, id, reason, at?.agent.policy);
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
