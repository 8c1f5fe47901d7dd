import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  assertFramesEqual, buildFrame, bytesToIp6, checksumProblems, decodeFrame, describeFrame, diffFrames, findLayer,
  fixChecksums, flattenFrame, fragmentIpv4, hexToBytes, internetChecksum, ip6ToBytes, ipToBytes, ipToU32,
  ipv4HeaderChecksum, l4Checksum, macToBytes, onesComplementSum, pseudoHeaderSum, toBytes, truncate, u32ToIp,
  udpChecksum, verifyIpv4Header, verifyL4,
  type DecodedFrame, type FieldValue, type FrameSpec,
} from './index.ts';
import { encodePcap, readPcap, readPcapFile, writePcap } from '../pcap.ts';

/**
 * Reference ones'-complement sum by a different route than the library's
 * end-around-carry folding: since 2^16 = 1 (mod 0xffff), the folded sum is
 * the plain integer sum modulo 0xffff, with 0xffff standing for a non-zero
 * multiple.
 */
function refSum(bytes: ArrayLike<number>): number {
  let total = 0;
  for (let i = 0; i < bytes.length; i += 2) total += bytes[i] * 256 + (i + 1 < bytes.length ? bytes[i + 1] : 0);
  const r = total % 0xffff;
  return r === 0 && total !== 0 ? 0xffff : r;
}

function refL4Checksum(src: string, dst: string, proto: number, seg: Uint8Array): number {
  const pseudo = [...ipToBytes(src), ...ipToBytes(dst), 0, proto, seg.length >> 8, seg.length & 0xff];
  return 0xffff - refSum([...pseudo, ...seg]);
}

function fieldsOf(d: DecodedFrame, path: string): Record<string, FieldValue> {
  const l = findLayer(d, path);
  if (!l) throw new Error(`no layer ${path} in ${d.layers.map((x) => x.path).join(',')}`);
  return l.fields;
}

/** The decoder's promise: layer spans tile the buffer exactly, so no byte escapes a diff. */
function expectTiling(d: DecodedFrame): void {
  const spans = d.layers.filter((l) => l.length > 0).map((l) => [l.offset, l.offset + l.length]).sort((a, b) => a[0] - b[0]);
  let at = 0;
  for (const [s, e] of spans) {
    expect(s, `gap or overlap at ${at} in ${d.layers.map((l) => `${l.path}@${l.offset}+${l.length}`).join(' ')}`).toBe(at);
    at = e;
  }
  expect(at).toBe(d.length);
}

const SYN: FrameSpec = {
  ipv4: { src: '10.0.0.1', dst: '10.0.0.2', id: 1, df: true, l4: { tcp: { sport: 1234, dport: 80, flags: 'S', payload: { len: 12 } } } },
};

function vxlanSpec(inner: FrameSpec = SYN, dport = 4789): FrameSpec {
  return {
    eth: { src: '52:54:00:00:00:01', dst: '52:54:00:00:00:02' },
    ipv4: { src: '192.168.1.1', dst: '192.168.1.2', tos: 0x08, l4: { udp: { sport: 40000, dport, payload: { vxlan: { vni: 42 }, inner } } } },
  };
}

