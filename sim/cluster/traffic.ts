/**
 * Flows and the traffic generator. A flow is a pod pair exchanging a number
 * of packets at a fixed spacing; its frames are built once per address pair
 * (buildFrame, with valid checksums) and copied per packet with the packet's
 * id written into the payload.
 */
import { buildFrame, type L4Spec } from '../../testing/packet/index.ts';
import type { Sent } from './invariants.ts';
import { ETH_HLEN, payloadOffset, put16, put32 } from './frames.ts';
import type { Rng } from './rng.ts';
import { PROTO_NUMBER, type FlowSpec, type PodRef, type Proto } from './scenario.ts';
import { u32ToIp } from './topology.ts';

/** Payload bytes of every simulated packet: the 8-byte id and filler. */
export const PAYLOAD_BYTES = 64;
const SERVER_PORTS = [80, 443, 8080, 9000, 6379, 5432];

export interface Template extends Sent {
  srcIp: number;
  dstIp: number;
}

export interface Flow {
  id: number;
  spec: FlowSpec;
  /** Index of the next packet to send. */
  next: number;
  /** Cross-host packets sent, and those masq carried. */
  sentCross: number;
  fast: number;
  /** The pods of a and b when the flow started (deadPeerGraceNs ends a flow some time after either is deleted). */
  pods: [{ deletedAt?: number } | undefined, { deletedAt?: number } | undefined];
  /**
   * The last frames built, by slot (FLOW_SENT_A etc.), and the addresses each
   * was built for (churn can change them); flagged: their TCP SYN, SYN-ACK
   * and FIN variants, made from them (flowTemplate).
   */
  templates: Array<Template | undefined>;
  flagged: Array<Template | undefined>;
  /** The flow's protocol (a Service's for a Service flow). */
  proto: Proto;
  /** A server answers only what it heard: b (or a Service's backend) received a packet of the flow; a heard b; b heard a's handshake end. */
  heardB: boolean;
  heardA: boolean;
  bData: boolean;
  /** A Service flow's backend: the pod that received its first request (its IP and where it is). */
  server: { ip: number; host: number; slot: number; deletedAt?: number } | undefined;
  /** The addresses of a and b the connection was made with (-1: none yet; b's: -1 for a Service). */
  aIp: number;
  bIp: number;
}

/** Template slots of a flow: what a sends, what b sends; what a Service's backend must receive, what its client must. */
export const SENT_A = 0, SENT_B = 1, EXPECT_AT_B = 2, EXPECT_AT_A = 3;

/** TCP flags the simulated connections carry. */
export const FLAGS_SYN = 0x02, FLAGS_SYNACK = 0x12, FLAGS_PA = 0x18, FLAGS_FINACK = 0x11;

/**
 * The frame of a flow's slot from src:sport to dst:dport, with TCP flags (any
 * for UDP and ICMP, which have none): the PSH-ACK frame is built (and kept)
 * per address pair, the others are made from it.
 */
export function flowTemplate(f: Flow, slot: number, src: number, dst: number, sport: number, dport: number, flags: number): Template {
  let base = f.templates[slot];
  if (!base || base.srcIp !== src || base.dstIp !== dst) {
    base = buildTemplate(src, dst, f.proto, sport, dport, f.spec.tos ?? 0, false, slot === SENT_A || slot === EXPECT_AT_B, f.id);
    f.templates[slot] = base;
  }
  if (flags === FLAGS_PA || f.proto !== 'tcp') return base;
  const k = slot * 3 + (flags === FLAGS_SYN ? 0 : flags === FLAGS_SYNACK ? 1 : 2);
  const c = f.flagged[k];
  if (c && c.srcIp === src && c.dstIp === dst) return c;
  return (f.flagged[k] = withTcpFlags(base, flags));
}

/** A copy of a TCP template with other flags, its checksum updated incrementally (RFC 1624), as a recomputation would give it. */
export function withTcpFlags(t: Template, flags: number): Template {
  const { frame, words } = templateMemory(t.frame.length);
  frame.set(t.frame);
  const l4 = ETH_HLEN + (frame[ETH_HLEN] & 0x0f) * 4;
  const old = (frame[l4 + 12] << 8) | frame[l4 + 13];
  frame[l4 + 13] = flags;
  const now = (frame[l4 + 12] << 8) | frame[l4 + 13];
  let sum = (~((frame[l4 + 16] << 8) | frame[l4 + 17]) & 0xffff) + (~old & 0xffff) + now;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  put16(frame, l4 + 16, ~sum & 0xffff);
  return { frame, words, srcIp: t.srcIp, dstIp: t.dstIp, idOffset: t.idOffset, tuple: t.tuple, podMask: undefined, hostMask: undefined };
}

/** Which way packet k of a flow goes: true from a to b. */
export function forward(spec: FlowSpec, k: number): boolean {
  return spec.pattern === 'rr' ? k % 2 === 0 : k % 4 !== 3;
}

export function flowPorts(id: number): { client: number; server: number } {
  return { client: 10000 + (id * 7919) % 50000, server: SERVER_PORTS[id % SERVER_PORTS.length] };
}


/**
 * One frame per shape (protocol, DF, ICMP echo request or reply), built with
 * buildFrame with every varying field zero; a template is a copy of it with
 * those fields written and its checksums computed again. A template per flow
 * direction is made often (microservice flows are a few packets long), and
 * this is several times cheaper than building it from a spec. traffic.test.ts
 * checks the two give the same bytes.
 */
