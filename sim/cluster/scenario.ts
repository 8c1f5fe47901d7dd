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
  /** Simulated time to run, ns; events after it are not run. */
  durationNs: number;
  seed: number;
}

export const PROTO_NUMBER: Record<Proto, number> = { icmp: 1, tcp: 6, udp: 17 };
