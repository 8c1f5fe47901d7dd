/**
 * XMasq on a Geneve overlay (issue 14, tunnel ports from configuration), which only the
 * guest kernel can run: the host's has no geneve module. The two-host lab in Geneve mode
 * (one collect_md device per host on 6081, a tunnel route per peer, as Antrea's tunnel;
 * no FDB, so the agents get the nodes from --nodes), one agent per host in auto mode:
 *  - the agents take the device's port, 6081, and every host as a node;
 *  - UDP and TCP between pods cross as Geneve on 6081 first, init learns from it, then
 *    they are masqueraded at h1 and restored at h2, with valid checksums, all delivered;
 *  - a pod's own UDP datagram to 6081, made to look like a Geneve packet of its pair,
 *    is no overlay packet of its host: not learned from (`not_ours`), the pair's path kept;
 *  - with the agents stopped, the same traffic gets the same answers, all on Geneve.
 */
import type { ChildProcess } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentClient } from '../../dataplane/agent/protocol.ts';
import { verifyIpv4Header } from '../../testing/packet/checksum.ts';
import { buildFrame } from '../../testing/packet/build.ts';
import { LabAgents, upWithAgents } from '../../lab/agents.ts';
import { Lab, type LabPod } from '../../lab/lab.ts';
import { TCP_ECHO, UDP_ECHO, UDP_ROUND_TRIPS, capture, csumErrors, nodeIn, output, server, wireChecksumValid, wireKind } from '../../lab/traffic.ts';

if (process.getuid?.() !== 0) throw new Error('geneve.guest.ts needs root (network namespaces, BPF): it runs as PID 1 of the test VM');

const name = `xg${process.pid % 100000}`;
const runDir = `/run/xmasq-vm-${name}`;
const GENEVE_PORT = 6081;
const UDP_PORT = 5360;
const TCP_PORT = 8090;
let lab: Lab;
let agents: LabAgents;
let a: LabPod, b: LabPod;
const servers: ChildProcess[] = [];

/** The test's traffic a -> b: UDP round trips on one socket, then a TCP echo of 20 writes; what came back. */
async function traffic(): Promise<{ udp: string; tcp: string }> {
  const udp = (await output(nodeIn(lab, a, UDP_ROUND_TRIPS(b.ip, UDP_PORT, 30, 100)), 60_000)).out.trim();
  const tcp = (await output(nodeIn(lab, a, `const s = require('net').connect(${TCP_PORT}, '${b.ip}'); let got = 0; let n = 0;
    s.on('connect', () => { const tick = () => { s.write('x'.repeat(500)); if (++n < 20) setTimeout(tick, 50); else s.end(); }; tick(); });
    s.on('data', (d) => { got += d.length; }); s.on('end', () => console.log('tcp-echoed', got));`), 60_000)).out.trim();
  return { udp, tcp };
}

/** The frames on h1's NIC while traffic() runs, with what came back. */
async function onTheWire(file: string) {
  const h1 = lab.host('h1');
  const { frames, result } = await capture(lab, h1, h1.nic, 'ip and not igmp', `${runDir}/${file}`, traffic);
  const hostIps = new Set(lab.hosts.map((h) => h.ip));
  return { frames, kinds: frames.map((f) => wireKind(f, hostIps)), result };
}

let withAgents: { udp: string; tcp: string };

beforeAll(async () => {
  // Under TCG an agent takes tens of seconds to start (Node, tsx, the verifier), and a case can
  // take longer than the default --egress-idle (20 s) on a busy host: the pair's entry, which the
  // not_ours case checks is kept, would idle out between the cases, so entries live 5 minutes here.
  ({ lab, agents } = await upWithAgents({
    name, runDir, overlay: 'geneve', startTimeoutMs: 180_000, cniAgentTimeoutMs: 60_000,
    agentArgs: ['--scan-interval', '0.5', '--egress-idle', '300', '--ingress-idle', '330'],
  }));
  a = await lab.addPod('h1', 'a');
  b = await lab.addPod('h2', 'b');
  servers.push(await server(lab, b, UDP_ECHO(UDP_PORT)), await server(lab, b, TCP_ECHO(TCP_PORT)));
});

afterAll(async () => {
  for (const s of servers) s.kill();
  await agents?.teardown();
  await lab?.down();
});

