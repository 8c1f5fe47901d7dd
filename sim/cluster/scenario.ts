/**
 * A scenario is plain data: the cluster, its links, the agents' timing, and
 * every event — flows, pod churn, policy changes, host traffic. The property
 * tests generate scenarios and print the one that fails; the study and the
 * benchmark add a traffic generator (traffic.ts) that makes flows as it goes.
 */
import type { AgentTiming } from './agent.ts';
import type { CtTimeouts } from './conntrack.ts';

export interface LinkSpec {
  /** One-way latency of the underlay, ns. */
  latencyNs: number;
  /** Each packet is delayed by a further uniform [0, jitterNs): packets of a flow overtake each other when it exceeds their spacing. */
  jitterNs: number;
  /** Probability that the wire loses a packet. */
  loss: number;
}

export type Proto = 'tcp' | 'udp' | 'icmp';

/** A pod slot: slot k of host h (both from 0). The pod in a slot changes with churn. */
export interface PodRef {
  host: number;
  slot: number;
}

export interface FlowSpec {
  /** Start time, ns. */
  at: number;
  a: PodRef;
  b: PodRef;
  proto: Proto;
  /** Packets in the flow, both directions together. */
  packets: number;
  /** Time between two packets of the flow, ns. */
  gapNs: number;
  /** 'rr': request/response, directions alternate; 'stream': a → b, with one b → a packet every fourth. */
  pattern: 'rr' | 'stream';
  /** The TOS byte the pods write; DSCP ≠ 0 keeps a flow on the overlay by design. */
  tos?: number;
  /**
   * a talks to Service #service (Scenario.services) instead of to b: a sends to
   * its ClusterIP:port, its host DNATs the connection to a backend, and the
   * backend that receives it answers. proto is the Service's; b is not used.
   */
  service?: number;
}

/**
 * A ClusterIP Service, DNATed kube-proxy style by the client's host (nat
 * PREROUTING) to one of its backends, chosen at random per connection among
 * the backend slots that hold a pod; conntrack reverses it on the replies.
 */
export interface ServiceSpec {
  proto: 'tcp' | 'udp';
  port: number;
  targetPort: number;
  backends: PodRef[];
}

/** Host-to-host traffic (not from pods), which XMasq must never alter. */
export interface HostFlowSpec {
  at: number;
  from: number;
  to: number;
  proto: Proto;
  /** Any TOS, including ECN-CE with a DSCP equal to a live key. */
  tos: number;
  df: boolean;
  packets: number;
  gapNs: number;
}

/** The pod in a slot is deleted (CNI DEL) and, gapNs later, a new one added in the slot. */
export interface ChurnSpec {
  at: number;
  pod: PodRef;
  gapNs: number;
  /** true: the new pod gets the old pod's IP back; false: the next free IP. */
  sameIp: boolean;
}

export interface PolicySpec {
  at: number;
  host: number;
  /** add a deny rule (pods by slot, resolved to the IP the slot has when the rule is added), or remove the rule added by policy event #removes. */
  op: 'add' | 'remove';
  dir?: 'egress' | 'ingress';
  src?: PodRef;
  dst?: PodRef;
  dport?: number;
  proto?: Proto;
  removes?: number;
}

export interface Scenario {
  hosts: number;
  podsPerHost: number;
  link: LinkSpec;
  timing: AgentTiming;
  /** The key scheme (datapath.ts). */
  scheme: string;
  /** 'fresh': a new veth gets a new ifindex, as the kernel does; 'reuse': it takes the lowest freed one, the worst case for stale state. */
  ifindex: 'fresh' | 'reuse';
  flows: FlowSpec[];
  hostFlows: HostFlowSpec[];
  churn: ChurnSpec[];
  /** The agent's own deny rules (xmasq policy add: compiled into its policy_table). */
  policy: PolicySpec[];
  /** ClusterIP Services (the n-th is 10.96.0.(10 + n)). */
  services?: ServiceSpec[];
  /** Whether the agents know the Service range (masq takes admitted requests to their backend); default true. */
  serviceRange?: boolean;
  /**
   * Deny rules in the hosts' FORWARD chain, as Calico or kube-router install
   * a NetworkPolicy: ESTABLISHED,RELATED accepted first, then the deny rules
   * (ingress: to a pod of this host; egress: from one), then KUBE-FORWARD's
   * ctstate INVALID drop. Same shape as policy, on the host's stack.
   */
  hostPolicy?: PolicySpec[];
  /** The hosts' conntrack timeouts (default Linux's, conntrack.ts). */
  ctTimeouts?: CtTimeouts;
  /**
   * How long a flow goes on sending after one of its pods was deleted, ns: a client
   * keeps sending to a dead pod until it notices (TCP retries, endpoint updates).
   * Default: forever (the flow's slot is served by whatever pod holds it).
   */
  deadPeerGraceNs?: number;
  /** Simulated time to run, ns; events after it are not run. */
  durationNs: number;
  seed: number;
}