describe('checksum', () => {
  it('matches the classic IPv4 header example (0xb861)', () => {
    const h = hexToBytes('4500 0073 0000 4000 4011 0000 c0a8 0001 c0a8 00c7');
    expect(ipv4HeaderChecksum(h)).toBe(0xb861);
    // The field's current content must not matter.
    h[10] = 0x12; h[11] = 0x34;
    expect(ipv4HeaderChecksum(h)).toBe(0xb861);
    expect(verifyIpv4Header(h, 0)).toBe(false);
    h[10] = 0xb8; h[11] = 0x61;
    expect(verifyIpv4Header(h, 0)).toBe(true);
    expect(onesComplementSum(h)).toBe(0xffff);
  });

  it('matches the RFC 1071 numerical example', () => {
    const b = Uint8Array.from([0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]);
    expect(onesComplementSum(b)).toBe(0xddf2);
    expect(internetChecksum(b)).toBe(0x220d);
    // Sub-ranges pair words from their own start.
    expect(onesComplementSum(b, 2, 6)).toBe(0xf203 + 0xf4f5 - 0xffff);
  });

  it('pads an odd trailing byte as the high half of a word', () => {
    expect(onesComplementSum(Uint8Array.from([0xab]))).toBe(0xab00);
    expect(onesComplementSum(Uint8Array.from([0x01, 0x02, 0x03]))).toBe(0x0402);
    expect(() => onesComplementSum(new Uint8Array(2), 0, 3)).toThrow(RangeError);
  });

  it('agrees with a modulo-0xffff reference on random data', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 300 }), fc.integer({ min: 0, max: 0xffff }), (b, init) => {
      expect(onesComplementSum(b, 0, b.length, init)).toBe(refSum([init >> 8, init & 0xff, ...b]));
    }), { seed: 1, numRuns: 300 });
  });

  it('computes TCP and UDP checksums like the reference', () => {
    fc.assert(fc.property(
      fc.uint8Array({ maxLength: 200 }), fc.integer({ min: 0, max: 0xffff }), fc.integer({ min: 0, max: 0xffff }), fc.boolean(),
      (payload, sport, dport, tcp) => {
        const spec: FrameSpec = {
          ipv4: { src: '172.16.3.4', dst: '10.9.8.7', l4: tcp ? { tcp: { sport, dport, payload } } : { udp: { sport, dport, payload } } },
        };
        const f = buildFrame(spec);
        const seg = Uint8Array.from(f.subarray(34));
        const csOff = tcp ? 16 : 6;
        const stored = (seg[csOff] << 8) | seg[csOff + 1];
        seg[csOff] = 0; seg[csOff + 1] = 0;
        let want = refL4Checksum('172.16.3.4', '10.9.8.7', tcp ? 6 : 17, seg);
        if (!tcp && want === 0) want = 0xffff;
        expect(stored).toBe(want);
        expect(verifyL4(f, 14)).toBe(true);
        expect(fieldsOf(decodeFrame(f), tcp ? 'tcp' : 'udp').checksumValid).toBe(true);
      }), { seed: 2, numRuns: 300 });
  });

  it('sends a computed UDP checksum of 0 as 0xffff', () => {
    const src = ipToBytes('10.0.0.1');
    const dst = ipToBytes('10.0.0.2');
    // Choose the payload word that brings the whole sum to 0xffff, i.e. a checksum of 0.
    const seg = Uint8Array.from([0x04, 0xd2, 0x16, 0x2e, 0x00, 0x0a, 0, 0, 0, 0]);
    const word = 0xffff - onesComplementSum(seg, 0, seg.length, pseudoHeaderSum(src, dst, 17, seg.length));
    seg[8] = word >> 8; seg[9] = word & 0xff;
    expect(l4Checksum(src, dst, 17, seg)).toBe(0);
    expect(udpChecksum(src, dst, seg)).toBe(0xffff);
    const f = buildFrame({ ipv4: { src: '10.0.0.1', dst: '10.0.0.2', l4: { udp: { sport: 1234, dport: 5678, payload: seg.subarray(8) } } } });
    const udp = fieldsOf(decodeFrame(f), 'udp');
    expect(udp.checksum).toBe(0xffff);
    expect(udp.checksumValid).toBe(true);
  });

  it('computes the pseudo-header sum by hand', () => {
    // c0a8 + 0001 + c0a8 + 00c7 + 0011 + 001c = 0x18245 -> 0x8246
    expect(pseudoHeaderSum(ipToBytes('192.168.0.1'), ipToBytes('192.168.0.199'), 17, 28)).toBe(0x8246);
  });
});

