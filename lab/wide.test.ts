/**
 * Wide keys on the real wire (the agents' default, --wide-keys on): a pod pair
 * gets 14-bit keys, signalled in the outer IPv4 ID of its first VXLAN packets
 * and then carried in its masqueraded packets: the TCP urgent pointer or the UDP
 * length (an ICMP echo's code can carry one too, but the hosts' conntrack admits
 * only TCP and UDP flows to the fast path, so echoes stay on the overlay). The receiving pod sees its own
 * packets again, checksums valid (offload off, so the capture shows what a
 * receiver checks).
 */
import { describe, expect, it } from 'vitest';
import { AgentClient } from '../dataplane/agent/protocol.ts';
import { WIDE_KEY_MAX, WIDE_KEY_MIN } from '../dataplane/maps.ts';
import { l4ChecksumInfo, verifyIpv4Header } from '../testing/packet/checksum.ts';
import type { LabAgents } from './agents.ts';
import { labWithAgents } from './fixture.ts';
import { Lab, type LabPod } from './lab.ts';
import { TCP_ECHO, UDP_ECHO, capture, csumErrors, nodeIn, output, server, wireChecksumValid } from './traffic.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'network namespaces, BPF');

const name = `xk${process.pid % 100000}`;
let lab: Lab;
let agents: LabAgents;
let a: LabPod, b: LabPod, c: LabPod, d: LabPod, e: LabPod, f: LabPod;

labWithAgents({ name, runDir: `/run/xmasq-wide-${name}`, pods: [['h1', 'a'], ['h2', 'b'], ['h1', 'c'], ['h2', 'd'], ['h1', 'e'], ['h2', 'f']] },
  (up) => ({ lab, agents, pods: [a, b, c, d, e, f] } = up));

/** The IPv4 header at 14, the L4 header after its options. */
const l4At = (f: Uint8Array) => 14 + (f[14] & 0x0f) * 4;
const u16 = (f: Uint8Array, at: number) => (f[at] << 8) | f[at + 1];
const ipOf = (f: Uint8Array, at: number) => Array.from(f.subarray(at, at + 4)).join('.');

async function egressEntry(host: string, local: string, remote: string) {
  const dump = await AgentClient.request(agents.socket(host), { op: 'cache-dump', cache: 'egress' });
  return dump.egress?.find((x) => x.key.local_pod === local && x.key.remote_pod === remote)?.value;
}

/** Both hosts gave the pair wide keys, and each knows the other's. */
async function wideKeys(x: LabPod, y: LabPod) {
  const xy = await egressEntry('h1', x.ip, y.ip), yx = await egressEntry('h2', y.ip, x.ip);
  expect(xy, `h1 egress entry ${x.name} -> ${y.name}`).toBeDefined();
  expect(yx, `h2 egress entry ${y.name} -> ${x.name}`).toBeDefined();
  for (const k of [xy!.local_key, xy!.remote_key, yx!.local_key, yx!.remote_key]) {
    expect(k).toBeGreaterThanOrEqual(WIDE_KEY_MIN);
    expect(k).toBeLessThanOrEqual(WIDE_KEY_MAX);
  }
  expect(xy!.remote_key).toBe(yx!.local_key);
  expect(yx!.remote_key).toBe(xy!.local_key);
  return { out: xy!.remote_key, back: yx!.remote_key };
}

async function noMisses() {
  const c1 = await agents.counters('h1'), c2 = await agents.counters('h2');
  expect(c1.masqueraded).toBeGreaterThan(0);
  expect(c2.masqueraded).toBeGreaterThan(0);
  expect(c1.restored).toBeGreaterThan(0);
  expect(c2.restored).toBeGreaterThan(0);
  expect(c1.restore_miss + c2.restore_miss).toBe(0);
}