export const PROTO_NUMBER: Record<Proto, number> = { icmp: 1, tcp: 6, udp: 17 };

/** The Service range the agents are given (--service-cidr 10.96.0.0/12), as the datapath's config holds it. */
export const SERVICE_RANGE = { service_net: '10.96.0.0', service_mask: '255.240.0.0' } as const;

/** Service #n's ClusterIP, 10.96.0.(10 + n). */
export function serviceIp(n: number): number {
  return ((10 << 24) | (96 << 16) | (10 + n)) >>> 0;
}

const ms = (ns: number) => `${(ns / 1e6).toFixed(3)}ms`;
const ref = (r: PodRef) => `h${r.host}p${r.slot}`;

/** The scenario as a few readable lines, for failing property runs. */
export function formatScenario(sc: Scenario): string {
  const l = sc.link;
  const t = sc.timing;
  const lines = [
    `${sc.hosts} hosts × ${sc.podsPerHost} pods, scheme ${sc.scheme}, ifindex ${sc.ifindex}, seed ${sc.seed}, run ${ms(sc.durationNs)}`,
    `link: latency ${ms(l.latencyNs)} + jitter ${ms(l.jitterNs)}, loss ${l.loss}; agent: egress idle ${ms(t.egressIdleNs)}, ingress idle ${ms(t.ingressIdleNs)}, scan every ${ms(t.scanIntervalNs)}`,
    ...(sc.services ?? []).map((v, i) => `service #${i}: 10.96.0.${10 + i}:${v.port} ${v.proto} → ${v.backends.map(ref).join(' ')} :${v.targetPort}`),
    ...sc.flows.map((f, i) => `flow ${i + 1}: at ${ms(f.at)} ${ref(f.a)} ↔ ${f.service !== undefined ? `service #${f.service}` : `${ref(f.b)} ${f.proto}`} ${f.packets} packets every ${ms(f.gapNs)} ${f.pattern}${f.tos ? ` tos 0x${f.tos.toString(16)}` : ''}`),
    ...sc.hostFlows.map((f) => `host traffic: at ${ms(f.at)} h${f.from} → h${f.to} ${f.proto} tos 0x${f.tos.toString(16)}${f.df ? ' DF' : ''} ${f.packets} packets every ${ms(f.gapNs)}`),
    ...sc.churn.map((c) => `churn: at ${ms(c.at)} ${ref(c.pod)} deleted, a new pod ${ms(c.gapNs)} later on ${c.sameIp ? 'the same IP' : 'a new IP'}`),
    ...sc.policy.map((p, i) => p.op === 'add'
      ? `policy #${i}: at ${ms(p.at)} h${p.host} deny ${p.dir} ${p.src ? ref(p.src) : '*'} → ${p.dst ? ref(p.dst) : '*'}${p.dport ? `:${p.dport}` : ''}${p.proto ? ` ${p.proto}` : ''}`
      : `policy #${i}: at ${ms(p.at)} h${p.host} remove rule #${p.removes}`),
    ...(sc.hostPolicy ?? []).map((p, i) => p.op === 'add'
      ? `FORWARD #${i}: at ${ms(p.at)} h${p.host} deny ${p.dir} ${p.src ? ref(p.src) : '*'} → ${p.dst ? ref(p.dst) : '*'}${p.dport ? `:${p.dport}` : ''}${p.proto ? ` ${p.proto}` : ''}`
      : `FORWARD #${i}: at ${ms(p.at)} h${p.host} remove rule #${p.removes}`),
    ...(sc.ctTimeouts ? [`conntrack: udp ${ms(sc.ctTimeouts.udp)} / stream ${ms(sc.ctTimeouts.udpStream)}, tcp closing ${ms(sc.ctTimeouts.tcpFinWait)}`] : []),
  ];
  return lines.join('\n');
}
