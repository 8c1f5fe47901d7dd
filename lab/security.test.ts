/**
 * Nothing forged gets in (issue 14, README "Threat model"): the attacks of the
 * issue, each run against three hosts with agents while the pods' own UDP
 * traffic (a on h1 <-> b on h2) runs on the fast path, checked before and after
 * each attack.
 *  - a pod's UDP datagrams to every tunnel port, made to look like VXLAN or
 *    Geneve carrying "a -> b", from an unprivileged process, with h1 masquerading
 *    pod traffic to the underlay as flannel's ip-masq does (so they leave from
 *    h1's own address): init learns nothing from them;
 *  - a pod with a raw socket sending our marker (RF): masq drops it;
 *  - a pod sending as its neighbour (a raw socket, the neighbour's address
 *    and port) on a flow conntrack admitted: masq leaves it on the overlay;
 *  - key signals from an address that is no node, and from a node for a pair
 *    that is not its own: no key changes;
 *  - masqueraded frames over the whole key space from an address that is no
 *    node, and from a node for pairs that are not its own: none reaches a pod or
 *    a host socket;
 *  - every stop of h2's agent (SIGTERM, SIGUSR2, SIGKILL) with traffic running:
 *    what h1 still masquerades to h2 reaches b, never h2's host stack.
 */
import type { ChildProcess } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentClient } from '../dataplane/agent/protocol.ts';
import { hookPrograms } from '../testing/hooks.ts';
import { buildFrame } from '../testing/packet/build.ts';
import { LabAgents } from './agents.ts';
import { ROOT } from '../testing/root.ts';
import { injectFrames } from './inject.ts';
import { Lab, type LabHost, type LabPod } from './lab.ts';
import { UDP_ECHO, UDP_ROUND_TRIPS, nodeIn, output, server } from './traffic.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'network namespaces, BPF');

const name = `xs${process.pid % 100000}`;
const runDir = `/run/xmasq-security-${name}`;
const MARK = 'XMASQ-FORGED';
/** b's echo port, and a listener of h2's own on the same port: a marked packet that reached h2's stack would land there. */
const ECHO_PORT = 7000;
/** Where the forged masqueraded frames are addressed: listeners in pod a and in h1's host netns. */
const TRAP_PORT = 7001;
/** An address on the lab's underlay that is no node. */
const STRANGER = '172.31.250.77';

let lab: Lab;
let agents: LabAgents;
let a: LabPod, p2: LabPod, b: LabPod;
let h1: LabHost, h2: LabHost, h3: LabHost;
const children: ChildProcess[] = [];

/** A UDP listener that prints a line per datagram carrying MARK (and answers 'host' on ECHO_PORT). */
const LISTENER = (port: number, answer: boolean) => `const d = require('dgram').createSocket('udp4');
  d.on('message', (m, r) => { if (String(m).includes('${MARK}') || ${answer}) console.log('got', r.address, String(m).slice(0, 40)); if (${answer}) d.send('host', r.port, r.address); });
  d.bind(${port}, () => console.log('ready'));`;

interface Listener { child: ChildProcess; lines: () => string[] }

async function listen(where: LabPod | LabHost, port: number, answer = false): Promise<Listener> {
  const child = nodeIn(lab, where, LISTENER(port, answer));
  children.push(child);
  let out = '';
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (d) => {
      out += d;
      if (out.includes('ready')) resolve();
    });
    child.once('exit', (c) => reject(new Error(`listener in ${where.name} exited ${c}`)));
  });
  return { child, lines: () => out.split('\n').filter((l) => l.startsWith('got')) };
}

async function counters(host: string): Promise<Record<string, number>> {
  return agents.counters(host);
}

const delta = (after: Record<string, number>, before: Record<string, number>, k: string) => (after[k] ?? 0) - (before[k] ?? 0);

/** n UDP round trips a -> b; all must come back, from b (the 'host' listener on h2 would answer otherwise). */
async function roundTrips(n: number, gapMs = 50): Promise<string> {
  const r = await output(nodeIn(lab, a, UDP_ROUND_TRIPS(b.ip, ECHO_PORT, n, gapMs)), n * gapMs + 15_000);
  return r.out;
}

