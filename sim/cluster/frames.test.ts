import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { buildFrame, decodeFrame, verifyIpv4Header, verifyL4 } from '../../testing/packet/index.ts';
import { decreaseTtl, ipHeaderValid, payloadOffset, readPacketId, vxlanDecap, vxlanEncap, writePacketId } from './frames.ts';
import { buildTemplate } from './traffic.ts';
import { ipToU32, macBytes } from './topology.ts';

const proto = fc.constantFrom('tcp' as const, 'udp' as const, 'icmp' as const);

describe('sim/cluster frames', () => {
  it('writing a packet id keeps the template L4 checksum valid (full recomputation)', () => {
    fc.assert(fc.property(proto, fc.nat(0xffffffff), fc.nat(255), (p, id, tos) => {
      const t = buildTemplate(ipToU32('10.244.1.2'), ipToU32('10.244.2.3'), p, 12345, 80, tos, false, true, 7);
      const f = Buffer.from(t.frame);
      writePacketId(f, t.idOffset, id);
      expect(readPacketId(f, t.idOffset)).toBe(id);
      expect(payloadOffset(f, 14)).toBe(t.idOffset);
      expect(verifyL4(f, 14)).toBe(true);
    }), { numRuns: 300 });
  });

  it('decreaseTtl leaves a header checksum that a full recomputation accepts', () => {
    fc.assert(fc.property(fc.integer({ min: 2, max: 255 }), fc.nat(255), (ttl, tos) => {
      const f = buildFrame({ ipv4: { src: '10.0.0.1', dst: '10.0.0.2', ttl, tos, l4: { udp: { sport: 1, dport: 2 } } } });
      expect(decreaseTtl(f, 14)).toBe(true);
      expect(f[22]).toBe(ttl - 1);
      expect(verifyIpv4Header(f, 14)).toBe(true);
      expect(ipHeaderValid(f, 14)).toBe(true);
    }), { numRuns: 300 });
    const last = buildFrame({ ipv4: { src: '10.0.0.1', dst: '10.0.0.2', ttl: 1 } });
    expect(decreaseTtl(last, 14)).toBe(false);
  });

  it('VXLAN encapsulation is what the decoder reads as VXLAN to 8472 with VNI 1, and decapsulates back', () => {
    const inner = buildTemplate(ipToU32('10.244.1.2'), ipToU32('10.244.2.3'), 'tcp', 1000, 80, 0b11, false, true, 1).frame;
    const out = vxlanEncap(inner, { srcMac: macBytes('02:00:00:00:00:01'), dstMac: macBytes('02:00:00:00:00:02'), srcIp: ipToU32('172.31.250.1'), dstIp: ipToU32('172.31.250.2') }, 9);
    const d = JSON.stringify(decodeFrame(out));
    expect(d).toContain('"vni":1');
    expect(d).toContain('8472');
    expect(verifyIpv4Header(out, 14)).toBe(true);
    // The outer header carries the inner ECN bits, as the kernel's tunnels do.
    expect(out[15]).toBe(0b11);
    expect(vxlanDecap(out)?.equals(inner)).toBe(true);
    const notVxlan = buildFrame({ ipv4: { src: '1.1.1.1', dst: '2.2.2.2', l4: { udp: { sport: 1, dport: 8473, payload: { len: 64 } } } } });
    expect(vxlanDecap(notVxlan)).toBeUndefined();
  });
});
