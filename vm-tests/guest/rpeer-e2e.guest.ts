/**
 * XMasq end to end on the rpeer kernel: the two-host lab, one xmasq-agent per host in
 * auto mode (which must pick rpeer from the kernel's BTF), pods from the CNI chain
 * bridge + host-local + xmasq, and ICMP/TCP/UDP between pods on different hosts.
 * The wire must show VXLAN first, then masqueraded packets with valid checksums; and
 * in rpeer mode the masqueraded packets leave the pod's eth0 straight for the NIC,
 * so they never appear on the pod's host-side veth.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentClient } from '../../dataplane/agent/protocol.ts';
import { verifyIpv4Header } from '../../sim/packet/checksum.ts';
import { run } from '../../lab/command.ts';
import { LabAgents, ROOT, TSX, upWithAgents } from '../../lab/agents.ts';
import { Lab, type LabPod } from '../../lab/lab.ts';
import { TCP_ECHO, UDP_ECHO, capture, csumErrors, nodeIn, output, server, wireKind, wireChecksumValid } from '../../lab/traffic.ts';

if (process.getuid?.() !== 0) throw new Error('rpeer-e2e.guest.ts needs root (network namespaces, BPF): it runs as PID 1 of the test VM');

const name = `xv${process.pid % 100000}`;
const runDir = `/run/xmasq-vm-${name}`;
let lab: Lab;
let agents: LabAgents;
let a: LabPod, b: LabPod;
const sock = (host: string) => agents.socket(host);

beforeAll(async () => {
  // Under TCG an agent takes tens of seconds to start (Node, tsx, the verifier).
  // The guest kernel has no netfilter, and the rpeer object no conntrack admission check.
  ({ lab, agents } = await upWithAgents({ name, runDir, startTimeoutMs: 180_000, conntrack: false }));
  a = await lab.addPod('h1', 'a');
  b = await lab.addPod('h2', 'b');
});

afterAll(async () => {
  await agents?.teardown();
  await lab?.down();
});

describe('XMasq on the rpeer kernel, agents in auto mode', () => {
  it('each agent picked rpeer mode and attached masq_rpeer at its pod\'s eth0 egress, inside the pod netns', async () => {
    for (const [host, pod] of [['h1', a], ['h2', b]] as const) {
      const s = (await AgentClient.request(sock(host), { op: 'status' })).status;
      expect(s.mode, s.modeReason).toBe('rpeer');
      const masq = s.attachments.filter((x) => x.program === 'masq_rpeer');
      expect(masq).toHaveLength(1);
      expect(masq[0]).toMatchObject({ dev: 'eth0', where: 'egress' });
      expect(masq[0].netns).toContain(pod.netns);
      expect(s.attachments.some((x) => x.program === 'masq')).toBe(false);
    }
  });

  it('`xmasq status` says mode rpeer', async () => {
    const r = await run('nsenter', [`--net=/run/netns/${lab.host('h1').netns}`, TSX, `${ROOT}dataplane/cli/main.ts`, 'status', '--socket', sock('h1')]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^mode\s+rpeer\b/m);
  });

  it('ICMP, TCP and UDP across hosts: VXLAN first, then masqueraded, checksums valid', async () => {
    const tcp = await server(lab, b, TCP_ECHO(8080));
    const udp = await server(lab, b, UDP_ECHO(5353));
    try {
      const hostIps = new Set(lab.hosts.map((h) => h.ip));
      const h1 = lab.host('h1');
      const { frames, result } = await capture(lab, h1, h1.nic, 'ip and not igmp', `${runDir}/wire.pcap`, async () => {
        const ping = await lab.exec(a, 'ping', ['-c', '4', '-i', '0.2', '-W', '2', b.ip]);
        const t = await output(nodeIn(lab, a, `const s = require('net').connect(8080, '${b.ip}'); let got = ''; let n = 0;
          s.on('connect', () => { const tick = () => { s.write('x'.repeat(1000)); if (++n < 20) setTimeout(tick, 20); else s.end(); }; tick(); });
          s.on('data', (d) => { got += d; }); s.on('end', () => console.log('tcp-echoed', got.length));`), 60_000);
        const u = await output(nodeIn(lab, a, `const d = require('dgram').createSocket('udp4'); let n = 0;
          d.on('message', () => { if (++n === 5) { console.log('udp-echoed', n); d.close(); } });
          for (let i = 0; i < 5; i++) setTimeout(() => d.send('ping-' + i, 5353, '${b.ip}'), i * 100);
          setTimeout(() => { console.log('udp-echoed', n); process.exit(1); }, 20000);`), 60_000);
        return { ping, t, u };
      });
      expect(result.ping.stdout, result.ping.stderr).toMatch(/4 packets transmitted, 4 received/);
      expect(result.t.out).toContain('tcp-echoed 20000');
      expect(result.u.out).toContain('udp-echoed 5');

      const kinds = frames.map((f) => wireKind(f, hostIps));
      expect(kinds[0]).toBe('vxlan');
      const protoOf = (k: string) => new Set(frames.filter((_, i) => kinds[i] === k).map((f) => f[23]));
      expect([...protoOf('masq')].sort((x, y) => x - y)).toEqual([1, 6, 17]);
      for (const f of frames.filter((_, i) => kinds[i] === 'masq')) {
        expect(verifyIpv4Header(f, 14)).toBe(true);
        expect(wireChecksumValid(f)).toBe(true);
      }
      for (const pod of [a, b]) expect(await csumErrors(lab, pod), `checksum errors in ${pod.name}`).toBe(0);
      const c1 = await agents.counters('h1'), c2 = await agents.counters('h2');
      expect(c1.masqueraded).toBeGreaterThan(0);
      expect(c2.restored).toBeGreaterThan(0);
      expect(c1.restore_miss + c2.restore_miss).toBe(0);
    } finally {
      tcp.kill();
      udp.kill();
    }
  });

  it('a learned flow goes pod eth0 -> NIC directly: masqueraded on the wire, nothing on the pod\'s host-side veth', async () => {
    const h1 = lab.host('h1');
    // The flow may have idled out of the caches since the last test (Node is slow under
    // TCG, the agents expire after 20 s): two pings learn it again, over VXLAN.
    expect((await lab.exec(a, 'ping', ['-c', '2', '-i', '0.5', '-W', '2', b.ip])).code).toBe(0);
    const masqBefore = (await agents.counters('h1')).masqueraded;
    // Under TCG tcpdump writes its last frames well after ping returns: give both
    // captures a moment on each side.
    const settle = () => new Promise((resolve) => setTimeout(resolve, 2000));
    const pingThenSettle = async () => {
      await settle();
      const r = await lab.exec(a, 'ping', ['-c', '5', '-i', '0.2', '-W', '2', b.ip]);
      await settle();
      return r;
    };
    const { frames: onVeth, result: wire } = await capture(lab, h1, a.hostVeth, 'icmp', `${runDir}/veth.pcap`, () =>
      capture(lab, h1, h1.nic, 'icmp or udp port 8472', `${runDir}/wire2.pcap`, pingThenSettle));
    expect(wire.result.stdout, wire.result.stderr).toMatch(/5 packets transmitted, 5 received/);
    const hostIps = new Set(lab.hosts.map((h) => h.ip));
    // Echo requests out and replies in, all masqueraded; none crossed the veth either way
    // (replies go into the pod with bpf_redirect_peer).
    const seen = wire.frames.map((f) => `${wireKind(f, hostIps)} ${[...f.subarray(26, 30)].join('.')}>${[...f.subarray(30, 34)].join('.')} type ${f[34]} seq ${(f[40] << 8) | f[41]}`);
    expect(wire.frames.map((f) => wireKind(f, hostIps)), seen.join('\n')).toEqual(Array(10).fill('masq'));
    expect(onVeth.length).toBe(0);
    expect((await agents.counters('h1')).masqueraded - masqBefore).toBeGreaterThanOrEqual(5);
  });
});
