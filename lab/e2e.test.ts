/**
 * XMasq for real in the lab: one xmasq-agent per host (in the host's netns),
 * pods created through the CNI chain bridge + host-local + xmasq, real
 * traffic between pods on different hosts. Checksum offload is off on the
 * wire and pod veths, so what the capture shows is what a receiver checks.
 */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { AgentClient, type Attachment } from '../dataplane/agent/protocol.ts';
import { hookNames } from '../testing/hooks.ts';
import type { LabAgents } from './agents.ts';
import { labWithAgents } from './fixture.ts';
import { Lab, type LabPod } from './lab.ts';
import { TCP_ECHO, TCP_ECHOED_STREAM, csumErrors, mixedTraffic, nodeIn, output, tcpRetransSegs, wireFacts, withServer } from './traffic.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'network namespaces, BPF');

const name = `xe${process.pid % 100000}`;
let lab: Lab;
let agents: LabAgents;
let a: LabPod, b: LabPod;
const sock = (host: string) => agents.socket(host);
const counters = (host: string) => agents.counters(host);
const nodeInPod = (pod: LabPod, script: string) => nodeIn(lab, pod, script);

labWithAgents({ name, runDir: `/run/xmasq-e2e-${name}`, pods: [['h1', 'a'], ['h2', 'b']] }, (f) => ({ lab, agents, pods: [a, b] } = f));

