/**
 * A scenario is plain data: the cluster, its links, the agents' timing, and
 * every event — flows, pod churn, policy changes, host traffic. The property
 * tests generate scenarios and print the one that fails; the study and the
 * benchmark add a traffic generator (traffic.ts) that makes flows as it goes.
 */
import type { AgentTiming } from './agent.ts';

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
  policy: PolicySpec[];
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

const ms = (ns: number) => `${(ns / 1e6).toFixed(3)}ms`;
const ref = (r: PodRef) => `h${r.host}p${r.slot}`;

/** The scenario as a few readable lines, for failing property runs. */
export function formatScenario(sc: Scenario): string {
  const l = sc.link;
  const t = sc.timing;
  const lines = [
    `${sc.hosts} hosts × ${sc.podsPerHost} pods, scheme ${sc.scheme}, ifindex ${sc.ifindex}, seed ${sc.seed}, run ${ms(sc.durationNs)}`,
    `link: latency ${ms(l.latencyNs)} + jitter ${ms(l.jitterNs)}, loss ${l.loss}; agent: egress idle ${ms(t.egressIdleNs)}, ingress idle ${ms(t.ingressIdleNs)}, scan every ${ms(t.scanIntervalNs)}`,
    ...sc.flows.map((f, i) => `flow ${i + 1}: at ${ms(f.at)} ${ref(f.a)} ↔ ${ref(f.b)} ${f.proto} ${f.packets} packets every ${ms(f.gapNs)} ${f.pattern}${f.tos ? ` tos 0x${f.tos.toString(16)}` : ''}`),
    ...sc.hostFlows.map((f) => `host traffic: at ${ms(f.at)} h${f.from} → h${f.to} ${f.proto} tos 0x${f.tos.toString(16)}${f.df ? ' DF' : ''} ${f.packets} packets every ${ms(f.gapNs)}`),
    ...sc.churn.map((c) => `churn: at ${ms(c.at)} ${ref(c.pod)} deleted, a new pod ${ms(c.gapNs)} later on ${c.sameIp ? 'the same IP' : 'a new IP'}`),
    ...sc.policy.map((p, i) => p.op === 'add'
      ? `policy #${i}: at ${ms(p.at)} h${p.host} deny ${p.dir} ${p.src ? ref(p.src) : '*'} → ${p.dst ? ref(p.dst) : '*'}${p.dport ? `:${p.dport}` : ''}${p.proto ? ` ${p.proto}` : ''}`
      : `policy #${i}: at ${ms(p.at)} h${p.host} remove rule #${p.removes}`),
  ];
  return lines.join('\n');
}