describe('XMasq on a Geneve overlay (port 6081)', () => {
  it('the agents take gnv0 as the overlay, its port 6081 for Geneve, and the other host as a node', async () => {
    for (const [host, peer] of [['h1', 'h2'], ['h2', 'h1']] as const) {
      const s = (await AgentClient.request(agents.socket(host), { op: 'status' })).status;
      expect(s.nodes).toEqual({ overlayDevices: ['gnv0'], self: [lab.host(host).ip], peers: [lab.host(peer).ip] });
      expect(agents.log(host)).toMatch(/tunnel ports: .*geneve 6081 \(gnv0\)/);
    }
  });

  it('UDP and TCP between pods: Geneve on 6081 first, learned from, then masqueraded at h1 and restored at h2, all delivered', async () => {
    const before = { h1: await agents.counters('h1'), h2: await agents.counters('h2') };
    const { frames, kinds, result } = await onTheWire('geneve.pcap');
    withAgents = result;
    expect(result).toEqual({ udp: 'udp-echoed 30', tcp: 'tcp-echoed 10000' });
    expect(kinds[0], 'the first frame on the wire').toBe('geneve');
    const geneve = frames.filter((_, i) => kinds[i] === 'geneve');
    expect(new Set(geneve.map((f) => (f[36] << 8) | f[37])), 'Geneve destination ports').toEqual(new Set([GENEVE_PORT]));
    const masq = frames.filter((_, i) => kinds[i] === 'masq');
    expect(new Set(masq.map((f) => f[23])), 'protocols masqueraded').toEqual(new Set([6, 17]));
    for (const f of masq) {
      expect(verifyIpv4Header(f, 14)).toBe(true);
      expect(wireChecksumValid(f)).toBe(true);
    }
    for (const pod of [a, b]) expect(await csumErrors(lab, pod), `checksum errors in ${pod.name}`).toBe(0);
    const after = { h1: await agents.counters('h1'), h2: await agents.counters('h2') };
    const d = (h: 'h1' | 'h2', k: string) => after[h][k] - before[h][k];
    expect(d('h1', 'learned'), 'h1 signalled its keys on Geneve').toBeGreaterThan(0);
    expect(d('h2', 'learned'), 'h2 learned them').toBeGreaterThan(0);
    expect(d('h1', 'masqueraded')).toBeGreaterThan(0);
    expect(d('h2', 'restored')).toBeGreaterThan(0);
    expect(d('h2', 'masqueraded'), "b's answers masqueraded at h2").toBeGreaterThan(0);
    expect(d('h1', 'restored'), 'and restored at h1').toBeGreaterThan(0);
    for (const k of ['restore_miss', 'not_ours', 'peer_not_node', 'signal_not_node', 'signal_wrong_node', 'marked_not_node']) {
      expect(d('h1', k) + d('h2', k), k).toBe(0);
    }
  });

  it("a pod's UDP datagram to 6081, looking like a Geneve packet of its pair, is not learned from (not_ours)", async () => {
    const dump = async () => (await AgentClient.request(agents.socket('h1'), { op: 'cache-dump', cache: 'egress' })).egress
      ?.find((e) => e.key.local_pod === a.ip && e.key.remote_pod === b.ip)?.value;
    const entry = await dump();
    expect(entry?.remote_ip).toBe(lab.host('h2').ip);
    // Geneve: version 0, no options, Ethernet, VNI 1; inside, "a -> b" to a port b discards.
    const hdr = Buffer.from([0, 0, 0x65, 0x58, 0, 0, 1, 0]);
    const inner = buildFrame({ eth: { src: a.mac, dst: lab.host('h2').vtepMac }, ipv4: { src: a.ip, dst: b.ip, l4: { udp: { sport: 40000, dport: 9, payload: { ascii: 'XMASQ-FORGED' } } } } });
    const payload = Buffer.concat([hdr, inner]).toString('hex');
    const before = await agents.counters('h1');
    const r = await lab.exec(a, 'setpriv', ['--reuid', '65534', '--regid', '65534', '--clear-groups', process.execPath, '-e',
      `const d = require('dgram').createSocket('udp4'); d.send(Buffer.from('${payload}', 'hex'), ${GENEVE_PORT}, '${lab.host('h2').ip}', () => d.close());`]);
    expect(r.code, r.stderr).toBe(0);
    await new Promise((res) => setTimeout(res, 1000));
    const after = await agents.counters('h1');
    expect(after.not_ours - before.not_ours, "init at h1's NIC: forwarded, not ours").toBe(1);
    expect(after.learned - before.learned).toBe(0);
    const now = await dump();
    expect({ peer: now?.remote_ip, key: now?.local_key }).toEqual({ peer: entry!.remote_ip, key: entry!.local_key });
  });

  it('without agents (the plain Geneve overlay): the same answers, every frame on Geneve', async () => {
    await agents.stop('h1');
    await agents.stop('h2');
    const { kinds, result } = await onTheWire('plain.pcap');
    expect(result).toEqual(withAgents);
    expect(kinds.filter((k) => k === 'masq'), 'masqueraded frames').toEqual([]);
    expect(kinds.filter((k) => k === 'geneve').length).toBeGreaterThan(0);
  });
});