describe('wide keys in a two-host lab', () => {
  it('a pair that starts with TCP: wide keys in the outer ID, then in the urgent pointer; the pod gets its segments back', async () => {
    const srv = await server(lab, b, TCP_ECHO(8080));
    try {
      const h1 = lab.host('h1'), h2 = lab.host('h2');
      const stream = () => output(nodeIn(lab, a, `const s = require('net').connect(8080, '${b.ip}'); let got = ''; let n = 0;
        s.on('connect', () => { const tick = () => { s.write('y'.repeat(1000)); if (++n < 30) setTimeout(tick, 20); else s.end(); }; tick(); });
        s.on('data', (d) => { got += d; }); s.on('end', () => console.log('tcp-echoed', got.length));`));
      // The wire at h1's NIC, and b's own eth0 (what the pod receives), at once.
      const { frames: wire, result: inPod } = await capture(lab, h1, h1.nic, 'ip and not igmp', `${agents.runDir}/wide-wire.pcap`,
        () => capture(lab, b, 'eth0', 'tcp port 8080', `${agents.runDir}/wide-pod.pcap`, stream));
      expect(inPod.result.out).toContain('tcp-echoed 30000');

      const keys = await wideKeys(a, b);

      // The first packets are VXLAN; h1's signals carry its key in the outer ID under DSCP 0.
      const vxlan = wire.filter((f) => f[23] === 17 && u16(f, l4At(f) + 2) === 8472);
      const signals = vxlan.filter((f) => ipOf(f, 26) === h1.ip && (f[20] & 0x80) !== 0);
      expect(signals.length).toBeGreaterThan(0);
      for (const f of signals) {
        expect(f[15] >> 2, 'DSCP of a wide signal').toBe(0);
        expect(u16(f, 18), 'outer ID = h1\'s key').toBe(keys.back);
      }
      // Then masqueraded segments both ways: RF, DSCP 0, the receiver's key in the urgent pointer, URG clear.
      const masq = wire.filter((f) => f[23] === 6 && (f[20] & 0x80) !== 0);
      const out = masq.filter((f) => ipOf(f, 26) === h1.ip && ipOf(f, 30) === h2.ip);
      const back = masq.filter((f) => ipOf(f, 26) === h2.ip && ipOf(f, 30) === h1.ip);
      expect(out.length).toBeGreaterThan(5);
      expect(back.length).toBeGreaterThan(5);
      for (const [frames, key] of [[out, keys.out], [back, keys.back]] as const) {
        for (const f of frames) {
          expect(f[15] >> 2, 'DSCP').toBe(0);
          expect(f[l4At(f) + 13] & 0x20, 'URG').toBe(0);
          expect(u16(f, l4At(f) + 18), 'urgent pointer = key').toBe(key);
          expect(verifyIpv4Header(f, 14)).toBe(true);
          expect(l4ChecksumInfo(f, 14)?.valid, 'TCP checksum on the wire').toBe(true);
        }
      }
      // b receives pod packets: its own addresses, no RF, DSCP 0, urgent pointer 0, valid checksums.
      const toB = inPod.frames.filter((f) => ipOf(f, 30) === b.ip);
      expect(toB.length).toBeGreaterThan(5);
      for (const f of toB) {
        expect(ipOf(f, 26)).toBe(a.ip);
        expect(f[20] & 0x80, 'RF').toBe(0);
        expect(f[15] >> 2, 'DSCP').toBe(0);
        expect(u16(f, l4At(f) + 18), 'urgent pointer').toBe(0);
        expect(l4ChecksumInfo(f, 14)?.valid, 'TCP checksum in the pod').toBe(true);
      }
      for (const pod of [a, b]) expect(await csumErrors(lab, pod), `checksum errors in ${pod.name}`).toBe(0);
      await noMisses();
    } finally {
      srv.kill();
    }
  }, 60_000);

  it('UDP: the key in the length; the pod gets its datagrams back, length and checksum its own', async () => {
    const srv = await server(lab, f, UDP_ECHO(5353));
    try {
      const h1 = lab.host('h1'), h2 = lab.host('h2');
      // 30 datagrams of growing sizes, one at a time, each echoed.
      const talk = () => output(nodeIn(lab, e, `const d = require('dgram').createSocket('udp4'); let n = 0, got = 0;
        d.on('message', (m) => { got += m.length; if (++n < 30) setTimeout(send, 20); else { console.log('udp-echoed', n, got); d.close(); } });
        const send = () => d.send(Buffer.alloc(100 + 30 * n, n), 5353, '${f.ip}'); send();`));
      const { frames: wire, result: inPod } = await capture(lab, h1, h1.nic, 'ip and not igmp', `${agents.runDir}/wide-udp-wire.pcap`,
        () => capture(lab, f, 'eth0', 'udp port 5353', `${agents.runDir}/wide-udp-pod.pcap`, talk));
      expect(inPod.result.out).toContain('udp-echoed 30');
      const keys = await wideKeys(e, f);

      // Masqueraded datagrams both ways: RF, DSCP 0, the receiver's key in the UDP length.
      const masq = wire.filter((x) => x[23] === 17 && (x[20] & 0x80) !== 0 && u16(x, l4At(x) + 2) !== 8472);
      const out = masq.filter((x) => ipOf(x, 26) === h1.ip && ipOf(x, 30) === h2.ip);
      const back = masq.filter((x) => ipOf(x, 26) === h2.ip && ipOf(x, 30) === h1.ip);
      expect(out.length).toBeGreaterThan(5);
      expect(back.length).toBeGreaterThan(5);
      for (const [frames, key] of [[out, keys.out], [back, keys.back]] as const) {
        for (const x of frames) {
          expect(x[15] >> 2, 'DSCP').toBe(0);
          expect(u16(x, l4At(x) + 4), 'UDP length = key').toBe(key);
          expect(verifyIpv4Header(x, 14)).toBe(true);
          expect(wireChecksumValid(x), 'UDP checksum on the wire (of the true length)').toBe(true);
        }
      }
      // f receives its datagrams: no RF, DSCP 0, the length the IPv4 header implies, valid checksums.
      const toF = inPod.frames.filter((x) => ipOf(x, 30) === f.ip);
      expect(toF.length).toBe(30);
      for (const x of toF) {
        expect(ipOf(x, 26)).toBe(e.ip);
        expect(x[20] & 0x80, 'RF').toBe(0);
        expect(x[15] >> 2, 'DSCP').toBe(0);
        expect(u16(x, l4At(x) + 4), 'UDP length').toBe(u16(x, 16) - (l4At(x) - 14));
        expect(l4ChecksumInfo(x, 14)?.valid, 'UDP checksum in the pod').toBe(true);
      }
      for (const pod of [e, f]) expect(await csumErrors(lab, pod), `checksum errors in ${pod.name}`).toBe(0);
      await noMisses();
    } finally {
      srv.kill();
    }
  }, 60_000);

  it('ICMP echo of a wide-key pair stays on the overlay (the hosts\' conntrack admits TCP and UDP only) and arrives as sent', async () => {
    const h1 = lab.host('h1');
    const { frames: wire, result } = await capture(lab, h1, h1.nic, 'icmp', `${agents.runDir}/wide-icmp-wire.pcap`,
      () => capture(lab, d, 'eth0', 'icmp', `${agents.runDir}/wide-icmp-pod.pcap`,
        () => lab.exec(c, 'ping', ['-c', '8', '-i', '0.2', '-W', '2', d.ip])));
    expect(result.result.stdout, result.result.stderr).toMatch(/8 packets transmitted, 8 received/);
    await wideKeys(c, d); // the pair is learned with wide keys (TCP and UDP above used them)
    // No plain ICMP on the underlay: every echo crossed inside VXLAN.
    expect(wire.filter((x) => ipOf(x, 26) === h1.ip).length, 'masqueraded echoes on the wire').toBe(0);
    const requests = result.frames.filter((x) => ipOf(x, 30) === d.ip);
    expect(requests.length).toBe(8);
    for (const x of requests) {
      expect(x[20] & 0x80, 'RF').toBe(0);
      expect(x[15] >> 2, 'DSCP').toBe(0);
      expect(x[l4At(x) + 1], 'code').toBe(0);
      expect(l4ChecksumInfo(x, 14)?.valid, 'ICMP checksum in the pod').toBe(true);
    }
  }, 30_000);
});
