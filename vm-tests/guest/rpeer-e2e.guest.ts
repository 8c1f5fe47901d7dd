/**
 * XMasq end to end on the rpeer kernel: the two-host lab, one xmasq-agent per host in
 * auto mode (which must pick rpeer from the kernel's BTF), pods from the CNI chain
 * bridge + host-local + xmasq, and ICMP/TCP/UDP between pods on different hosts.
 * The wire must show VXLAN first, then masqueraded TCP and UDP with valid checksums
 * (ICMP always crosses the host stack, bpf/conntrack.h); and in rpeer mode the
 * masqueraded packets leave the pod's eth0 straight for the NIC, so they never appear
 * on the pod's host-side veth.
 *
 * The hosts keep their authority in rpeer mode too: masq_rpeer runs in the pod's
 * namespace and consults the HOST's conntrack, by the id the pod's namespace gives
 * the host's (pod_info). A DROP rule in the sending host's FORWARD chain (egress
 * policy) holds for a learned pair's denied port, with the agents as without them.
 */
import { existsSync, statSync } from 'node:fs';
import type { ChildProcess } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentClient } from '../../dataplane/agent/protocol.ts';
import { BpfMap } from '../../dataplane/libbpf.ts';
import { podInfo, podIp } from '../../dataplane/maps.ts';
import { run } from '../../testing/command.ts';
import { LabAgents, upWithAgents } from '../../lab/agents.ts';
import { ROOT, TSX } from '../../testing/root.ts';
import { Lab, type LabPod } from '../../lab/lab.ts';
import {
  TCP_CONNECT, TCP_ECHO, TCP_ROUND_TRIPS, UDP_ECHO, UDP_ROUND_TRIPS, capture, csumErrors, mixedTraffic, nodeIn, output, rulePackets, server, wireFacts, wireKind,
} from '../../lab/traffic.ts';

if (process.getuid?.() !== 0) throw new Error('rpeer-e2e.guest.ts needs root (network namespaces, BPF): it runs as PID 1 of the test VM');

const name = `xv${process.pid % 100000}`;
const runDir = `/run/xmasq-vm-${name}`;
let lab: Lab;
let agents: LabAgents;
let a: LabPod, b: LabPod;
const sock = (host: string) => agents.socket(host);

