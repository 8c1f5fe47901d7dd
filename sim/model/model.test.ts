/**
 * Properties of the model that the differential check cannot give (the model
 * and the kernel could agree and both be wrong): checked against the packet
 * library's independent full checksum computation and against the original
 * packet itself.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { buildFrame, type FrameSpec, type L4Spec } from '../../testing/packet/build.ts';
import { l4ChecksumInfo, verifyIpv4Header } from '../../testing/packet/checksum.ts';
import { NO_HOST_NETNS, NO_OVERLAY, NO_SERVICES, FLANNEL_PORTS, ConfigFlag, IP_RF, NodeFlag, WIDE_KEY_MAX, WIDE_KEY_MIN } from '../../dataplane/maps.ts';
import { TC_CONTINUE, egressFilterAdd, emptyState, type DatapathState, type Env } from './index.ts';
import { csumAdd32, csumFold64 } from './packet.ts';
import { masq } from './masq.ts';
import { restore } from './restore.ts';
import { init } from './init.ts';

const A = { host: '192.0.2.1', mac: '02:00:00:00:00:0a' };
const B = { host: '192.0.2.2', mac: '02:00:00:00:00:0b' };
const SRC = { ip: '10.244.1.5', mac: '0a:58:0a:f4:01:05', ifindex: 7 };
const DST = { ip: '10.244.2.9', mac: '0a:58:0a:f4:02:09', ifindex: 12 };
/** masq runs on SRC's host-side veth (it holds the packet's source to that pod). */
const env: Env = { now: 5n, random: () => 0, ifindex: SRC.ifindex };
const SIZES = { pods: 16, paths: 64, policySlots: 32 * 256 };

/** The node set the agent writes: both hosts, self flagged SELF. */
function nodes(s: DatapathState, self: string): DatapathState {
  for (const h of [A.host, B.host]) s.nodes.update(h, { flags: h === self ? NodeFlag.SELF : 0 });
  return s;
}

/** Host A knows the pair SRC -> DST fully (our key 4, theirs 33); host B can restore it under 33. */
function hosts(): { a: DatapathState; b: DatapathState } {
  const a = nodes(emptyState(SIZES), A.host);
  a.config = { nic_ifindex: 3, flags: 0, ...NO_OVERLAY, ...NO_SERVICES, ...FLANNEL_PORTS };
  a.pod_info.update(SRC.ip, { ifindex: SRC.ifindex, mac: SRC.mac, ...NO_HOST_NETNS });
  a.egress_cache.update({ local_pod: SRC.ip, remote_pod: DST.ip }, {
    last_seen: 1n, local_mac: A.mac, remote_mac: B.mac, local_ip: A.host, remote_ip: B.host,
    ifindex: SRC.ifindex, local_key: 4, remote_key: 33, remote_ready: 1,
  });
  const ek = a.egress_cache.keys.fromLayout({ local_pod: SRC.ip, remote_pod: DST.ip });
  egressFilterAdd(a, ek.local_pod, ek.remote_pod);
  const b = nodes(emptyState(SIZES), B.host);
  b.pod_info.update(DST.ip, { ifindex: DST.ifindex, mac: DST.mac, ...NO_HOST_NETNS });
  b.ingress_cache.update({ remote_host: A.host, key: 33 }, {
    last_seen: 1n, local_mac: DST.mac, remote_mac: '0a:58:0a:f4:02:01', local_ip: DST.ip, remote_ip: SRC.ip,
    ifindex: DST.ifindex, local_key: 33, remote_key: 0, remote_ready: 0,
  });
  return { a, b };
}

const l4Arb: fc.Arbitrary<L4Spec> = fc.oneof(
  fc.record({ sport: fc.integer({ min: 1, max: 65535 }), dport: fc.integer({ min: 1, max: 65535 }), seq: fc.nat(), flags: fc.integer({ min: 0, max: 255 }), payload: fc.uint8Array({ maxLength: 64 }) })
    .map((t) => ({ tcp: t })),
  fc.record({ sport: fc.integer({ min: 1, max: 65535 }), dport: fc.constantFrom(53, 80, 9000, 65535), payload: fc.uint8Array({ maxLength: 64 }) })
    .map((u) => ({ udp: u })),
  fc.record({ id: fc.integer({ min: 0, max: 65535 }), seq: fc.integer({ min: 0, max: 65535 }), payload: fc.uint8Array({ maxLength: 32 }) })
    .map((i) => ({ icmp: { type: 8, ...i } })),
);

