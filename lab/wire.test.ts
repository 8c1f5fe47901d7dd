/**
 * What else crosses the wire while XMasq is on: host traffic carrying ECN-CE
 * and a DSCP equal to a live key (the original XMasq restored such packets
 * into a pod), and malformed or unusual frames, many forged to carry our
 * marker and a live key. None may reach a pod; nothing may break. The agents
 * run with narrow keys (--wide-keys off), whose DSCP is what the original's
 * flaw was about; host packets whose carrier equals a live wide key are
 * fixtures (restore-host-tcp-urgent-equal-live-wide-key-passes).
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { AgentClient } from '../dataplane/agent/protocol.ts';
import { buildFrame, truncate, type FrameSpec, type Ipv4Spec } from '../testing/packet/build.ts';
import type { LabAgents } from './agents.ts';
import { labWithAgents } from './fixture.ts';
import { injectFrames } from './inject.ts';
import { Lab, type LabPod } from './lab.ts';
import { UDP_ECHO, UDP_ROUND_TRIPS, capture, nodeIn, output, server } from './traffic.ts';
import { describeFrame } from '../testing/packet/diff.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'network namespaces, BPF');

const name = `xw${process.pid % 100000}`;
const MARK = 'XMASQ-INJECTED';
let lab: Lab;
let agents: LabAgents;
let a: LabPod, b: LabPod;
/** A key h1 gave h2 for the pair (b -> a): h2 writes it into the DSCP of what it masquerades to h1. */
let liveKey: number;

labWithAgents({ name, runDir: `/run/xmasq-wire-${name}`, agentArgs: ['--wide-keys', 'off'], pods: [['h1', 'a'], ['h2', 'b']] },
  (f) => ({ lab, agents, pods: [a, b] } = f));

beforeAll(async () => {
  const ping = await lab.exec(a, 'ping', ['-c', '3', '-i', '0.2', '-W', '2', b.ip]);
  if (!/3 received/.test(ping.stdout)) throw new Error(`pods cannot talk: ${ping.stdout}${ping.stderr}`);
  const dump = await AgentClient.request(agents.socket('h1'), { op: 'cache-dump', cache: 'ingress' });
  const entry = dump.ingress?.find((e) => e.key.remote_host === lab.host('h2').ip && e.value.local_ip === a.ip);
  if (!entry) throw new Error(`h1 has no ingress entry for b -> a after a ping: ${JSON.stringify(dump.ingress)}`);
  liveKey = entry.key.key;
}, 120_000);