beforeAll(async () => {
  // Under TCG an agent takes tens of seconds to start (Node, tsx, the verifier).
  // conntrack (the default): every host carries kube-proxy's INVALID drop, which makes
  // its conntrack track the pods' flows, as on a Kubernetes node.
  ({ lab, agents } = await upWithAgents({ name, runDir, startTimeoutMs: 180_000, cniAgentTimeoutMs: 60_000 }));
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
      // 6.1 has no tcx links: auto attaches cls_bpf filters.
      expect(s.attach).toBe('cls_bpf');
      expect(s.attachReason).toBe('auto: the kernel has no tcx links');
      expect(s.attachments.map((x) => x.kind)).toEqual(['cls_bpf', 'cls_bpf', 'cls_bpf']);
    }
  });

  it('--attach tcx on this kernel (no tcx) is refused with the fix in the message, before anything is pinned or attached', async () => {
    const h = lab.host('h1');
    const pins = `/sys/fs/bpf/${name}-tcx-refused`;
    const r = await run('nsenter', [`--net=/run/netns/${h.netns}`, TSX, `${ROOT}dataplane/agent/main.ts`, '--attach', 'tcx', '--nic', h.nic,
      '--pin-dir', pins, '--socket', `${runDir}/tcx-refused.sock`, '--state-dir', `${runDir}/tcx-refused`, '--metrics-listen', 'off']);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toContain('--attach (attach) = "tcx": this kernel has no tcx links');
    expect(r.stderr).toContain('use --attach cls_bpf, or auto');
    expect(existsSync(pins)).toBe(false);
    expect(existsSync(`${runDir}/tcx-refused.sock`)).toBe(false);
  }, 180_000);

  it('`xmasq status` says mode rpeer', async () => {
    const r = await run('nsenter', [`--net=/run/netns/${lab.host('h1').netns}`, TSX, `${ROOT}dataplane/cli/main.ts`, 'status', '--socket', sock('h1')]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^mode\s+rpeer\b/m);
  });

  it('pod_info names the host\'s namespace as each pod\'s namespace sees it: an id there, and its inode', () => {
    for (const [host, pod] of [['h1', a], ['h2', b]] as const) {
      const m = BpfMap.fromPinned(`${agents.pinDir(host)}/pod_info`);
      try {
        const v = m.lookup(podIp.encode({ ip: pod.ip }));
        expect(v, `${pod.ip} in ${host}'s pod_info`).toBeDefined();
        const info = podInfo.decode(v!);
        expect(info.host_netns_id).toBeGreaterThanOrEqual(0);
        expect(info.host_netns_ino).toBe(statSync(`/run/netns/${lab.host(host).netns}`).ino);
      } finally {
        m.close();
      }
    }
  });

  it('ICMP, TCP and UDP across hosts: VXLAN first, then TCP and UDP masqueraded (ICMP on the overlay), checksums valid', async () => {
    const t = await mixedTraffic(lab, a, b, {
      file: `${runDir}/wire.pcap`, tcpPort: 8080, udpPort: 5353, writes: 40, gapMs: 25, datagrams: 10, udpTimeoutMs: 20_000, clientTimeoutMs: 60_000,
    });
    expect(t.ping.stdout, t.ping.stderr).toMatch(/4 packets transmitted, 4 received/);
    expect(t.tcp.out).toContain('tcp-echoed 40000');
    expect(t.udp.out).toContain('udp-echoed 10');
    // TCP and UDP once the host's conntrack admits their flows (the agent made TCP's
    // entry liberal); ICMP never: it crosses the host stack, on the overlay.
    const wire = wireFacts(t.frames, new Set(lab.hosts.map((h) => h.ip)));
    expect(wire).toMatchObject({ first: 'vxlan', masqProtocols: [6, 17], masqBadChecksums: 0 });
    expect(wire.icmpInVxlan, 'ICMP in VXLAN').toBeGreaterThanOrEqual(8);
    for (const pod of [a, b]) expect(await csumErrors(lab, pod), `checksum errors in ${pod.name}`).toBe(0);
    const c1 = await agents.counters('h1'), c2 = await agents.counters('h2');
    expect(c1.masqueraded).toBeGreaterThan(0);
    expect(c2.restored).toBeGreaterThan(0);
    expect(c1.restore_miss + c2.restore_miss).toBe(0);
  });

  // Each test has servers of its own on ports of its own: a killed server's port may
  // not be free again yet under TCG.
  it('a learned flow goes pod eth0 -> NIC directly: masqueraded on the wire, nothing on the pod\'s host-side veth', async () => {
    const h1 = lab.host('h1');
    const udp = await server(lab, b, UDP_ECHO(5355));
    try {
      // One UDP socket, a round trip every 200 ms for ~12 s: its first datagrams cross
      // the host stacks over VXLAN (the pair may have idled out of the caches, Node is
      // slow under TCG, and the host's conntrack must see a reply before it admits the
      // flow); the capture starts once it is on the fast path.
      const client = nodeIn(lab, a, `const d = require('dgram').createSocket('udp4'); let k = 0;
        const send = () => d.send('rt-' + k, 5355, '${b.ip}');
        d.on('message', () => { if (++k === 60) { console.log('udp-echoed', k); process.exit(0); } setTimeout(send, 200); });
        send(); setTimeout(() => { console.log('udp-echoed', k); process.exit(1); }, 40000);`);
      const done = output(client, 60_000);
      const masqBefore = (await agents.counters('h1')).masqueraded;
      const deadline = Date.now() + 20_000;
      while ((await agents.counters('h1')).masqueraded - masqBefore < 3 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 250));
      const capturedFor = () => new Promise((resolve) => setTimeout(resolve, 3000));
      const { frames: onVeth, result: wire } = await capture(lab, h1, a.hostVeth, 'udp port 5355', `${runDir}/veth.pcap`, () =>
        capture(lab, h1, h1.nic, 'udp port 5355 or udp port 8472', `${runDir}/wire2.pcap`, capturedFor));
      const { out } = await done;
      expect(out).toContain('udp-echoed 60');
      const hostIps = new Set(lab.hosts.map((h) => h.ip));
      // Requests out and answers in, all masqueraded; none crossed the veth either way
      // (answers go into the pod with bpf_redirect_peer).
      const kinds = wire.frames.map((f) => wireKind(f, hostIps));
      expect(kinds.length).toBeGreaterThanOrEqual(4);
      expect(kinds).toEqual(Array(kinds.length).fill('masq'));
      expect(onVeth.length).toBe(0);
    } finally {
      udp.kill();
    }
  });
});

/** n datagrams from one socket, gapMs apart, whatever comes back; prints 'udp-answers <k>' 3 s after the last. */
const udpBurst = (ip: string, port: number, n: number, gapMs: number) => `const d = require('dgram').createSocket('udp4'); let k = 0;
  d.on('message', () => { k++; });
  for (let i = 0; i < ${n}; i++) setTimeout(() => d.send('q' + i, ${port}, '${ip}'), i * ${gapMs});
  setTimeout(() => { console.log('udp-answers', k); process.exit(0); }, ${n} * ${gapMs} + 3000);`;