describe('build and decode round trip', () => {
  it('gives back TCP fields, options and flags', () => {
    const f = buildFrame({
      eth: { src: 'AA-BB-CC-DD-EE-FF', dst: '02:00:00:00:00:09' },
      ipv4: {
        src: '10.1.2.3', dst: '10.3.2.1', tos: 0x2e, id: 4242, df: true, rf: true, ttl: 17,
        l4: { tcp: { sport: 443, dport: 55000, seq: 0xfffffff0, ack: 7, flags: 'PA', window: 1024, urgent: 3, options: '020405b4 0103', payload: { ascii: 'hello' } } },
      },
    });
    const d = decodeFrame(f);
    expect(d.layers.map((l) => l.path)).toEqual(['eth', 'ipv4', 'tcp', 'payload']);
    expect(d.truncatedAt).toBeUndefined();
    expect(d.error).toBeUndefined();
    expect(fieldsOf(d, 'eth')).toMatchObject({ src: 'aa:bb:cc:dd:ee:ff', dst: '02:00:00:00:00:09', type: 0x0800 });
    expect(fieldsOf(d, 'ipv4')).toMatchObject({
      version: 4, ihl: 5, tos: 0x2e, id: 4242, df: true, rf: true, mf: false, fragOffset: 0, ttl: 17, protocol: 6,
      src: '10.1.2.3', dst: '10.3.2.1', totalLength: f.length - 14, checksumValid: true,
    });
    expect(fieldsOf(d, 'tcp')).toMatchObject({
      sport: 443, dport: 55000, seq: 0xfffffff0, ack: 7, flags: 0x18, window: 1024, urgent: 3,
      dataOffset: 7, options: '020405b401030000', checksumValid: true, checksumPartial: false,
    });
    expect(fieldsOf(d, 'payload')).toEqual({ len: 5, hex: '68656c6c6f' });
    expect(checksumProblems(d)).toEqual([]);
  });

  it('builds IPv4 options padded to 4 bytes', () => {
    const f = buildFrame({ ipv4: { src: '1.1.1.1', dst: '2.2.2.2', options: [0x94, 0x04, 0, 0, 0x01], l4: { udp: { sport: 1, dport: 2 } } } });
    const ip = fieldsOf(decodeFrame(f), 'ipv4');
    expect(ip).toMatchObject({ ihl: 7, options: '9404000001000000', checksumValid: true });
    expect(fieldsOf(decodeFrame(f), 'udp').checksumValid).toBe(true);
  });

  it('builds UDP, ICMP, ARP, IPv6 and bare Ethernet', () => {
    const udp = decodeFrame(buildFrame({ ipv4: { src: '1.2.3.4', dst: '5.6.7.8', l4: { udp: { sport: 53, dport: 3333, payload: 'de ad be ef' } } } }));
    expect(fieldsOf(udp, 'udp')).toMatchObject({ sport: 53, dport: 3333, length: 12, checksumValid: true });
    expect(fieldsOf(udp, 'payload').hex).toBe('deadbeef');

    const icmp = decodeFrame(buildFrame({ ipv4: { src: '1.2.3.4', dst: '5.6.7.8', l4: { icmp: { type: 8, id: 0x1234, seq: 9, payload: { len: 16, fill: 'counter' } } } } }));
    expect(fieldsOf(icmp, 'icmp')).toMatchObject({ type: 8, code: 0, id: 0x1234, seq: 9, checksumValid: true });
    expect(fieldsOf(icmp, 'payload').hex).toBe('000102030405060708090a0b0c0d0e0f');
    const unreach = decodeFrame(buildFrame({ ipv4: { src: '1.2.3.4', dst: '5.6.7.8', l4: { icmp: { type: 3, code: 4, rest: 1400 } } } }));
    expect(fieldsOf(unreach, 'icmp')).toMatchObject({ type: 3, code: 4, rest: 1400, checksumValid: true });

    const arp = decodeFrame(buildFrame({ eth: { src: '02:00:00:00:00:07', dst: 'ff:ff:ff:ff:ff:ff' }, arp: { spa: '10.0.0.1', tpa: '10.0.0.2' }, minLength: 60 }));
    expect(arp.layers.map((l) => l.path)).toEqual(['eth', 'arp', 'trailer']);
    expect(fieldsOf(arp, 'arp')).toEqual({ htype: 1, ptype: 0x0800, hlen: 6, plen: 4, op: 1, sha: '02:00:00:00:00:07', spa: '10.0.0.1', tha: '00:00:00:00:00:00', tpa: '10.0.0.2' });
    expect(fieldsOf(arp, 'trailer').len).toBe(18);

    const v6 = decodeFrame(buildFrame({ ipv6: { src: 'fd00::1', dst: 'fd00::a:2', trafficClass: 0xb8, flowLabel: 0x12345, nextHeader: 17, hopLimit: 3, payload: '0102' } }));
    expect(fieldsOf(v6, 'eth').type).toBe(0x86dd);
    expect(fieldsOf(v6, 'ipv6')).toEqual({ version: 6, trafficClass: 0xb8, flowLabel: 0x12345, payloadLength: 2, nextHeader: 17, hopLimit: 3, src: 'fd00::1', dst: 'fd00::a:2' });

    const bare = decodeFrame(buildFrame({ eth: { type: 0x1234 }, payload: [1, 2, 3] }));
    expect(fieldsOf(bare, 'eth').type).toBe(0x1234);
    expect(fieldsOf(bare, 'payload').hex).toBe('010203');
  });

  it('builds 802.1Q and QinQ tags outermost first', () => {
    const d = decodeFrame(buildFrame({ eth: { vlan: [{ vid: 100, tpid: 0x88a8, pcp: 5, dei: true }, 200] }, ipv4: { src: '1.1.1.1', dst: '2.2.2.2' } }));
    expect(d.layers.map((l) => l.path)).toEqual(['eth', 'vlan[0]', 'vlan[1]', 'ipv4', 'payload']);
    expect(fieldsOf(d, 'eth').type).toBe(0x88a8);
    expect(fieldsOf(d, 'vlan[0]')).toEqual({ pcp: 5, dei: true, vid: 100, type: 0x8100 });
    expect(fieldsOf(d, 'vlan[1]')).toEqual({ pcp: 0, dei: false, vid: 200, type: 0x0800 });
    expect(fieldsOf(d, 'ipv4').protocol).toBe(253);
  });

  it('nests VXLAN with checksums computed after the inner frame', () => {
    const f = buildFrame(vxlanSpec());
    const d = decodeFrame(f);
    expect(d.layers.map((l) => l.path)).toEqual(['eth', 'ipv4', 'udp', 'vxlan', 'inner.eth', 'inner.ipv4', 'inner.tcp', 'inner.payload']);
    expect(fieldsOf(d, 'vxlan')).toEqual({ flags: 0x08, reserved1: 0, vni: 42, reserved2: 0 });
    expect(fieldsOf(d, 'udp')).toMatchObject({ dport: 4789, length: f.length - 34, checksumValid: true });
    expect(flattenFrame(d)).toMatchObject({ 'inner.ipv4.src': '10.0.0.1', 'inner.ipv4.df': true, 'inner.tcp.flags': 0x02, 'inner.tcp.checksumValid': true });
    expect(checksumProblems(f)).toEqual([]);
    // The Linux driver's historical port decodes the same way.
    expect(decodeFrame(buildFrame(vxlanSpec(SYN, 8472))).layers.map((l) => l.path)).toContain('inner.tcp');
  });

  it('supports UDP checksum modes', () => {
    const mode = (checksum: 'none' | 'partial' | number) =>
      fieldsOf(decodeFrame(buildFrame({ ipv4: { src: '10.0.0.1', dst: '10.0.0.2', l4: { udp: { sport: 1, dport: 6081, checksum, payload: { geneve: { vni: 7 }, inner: SYN } } } } })), 'udp');
    expect(mode('none')).toMatchObject({ checksum: 0, checksumValid: true, checksumPartial: false });
    // Pseudo-header: 0a00+0001+0a00+0002+0011+length.
    const partial = mode('partial');
    expect(partial.checksum).toBe(0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 0x0011 + (partial.length as number));
    expect(partial).toMatchObject({ checksumValid: false, checksumPartial: true });
    expect(mode(0xbeef)).toMatchObject({ checksum: 0xbeef, checksumValid: false });
    const tcpPartial = decodeFrame(buildFrame({ ipv4: { src: '10.0.0.1', dst: '10.0.0.2', l4: { tcp: { sport: 1, dport: 2, checksum: 'partial' } } } }));
    expect(fieldsOf(tcpPartial, 'tcp')).toMatchObject({ checksumPartial: true, checksumValid: false });
    expect(describeFrame(tcpPartial)).toContain('[A] PARTIAL');
  });

  it('nests Geneve with options, and tunnels in tunnels', () => {
    const spec: FrameSpec = {
      ipv4: {
        src: '192.168.0.1', dst: '192.168.0.2',
        l4: { udp: { sport: 1000, dport: 6081, payload: { geneve: { vni: 0xabcdef, options: '0102 0304 0506 0708', oBit: true, cBit: true }, inner: vxlanSpec() } } },
      },
    };
    const d = decodeFrame(buildFrame(spec));
    expect(d.layers.map((l) => l.path)).toEqual([
      'eth', 'ipv4', 'udp', 'geneve', 'inner.eth', 'inner.ipv4', 'inner.udp', 'inner.vxlan',
      'inner.inner.eth', 'inner.inner.ipv4', 'inner.inner.tcp', 'inner.inner.payload',
    ]);
    expect(fieldsOf(d, 'geneve')).toEqual({
      version: 0, optLen: 2, oBit: true, cBit: true, reserved: 0, protocol: 0x6558, vni: 0xabcdef, reserved2: 0, options: '0102030405060708',
    });
    expect(fieldsOf(d, 'inner.inner.ipv4').src).toBe('10.0.0.1');
    expect(checksumProblems(d)).toEqual([]);
  });

  it('stores specs as JSON', () => {
    const spec = vxlanSpec({ ipv4: { src: '10.0.0.1', dst: '10.0.0.2', options: '94040000', l4: { udp: { sport: 1, dport: 2, payload: { len: 30, fill: 'counter' } } } } });
    expect(buildFrame(JSON.parse(JSON.stringify(spec)) as FrameSpec).equals(buildFrame(spec))).toBe(true);
  });

  it('honours overrides for malformed packets', () => {
    const bad = decodeFrame(buildFrame({ ipv4: { src: '1.1.1.1', dst: '2.2.2.2', checksum: 0x1234 } }));
    expect(fieldsOf(bad, 'ipv4')).toMatchObject({ checksum: 0x1234, checksumValid: false });
    expect(checksumProblems(bad)).toEqual([`ipv4.checksum 0x1234, expected 0x${(fieldsOf(bad, 'ipv4').checksumExpected as number).toString(16).padStart(4, '0')}`]);

    const ihl = decodeFrame(buildFrame({ ipv4: { src: '1.1.1.1', dst: '2.2.2.2', ihl: 3, l4: { udp: { sport: 1, dport: 2 } } } }));
    expect(ihl.error).toBe('ipv4 ihl 3 < 5');
    expect(fieldsOf(ihl, 'ipv4').ihl).toBe(3);
    expectTiling(ihl);

    const long = decodeFrame(buildFrame({ ipv4: { src: '1.1.1.1', dst: '2.2.2.2', totalLength: 100, l4: { udp: { sport: 1, dport: 2 } } } }));
    expect(long.truncatedAt).toBe('ipv4 payload: totalLength 100 needs 80 bytes after the header, have 8');
    expect(findLayer(long, 'udp')?.fields.checksumValid).toBeUndefined();

    const ulen = decodeFrame(buildFrame({ ipv4: { src: '1.1.1.1', dst: '2.2.2.2', l4: { udp: { sport: 1, dport: 2, length: 10, payload: '00112233' } } } }));
    expect(ulen.layers.map((l) => l.path)).toEqual(['eth', 'ipv4', 'udp', 'payload', 'udp-trailer']);
    expect(fieldsOf(ulen, 'udp-trailer').hex).toBe('2233');

    const v = decodeFrame(buildFrame({ ipv4: { src: '1.1.1.1', dst: '2.2.2.2', version: 6 } }));
    expect(v.error).toBe('ipv4 version 6 != 4');

    const noI = decodeFrame(buildFrame({ ipv4: { src: '1.1.1.1', dst: '2.2.2.2', l4: { udp: { sport: 1, dport: 4789, payload: { vxlan: { vni: 1, flags: 0 }, inner: SYN } } } } }));
    expect(noI.notes).toContain('vxlan flags 0x00 lack the I flag');
    expect(findLayer(noI, 'inner.tcp')).toBeDefined();
  });

  it('rejects bad specs with clear errors', () => {
    expect(() => buildFrame({ ipv4: { src: '10.0.0.256', dst: '1.1.1.1' } })).toThrow(/bad IPv4 address "10.0.0.256"/);
    expect(() => buildFrame({ ipv4: { src: '010.0.0.1', dst: '1.1.1.1' } })).toThrow(/bad IPv4/);
    expect(() => buildFrame({ eth: { vlan: [4096] } })).toThrow(/vlan.vid = 4096/);
    expect(() => buildFrame({ eth: { src: '02:00:00:00:00' } })).toThrow(/bad MAC/);
    expect(() => buildFrame({ ipv4: { src: '1.1.1.1', dst: '1.1.1.1' }, arp: true })).toThrow(/ipv4 and arp/);
    expect(() => buildFrame({ ipv4: { src: '1.1.1.1', dst: '1.1.1.1', l4: { udp: { sport: 1, dport: 6081, payload: { geneve: { vni: 1, options: '010203' }, inner: {} } } } } })).toThrow(/multiple of 4/);
    expect(() => buildFrame({ ipv4: { src: '1.1.1.1', dst: '1.1.1.1', l4: { tcp: { sport: 1, dport: 2, flags: 'SX' } } } })).toThrow(/'X'/);
    expect(() => buildFrame({ payload: 'abc' })).toThrow(/even number/);
  });
});