describe('the wire while XMasq is on', () => {
  it('host-to-host packets with ECN-CE and DSCP = a live key pass unaltered', async () => {
    const [h1, h2] = [lab.host('h1'), lab.host('h2')];
    const tos = (liveKey << 2) | 3;
    const before = await agents.counters('h1');
    const { frames, result } = await capture(lab, h2, h2.nic, 'icmp', `${agents.runDir}/ecn.pcap`,
      () => lab.exec(h2, 'ping', ['-Q', String(tos), '-c', '3', '-i', '0.2', '-W', '2', h1.ip]));
    expect(result.stdout, result.stderr).toMatch(/3 packets transmitted, 3 received/);
    // The echo replies carry the TOS h1's stack received: the request reached it as sent.
    const replies = frames.filter((f) => f[34] === 0 && f[26] === Number(h1.ip.split('.')[0]));
    expect(replies.length).toBe(3);
    for (const f of replies) expect(f[15]).toBe(tos);
    const after = await agents.counters('h1');
    expect(after.restored - before.restored, 'restored').toBe(0);
    expect(after.restore_miss - before.restore_miss, 'dropped as misses').toBe(0);
  }, 30_000);

  it('malformed and unusual frames never reach a pod and break nothing', async () => {
    const [h1, h2] = [lab.host('h1'), lab.host('h2')];
    const eth = { src: h2.mac, dst: h1.mac };
    const payload = { ascii: `${MARK}-${'x'.repeat(40)}` };
    // Forged like a masqueraded packet from b to a: RF, the live key, a's ports.
    const forged = (over: Partial<Ipv4Spec> = {}): FrameSpec => ({
      eth, ipv4: { src: h2.ip, dst: h1.ip, rf: true, df: true, tos: liveKey << 2, l4: { udp: { sport: 53, dport: 40000, payload } }, ...over },
    });
    const overlay = (udpLength?: number, port = 8472): FrameSpec => ({
      eth, ipv4: { src: h2.ip, dst: h1.ip, l4: { udp: { sport: 40000, dport: port, checksum: 'none', length: udpLength, payload: {
        vxlan: { vni: 1 }, inner: { eth: { src: b.mac, dst: a.mac }, ipv4: { src: b.ip, dst: a.ip, l4: { udp: { sport: 53, dport: 40000, payload } } } },
      } } } },
    });
    const cases: Array<[string, Uint8Array, 'miss' | 'pass']> = [
      ['total length beyond the frame', buildFrame(forged({ totalLength: 1400 })), 'pass'],
      ['IHL 4', buildFrame(forged({ ihl: 4 })), 'pass'],
      ['VLAN-tagged', buildFrame({ ...forged(), eth: { ...eth, vlan: [42] } }), 'pass'],
      ['first fragment with a cut TCP header', buildFrame(forged({ mf: true, df: false, l4: undefined, protocol: 6, payload: '9c40005012' })), 'miss'],
      ['GRE with our marker', buildFrame(forged({ l4: { raw: { protocol: 47, bytes: { ascii: MARK } } } })), 'miss'],
      ['a key nobody gave out', buildFrame(forged({ tos: (liveKey === 63 ? 62 : liveKey + 1) << 2 })), 'miss'],
      ['host packet with IP options', buildFrame({ eth, ipv4: { src: h2.ip, dst: h1.ip, options: '94040000', l4: { udp: { sport: 1, dport: 9, payload } } } }), 'pass'],
      ['frame cut inside the IP options', truncate(buildFrame(forged({ options: { len: 20, fill: 1 } })), 14 + 30), 'pass'],
      ['overlay with a UDP length that cuts the inner frame', buildFrame(overlay(24)), 'pass'],
      ['Geneve garbage', buildFrame({ eth, ipv4: { src: h2.ip, dst: h1.ip, l4: { udp: { sport: 1, dport: 6081, payload: { ascii: MARK } } } } }), 'pass'],
    ];
    const before = await agents.counters('h1');
    const { frames } = await capture(lab, a, 'eth0', 'not arp and not icmp6', `${agents.runDir}/pod-a.pcap`, async () => {
      injectFrames(`/run/netns/${h2.netns}`, h2.nic, cases.map(([, f]) => f));
      await new Promise((r) => setTimeout(r, 500));
    });
    const leaked = frames.filter((f) => Buffer.from(f).includes(MARK));
    expect(leaked.map((f) => describeFrame(f)), 'injected frames seen inside pod a').toEqual([]);
    const after = await agents.counters('h1');
    expect(after.restored - before.restored, 'restored').toBe(0);
    expect(after.restore_miss - before.restore_miss, 'dropped as misses').toBe(cases.filter(([, , k]) => k === 'miss').length);

    // Still healthy: the agent answers and the pods still talk on the fast path (UDP: the
    // hosts' conntrack admits TCP and UDP flows only).
    expect((await AgentClient.request(agents.socket('h1'), { op: 'status' })).status.pods).toBe(1);
    const echo = await server(lab, b, UDP_ECHO(5353));
    try {
      const rt = await output(nodeIn(lab, a, UDP_ROUND_TRIPS(b.ip, 5353, 4, 100)));
      expect(rt.out).toContain('udp-echoed 4');
    } finally {
      echo.kill();
    }
    expect((await agents.counters('h1')).restored).toBeGreaterThan(after.restored);
  }, 30_000);
});