const shapes: Array<{ frame: Buffer; idOffset: number } | undefined> = [];

function shape(proto: Proto, df: boolean, request: boolean): { frame: Buffer; idOffset: number } {
  const name = PROTO_NUMBER[proto] * 4 + (df ? 2 : 0) + (proto === 'icmp' && request ? 1 : 0);
  let s = shapes[name];
  if (s) return s;
  // The id words go where the payload is zero: they sum to zero themselves, so the checksum stays valid.
  const payload = new Uint8Array(PAYLOAD_BYTES).map((_, i) => (i < 8 ? 0 : i));
  const l4: L4Spec = proto === 'tcp' ? { tcp: { sport: 0, dport: 0, flags: 'PA', seq: 0, payload } }
    : proto === 'udp' ? { udp: { sport: 0, dport: 0, payload } }
      : { icmp: { type: request ? 8 : 0, id: 0, seq: 1, payload } };
  const frame = buildFrame({ eth: {}, ipv4: { src: '0.0.0.0', dst: '0.0.0.0', tos: 0, df, id: 0, l4 } });
  s = { frame, idOffset: payloadOffset(frame, ETH_HLEN) };
  shapes[name] = s;
  return s;
}

/**
 * Memory for templates, carved from slabs at 8-byte boundaries (the words
 * view needs 4): an ArrayBuffer of its own per template costs more than the
 * rest of making one.
 */
const SLAB_BYTES = 1 << 16;
let slab = new ArrayBuffer(SLAB_BYTES);
let slabUsed = 0;

function templateMemory(len: number): { frame: Buffer; words: Int32Array } {
  if (slabUsed + len > SLAB_BYTES) {
    slab = new ArrayBuffer(SLAB_BYTES);
    slabUsed = 0;
  }
  const at = slabUsed;
  slabUsed += (len + 7) & ~7;
  return { frame: Buffer.from(slab, at, len), words: new Int32Array(slab, at, len >> 2) };
}

/** Ones'-complement sum of the big-endian words of f[start, end), folded, not complemented. */
function wordSum(f: Buffer, start: number, end: number, initial: number): number {
  let sum = initial;
  let i = start;
  for (; i + 1 < end; i += 2) sum += (f[i] << 8) | f[i + 1];
  if (i < end) sum += f[i] << 8;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return sum;
}

/**
 * The frame of a packet from src to dst (pod or host addresses), as
 * buildFrame would make it: TCP PA with sequence number id × 1000, UDP, or an
 * ICMP echo request or reply with identifier id; IPv4 ID id; PAYLOAD_BYTES of
 * payload starting with 8 zero bytes for the packet id; valid checksums.
 */
export function buildTemplate(src: number, dst: number, proto: Proto, sport: number, dport: number, tos: number, df: boolean, request: boolean, id: number, macs?: { src: Buffer; dst: Buffer }): Template {
  const s = shape(proto, df, request);
  const { frame, words } = templateMemory(s.frame.length);
  frame.set(s.frame);
  if (macs) {
    frame.set(macs.dst, 0);
    frame.set(macs.src, 6);
  }
  // Plain stores: Buffer's write methods check their arguments on every call, a cost per flow.
  const l3 = ETH_HLEN;
  const l4 = l3 + 20;
  frame[l3 + 1] = tos;
  put16(frame, l3 + 4, id & 0xffff);
  put32(frame, l3 + 12, src);
  put32(frame, l3 + 16, dst);
  put16(frame, l3 + 10, 0);
  put16(frame, l3 + 10, ~wordSum(frame, l3, l4, 0) & 0xffff);
  const end = frame.length;
  const pn = PROTO_NUMBER[proto];
  // The pseudo header: addresses, protocol, L4 length.
  const pseudo = (src >>> 16) + (src & 0xffff) + (dst >>> 16) + (dst & 0xffff) + pn + (end - l4);
  if (proto === 'tcp') {
    put16(frame, l4, sport);
    put16(frame, l4 + 2, dport);
    put32(frame, l4 + 4, (id * 1000) % 0x100000000);
    put16(frame, l4 + 16, 0);
    put16(frame, l4 + 16, ~wordSum(frame, l4, end, pseudo) & 0xffff);
  } else if (proto === 'udp') {
    put16(frame, l4, sport);
    put16(frame, l4 + 2, dport);
    put16(frame, l4 + 6, 0);
    // UDP sends a computed 0 as 0xffff (0 means no checksum).
    put16(frame, l4 + 6, (~wordSum(frame, l4, end, pseudo) & 0xffff) || 0xffff);
  } else {
    put16(frame, l4 + 4, id & 0xffff);
    put16(frame, l4 + 2, 0);
    put16(frame, l4 + 2, ~wordSum(frame, l4, end, 0) & 0xffff);
  }
  const icmp = proto === 'icmp';
  return {
    frame, words, srcIp: src, dstIp: dst, idOffset: s.idOffset,
    tuple: { src: ipText(src), dst: ipText(dst), proto: pn, sport: icmp ? 0 : sport, dport: icmp ? 0 : dport },
    podMask: undefined, hostMask: undefined,
  };
}

/** Address text for tuples, made once per address (the cluster's addresses are few). */
const ipTexts = new Map<number, string>();

function ipText(ip: number): string {
  let t = ipTexts.get(ip);
  if (t === undefined) ipTexts.set(ip, (t = u32ToIp(ip)));
  return t;
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
