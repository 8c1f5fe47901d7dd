/**
 * XMasq for real in the lab: one xmasq-agent per host (in the host's netns),
 * pods created through the CNI chain bridge + host-local + xmasq, real
 * traffic between pods on different hosts. Checksum offload is off on the
 * wire and pod veths, so what the capture shows is what a receiver checks.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentClient } from '../dataplane/agent/protocol.ts';
import { readPcap } from '../fixtures/pcap.ts';
import { l4ChecksumInfo, verifyIpv4Header } from '../sim/packet/checksum.ts';
import { decodeFrame, findLayer } from '../sim/packet/decode.ts';
import { Lab, type LabPod } from './lab.ts';

if (process.getuid?.() !== 0) throw new Error('lab/e2e.test.ts needs root (network namespaces, BPF): run it as root');

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const TSX = `${ROOT}node_modules/.bin/tsx`;
const name = `xe${process.pid % 100000}`;
const RUN = `/run/xmasq-e2e-${name}`;
const sock = (host: string) => `${RUN}/${host}/agent.sock`;
const pinDir = (host: string) => `/sys/fs/bpf/${name}-${host}`;

let lab: Lab;
const agents = new Map<string, ChildProcess>();
let a: LabPod, b: LabPod;

async function startAgent(host: string): Promise<void> {
  const h = lab.host(host);
  mkdirSync(`${RUN}/${host}`, { recursive: true });
  const child = spawn('nsenter', [`--net=/run/netns/${h.netns}`, TSX, `${ROOT}dataplane/agent/main.ts`,
    '--nic', h.nic, '--pin-dir', pinDir(host), '--socket', sock(host), '--state-dir', `${RUN}/${host}`,
    '--metrics-listen', 'off', '--scan-interval', '0.5'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  child.stderr!.on('data', (d) => { log += d; });
  agents.set(host, child);
  const deadline = Date.now() + 20_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`xmasq-agent on ${host} exited ${child.exitCode}:\n${log}`);
    try {
      await AgentClient.request(sock(host), { op: 'status' }, { timeoutMs: 500 });
      return;
    } catch {
      if (Date.now() > deadline) throw new Error(`xmasq-agent on ${host} did not answer within 20 s:\n${log}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

async function stopAgent(host: string): Promise<void> {
  const child = agents.get(host);
  if (!child || child.exitCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await exited;
  agents.delete(host);
}

async function counters(host: string): Promise<Record<string, number>> {
  return (await AgentClient.request(sock(host), { op: 'status' })).status.counters;
}

/** A node one-liner in a pod's netns. */
function nodeIn(pod: LabPod, script: string): ChildProcess {
  return lab.spawn(pod, process.execPath, ['-e', script]);
}

async function output(child: ChildProcess, timeoutMs = 15_000): Promise<{ code: number | null; out: string }> {
  let out = '';
  child.stdout?.on('data', (d) => { out += d; });
  child.stderr?.on('data', (d) => { out += d; });
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  const code = await new Promise<number | null>((r) => child.once('exit', r));
  clearTimeout(timer);
  return { code, out };
}

const TCP_ECHO = (port: number) => `require('net').createServer((s) => s.pipe(s)).listen(${port}, '0.0.0.0', () => console.log('ready'))`;
const UDP_ECHO = (port: number) => `const d = require('dgram').createSocket('udp4'); d.on('message', (m, r) => d.send(m, r.port, r.address)); d.bind(${port}, () => console.log('ready'))`;

async function server(pod: LabPod, script: string): Promise<ChildProcess> {
  const s = nodeIn(pod, script);
  await new Promise<void>((resolve, reject) => {
    s.stdout!.on('data', (d) => { if (String(d).includes('ready')) resolve(); });
    s.once('exit', (c) => reject(new Error(`server in ${pod.name} exited ${c}`)));
  });
  return s;
}

async function capture<T>(host: string, filter: string, during: () => Promise<T>): Promise<{ frames: Uint8Array[]; result: T }> {
  const h = lab.host(host);
  const file = `${RUN}/${host}-${Date.now()}.pcap`;
  const dump = lab.spawn(h, 'tcpdump', ['-i', h.nic, '--immediate-mode', '-U', '-w', file, filter]);
  await new Promise<void>((resolve, reject) => {
    let err = '';
    dump.stderr!.on('data', (d) => { err += d; if (err.includes('listening on')) resolve(); });
    dump.once('exit', (c) => reject(new Error(`tcpdump exited ${c}: ${err}`)));
  });
  const result = await during();
  await new Promise((r) => setTimeout(r, 200));
  const exited = new Promise((r) => dump.once('exit', r));
  dump.kill('SIGINT');
  await exited;
  return { frames: await readPcap(file), result };
}