describe('the sending host\'s policy holds in rpeer mode: masq_rpeer consults the host\'s conntrack', () => {
  const servers: ChildProcess[] = [];
  interface Outcome { learned: string; deniedUdp: string; deniedTcp: string; allowedTcp: string; allowedUdp: string }
  let withAgents: Outcome;

  /**
   * The pair is learned on an allowed port first; then a denied UDP port, a denied TCP
   * port, and allowed flows. around: runs the denied UDP step (to read counters around it).
   */
  async function scenario(around = async (step: () => Promise<string>) => step()): Promise<Outcome> {
    const learned = (await output(nodeIn(lab, a, UDP_ROUND_TRIPS(b.ip, 5356, 6, 100)), 60_000)).out.trim();
    // b's echo would answer anything that arrived: no answer, nothing arrived.
    const deniedUdp = await around(async () => (await output(nodeIn(lab, a, udpBurst(b.ip, 5354, 5, 200)), 60_000)).out.trim());
    const deniedTcp = (await output(nodeIn(lab, a, TCP_CONNECT(b.ip, 2222)), 60_000)).out.trim();
    const allowedTcp = (await output(nodeIn(lab, a, TCP_ROUND_TRIPS(b.ip, 8081, 200, 30_000)), 60_000)).out.trim();
    const allowedUdp = (await output(nodeIn(lab, a, UDP_ROUND_TRIPS(b.ip, 5356, 20, 50)), 60_000)).out.trim();
    return { learned, deniedUdp, deniedTcp, allowedTcp, allowedUdp };
  }

  beforeAll(async () => {
    for (const script of [TCP_ECHO(8081), TCP_ECHO(2222), UDP_ECHO(5356), UDP_ECHO(5354)]) servers.push(await server(lab, b, script));
    // Egress policy on a's host, as Calico, Canal or kube-router install it: a may not send
    // to b's UDP 5354 nor TCP 2222. masq_rpeer runs before h1's stack sees the packet.
    for (const [proto, port] of [['udp', '5354'], ['tcp', '2222']]) {
      const r = await lab.exec(lab.host('h1'), 'iptables', ['-w', '-I', 'FORWARD', '-s', a.ip, '-d', b.ip, '-p', proto, '--dport', port, '-j', 'DROP']);
      if (r.code !== 0) throw new Error(`iptables on h1: ${r.stderr}`);
    }
  });

  afterAll(() => {
    for (const s of servers) s.kill();
  });

  it('with agents: the denied flows of a learned pair never arrive and the rules count them; the allowed ones are masqueraded', async () => {
    const before = await agents.counters('h1');
    const drops = { udp: await rulePackets(lab, 'h1', 'filter', 'FORWARD', ['DROP', 'dpt:5354']), tcp: await rulePackets(lab, 'h1', 'filter', 'FORWARD', ['DROP', 'dpt:2222']) };
    let denied: Record<string, number> = {};
    withAgents = await scenario(async (step) => {
      const c0 = await agents.counters('h1');
      const out = await step();
      const c1 = await agents.counters('h1');
      denied = Object.fromEntries(Object.keys(c1).map((k) => [k, c1[k] - c0[k]]));
      return out;
    });
    expect(withAgents).toEqual({
      learned: 'udp-echoed 6', deniedUdp: 'udp-answers 0', deniedTcp: 'refused-or-timeout', allowedTcp: 'tcp-rt 200', allowedUdp: 'udp-echoed 20',
    });
    expect(await rulePackets(lab, 'h1', 'filter', 'FORWARD', ['DROP', 'dpt:5354'])).toBeGreaterThan(drops.udp);
    expect(await rulePackets(lab, 'h1', 'filter', 'FORWARD', ['DROP', 'dpt:2222'])).toBeGreaterThan(drops.tcp);
    // The denied datagram of the learned pair reached masq_rpeer, which found no entry
    // in the host's conntrack (the DROP let none be confirmed) and left it to h1's stack:
    // refused, not masqueraded (a build without the check would have sent it to the NIC).
    expect(denied.ct_refused, JSON.stringify(denied)).toBeGreaterThan(0);
    expect(denied.masqueraded, JSON.stringify(denied)).toBe(0);
    // The allowed flows were admitted and masqueraded, both ways.
    const after = await agents.counters('h1');
    const d = (c: string) => after[c] - before[c];
    expect(d('masqueraded')).toBeGreaterThan(0);
    expect(d('restored')).toBeGreaterThan(0);
    expect(d('restore_miss')).toBe(0);
  });

  it('without agents (the plain overlay): the same outcomes', async () => {
    await agents.stop('h1');
    await agents.stop('h2');
    expect(await scenario()).toEqual(withAgents);
  });
});