const podPacketArb = fc.record({
  ecn: fc.integer({ min: 0, max: 3 }),
  id: fc.integer({ min: 0, max: 65535 }),
  df: fc.boolean(),
  ttl: fc.integer({ min: 1, max: 255 }),
  options: fc.option(fc.uint8Array({ minLength: 4, maxLength: 40 }).map((o) => o.subarray(0, o.length & ~3)), { nil: undefined }),
  l4: l4Arb,
}).map((p): FrameSpec => ({
  eth: { src: SRC.mac, dst: '0a:58:0a:f4:01:01' },
  ipv4: { src: SRC.ip, dst: DST.ip, tos: p.ecn, id: p.id, df: p.df, ttl: p.ttl, options: p.options?.length ? p.options : undefined, l4: p.l4 },
}));

describe('model: masq then restore', () => {
  it('gives back the pod packet, with valid checksums on the wire and after', () => {
    fc.assert(fc.property(podPacketArb, (spec) => {
      const original = buildFrame(spec);
      const { a, b } = hosts();
      const sent = masq(original, a, env);
      expect(sent.verdict).toBe(7);
      const wire = sent.packet;

      // On the wire: a host packet with RF, the receiver's key, the pod's ECN, valid checksums.
      expect(wire.readUInt16BE(20) & IP_RF).toBe(IP_RF);
      expect(wire[15]).toBe((33 << 2) | (original[15] & 3));
      expect(wire.subarray(26, 34)).toEqual(Buffer.from([192, 0, 2, 1, 192, 0, 2, 2]));
      expect(verifyIpv4Header(wire, 14)).toBe(true);
      expect(l4ChecksumInfo(wire, 14)?.valid).toBe(true);

      const got = restore(wire, b, env);
      expect(got.verdict).toBe(7);
      expect(got.effects.redirect).toEqual({ ifindex: DST.ifindex, kind: 'PEER' });
      const back = got.packet;
      expect(back.subarray(0, 6)).toEqual(Buffer.from(DST.mac.split(':').map((x) => parseInt(x, 16))));
      expect(verifyIpv4Header(back, 14)).toBe(true);
      expect(l4ChecksumInfo(back, 14)?.valid).toBe(true);

      // Everything from the IP header on is the pod's packet again, checksums equal as
      // one's complement values (0x0000 and 0xffff are the same number).
      const same = (x: Buffer, y: Buffer, csumAt: number[]) => {
        const xs = Buffer.from(x), ys = Buffer.from(y);
        for (const at of csumAt) {
          const norm = (buf: Buffer) => { if (buf.readUInt16BE(at) === 0xffff) buf.writeUInt16BE(0, at); };
          norm(xs); norm(ys);
        }
        expect(xs.subarray(14)).toEqual(ys.subarray(14));
      };
      const info = l4ChecksumInfo(original, 14);
      same(back, original, [24, ...(info && info.protocol !== 1 ? [info.fieldOffset] : [])]);
    }), { numRuns: 2000 });
  });
});

describe('model: host traffic', () => {
  it('restore never touches a packet without RF, whatever its TOS', () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: 255 }), l4Arb, (tos, l4) => {
      const { b } = hosts();
      const frame = buildFrame({ eth: { src: A.mac, dst: B.mac }, ipv4: { src: A.host, dst: B.host, tos, l4 } });
      const r = restore(frame, b, env);
      expect(r.verdict).toBe(TC_CONTINUE);
      expect(r.packet.equals(frame)).toBe(true);
    }), { numRuns: 1000 });
  });
});

describe('model: frames too short for the kernel test runner', () => {
  it('pass untouched through every program', () => {
    // BPF_PROG_TEST_RUN refuses IPv4 frames under 34 bytes, so only the model can be run on them.
    const { a, b } = hosts();
    const full = buildFrame({ eth: { src: A.mac, dst: B.mac }, ipv4: { src: A.host, dst: B.host, rf: true, tos: 33 << 2, l4: { tcp: { sport: 1, dport: 2 } } } });
    for (let len = 14; len < 34; len++) {
      const frame = full.subarray(0, len);
      for (const [name, r] of [['masq', masq(frame, a, env)], ['restore', restore(frame, b, env)], ['init', init(frame, b, env)]] as const) {
        expect(r.verdict, `${name} on ${len} bytes`).toBe(TC_CONTINUE);
        expect(r.effects.counters.PASSED, `${name} on ${len} bytes`).toBe(1);
        expect(r.packet.equals(frame)).toBe(true);
      }
    }
  });
});

describe('model: VLAN tag taken out of the frame by the kernel', () => {
  it('makes every program pass the packet untouched', () => {
    const { a, b } = hosts();
    const pod = buildFrame({ eth: { src: SRC.mac, dst: '0a:58:0a:f4:01:01' }, ipv4: { src: SRC.ip, dst: DST.ip, l4: { tcp: { sport: 1, dport: 2 } } } });
    const sent = masq(pod, a, env).packet;
    const tagged = { ...env, vlanPresent: true };
    for (const [name, r, input] of [['masq', masq(pod, a, tagged), pod], ['restore', restore(sent, b, tagged), sent]] as const) {
      expect(r.verdict, name).toBe(TC_CONTINUE);
      expect(r.effects.counters.PASSED, name).toBe(1);
      expect(r.packet.equals(input), name).toBe(true);
    }
  });
});