function kind(f: Uint8Array, hostIps: Set<string>): 'vxlan' | 'masq' | 'other' {
  const d = decodeFrame(f);
  if (findLayer(d, 'vxlan')) return 'vxlan';
  const ip = findLayer(d, 'ipv4');
  const hostToHost = ip && hostIps.has(String(ip.fields.src)) && hostIps.has(String(ip.fields.dst));
  return hostToHost && (f[20] & 0x80) !== 0 && f[15] >> 2 !== 0 ? 'masq' : 'other';
}

function csumErrors(pod: LabPod): Promise<number> {
  // /proc/net/snmp follows the reader's netns: InCsumErrors of Tcp and Udp.
  return lab.exec(pod, 'cat', ['/proc/net/snmp']).then(({ stdout }) => {
    let total = 0;
    const lines = stdout.split('\n');
    for (let i = 0; i + 1 < lines.length; i++) {
      const head = lines[i].split(/\s+/), vals = lines[i + 1].split(/\s+/);
      if ((head[0] === 'Tcp:' || head[0] === 'Udp:') && head[0] === vals[0] && vals[1] && !/^[A-Z]/.test(vals[1])) {
        const at = head.indexOf('InCsumErrors');
        if (at > 0) total += Number(vals[at]);
      }
    }
    return total;
  });
}

beforeAll(async () => {
  lab = await Lab.up({
    name, hosts: 2, podsPerHost: 0, checksumOffload: false,
    cniPath: ['/usr/lib/cni', `${ROOT}dataplane/cni`],
    cniPlugins: [{ type: 'xmasq', agentSocket: `${RUN}/{host}/agent.sock`, required: true }],
  });
  await startAgent('h1');
  await startAgent('h2');
  a = await lab.addPod('h1', 'a');
  b = await lab.addPod('h2', 'b');
}, 120_000);

afterAll(async () => {
  for (const host of [...agents.keys()]) await stopAgent(host);
  await lab?.down();
  for (const host of ['h1', 'h2']) rmSync(pinDir(host), { recursive: true, force: true });
  rmSync(RUN, { recursive: true, force: true });
});