/** The pods' own traffic flows, on the fast path: every round trip back, h1 masquerading and h2 restoring more. */
async function nothingLost(what: string): Promise<void> {
  const [c1, c2] = [await counters('h1'), await counters('h2')];
  const out = await roundTrips(20);
  expect(out, `${what}: a <-> b round trips`).toContain('udp-echoed 20');
  const [d1, d2] = [await counters('h1'), await counters('h2')];
  expect(delta(d1, c1, 'masqueraded'), `${what}: h1 masqueraded a's datagrams`).toBeGreaterThan(0);
  expect(delta(d2, c2, 'restored'), `${what}: h2 restored them into b`).toBeGreaterThan(0);
}

async function egressEntry(host: string, local: string, remote: string) {
  const dump = await AgentClient.request(agents.socket(host), { op: 'cache-dump', cache: 'egress' });
  return dump.egress?.find((e) => e.key.local_pod === local && e.key.remote_pod === remote)?.value;
}

/** A VXLAN (8 bytes, VNI 1) or Geneve (8 bytes, no options, Ethernet) header before an inner frame. */
function tunnelPayload(kind: 'vxlan' | 'geneve', inner: Uint8Array): Buffer {
  const hdr = Buffer.alloc(8);
  if (kind === 'vxlan') hdr[0] = 0x08;
  else hdr.writeUInt16BE(0x6558, 2);
  hdr.writeUIntBE(1, 4, 3);
  return Buffer.concat([hdr, inner]);
}

/** The inner frame of the forgeries: "a -> b", UDP to a port b discards. */
const innerAtoB = (): Uint8Array => buildFrame({
  eth: { src: a.mac, dst: h2.vtepMac },
  ipv4: { src: a.ip, dst: b.ip, l4: { udp: { sport: 40000, dport: 9, payload: { ascii: MARK } } } },
});

beforeAll(async () => {
  lab = await Lab.up({
    name, hosts: 3, podsPerHost: 0, checksumOffload: false,
    cniPath: ['/usr/lib/cni', `${ROOT}dataplane/cni`],
    cniPlugins: [{ type: 'xmasq', agentSocket: `${runDir}/{host}/agent.sock`, required: true }],
  });
  // 60 s to answer: on a loaded machine an agent's start (node, tsx, the verifier) can pass 20 s.
  agents = new LabAgents(lab, runDir, name, ['--scan-interval', '0.5'], 60_000);
  [h1, h2, h3] = [lab.host('h1'), lab.host('h2'), lab.host('h3')];
  // flannel's ip-masq: pod traffic leaving the cluster network leaves from the host's address.
  await lab.exec(h1, 'iptables', ['-w', '-t', 'nat', '-A', 'POSTROUTING', '-s', '10.244.0.0/16', '!', '-d', '10.244.0.0/16', '-j', 'MASQUERADE']);
  for (const h of ['h1', 'h2', 'h3']) await agents.start(h);
  a = await lab.addPod('h1', 'a');
  p2 = await lab.addPod('h1', 'p2');
  b = await lab.addPod('h2', 'b');
  await lab.addPod('h3', 'c');
  children.push(await server(lab, b, UDP_ECHO(ECHO_PORT)));
  // Warm up: the pair learns over the overlay, then runs masqueraded both ways.
  for (let i = 0; i < 5; i++) {
    const out = await roundTrips(10);
    if (!out.includes('udp-echoed 10')) throw new Error(`a and b cannot talk: ${out}`);
    if ((await counters('h1')).masqueraded > 0 && (await counters('h2')).restored > 0) break;
  }
}, 180_000);

afterAll(async () => {
  for (const c of children) c.kill('SIGKILL');
  await agents?.teardown();
  await lab?.down();
});

