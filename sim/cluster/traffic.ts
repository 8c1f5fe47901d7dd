/**
 * Flows and the traffic generator. A flow is a pod pair exchanging a number
 * of packets at a fixed spacing; its frames are built once per address pair
 * (buildFrame, with valid checksums) and copied per packet with the packet's
 * id written into the payload.
 */
import { buildFrame, type L4Spec } from '../packet/index.ts';
import type { Tuple } from './invariants.ts';
import { ETH_HLEN, payloadOffset } from './frames.ts';
import type { Rng } from './rng.ts';
import { PROTO_NUMBER, type FlowSpec, type PodRef, type Proto } from './scenario.ts';
import { ipToU32, u32ToIp } from './topology.ts';

/** Payload bytes of every simulated packet: the 8-byte id and filler. */
export const PAYLOAD_BYTES = 64;
const SERVER_PORTS = [80, 443, 8080, 9000, 6379, 5432];

export interface Template {
  frame: Buffer;
  srcIp: number;
  dstIp: number;
  idOffset: number;
  tuple: Tuple;
}

export interface Flow {
  id: number;
  spec: FlowSpec;
  /** Index of the next packet to send. */
  next: number;
  cross: boolean;
  /** Cross-host packets sent, and those masq carried. */
  sentCross: number;
  fast: number;
  /** The pods of a and b when the flow started (deadPeerGraceNs ends a flow some time after either is deleted). */
  pods: [{ deletedAt?: number } | undefined, { deletedAt?: number } | undefined];
  /** The last frame built for each direction, and the addresses it was built for (churn can change them). */
  templates: [Template | undefined, Template | undefined];
}

/** Which way packet k of a flow goes: true from a to b. */
export function forward(spec: FlowSpec, k: number): boolean {
  return spec.pattern === 'rr' ? k % 2 === 0 : k % 4 !== 3;
}

export function flowPorts(id: number): { client: number; server: number } {
  return { client: 10000 + (id * 7919) % 50000, server: SERVER_PORTS[id % SERVER_PORTS.length] };
}

/** The frame a pod sends for flow f from src to dst (MACs are written per packet). */
export function podTemplate(f: Flow, fwd: boolean, src: number, dst: number): Template {
  const slot = fwd ? 0 : 1;
  const cached = f.templates[slot];
  if (cached && cached.srcIp === src && cached.dstIp === dst) return cached;
  const { client, server } = flowPorts(f.id);
  const sport = fwd ? client : server;
  const dport = fwd ? server : client;
  const t = buildTemplate(u32ToIp(src), u32ToIp(dst), f.spec.proto, sport, dport, f.spec.tos ?? 0, false, fwd, f.id);
  f.templates[slot] = t;
  return t;
}

export function buildTemplate(src: string, dst: string, proto: Proto, sport: number, dport: number, tos: number, df: boolean, request: boolean, id: number, macs?: { src: string; dst: string }): Template {
  // The id words go where the payload is zero: they sum to zero themselves, so the checksum stays valid.
  const payload = new Uint8Array(PAYLOAD_BYTES).map((_, i) => (i < 8 ? 0 : i));
  const l4: L4Spec = proto === 'tcp' ? { tcp: { sport, dport, flags: 'PA', seq: id * 1000, payload } }
    : proto === 'udp' ? { udp: { sport, dport, payload } }
      : { icmp: { type: request ? 8 : 0, id: id & 0xffff, seq: 1, payload } };
  const frame = buildFrame({ eth: macs ?? {}, ipv4: { src, dst, tos, df, id: id & 0xffff, l4 } });
  const idOffset = payloadOffset(frame, ETH_HLEN);
  const ports = proto === 'icmp' ? { sport: 0, dport: 0 } : { sport, dport };
  return { frame, srcIp: ipToU32(src), dstIp: ipToU32(dst), idOffset, tuple: { src, dst, proto: PROTO_NUMBER[proto], ...ports } };
}

/** How the study and the benchmark make traffic: flows arriving at random, as a cluster of microservices does. */
export interface TrafficModel {
  /** New flows per second, over the whole cluster. */
  flowsPerSecond: number;
  /**
   * 'all-to-all': any pod talks to any other; a number P: only P fixed pod
   * pairs per pair of hosts talk (the concurrency of pairs the key space must hold).
   */
  pairs: 'all-to-all' | number;
  /** Packets per flow: log-normal with this median and shape, at least 2. */
  sizeMedian: number;
  sizeSigma: number;
  maxPackets: number;
  /** Spacing of a flow's packets: log-normal median, ns (shape 1). */
  gapMedianNs: number;
  /** Long streams started at time 0 between random cross-host pairs. */
  heavyFlows: number;
  heavyPackets: number;
  heavyGapNs: number;
}

export const MICROSERVICES: TrafficModel = {
  flowsPerSecond: 2000,
  pairs: 'all-to-all',
  sizeMedian: 8,
  sizeSigma: 1.2,
  maxPackets: 5000,
  gapMedianNs: 2e6,
  heavyFlows: 4,
  heavyPackets: 20000,
  heavyGapNs: 1e6,
};

export class TrafficGenerator {
  private readonly pairList: Array<[PodRef, PodRef]> = [];

  constructor(private readonly m: TrafficModel, private readonly hosts: number, private readonly podsPerHost: number, private readonly rng: Rng) {
    if (m.pairs !== 'all-to-all') {
      // P distinct pod pairs for every pair of hosts, fixed for the run.
      for (let h = 0; h < hosts; h++) {
        for (let g = h + 1; g < hosts; g++) {
          const seen = new Set<number>();
          const want = Math.min(m.pairs, podsPerHost * podsPerHost);
          while (seen.size < want) seen.add(rng.int(podsPerHost * podsPerHost));
          for (const x of seen) this.pairList.push([{ host: h, slot: Math.floor(x / podsPerHost) }, { host: g, slot: x % podsPerHost }]);
        }
      }
    }
  }

  /** Flows that start with the run: the heavy streams. */
  initial(): FlowSpec[] {
    const out: FlowSpec[] = [];
    for (let i = 0; i < this.m.heavyFlows; i++) {
      const [a, b] = this.pair(true);
      out.push({ at: 0, a, b, proto: 'tcp', packets: this.m.heavyPackets, gapNs: this.m.heavyGapNs, pattern: 'stream' });
    }
    return out;
  }

  /** The next flow to arrive after time t. */
  next(t: number): FlowSpec {
    const at = t + this.rng.exponential(1e9 / this.m.flowsPerSecond);
    const [a, b] = this.pair(false);
    const packets = Math.max(2, Math.min(this.m.maxPackets, Math.round(this.rng.lognormal(this.m.sizeMedian, this.m.sizeSigma))));
    const u = this.rng.next();
    const proto: Proto = u < 0.8 ? 'tcp' : u < 0.97 ? 'udp' : 'icmp';
    return { at, a, b, proto, packets, gapNs: this.rng.lognormal(this.m.gapMedianNs, 1), pattern: 'rr' };
  }

  private pair(crossHost: boolean): [PodRef, PodRef] {
    if (this.pairList.length) {
      const [a, b] = this.pairList[this.rng.int(this.pairList.length)];
      return this.rng.next() < 0.5 ? [a, b] : [b, a];
    }
    for (;;) {
      const a = { host: this.rng.int(this.hosts), slot: this.rng.int(this.podsPerHost) };
      const b = { host: this.rng.int(this.hosts), slot: this.rng.int(this.podsPerHost) };
      if (a.host === b.host && (crossHost || a.slot === b.slot)) continue;
      return [a, b];
    }
  }
}