describe('XMasq with xmasq-agent in a two-host lab', () => {
  it('the CNI chain told each agent about its pod; the agents run in veth mode', async () => {
    for (const [host, pod] of [['h1', a], ['h2', b]] as const) {
      const s = (await AgentClient.request(sock(host), { op: 'status' })).status;
      expect(s.mode).toBe('veth');
      const pods = (await AgentClient.request(sock(host), { op: 'list' })).pods;
      expect(pods.map((p) => [p.ip, p.attached])).toEqual([[pod.ip, true]]);
    }
  });

  it('ICMP, TCP and UDP work across hosts: first as VXLAN, then masqueraded, checksums valid', async () => {
    const tcp = await server(b, TCP_ECHO(8080));
    const udp = await server(b, UDP_ECHO(5353));
    try {
      const hostIps = new Set(lab.hosts.map((h) => h.ip));
      const { frames, result } = await capture('h1', 'ip and not igmp', async () => {
        const ping = await lab.exec(a, 'ping', ['-c', '4', '-i', '0.2', '-W', '2', b.ip]);
        const t = await output(nodeIn(a, `const s = require('net').connect(8080, '${b.ip}'); let got = ''; let n = 0;
          s.on('connect', () => { const tick = () => { s.write('x'.repeat(1000)); if (++n < 20) setTimeout(tick, 20); else s.end(); }; tick(); });
          s.on('data', (d) => { got += d; }); s.on('end', () => console.log('tcp-echoed', got.length));`));
        const u = await output(nodeIn(a, `const d = require('dgram').createSocket('udp4'); let n = 0;
          d.on('message', () => { if (++n === 5) { console.log('udp-echoed', n); d.close(); } });
          for (let i = 0; i < 5; i++) setTimeout(() => d.send('ping-' + i, 5353, '${b.ip}'), i * 100);
          setTimeout(() => { console.log('udp-echoed', n); process.exit(1); }, 5000);`));
        return { ping, t, u };
      });
      expect(result.ping.stdout, result.ping.stderr).toMatch(/4 packets transmitted, 4 received/);
      expect(result.t.out).toContain('tcp-echoed 20000');
      expect(result.u.out).toContain('udp-echoed 5');

      const kinds = frames.map((f) => kind(f, hostIps));
      const protoOf = (k: string) => new Set(frames.filter((_, i) => kinds[i] === k).map((f) => f[23]));
      expect([...protoOf('masq')].sort((x, y) => x - y)).toEqual([1, 6, 17]);
      expect(kinds[0]).toBe('vxlan');
      for (const f of frames.filter((_, i) => kinds[i] === 'masq')) {
        expect(verifyIpv4Header(f, 14)).toBe(true);
        expect(l4ChecksumInfo(f, 14)?.valid).toBe(true);
      }
      for (const pod of [a, b]) expect(await csumErrors(pod), `checksum errors in ${pod.name}`).toBe(0);
      const c1 = await counters('h1'), c2 = await counters('h2');
      expect(c1.masqueraded).toBeGreaterThan(0);
      expect(c2.restored).toBeGreaterThan(0);
      expect(c1.restore_miss + c2.restore_miss).toBe(0);
    } finally {
      tcp.kill();
      udp.kill();
    }
  }, 60_000);

  it('a denied flow gets no packet through, from its first packet; deleting the rule lets it through', async () => {
    const srv = await server(b, TCP_ECHO(9090));
    try {
      const added = await AgentClient.request(sock('h2'), { op: 'policy-add', rule: { dir: 'ingress', dst: b.ip, dport: 9090, proto: 'tcp' } });
      const before = (await counters('h2')).policy_drop;
      const denied = await output(nodeIn(a, `const s = require('net').connect(9090, '${b.ip}');
        s.on('connect', () => { console.log('connected'); process.exit(0); }); setTimeout(() => { console.log('timeout'); process.exit(1); }, 2000);`));
      expect(denied.out).toContain('timeout');
      expect((await counters('h2')).policy_drop).toBeGreaterThan(before);
      await AgentClient.request(sock('h2'), { op: 'policy-del', id: added.rule.id });
      const allowed = await output(nodeIn(a, `const s = require('net').connect(9090, '${b.ip}');
        s.on('connect', () => { console.log('connected'); process.exit(0); }); setTimeout(() => { console.log('timeout'); process.exit(1); }, 5000);`));
      expect(allowed.out).toContain('connected');
    } finally {
      srv.kill();
    }
  }, 30_000);

  it('an agent restart under a running TCP stream loses no connection, and the flow stays masqueraded', async () => {
    const srv = await server(b, TCP_ECHO(7070));
    try {
      // 4 s of 1 KB writes every 20 ms; the client checks every byte comes back.
      const client = nodeIn(a, `const s = require('net').connect(7070, '${b.ip}'); let got = 0, sent = 0;
        s.on('connect', () => { const t = setInterval(() => { s.write(Buffer.alloc(1024, 7)); sent += 1024; }, 20); setTimeout(() => { clearInterval(t); setTimeout(() => s.end(), 1500); }, 4000); });
        s.on('data', (d) => { got += d.length; }); s.on('error', (e) => { console.log('error', e.code); process.exit(1); });
        s.on('close', () => console.log('done', sent, got));`);
      const done = output(client, 30_000);
      await new Promise((r) => setTimeout(r, 1000));
      await stopAgent('h1');
      await startAgent('h1');
      const { out } = await done;
      const m = /done (\d+) (\d+)/.exec(out);
      expect(m, out).not.toBeNull();
      expect(Number(m![1])).toBeGreaterThan(100 * 1024);
      expect(Number(m![2])).toBe(Number(m![1]));
      const s = (await AgentClient.request(sock('h1'), { op: 'status' })).status;
      expect(s.pinsReused).toBe(true);
      expect((await AgentClient.request(sock('h1'), { op: 'list' })).pods.map((p) => p.attached)).toEqual([true]);
    } finally {
      srv.kill();
    }
  }, 60_000);

  it('stopping the agents and taking the lab down leaves no netns, filter or pin behind', async () => {
    for (const host of ['h1', 'h2']) {
      await stopAgent(host);
      const r = await output(spawn('nsenter', [`--net=/run/netns/${lab.host(host).netns}`, TSX, `${ROOT}dataplane/agent/main.ts`, 'cleanup',
        '--pin-dir', pinDir(host), '--socket', sock(host), '--state-dir', `${RUN}/${host}`, '--nic', lab.host(host).nic]));
      expect(r.code, r.out).toBe(0);
      expect(existsSync(pinDir(host))).toBe(false);
      const filters = await lab.exec(lab.host(host), 'tc', ['filter', 'show', 'dev', lab.host(host).nic, 'ingress']);
      expect(filters.stdout).not.toMatch(/bpf/);
    }
    await lab.down();
    const netns = await import('node:child_process').then((cp) => cp.execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' }));
    expect(netns).not.toContain(name);
  }, 60_000);
});
