/**
 * Wide keys on the real wire (the agents' default, --wide-keys on): a pod pair
 * whose first packet is TCP gets 16-bit keys, signalled in the outer IPv4 ID
 * of its first VXLAN packets and then carried in the TCP urgent pointer of its
 * masqueraded segments; the receiving pod sees its own segments again, urgent
 * pointer 0, checksums valid (offload off, so the capture shows what a
 * receiver checks). A pair that starts with ICMP keeps a narrow key in DSCP.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentClient } from '../dataplane/agent/protocol.ts';
import { KEY_MAX, WIDE_KEY_MIN } from '../dataplane/maps.ts';
import { l4ChecksumInfo, verifyIpv4Header } from '../sim/packet/checksum.ts';
import { LabAgents, upWithAgents } from './agents.ts';
import { Lab, type LabPod } from './lab.ts';
import { TCP_ECHO, capture, csumErrors, nodeIn, output, server } from './traffic.ts';

if (process.getuid?.() !== 0) throw new Error('lab/wide.test.ts needs root (network namespaces, BPF): run it as root');

const name = `xk${process.pid % 100000}`;
let lab: Lab;
let agents: LabAgents;
let a: LabPod, b: LabPod, c: LabPod, d: LabPod;

beforeAll(async () => {
  const runDir = `/run/xmasq-wide-${name}`;
  ({ lab, agents } = await upWithAgents({ name, runDir }));
  a = await lab.addPod('h1', 'a');
  b = await lab.addPod('h2', 'b');
  c = await lab.addPod('h1', 'c');
  d = await lab.addPod('h2', 'd');
}, 120_000);

afterAll(async () => {
  await agents?.teardown();
  await lab?.down();
});

/** The IPv4 header at 14, the L4 header after its options. */
const l4At = (f: Uint8Array) => 14 + (f[14] & 0x0f) * 4;
const u16 = (f: Uint8Array, at: number) => (f[at] << 8) | f[at + 1];
const ipOf = (f: Uint8Array, at: number) => Array.from(f.subarray(at, at + 4)).join('.');

async function egressEntry(host: string, local: string, remote: string) {
  const dump = await AgentClient.request(agents.socket(host), { op: 'cache-dump', cache: 'egress' });
  return dump.egress?.find((e) => e.key.local_pod === local && e.key.remote_pod === remote)?.value;
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

      // Both hosts gave the pair wide keys, and each knows the other's.
      const ab = await egressEntry('h1', a.ip, b.ip), ba = await egressEntry('h2', b.ip, a.ip);
      expect(ab, 'h1 egress entry a -> b').toBeDefined();
      expect(ba, 'h2 egress entry b -> a').toBeDefined();
      for (const e of [ab!, ba!]) {
        expect(e.local_key).toBeGreaterThanOrEqual(WIDE_KEY_MIN);
        expect(e.remote_key).toBeGreaterThanOrEqual(WIDE_KEY_MIN);
      }
      expect(ab!.remote_key).toBe(ba!.local_key);
      expect(ba!.remote_key).toBe(ab!.local_key);

      // The first packets are VXLAN; h1's signals carry its key in the outer ID under DSCP 0.
      const vxlan = wire.filter((f) => f[23] === 17 && u16(f, l4At(f) + 2) === 8472);
      const signals = vxlan.filter((f) => ipOf(f, 26) === h1.ip && (f[20] & 0x80) !== 0);
      expect(signals.length).toBeGreaterThan(0);
      for (const f of signals) {
        expect(f[15] >> 2, 'DSCP of a wide signal').toBe(0);
        expect(u16(f, 18), 'outer ID = h1\'s key').toBe(ab!.local_key);
      }
      // Then masqueraded segments both ways: RF, DSCP 0, the receiver's key in the urgent pointer, URG clear.
      const masq = wire.filter((f) => f[23] === 6 && (f[20] & 0x80) !== 0);
      const out = masq.filter((f) => ipOf(f, 26) === h1.ip && ipOf(f, 30) === h2.ip);
      const back = masq.filter((f) => ipOf(f, 26) === h2.ip && ipOf(f, 30) === h1.ip);
      expect(out.length).toBeGreaterThan(5);
      expect(back.length).toBeGreaterThan(5);
      for (const [frames, key] of [[out, ab!.remote_key], [back, ba!.remote_key]] as const) {
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
      const c1 = await agents.counters('h1'), c2 = await agents.counters('h2');
      expect(c1.masqueraded).toBeGreaterThan(0);
      expect(c2.masqueraded).toBeGreaterThan(0);
      expect(c1.restored).toBeGreaterThan(0);
      expect(c2.restored).toBeGreaterThan(0);
      expect(c1.restore_miss + c2.restore_miss).toBe(0);
    } finally {
      srv.kill();
    }
  }, 60_000);

  it('a pair that starts with ICMP keeps a narrow key in DSCP', async () => {
    const h1 = lab.host('h1');
    const { frames, result } = await capture(lab, h1, h1.nic, 'icmp', `${agents.runDir}/narrow.pcap`,
      () => lab.exec(c, 'ping', ['-c', '5', '-i', '0.2', '-W', '2', d.ip]));
    expect(result.stdout, result.stderr).toMatch(/5 packets transmitted, 5 received/);
    const cd = await egressEntry('h1', c.ip, d.ip);
    expect(cd!.local_key).toBeLessThanOrEqual(KEY_MAX);
    expect(cd!.remote_key).toBeLessThanOrEqual(KEY_MAX);
    const masq = frames.filter((f) => (f[20] & 0x80) !== 0 && ipOf(f, 26) === h1.ip);
    expect(masq.length).toBeGreaterThan(0);
    for (const f of masq) expect(f[15] >> 2).toBe(cd!.remote_key);
  }, 30_000);
});