describe('fragments', () => {
  const ip = { src: '10.0.0.1', dst: '10.0.0.2', id: 77 };

  it('decodes the L4 header of a first fragment but not its checksum or tunnel', () => {
    const d = decodeFrame(buildFrame({ ipv4: { ...ip, mf: true, l4: { udp: { sport: 5, dport: 4789, payload: { len: 40 } } } } }));
    expect(fieldsOf(d, 'ipv4')).toMatchObject({ mf: true, fragOffset: 0 });
    expect(fieldsOf(d, 'udp').checksumValid).toBeUndefined();
    expect(findLayer(d, 'vxlan')).toBeUndefined();
    expect(d.notes).toContain('udp to tunnel port 4789 in a fragment: tunnel not decoded');
    // Built from the whole datagram, so a real first fragment's UDP length overruns it.
    const real = decodeFrame(fragmentIpv4(buildFrame({ ipv4: { ...ip, l4: { udp: { sport: 5, dport: 6, payload: { len: 40 } } } } }), 24)[0]);
    expect(fieldsOf(real, 'udp').length).toBe(48);
    expect(real.truncatedAt).toBeUndefined();
    expect(fieldsOf(real, 'payload').len).toBe(16);
  });

  it('does not look for L4 in a non-first fragment', () => {
    const d = decodeFrame(buildFrame({ ipv4: { ...ip, protocol: 17, fragOffset: 3, payload: '0001000200080000' } }));
    expect(d.layers.map((l) => l.path)).toEqual(['eth', 'ipv4', 'payload']);
    expect(d.notes).toContain('ipv4 non-first fragment (offset 24): no L4 decode');
    expect(describeFrame(d)).toContain('frag=24');
  });

  it('splits a datagram, copying only copied-flag options past the first fragment', () => {
    // Router alert (copied) then record route (not copied).
    const options = [0x94, 0x04, 0x00, 0x00, 0x07, 0x07, 0x04, 0, 0, 0, 0];
    const whole = buildFrame({ ipv4: { ...ip, rf: true, options, l4: { udp: { sport: 9, dport: 10, payload: { len: 50, fill: 'counter' } } } } });
    // 58 bytes of UDP in fragments of 24, 24 and 10.
    const frags = fragmentIpv4(whole, 30);
    expect(frags).toHaveLength(3);
    const ds = frags.map((f) => decodeFrame(f));
    expect(ds.map((d) => fieldsOf(d, 'ipv4').fragOffset)).toEqual([0, 3, 6]);
    expect(ds.map((d) => fieldsOf(d, 'ipv4').mf)).toEqual([true, true, false]);
    expect(ds.map((d) => fieldsOf(d, 'ipv4').rf)).toEqual([true, true, true]);
    expect(ds.map((d) => fieldsOf(d, 'ipv4').ihl)).toEqual([8, 6, 6]);
    expect(ds.map((d) => fieldsOf(d, 'ipv4').options)).toEqual(['9404000007070400000000' + '00', '94040000', '94040000']);
    expect(ds.every((d) => fieldsOf(d, 'ipv4').checksumValid === true)).toBe(true);
    // Reassembling the fragment payloads gives back the original UDP datagram.
    const parts = frags.map((f, i) => f.subarray(14 + (i === 0 ? 32 : 24)));
    expect(Buffer.concat(parts).equals(whole.subarray(14 + 32))).toBe(true);
    expect(fragmentIpv4(whole, 1500)).toEqual([whole]);
  });
});