describe('nothing forged gets in', () => {
  it('the pair is on the fast path, and the node sets are every host', async () => {
    await nothingLost('at start');
    const s = (await AgentClient.request(agents.socket('h1'), { op: 'status' })).status;
    expect(s.nodes).toEqual({ overlayDevices: [h1.vxlan], self: [h1.ip], peers: [h2.ip, h3.ip] });
  }, 60_000);

  it("a pod's datagrams to every tunnel port, looking like a's overlay packets, re-point nothing (unprivileged, masqueraded to h1's address)", async () => {
    expect((await egressEntry('h1', a.ip, b.ip))?.remote_ip).toBe(h2.ip);
    const before = await counters('h1');
    const sends: string[] = [];
    for (const target of [h2, h3]) {
      for (const [port, kind] of [[8472, 'vxlan'], [4789, 'vxlan'], [6081, 'geneve']] as const) {
        sends.push(`d.send(Buffer.from('${tunnelPayload(kind, innerAtoB()).toString('hex')}', 'hex'), ${port}, '${target.ip}', next);`);
      }
    }
    // Each send waits for the last (a chain of callbacks); then the socket closes.
    const script = `const d = require('dgram').createSocket('udp4'); const q = [${sends.map((s) => `() => ${s.slice(0, -1)}`).join(', ')}];
      function next() { const f = q.shift(); if (f) f(); else d.close(); } next();`;
    const r = await lab.exec(p2, 'setpriv', ['--reuid', '65534', '--regid', '65534', '--clear-groups', process.execPath, '-e', script]);
    expect(r.code, r.stderr).toBe(0);
    await new Promise((res) => setTimeout(res, 500));
    const after = await counters('h1');
    // The lab's tunnel ports are 8472 (flannel.1's) and 6081 (Geneve, IANA's: no device): the
    // four datagrams to them are refused; to 4789, no tunnel port here, the two are no overlay
    // packets at all, and go on as the pod's flow (lab/ports.test.ts).
    expect(delta(after, before, 'not_ours'), 'forged overlay datagrams init refused at h1').toBe(4);
    expect(delta(after, before, 'learned'), 'learned from them').toBe(0);
    const e = await egressEntry('h1', a.ip, b.ip);
    expect(e?.remote_ip, "h1's path for a -> b").toBe(h2.ip);
    await nothingLost('after forged overlay datagrams');
  }, 60_000);

  it("a pod's own marker (RF, a raw socket) never leaves its host: masq drops it", async () => {
    const gw = JSON.parse((await lab.exec(h1, 'ip', ['-j', 'link', 'show', 'cni0'])).stdout) as Array<{ address: string }>;
    const eth = { src: p2.mac, dst: gw[0].address };
    const key = (await egressEntry('h1', a.ip, b.ip))?.remote_key ?? 100;
    const frames = [
      // A masqueraded packet under the key h2 gave h1 for a -> b, narrow and wide.
      buildFrame({ eth, ipv4: { src: p2.ip, dst: h2.ip, rf: true, df: true, tos: 7 << 2, l4: { udp: { sport: 40000, dport: ECHO_PORT, payload: { ascii: MARK } } } } }),
      buildFrame({ eth, ipv4: { src: p2.ip, dst: h2.ip, rf: true, df: true, tos: 0, l4: { udp: { sport: 40000, dport: ECHO_PORT, length: key, payload: { ascii: MARK } } } } }),
      // A signal: RF on the outer header of an overlay packet "a -> b".
      buildFrame({ eth, ipv4: { src: p2.ip, dst: h2.ip, rf: true, df: true, tos: 5 << 2, l4: { udp: { sport: 40000, dport: 8472, checksum: 'none', payload: tunnelPayload('vxlan', innerAtoB()) } } } }),
    ];
    const [c1, c2] = [await counters('h1'), await counters('h2')];
    injectFrames(`/run/netns/${p2.netns}`, 'eth0', frames);
    await new Promise((res) => setTimeout(res, 500));
    const [d1, d2] = [await counters('h1'), await counters('h2')];
    expect(delta(d1, c1, 'pod_marked'), 'dropped by masq at p2').toBe(frames.length);
    for (const k of ['restored', 'restore_miss', 'learned', 'signal_not_node', 'signal_wrong_node', 'marked_not_node']) {
      expect(delta(d2, c2, k), `h2 ${k}`).toBe(0);
    }
    await nothingLost("after a pod's marked frames");
  }, 60_000);

  it("a pod sending as its neighbour, on a flow of the neighbour's that conntrack admitted, is never masqueraded: masq leaves it on the overlay", async () => {
    // a's own flow from a fixed port, until it runs masqueraded (conntrack has seen b's replies).
    const SPORT = 40100;
    const aFlow = (n: number) => `const d = require('dgram').createSocket('udp4'); let k = 0;
      d.bind(${SPORT}, () => { const send = () => d.send('rt-' + k, ${ECHO_PORT}, '${b.ip}'); send();
        d.on('message', () => { if (++k === ${n}) { console.log('udp-echoed', k); process.exit(0); } else setTimeout(send, 50); }); });
      setTimeout(() => { console.log('udp-echoed', k); process.exit(1); }, ${n} * 50 + 5000);`;
    let c1 = await counters('h1');
    expect((await output(nodeIn(lab, a, aFlow(10)), 20_000)).out).toContain('udp-echoed 10');
    let d1 = await counters('h1');
    expect(delta(d1, c1, 'masqueraded'), "a's flow from its port is masqueraded").toBeGreaterThan(0);

    // p2 sends the same flow's datagrams, from a's address and port, out of its own eth0.
    const gw = JSON.parse((await lab.exec(h1, 'ip', ['-j', 'link', 'show', 'cni0'])).stdout) as Array<{ address: string }>;
    const frames = Array.from({ length: 5 }, (_, i) => buildFrame({
      eth: { src: p2.mac, dst: gw[0].address },
      ipv4: { src: a.ip, dst: b.ip, df: true, id: 0x100 + i, l4: { udp: { sport: SPORT, dport: ECHO_PORT, payload: { ascii: `${MARK}-${i}` } } } },
    }));
    const c2 = await counters('h2');
    c1 = await counters('h1');
    injectFrames(`/run/netns/${p2.netns}`, 'eth0', frames);
    await new Promise((res) => setTimeout(res, 500));
    d1 = await counters('h1');
    const d2 = await counters('h2');
    expect(delta(d1, c1, 'src_not_pod'), "left on the overlay by masq at p2's veth").toBe(frames.length);
    expect(delta(d1, c1, 'masqueraded'), 'masqueraded at h1').toBe(0);
    expect(delta(d2, c2, 'restored'), 'restored at h2').toBe(0);
    // a's own datagrams on the same flow still take the fast path.
    c1 = await counters('h1');
    expect((await output(nodeIn(lab, a, aFlow(5)), 20_000)).out).toContain('udp-echoed 5');
    d1 = await counters('h1');
    expect(delta(d1, c1, 'masqueraded'), "a's flow after the spoofing").toBeGreaterThan(0);
    expect(delta(d1, c1, 'src_not_pod'), "a's own datagrams").toBe(0);
    await nothingLost('after a pod sent as its neighbour');
  }, 90_000);

  it('key signals from an address that is no node, and from a node for a pair not its own, change no key', async () => {
    const entry = await egressEntry('h2', b.ip, a.ip);
    expect(entry?.remote_ip).toBe(h1.ip);
    const signal = (src: string, narrow: boolean): Uint8Array => buildFrame({
      eth: { src: h3.mac, dst: h2.mac },
      ipv4: {
        src, dst: h2.ip, rf: true, df: true, tos: narrow ? 13 << 2 : 0, id: narrow ? 0x4321 : 0x1234,
        l4: { udp: { sport: 40000, dport: 8472, checksum: 'none', payload: tunnelPayload('vxlan', buildFrame({
          eth: { src: h1.vtepMac, dst: b.mac }, ipv4: { src: a.ip, dst: b.ip, l4: { udp: { sport: 40000, dport: 9, payload: { ascii: MARK } } } },
        })) } },
      },
    });
    const before = await counters('h2');
    injectFrames(`/run/netns/${h3.netns}`, h3.nic, [signal(STRANGER, true), signal(STRANGER, false), signal(h3.ip, true), signal(h3.ip, false)]);
    await new Promise((res) => setTimeout(res, 500));
    const after = await counters('h2');
    expect(delta(after, before, 'signal_not_node'), 'signals from a non-node').toBe(2);
    expect(delta(after, before, 'signal_wrong_node'), "signals from h3 for h1's pair").toBe(2);
    const now = await egressEntry('h2', b.ip, a.ip);
    expect({ key: now?.remote_key, ready: now?.remote_ready, peer: now?.remote_ip }).toEqual({ key: entry!.remote_key, ready: entry!.remote_ready, peer: h1.ip });
    await nothingLost('after forged signals');
  }, 60_000);

  it('masqueraded frames over the whole key space, from a non-node and from a node for pairs not its own, reach no pod and no host socket', async () => {
    const inPod = await listen(a, TRAP_PORT);
    const inHost = await listen(h1, TRAP_PORT);
    const forged = (src: string, key: number): Uint8Array => buildFrame({
      eth: { src: h3.mac, dst: h1.mac },
      ipv4: key < 64
        ? { src, dst: h1.ip, rf: true, df: true, tos: key << 2, l4: { udp: { sport: 40000, dport: TRAP_PORT, payload: { ascii: MARK } } } }
        : { src, dst: h1.ip, rf: true, df: true, tos: 0, l4: { udp: { sport: 40000, dport: TRAP_PORT, length: key, payload: { ascii: MARK } } } },
    });
    const keys = Array.from({ length: 16383 }, (_, i) => i + 1);
    for (const [src, counter] of [[STRANGER, 'marked_not_node'], [h3.ip, 'restore_miss']] as const) {
      const before = await counters('h1');
      for (let i = 0; i < keys.length; i += 2048) injectFrames(`/run/netns/${h3.netns}`, h3.nic, keys.slice(i, i + 2048).map((k) => forged(src, k)));
      await new Promise((res) => setTimeout(res, 1000));
      const after = await counters('h1');
      expect(delta(after, before, counter), `${src}: dropped as ${counter}`).toBe(keys.length);
      expect(delta(after, before, 'restored'), `${src}: restored`).toBe(0);
    }
    expect(inPod.lines(), 'forged datagrams in pod a').toEqual([]);
    expect(inHost.lines(), "forged datagrams in h1's host stack").toEqual([]);
    await nothingLost('after forged masqueraded frames');
  }, 180_000);

  // The agents' default puts the programs on tcx links on this kernel; SIGTERM's guard runs on a cls_bpf filter too.
  it.each([['SIGTERM', 'tcx'], ['SIGTERM', 'cls_bpf'], ['SIGUSR2', 'tcx'], ['SIGKILL', 'tcx']] as const)("%s of h2's agent (programs as %s) with traffic running: what h1 still masquerades reaches b, never h2's stack", async (sig, kind) => {
    if (kind === 'cls_bpf') {
      expect(await agents.stop('h2', 'SIGUSR2')).toBe(0);
      await agents.start('h2', ['--attach', kind]);
      await roundTrips(10);
    }
    const host = await listen(h2, ECHO_PORT, true);
    const c1 = await counters('h1');
    const n = 80;
    const client = roundTrips(n, 50);
    await new Promise((res) => setTimeout(res, 1000));
    const code = await agents.stop('h2', sig);
    if (sig !== 'SIGKILL') expect(code, `h2's agent exit after ${sig}`).toBe(0);
    expect(hookPrograms(h2.netns, h2.nic, 'ingress').map((p) => `${p.name}/${p.kind}`), `${h2.nic} ingress after ${sig}`).toEqual([`restore/${kind}`]);
    const out = await client;
    expect(out, `round trips across the ${sig}`).toContain(`udp-echoed ${n}`);
    expect(host.lines(), "datagrams that reached h2's host stack").toEqual([]);
    expect(delta(await counters('h1'), c1, 'masqueraded'), 'h1 went on masquerading to h2').toBeGreaterThan(n / 2);
    host.child.kill('SIGKILL');
    // The next agent takes over (restore replaced in place) and the pair is back on the fast path.
    await agents.start('h2');
    await roundTrips(10);
    await nothingLost(`after ${sig} and a new agent`);
  }, 120_000);
});