describe('XMasq with xmasq-agent in a two-host lab', () => {
  it('the CNI chain told each agent about its pod; the agents run in veth mode', async () => {
    for (const [host, pod] of [['h1', a], ['h2', b]] as const) {
      const s = (await AgentClient.request(sock(host), { op: 'status' })).status;
      expect(s.mode).toBe('veth');
      const pods = (await AgentClient.request(sock(host), { op: 'list' })).pods;
      expect(pods.map((p) => [p.ip, p.attached])).toEqual([[pod.ip, true]]);
    }
  });

  it('ICMP, TCP and UDP work across hosts: TCP and UDP first as VXLAN, then masqueraded, checksums valid; ICMP stays on the overlay', async () => {
    const t = await mixedTraffic(lab, a, b, {
      file: `${agents.runDir}/wire.pcap`, tcpPort: 8080, udpPort: 5353, writes: 20, gapMs: 20, datagrams: 5, udpTimeoutMs: 5000,
    });
    expect(t.ping.stdout, t.ping.stderr).toMatch(/4 packets transmitted, 4 received/);
    expect(t.tcp.out).toContain('tcp-echoed 20000');
    expect(t.udp.out).toContain('udp-echoed 5');
    // The hosts' conntrack admits TCP and UDP flows only (bpf/conntrack.h): echoes stay VXLAN.
    expect(wireFacts(t.frames, new Set(lab.hosts.map((h) => h.ip)))).toMatchObject({ first: 'vxlan', masqProtocols: [6, 17], masqBadChecksums: 0 });
    for (const pod of [a, b]) expect(await csumErrors(lab, pod), `checksum errors in ${pod.name}`).toBe(0);
    const c1 = await counters('h1'), c2 = await counters('h2');
    expect(c1.masqueraded).toBeGreaterThan(0);
    expect(c2.restored).toBeGreaterThan(0);
    expect(c1.restore_miss + c2.restore_miss).toBe(0);
  }, 60_000);

  it('a denied flow gets no packet through, from its first packet; deleting the rule lets it through', async () => {
    await withServer(lab, b, TCP_ECHO(9090), async () => {
      const added = await AgentClient.request(sock('h2'), { op: 'policy-add', rule: { dir: 'ingress', dst: b.ip, dport: 9090, proto: 'tcp' } });
      const before = (await counters('h2')).policy_drop;
      const denied = await output(nodeInPod(a, `const s = require('net').connect(9090, '${b.ip}');
        s.on('connect', () => { console.log('connected'); process.exit(0); }); setTimeout(() => { console.log('timeout'); process.exit(1); }, 2000);`));
      expect(denied.out).toContain('timeout');
      expect((await counters('h2')).policy_drop).toBeGreaterThan(before);
      await AgentClient.request(sock('h2'), { op: 'policy-del', id: added.rule.id });
      const allowed = await output(nodeInPod(a, `const s = require('net').connect(9090, '${b.ip}');
        s.on('connect', () => { console.log('connected'); process.exit(0); }); setTimeout(() => { console.log('timeout'); process.exit(1); }, 5000);`));
      expect(allowed.out).toContain('connected');
    });
  }, 30_000);

  it('an agent restart under a running TCP stream loses no connection, and the flow stays masqueraded', async () => {
    await withServer(lab, b, TCP_ECHO(7070), async () => {
      // 4 s of 1 KB writes every 20 ms; the client checks every byte comes back.
      const client = nodeInPod(a, TCP_ECHOED_STREAM(b.ip, 7070, 20, 4000, 1500));
      const done = output(client, 30_000);
      await new Promise((r) => setTimeout(r, 1000));
      await agents.stop('h1');
      await agents.start('h1');
      const { out } = await done;
      const m = /done (\d+) (\d+)/.exec(out);
      expect(m, out).not.toBeNull();
      expect(Number(m![1])).toBeGreaterThan(100 * 1024);
      expect(Number(m![2])).toBe(Number(m![1]));
      const s = (await AgentClient.request(sock('h1'), { op: 'status' })).status;
      expect(s.pinsReused).toBe(true);
      expect((await AgentClient.request(sock('h1'), { op: 'list' })).pods.map((p) => p.attached)).toEqual([true]);
    });
  }, 60_000);

  // cls_bpf: the next agent replaces each filter in place (BPF_TC_F_REPLACE); tcx: the program of
  // each pinned link (BPF_LINK_UPDATE), the links themselves staying. Each case first hands h1's
  // agent over to one of that kind (switching kinds between runs).
  it.each(['cls_bpf', 'tcx'] as const)('a handover restart (SIGUSR2) on %s under a TCP stream loses no packet: zero retransmissions', async (kind) => {
    expect(await agents.stop('h1', 'SIGUSR2')).toBe(0);
    await agents.start('h1', ['--attach', kind]);
    const attached = async () => (await AgentClient.request(sock('h1'), { op: 'status' })).status.attachments;
    const attachedBefore: Attachment[] = await attached();
    expect(attachedBefore.map((x) => x.kind)).toEqual([kind, kind, kind]);
    await withServer(lab, b, TCP_ECHO(7171), async () => {
      const retrans = async () => {
        let n = 0;
        for (const pod of [a, b]) n += await tcpRetransSegs(lab, pod);
        return n;
      };
      const before = await retrans();
      const missesBefore = (await counters('h1')).restore_miss + (await counters('h2')).restore_miss;
      const client = nodeInPod(a, TCP_ECHOED_STREAM(b.ip, 7171, 10, 3000, 500));
      const done = output(client, 30_000);
      await new Promise((r) => setTimeout(r, 800));
      expect(await agents.stop('h1', 'SIGUSR2')).toBe(0);
      await agents.start('h1', ['--attach', kind]);
      const { out } = await done;
      const m = /done (\d+) (\d+)/.exec(out);
      expect(m, out).not.toBeNull();
      expect(Number(m![2])).toBe(Number(m![1]));
      expect(await retrans(), 'TCP retransmissions in the two pods').toBe(before);
      expect((await counters('h1')).restore_miss + (await counters('h2')).restore_miss).toBe(missesBefore);
      expect((await counters('h1')).masqueraded).toBeGreaterThan(0);
      const attachedAfter = await attached();
      for (const x of attachedBefore) {
        const y = attachedAfter.find((z) => z.program === x.program && z.ifindex === x.ifindex && z.where === x.where);
        expect(y?.kind, `${x.program} on ${x.dev}`).toBe(kind);
        expect(y?.progId, `${x.program} on ${x.dev}: the new agent's program`).not.toBe(x.progId);
        // The same link, its program swapped: the hook never went without one.
        if (kind === 'tcx') expect(y?.linkId, `${x.program} on ${x.dev}: its link`).toBe(x.linkId);
      }
    });
  }, 60_000);

  it('stopping the agents and taking the lab down leaves no netns, filter or pin behind', async () => {
    for (const host of ['h1', 'h2']) {
      await agents.stop(host);
      const r = await agents.cleanup(host);
      expect(r.code, r.out).toBe(0);
      expect(existsSync(agents.pinDir(host))).toBe(false);
      for (const where of ['ingress', 'egress'] as const) expect(hookNames(lab.host(host).netns, lab.host(host).nic, where), `${host} ${where}`).toEqual([]);
    }
    await lab.down();
    const netns = execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' });
    expect(netns).not.toContain(name);
  }, 60_000);
});