describe('model: init signal', () => {
  it('marks only the outer header, with a valid checksum, and draws keys 1..63', () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: 0xffffffff }), podPacketArb, (draw, inner) => {
      const s = nodes(emptyState(SIZES), A.host);
      Object.assign(s.config, FLANNEL_PORTS);
      s.pod_info.update(SRC.ip, { ifindex: SRC.ifindex, mac: SRC.mac, ...NO_HOST_NETNS });
      const innerFrame = buildFrame(inner);
      const frame = buildFrame({
        eth: { src: A.mac, dst: B.mac },
        ipv4: { src: A.host, dst: B.host, l4: { udp: { sport: 40000, dport: 8472, checksum: 'none', payload: { vxlan: { vni: 1 }, inner } } } },
      });
      const r = init(frame, s, { now: 9n, random: () => draw });
      const key = s.egress_cache.lookup({ local_pod: SRC.ip, remote_pod: DST.ip })!.local_key;
      expect(key).toBeGreaterThanOrEqual(1);
      expect(key).toBeLessThanOrEqual(63);
      expect(r.packet[15] >> 2).toBe(key);
      expect(r.packet.readUInt16BE(20) & IP_RF).toBe(IP_RF);
      expect(verifyIpv4Header(r.packet, 14)).toBe(true);
      // The inner frame, which the pod's peer will see, is untouched.
      expect(r.packet.subarray(14 + 20 + 8 + 8)).toEqual(innerFrame);
    }), { numRuns: 1000 });
  });
});

