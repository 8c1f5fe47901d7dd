import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { buildFrame, type L4Spec } from '../../testing/packet/index.ts';
import { PAYLOAD_BYTES, buildTemplate } from './traffic.ts';
import { macBytes, u32ToIp } from './topology.ts';

const proto = fc.constantFrom('tcp' as const, 'udp' as const, 'icmp' as const);

describe('sim/cluster templates', () => {
  it('are the bytes buildFrame makes from the same fields', () => {
    fc.assert(fc.property(proto, fc.nat(0xffffffff), fc.nat(0xffffffff), fc.nat(0xffff), fc.nat(0xffff), fc.nat(255), fc.boolean(), fc.boolean(), fc.nat(4_000_000), fc.boolean(),
      (p, src, dst, sport, dport, tos, df, request, id, withMacs) => {
        const payload = new Uint8Array(PAYLOAD_BYTES).map((_, i) => (i < 8 ? 0 : i));
        const l4: L4Spec = p === 'tcp' ? { tcp: { sport, dport, flags: 'PA', seq: id * 1000, payload } }
          : p === 'udp' ? { udp: { sport, dport, payload } }
            : { icmp: { type: request ? 8 : 0, id: id & 0xffff, seq: 1, payload } };
        const macs = { src: '02:00:ac:1f:fa:01', dst: '02:00:ac:1f:fa:02' };
        const want = buildFrame({ eth: withMacs ? macs : {}, ipv4: { src: u32ToIp(src), dst: u32ToIp(dst), tos, df, id: id & 0xffff, l4 } });
        const t = buildTemplate(src, dst, p, sport, dport, tos, df, request, id, withMacs ? { src: macBytes(macs.src), dst: macBytes(macs.dst) } : undefined);
        expect(t.frame.toString('hex')).toBe(want.toString('hex'));
        expect(t.tuple).toEqual({ src: u32ToIp(src), dst: u32ToIp(dst), proto: { tcp: 6, udp: 17, icmp: 1 }[p], sport: p === 'icmp' ? 0 : sport, dport: p === 'icmp' ? 0 : dport });
      }), { numRuns: 500 });
  });
});