describe('truncated and garbage input', () => {
  it('says where it stopped', () => {
    const f = buildFrame(SYN);
    expect(decodeFrame(truncate(f, 21)).truncatedAt).toBe('ipv4 header: need 20 bytes, have 7');
    expect(decodeFrame(truncate(f, 10)).truncatedAt).toBe('eth header: need 14 bytes, have 10');
    expect(decodeFrame(truncate(f, 40)).truncatedAt).toBe('tcp header: need 20 bytes, have 6');
    const v = buildFrame(vxlanSpec());
    const cut = decodeFrame(truncate(v, 50 + 14 + 5));
    expect(cut.truncatedAt).toBe('inner ipv4 header: need 20 bytes, have 5');
    expect(cut.notes[0]).toMatch(/^ipv4 payload: totalLength/);
    expect(describeFrame(cut)).toMatch(/ \| vxlan vni=42 \| eth [^|]+ \| undecoded 5B \| TRUNCATED inner ipv4 header: need 20 bytes, have 5$/);
    expect(decodeFrame(truncate(v, v.length - 1)).truncatedAt).toMatch(/^ipv4 payload/);
  });

  it('decodes every prefix of a tunnelled frame without throwing, covering every byte', () => {
    const spec = vxlanSpec({ eth: { vlan: [5] }, ipv4: { src: '10.0.0.1', dst: '10.0.0.2', options: '94040000', l4: { tcp: { sport: 1, dport: 2, options: '020405b4', payload: { len: 9 } } } } });
    const f = buildFrame(spec);
    for (let n = 0; n <= f.length; n++) {
      const d = decodeFrame(truncate(f, n));
      expectTiling(d);
      expect(d.error).toBeUndefined();
      if (n < f.length) expect(d.truncatedAt, `prefix ${n}`).toBeDefined();
      else expect(d.truncatedAt).toBeUndefined();
      expect(() => describeFrame(d)).not.toThrow();
      expect(diffFrames(truncate(f, n), f).length > 0).toBe(n < f.length);
    }
  });

  it('survives random bytes and random corruption', () => {
    const base = buildFrame(vxlanSpec({ ipv4: { src: '10.0.0.1', dst: '10.0.0.2', l4: { udp: { sport: 1, dport: 6081, payload: { geneve: { vni: 3, options: '00000000' }, inner: SYN } } } } }));
    fc.assert(fc.property(
      fc.array(fc.tuple(fc.nat(base.length - 1), fc.integer({ min: 0, max: 255 })), { maxLength: 6 }), fc.nat(base.length),
      (edits, len) => {
        const f = Buffer.from(base);
        for (const [at, v] of edits) f[at] = v;
        const cut = truncate(f, len);
        const d = decodeFrame(cut);
        expect(d.error ?? '').not.toMatch(/decoder bug/);
        expectTiling(d);
        describeFrame(d);
        diffFrames(cut, base);
      }), { seed: 3, numRuns: 2000 });
    fc.assert(fc.property(fc.uint8Array({ maxLength: 120 }), (b) => {
      const d = decodeFrame(b);
      expect(d.error ?? '').not.toMatch(/decoder bug/);
      expectTiling(d);
    }), { seed: 4, numRuns: 500 });
  });

  it('can start at an IP header', () => {
    const f = buildFrame(SYN).subarray(14);
    const d = decodeFrame(f, { start: 'ipv4' });
    expect(d.layers.map((l) => l.path)).toEqual(['ipv4', 'tcp', 'payload']);
    expectTiling(d);
  });
});