describe('model: wide keys', () => {
  /** Random wide keys, the bounds included. */
  const wideArb = fc.oneof(fc.constantFrom(WIDE_KEY_MIN, WIDE_KEY_MAX), fc.integer({ min: WIDE_KEY_MIN, max: WIDE_KEY_MAX }));

  function wideHosts(key: number): { a: DatapathState; b: DatapathState } {
    const { a, b } = hosts();
    a.egress_cache.lookup({ local_pod: SRC.ip, remote_pod: DST.ip })!.remote_key = key;
    const r = b.ingress_cache.lookup({ remote_host: A.host, key: 33 })!;
    b.ingress_cache.delete({ remote_host: A.host, key: 33 });
    b.ingress_cache.update({ remote_host: A.host, key }, { ...r, local_key: key });
    return { a, b };
  }
  // Pod packets a wide key can ride in: TCP with URG clear, UDP (checksum or none), ICMP echo and reply.
  const l4Arb: fc.Arbitrary<L4Spec> = fc.oneof(
    fc.record({
      sport: fc.integer({ min: 1, max: 65535 }), seq: fc.nat(),
      flags: fc.integer({ min: 0, max: 255 }).map((f) => f & ~0x20), payload: fc.uint8Array({ maxLength: 64 }),
    }).map((t): L4Spec => ({ tcp: { ...t, dport: 80 } })),
    fc.record({ sport: fc.integer({ min: 1, max: 65535 }), none: fc.boolean(), payload: fc.uint8Array({ maxLength: 64 }) })
      .map((u): L4Spec => ({ udp: { sport: u.sport, dport: 53, checksum: u.none ? 'none' : 'valid', payload: u.payload } })),
    fc.record({ type: fc.constantFrom(0, 8), id: fc.integer({ min: 0, max: 0xffff }), seq: fc.integer({ min: 0, max: 0xffff }), payload: fc.uint8Array({ maxLength: 64 }) })
      .map((i): L4Spec => ({ icmp: i })),
  );
  const podArb = fc.record({ ecn: fc.integer({ min: 0, max: 3 }), l4: l4Arb }).map((p): FrameSpec => ({
    eth: { src: SRC.mac, dst: '0a:58:0a:f4:01:01' },
    ipv4: { src: SRC.ip, dst: DST.ip, tos: p.ecn, df: true, l4: p.l4 },
  }));

  it('masq then restore gives back the pod packet, the key in its carrier on the wire, checksums valid against a full recomputation', () => {
    fc.assert(fc.property(podArb, wideArb, (spec, key) => {
      const original = buildFrame(spec);
      const { a, b } = wideHosts(key);
      const sent = masq(original, a, env);
      expect(sent.verdict).toBe(7);
      const wire = sent.packet;
      const l4 = 14 + 20;
      // The carrier, read straight off the wire format.
      if ('icmp' in spec.ipv4!.l4!) {
        expect(wire[l4 + 1], 'ICMP code = high bits').toBe(key >> 6);
        expect(wire[15], 'DSCP = low bits, the pod ECN').toBe(((key & 63) << 2) | (original[15] & 3));
      } else {
        expect(wire[15], 'DSCP 0, the pod ECN').toBe(original[15] & 3);
        expect(wire.readUInt16BE(l4 + ('tcp' in spec.ipv4!.l4! ? 18 : 4))).toBe(key);
      }
      // (A UDP checksum on the wire covers the true length, which its length field no longer says.)
      if (!('udp' in spec.ipv4!.l4!)) expect(l4ChecksumInfo(wire, 14)?.valid).toBe(true);
      const got = restore(wire, b, env);
      expect(got.verdict).toBe(7);
      expect(got.effects.redirect).toEqual({ ifindex: DST.ifindex, kind: 'PEER' });
      const back = l4ChecksumInfo(got.packet, 14);
      if (back) expect(back.valid).toBe(true);
      // 0 and 0xffff are the same checksum in ones' complement; not for UDP, where 0 means "none".
      const norm = (x: Buffer) => {
        const y = Buffer.from(x.subarray(14));
        const ats = 'tcp' in spec.ipv4!.l4! ? [10, 20 + 16] : 'udp' in spec.ipv4!.l4! ? [10] : [10, 20 + 2];
        for (const at of ats) if (y.readUInt16BE(at) === 0xffff) y.writeUInt16BE(0, at);
        return y;
      };
      expect(norm(got.packet)).toEqual(norm(original));
    }), { numRuns: 3000 });
  });

  it('init gives a pair a wide key in the outer ID only with the flag on, and never on a GSO packet', () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: 0xffffffff }), fc.boolean(), fc.boolean(), (draw, wideOn, gso) => {
      const s = nodes(emptyState(SIZES), A.host);
      s.config = { nic_ifindex: 3, flags: wideOn ? ConfigFlag.WIDE_KEYS : 0, ...NO_OVERLAY, ...NO_SERVICES, ...FLANNEL_PORTS };
      s.pod_info.update(SRC.ip, { ifindex: SRC.ifindex, mac: SRC.mac, ...NO_HOST_NETNS });
      const inner: FrameSpec = { eth: { src: SRC.mac, dst: '0a:58:0a:f4:01:01' }, ipv4: { src: SRC.ip, dst: DST.ip, l4: { tcp: { sport: 1000, dport: 80 } } } };
      const frame = buildFrame({
        eth: { src: A.mac, dst: B.mac },
        ipv4: { src: A.host, dst: B.host, id: 0x4242, l4: { udp: { sport: 40000, dport: 8472, checksum: 'none', payload: { vxlan: { vni: 1 }, inner } } } },
      });
      const r = init(frame, s, { now: 9n, random: () => draw, gsoSize: gso ? 1448 : 0 });
      const key = s.egress_cache.lookup({ local_pod: SRC.ip, remote_pod: DST.ip })!.local_key;
      expect(key >= WIDE_KEY_MIN).toBe(wideOn);
      if (wideOn && gso) {
        expect(r.packet.equals(frame)).toBe(true);
        return;
      }
      expect(r.packet.readUInt16BE(20) & IP_RF).toBe(IP_RF);
      expect(r.packet[15] >> 2).toBe(wideOn ? 0 : key);
      expect(r.packet.readUInt16BE(18)).toBe(wideOn ? key : 0x4242);
      expect(verifyIpv4Header(r.packet, 14)).toBe(true);
    }), { numRuns: 500 });
  });
});

describe('model: one\'s complement sums', () => {
  // The sum modulo 2^32 - 1 written out: 0 only for a sum of zeros, a multiple of 2^32 - 1 as 0xffffffff.
  const expected = (words: number[]): number => {
    const total = words.reduce((a, w) => a + BigInt(w >>> 0), 0n);
    return total === 0n ? 0 : Number((total - 1n) % 0xffffffffn + 1n);
  };
  const edge = fc.constantFrom(0, 1, 0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff);
  const word = fc.oneof(edge, fc.integer({ min: 0, max: 0xffffffff }));

  it('csumFold64 of a whole sum gives what adding the words one at a time with end-around carry gives', () => {
    fc.assert(fc.property(fc.array(word, { maxLength: 12 }), (words) => {
      const oneByOne = words.reduce((s, w) => csumAdd32(s, w), 0) >>> 0;
      const whole = csumFold64(words.reduce((a, w) => a + (w >>> 0), 0)) >>> 0;
      expect(oneByOne).toBe(expected(words));
      expect(whole).toBe(expected(words));
    }), { numRuns: 5000 });
  });

  it('keeps the two representations of zero apart', () => {
    expect(csumFold64(0)).toBe(0);
    expect(csumFold64(0xffffffff) >>> 0).toBe(0xffffffff);
    expect(csumFold64(2 * 0xffffffff) >>> 0).toBe(0xffffffff);
    expect(csumFold64(0x1_0000_0000)).toBe(1);
  });
});