describe('describe and diff', () => {
  it('summarises a frame on one line', () => {
    expect(describeFrame(buildFrame(SYN))).toBe('eth 02:00:00:00:00:01>02:00:00:00:00:02 | ipv4 10.0.0.1>10.0.0.2 tos=0x00 id=1 DF ttl=64 | tcp 1234>80 [S] | 12B');
    expect(describeFrame(buildFrame(vxlanSpec()))).toBe(
      'eth 52:54:00:00:00:01>52:54:00:00:00:02 | ipv4 192.168.1.1>192.168.1.2 tos=0x08 id=0 ttl=64 | udp 40000>4789 | vxlan vni=42 | '
      + 'eth 02:00:00:00:00:01>02:00:00:00:00:02 | ipv4 10.0.0.1>10.0.0.2 tos=0x00 id=1 DF ttl=64 | tcp 1234>80 [S] | 12B');
  });

  it('is empty for identical frames', () => {
    expect(diffFrames(buildFrame(SYN), buildFrame(SYN))).toEqual([]);
    expect(() => assertFramesEqual(buildFrame(SYN), buildFrame(SYN))).not.toThrow();
  });

  it('names the differing header fields', () => {
    const want = buildFrame(vxlanSpec());
    const got = Buffer.from(want);
    got[15] = 0x0b; // outer tos, checksum left stale
    expect(diffFrames(got, want)).toEqual([
      'ipv4.tos: got 0x0b want 0x08',
      `ipv4.checksumValid: got false (checksum 0x${got.readUInt16BE(24).toString(16).padStart(4, '0')}, expected 0x${ipv4HeaderChecksum(got, 14).toString(16).padStart(4, '0')}) want true`,
    ]);
    const fixed = fixChecksums(got);
    expect(diffFrames(fixed, want)).toEqual([
      'ipv4.tos: got 0x0b want 0x08',
      `ipv4.checksum: got 0x${fixed.readUInt16BE(24).toString(16)} want 0x${want.readUInt16BE(24).toString(16)}`,
    ]);
  });

  it('prefixes inner layers and reports payload offsets', () => {
    const want = buildFrame(vxlanSpec());
    const got = fixChecksums(buildFrame(vxlanSpec({ ...SYN, ipv4: { ...SYN.ipv4!, src: '10.0.0.9' } })));
    const lines = diffFrames(got, want);
    expect(lines).toContain('inner.ipv4.src: got 10.0.0.9 want 10.0.0.1');
    expect(lines.some((l) => l.startsWith('udp.checksum: got'))).toBe(true);
    expect(lines.some((l) => l.startsWith('inner.tcp.checksum: got'))).toBe(true);

    const p = Buffer.from(want);
    p[p.length - 3] ^= 0xff;
    expect(diffFrames(fixChecksums(p), want)).toContainEqual(
      `inner.payload.hex: first difference at byte 9 (frame offset ${p.length - 3}): got …0000000000000000[ff]0000 want …0000000000000000[00]0000`);
  });

  it('reports length and layers present on one side only', () => {
    const want = buildFrame({ ...SYN, minLength: 100 });
    const got = buildFrame(SYN);
    expect(diffFrames(got, want)).toEqual([`length: got ${got.length} want 100`, `trailer: only in want (len=${100 - got.length} hex=${'0'.repeat(24)}…)`]);
    const lines = diffFrames(truncate(got, 40), got);
    expect(lines[0]).toBe(`length: got 40 want ${got.length}`);
    expect(lines[1]).toBe('truncatedAt: got "tcp header: need 20 bytes, have 6" want (none)');
    expect(lines).toContain('tcp: only in want (sport=1234 dport=80 seq=0 ack=0 dataOffset=5 reserved=0x0 flags=0x02 [S] window=65535 checksum=0x' + got.readUInt16BE(50).toString(16).padStart(4, '0') + ' urgent=0 checksumValid=true checksumExpected=0x' + got.readUInt16BE(50).toString(16).padStart(4, '0') + ' checksumPartial=false)');
    expect(() => assertFramesEqual(got, want, 'egress')).toThrow(/^egress differs:\n {2}length: got/);
  });
});

describe('fixChecksums', () => {
  it('repairs every level, innermost first', () => {
    const good = buildFrame(vxlanSpec());
    const bad = Buffer.from(good);
    for (const at of [24, 24 + 50, bad.length - 12 - 4]) bad[at] ^= 0x55; // outer ip, inner ip, inner tcp checksum
    bad[40] ^= 0x01; // outer udp checksum
    expect(checksumProblems(bad).map((s) => s.split(' ')[0])).toEqual(['ipv4.checksum', 'udp.checksum', 'inner.ipv4.checksum', 'inner.tcp.checksum']);
    expect(fixChecksums(bad).equals(good)).toBe(true);
    const none = buildFrame({ ipv4: { src: '1.1.1.1', dst: '2.2.2.2', l4: { udp: { sport: 1, dport: 2, checksum: 'none' } } } });
    expect(fixChecksums(none).equals(none)).toBe(true);
  });
});

describe('addresses and bytes', () => {
  it('converts IPv4, IPv6 and MAC addresses', () => {
    expect(ipToU32('1.2.3.4')).toBe(0x01020304);
    expect(ipToU32('255.255.255.255')).toBe(0xffffffff);
    expect(u32ToIp(0xc0a80001)).toBe('192.168.0.1');
    expect([...macToBytes('AA:bb:0c:1:2:3')]).toEqual([0xaa, 0xbb, 0x0c, 1, 2, 3]);
    const six = (s: string) => bytesToIp6(ip6ToBytes(s));
    expect(six('2001:0DB8:0000:0000:0000:0000:0000:0001')).toBe('2001:db8::1');
    expect(six('::')).toBe('::');
    expect(six('::1')).toBe('::1');
    expect(six('1::')).toBe('1::');
    expect(six('2001:db8:0:0:1:0:0:1')).toBe('2001:db8::1:0:0:1');
    expect(six('2001:db8:0:1:1:1:1:1')).toBe('2001:db8:0:1:1:1:1:1');
    expect(six('::ffff:10.0.0.1')).toBe('::ffff:a00:1');
    expect(() => ip6ToBytes('1::2::3')).toThrow();
    expect(() => ip6ToBytes('1:2:3:4:5:6:7')).toThrow();
    expect(() => ip6ToBytes('1:2:3:4:5:6:7:8::')).toThrow();
  });

  it('accepts every JSON byte form', () => {
    expect([...toBytes('0x01:02 03-04')]).toEqual([1, 2, 3, 4]);
    expect([...toBytes([9, 8])]).toEqual([9, 8]);
    expect([...toBytes({ ascii: 'Hi' })]).toEqual([0x48, 0x69]);
    expect([...toBytes({ len: 3, fill: 0xaa })]).toEqual([0xaa, 0xaa, 0xaa]);
    expect(toBytes({ len: 300, fill: 'counter' })[257]).toBe(1);
    expect(() => toBytes([256])).toThrow(/bad byte/);
  });
});

describe('pcap', () => {
  const frames = [buildFrame(SYN), buildFrame(vxlanSpec()), buildFrame({ arp: true, minLength: 60 })];

  function withDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
    const dir = mkdtempSync(join(tmpdir(), 'pcap-test-'));
    return fn(dir).finally(() => rmSync(dir, { recursive: true, force: true }));
  }

  it('round-trips through pcap-parser with reproducible bytes', () => withDir(async (dir) => {
    const path = join(dir, 'a.pcap');
    writePcap(path, frames);
    const bytes = readFileSync(path);
    expect([...bytes.subarray(0, 4)]).toEqual([0xd4, 0xc3, 0xb2, 0xa1]);
    expect(bytes.equals(encodePcap(frames))).toBe(true);
    const back = await readPcap(path);
    expect(back.map((f) => Buffer.from(f).toString('hex'))).toEqual(frames.map((f) => f.toString('hex')));
    const file = await readPcapFile(path);
    expect(file.linktype).toBe(1);
    expect(file.records.map((r) => [r.tsSec, r.tsUsec, r.origLen])).toEqual(frames.map((f, i) => [i, 0, f.length]));
  }));

  it('cuts frames at snaplen but keeps their original length', () => withDir(async (dir) => {
    const path = join(dir, 'b.pcap');
    writePcap(path, frames, { snaplen: 64, linktype: 101 });
    const file = await readPcapFile(path);
    expect(file.snaplen).toBe(64);
    expect(file.linktype).toBe(101);
    expect(file.records.map((r) => r.data.length)).toEqual(frames.map((f) => Math.min(64, f.length)));
    expect(file.records[1].origLen).toBe(frames[1].length);
    expect(decodeFrame(file.records[1].data).truncatedAt).toBeDefined();
  }));

  it('rejects a truncated file and a non-pcap file', () => withDir(async (dir) => {
    const cut = join(dir, 'cut.pcap');
    writeFileSync(cut, encodePcap(frames).subarray(0, 24 + 16 + 10));
    await expect(readPcap(cut)).rejects.toThrow(/26 trailing bytes after 0 records/);
    const junk = join(dir, 'junk.pcap');
    writeFileSync(junk, Buffer.alloc(40, 1));
    await expect(readPcap(junk)).rejects.toThrow(/unknown magic/);
    await expect(readPcap(join(dir, 'missing.pcap'))).rejects.toThrow(/ENOENT/);
  }));
});
