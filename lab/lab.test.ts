/**
 * The lab against the real kernel and the real CNI plugins. Needs root and
 * containernetworking-plugins; every lab here has a per-run name so parallel runs and
 * leftovers of a crashed run never collide.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checksumProblems, decodeFrame, describeFrame, flattenFrame } from '../testing/packet/index.ts';
import { Lab, stateDir, type LabPod } from './lab.ts';
import { requireRoot } from '../testing/privileges.ts';

const RUN = process.pid;

function preflight(): void {
  requireRoot(import.meta.url, 'network namespaces, veth, vxlan');
  if (!existsSync('/usr/lib/cni/bridge')) throw new Error('/usr/lib/cni/bridge is missing: apt-get install containernetworking-plugins');
}

function netnsNames(): string[] {
  return execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' })
    .split('\n')
    .map((l) => l.split(' ')[0])
    .filter(Boolean);
}

function expectGone(name: string): void {
  expect(netnsNames().filter((n) => n.startsWith(`${name}-`))).toEqual([]);
  expect(existsSync(stateDir(name))).toBe(false);
}

/** Frames of a classic little-endian pcap file, as tcpdump -w writes it. */
function readPcap(file: string): Uint8Array[] {
  const b = readFileSync(file);
  if (b.readUInt32LE(0) !== 0xa1b2c3d4) throw new Error(`${file}: not a little-endian microsecond pcap`);
  const frames: Uint8Array[] = [];
  for (let off = 24; off + 16 <= b.length; ) {
    const caplen = b.readUInt32LE(off + 8);
    frames.push(new Uint8Array(b.subarray(off + 16, off + 16 + caplen)));
    off += 16 + caplen;
  }
  return frames;
}

/** Starts tcpdump on a host's underlay nic and resolves once it is capturing. */
async function capture(lab: Lab, hostName: string, count: number, filter: string) {
  const dir = mkdtempSync(join(tmpdir(), 'xmasq-lab-'));
  const file = join(dir, 'wire.pcap');
  const host = lab.host(hostName);
  // -Z root: tcpdump otherwise drops to its own user and cannot write into our private dir.
  const child = lab.spawn(host, 'tcpdump', ['-i', host.nic, '-nn', '--immediate-mode', '-U', '-Z', 'root', '-c', String(count), '-w', file, filter], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  const exited = new Promise<number | null>((resolve) => child.on('exit', resolve));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`tcpdump did not start: ${stderr}`)), 5000);
    child.stderr!.on('data', (d: Buffer) => {
      stderr += d.toString();
      if (stderr.includes('listening on')) {
        clearTimeout(timer);
        resolve();
      }
    });
    void exited.then((code) => reject(new Error(`tcpdump exited ${code}: ${stderr}`)));
  });
  return {
    /** Waits for tcpdump to see `count` packets (at most 5 s, then stops it) and returns what it saw. */
    async frames(): Promise<Uint8Array[]> {
      const timer = setTimeout(() => child.kill('SIGTERM'), 5000);
      await exited;
      clearTimeout(timer);
      const frames = readPcap(file);
      rmSync(dir, { recursive: true, force: true });
      return frames;
    },
  };
}

// One-shot TCP server/client in plain node, so the pods need nothing installed. The client
// retries its connect: the server starts in a separate process at the same moment.
const TCP_SERVER = `
const net = require('net');
const [ip, port] = process.argv.slice(1);
const srv = net.createServer((c) => {
  let n = 0;
  c.on('data', (d) => { n += d.length; });
  c.on('end', () => { c.end('got ' + n); srv.close(); });
});
srv.listen(Number(port), ip);
// unref: the timer must only fire if the client never comes, not hold the process open.
setTimeout(() => { console.error('server timeout'); process.exit(2); }, 8000).unref();
`;
const TCP_CLIENT = `
const net = require('net');
const [ip, port, bytes] = process.argv.slice(1);
const t0 = Date.now();
(function attempt() {
  const c = net.connect(Number(port), ip, () => c.end(Buffer.alloc(Number(bytes), 0x61)));
  let reply = '';
  c.on('data', (d) => { reply += d; });
  c.on('end', () => { console.log(reply); process.exit(0); });
  c.on('error', (e) => {
    if (Date.now() - t0 > 5000) { console.error(e.message); process.exit(1); }
    setTimeout(attempt, 50);
  });
})();
`;

async function tcpExchange(lab: Lab, server: LabPod, client: LabPod, bytes: number, port = 5201): Promise<string> {
  const srv = lab.exec(server, 'node', ['-e', TCP_SERVER, server.ip, String(port)], { timeoutMs: 10_000 });
  const cli = lab.exec(client, 'node', ['-e', TCP_CLIENT, server.ip, String(port), String(bytes)], { timeoutMs: 10_000 });
  const [s, c] = await Promise.all([srv, cli]);
  expect({ code: s.code, stderr: s.stderr }).toEqual({ code: 0, stderr: '' });
  expect({ code: c.code, stderr: c.stderr }).toEqual({ code: 0, stderr: '' });
  return c.stdout.trim();
}

async function ping(lab: Lab, from: LabPod, to: string, count = 1) {
  return lab.exec(from, 'ping', ['-c', String(count), '-i', '0.2', '-W', '2', to]);
}

describe('lab: 2 hosts, 2 pods each', () => {
  const name = `xt${RUN}`;
  let lab: Lab;
  const pod = (n: string) => lab.pod(n);

  beforeAll(async () => {
    preflight();
    const t0 = performance.now();
    lab = await Lab.up({ name, hosts: 2, podsPerHost: 2 });
    console.log(`lab ${name} up in ${(performance.now() - t0).toFixed(0)} ms`);
  });

  afterAll(async () => {
    await Lab.down(name);
  });

  it('builds the flannel topology: hosts, pods in their host CIDR, vxlan device', async () => {
    expect(lab.hosts.map((h) => [h.name, h.netns, h.ip, h.podCidr])).toEqual([
      ['h1', `${name}-h1`, '172.31.250.1', '10.244.1.0/24'],
      ['h2', `${name}-h2`, '172.31.250.2', '10.244.2.0/24'],
    ]);
    expect(lab.pods.map((p) => [p.name, p.host, p.netns])).toEqual([
      ['h1-p1', 'h1', `${name}-h1-p1`],
      ['h1-p2', 'h1', `${name}-h1-p2`],
      ['h2-p1', 'h2', `${name}-h2-p1`],
      ['h2-p2', 'h2', `${name}-h2-p2`],
    ]);
    for (const p of lab.pods) expect(p.ip).toMatch(new RegExp(`^10\\.244\\.${lab.host(p.host).index}\\.\\d+$`));

    const vx = await lab.exec(lab.host('h1'), 'ip', ['-d', 'link', 'show', 'flannel.1']);
    expect(vx.stdout).toMatch(/mtu 1450/);
    expect(vx.stdout).toMatch(/vxlan id 1 local 172\.31\.250\.1 dev nic0 .*dstport 8472 nolearning/);
    const fdb = await lab.exec(lab.host('h1'), 'bridge', ['fdb', 'show', 'dev', 'flannel.1']);
    expect(fdb.stdout).toContain(`${lab.host('h2').vtepMac} dst 172.31.250.2 self permanent`);
    const route = await lab.exec(lab.host('h1'), 'ip', ['route', 'show', '10.244.2.0/24']);
    expect(route.stdout.trim()).toBe('10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink');
    const eth0 = await lab.exec(pod('h1-p1'), 'ip', ['-j', 'link', 'show', 'eth0']);
    expect(JSON.parse(eth0.stdout)[0]).toMatchObject({ mtu: 1450, address: pod('h1-p1').mac, link_index: pod('h1-p1').hostVethIfindex });
  });

  it('Lab.load reads the same lab back from its state file', async () => {
    const again = await Lab.load(name);
    expect(again?.hosts).toEqual(lab.hosts);
    expect(again?.pods).toEqual(lab.pods);
    expect(again?.status().pods.every((p) => p.netnsExists)).toBe(true);
    expect(await Lab.load(`nx${RUN}`)).toBeUndefined();
  });

  it('pods on different hosts ping each other', async () => {
    for (const [a, b] of [['h1-p1', 'h2-p1'], ['h2-p2', 'h1-p2'], ['h1-p1', 'h1-p2']]) {
      const r = await ping(lab, pod(a), pod(b).ip);
      expect(r.code, `${a} -> ${b}: ${r.stdout}${r.stderr}`).toBe(0);
    }
  });

  it('TCP works across hosts, with segments larger than one packet', async () => {
    expect(await tcpExchange(lab, pod('h2-p1'), pod('h1-p2'), 200_000)).toBe('got 200000');
  });

  it('the wire carries pod-to-pod traffic VXLAN-encapsulated between the hosts', async () => {
    const cap = await capture(lab, 'h1', 4, 'udp port 8472');
    const r = await ping(lab, pod('h1-p1'), pod('h2-p2').ip, 2);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    const frames = (await cap.frames()).map((f) => decodeFrame(f));
    expect(frames.length).toBe(4);
    const [h1, h2] = [lab.host('h1'), lab.host('h2')];
    const [a, b] = [pod('h1-p1'), pod('h2-p2')];
    const seen = frames.map((f) => {
      const x = flattenFrame(f);
      return { frame: describeFrame(f), outer: `${x['ipv4.src']}>${x['ipv4.dst']}:${x['udp.dport']}`, vni: x['vxlan.vni'], inner: `${x['inner.ipv4.src']}>${x['inner.ipv4.dst']}`, icmp: x['inner.icmp.type'] };
    });
    const request = { outer: `${h1.ip}>${h2.ip}:8472`, vni: 1, inner: `${a.ip}>${b.ip}`, icmp: 8 };
    const reply = { outer: `${h2.ip}>${h1.ip}:8472`, vni: 1, inner: `${b.ip}>${a.ip}`, icmp: 0 };
    expect(seen).toEqual([request, reply, request, reply].map((w) => ({ ...w, frame: expect.any(String) })));
  });

  it('deletePod runs CNI DEL: the netns and the IP allocation go; the IP can be handed out again', async () => {
    const old = pod('h1-p2');
    const ipamFile = join(stateDir(name), 'ipam', 'h1', 'xmasq-lab', old.ip);
    expect(existsSync(ipamFile)).toBe(true);
    const neighbour = async (ip: string) => (await lab.exec(lab.host('h1'), 'ip', ['neigh', 'show', ip, 'dev', 'cni0'])).stdout;
    expect(await neighbour(old.ip)).toContain(old.mac);
    await lab.deletePod('h1-p2');
    expect(existsSync(ipamFile)).toBe(false);
    expect(netnsNames()).not.toContain(old.netns);
    expect(lab.pods.map((p) => p.name)).not.toContain('h1-p2');
    // The veth went with the netns: only h1-p1's port is left on cni0.
    const ports = await lab.exec(lab.host('h1'), 'ip', ['-j', 'link', 'show', 'master', 'cni0']);
    expect(JSON.parse(ports.stdout).map((l: { ifname: string }) => l.ifname)).toEqual([pod('h1-p1').hostVeth]);

    // host-local allocates round-robin, so an unconstrained ADD takes the next address; asking
    // for the freed one shows it is free (host-local refuses an address in use, see below).
    const again = await lab.addPod('h1', 'h1-p2', { ip: old.ip });
    expect(again.ip).toBe(old.ip);
    expect(again.mac).not.toBe(old.mac);
    // h1's neighbour cache held the old pod's MAC for this IP; addPod has the new pod
    // announce itself, so the reused IP is reachable right away.
    expect(await neighbour(old.ip)).toContain(again.mac);
    const r = await ping(lab, pod('h2-p1'), again.ip);
    expect(r.code, r.stdout + r.stderr).toBe(0);
  });

  it('a failing CNI ADD leaves no pod, netns or IP behind', async () => {
    const ours = () => netnsNames().filter((n) => n.startsWith(`${name}-`)).sort();
    const before = ours();
    await expect(lab.addPod('h2', 'dup', { ip: pod('h2-p1').ip })).rejects.toThrow(/CNI ADD failed in plugin "bridge".*not available/);
    expect(ours()).toEqual(before);
    expect(lab.status().incompletePods).toEqual([]);
    const next = await lab.addPod('h2', 'h2-p3');
    expect(next.ip).toMatch(/^10\.244\.2\.\d+$/);
    await lab.deletePod('h2-p3');
  });

  it('exec refuses namespaces that are not the lab\'s', async () => {
    await expect(lab.exec('init', 'true')).rejects.toThrow(/not part of lab/);
    expect(() => lab.spawn('init', 'true')).toThrow(/not part of lab/);
  });

  it('down removes every netns, link and the state dir, and is idempotent', async () => {
    const t0 = performance.now();
    await lab.down();
    console.log(`lab ${name} down in ${(performance.now() - t0).toFixed(0)} ms`);
    expectGone(name);
    expect(await lab.down()).toEqual({ warnings: [] });
    expect(await Lab.down(name)).toEqual({ warnings: [] });
  });
});

describe('lab: checksumOffload false', () => {
  const name = `xc${RUN}`;
  let lab: Lab;

  beforeAll(async () => {
    preflight();
    lab = await Lab.up({ name, hosts: 2, podsPerHost: 1, checksumOffload: false });
  });

  afterAll(async () => {
    await Lab.down(name);
    expectGone(name);
  });

  it('turns rx/tx checksum offload off on every wire and pod veth end', async () => {
    const ends: [{ netns: string }, string][] = [];
    for (const h of lab.hosts) ends.push([h, h.nic], [{ netns: lab.wireNetns }, h.wirePort]);
    for (const p of lab.pods) ends.push([p, p.ifname], [lab.host(p.host), p.hostVeth]);
    for (const [ns, dev] of ends) {
      const k = await lab.exec(ns, 'ethtool', ['-k', dev]);
      expect(k.stdout, `${ns.netns} ${dev}`).toMatch(/^rx-checksumming: off/m);
      expect(k.stdout, `${ns.netns} ${dev}`).toMatch(/^tx-checksumming: off/m);
    }
  });

  it('so every checksum on the wire is complete and right', async () => {
    const [a, b] = lab.pods;
    const cap = await capture(lab, 'h1', 12, 'udp port 8472');
    expect(await tcpExchange(lab, b, a, 20_000)).toBe('got 20000');
    const frames = await cap.frames();
    expect(frames.length).toBe(12);
    const bad = frames.flatMap((f) => checksumProblems(f).map((p) => `${p}: ${describeFrame(f)}`));
    expect(bad).toEqual([]);
    expect(frames.every((f) => flattenFrame(decodeFrame(f))['inner.tcp.checksumPartial'] === false)).toBe(true);
  });
});

describe('lab: configurable CNI chain and failed setups', () => {
  beforeAll(preflight);

  it('runs extra plugins after bridge, with prevResult (tuning sets promisc on eth0)', async () => {
    const name = `xp${RUN}`;
    try {
      const lab = await Lab.up({ name, hosts: 1, podsPerHost: 1, cniPlugins: [{ type: 'tuning', promisc: true }] });
      const link = await lab.exec(lab.pods[0], 'ip', ['-j', 'link', 'show', 'eth0']);
      expect(JSON.parse(link.stdout)[0].flags).toContain('PROMISC');
      await lab.deletePod(lab.pods[0].name);
      await lab.down();
    } finally {
      await Lab.down(name);
    }
    expectGone(name);
  });

  it('a plugin failing in the middle of up leaves nothing behind', async () => {
    const name = `xf${RUN}`;
    await expect(
      Lab.up({ name, hosts: 2, podsPerHost: 1, cniPlugins: [{ type: 'tuning', sysctl: { 'net.ipv4.conf.eth0.no_such_setting': '1' } }] }),
    ).rejects.toThrow(/CNI ADD failed in plugin "tuning"/);
    expectGone(name);
  });

  it('a missing plugin binary names the package and creates nothing', async () => {
    const name = `xm${RUN}`;
    await expect(Lab.up({ name, cniPath: ['/nonexistent/cni'] })).rejects.toThrow(
      `CNI plugin "bridge" not found in /nonexistent/cni; install it with 'apt-get install containernetworking-plugins'`,
    );
    expectGone(name);
  });

  it('a lab built by another process is loaded, used and taken down here', async () => {
    const name = `xo${RUN}`;
    const repo = fileURLToPath(new URL('..', import.meta.url));
    const code = `const { Lab } = await import(${JSON.stringify(fileURLToPath(new URL('./lab.ts', import.meta.url)))});
      await Lab.up({ name: ${JSON.stringify(name)}, hosts: 2, podsPerHost: 1 });`;
    try {
      execFileSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], { cwd: repo, stdio: 'pipe' });
      const lab = await Lab.load(name);
      expect(lab?.pods.map((p) => p.name)).toEqual(['h1-p1', 'h2-p1']);
      const r = await ping(lab!, lab!.pod('h1-p1'), lab!.pod('h2-p1').ip);
      expect(r.code, r.stdout + r.stderr).toBe(0);
      await lab!.down();
    } finally {
      await Lab.down(name);
    }
    expectGone(name);
  });

  it('a stale Lab object never takes down a newer lab of the same name', async () => {
    const name = `xs${RUN}`;
    try {
      const first = await Lab.up({ name, hosts: 1, podsPerHost: 0 });
      const stale = await Lab.load(name);
      await first.down();
      const second = await Lab.up({ name, hosts: 1, podsPerHost: 0 });
      expect((await stale!.down()).warnings).toEqual([expect.stringMatching(/replaced/)]);
      expect(second.status().hosts.every((h) => h.netnsExists)).toBe(true);
    } finally {
      await Lab.down(name);
    }
    expectGone(name);
  });

  it('refuses a second lab of the same name', async () => {
    const name = `xd${RUN}`;
    try {
      await Lab.up({ name, hosts: 1, podsPerHost: 0 });
      await expect(Lab.up({ name, hosts: 1, podsPerHost: 0 })).rejects.toThrow(/already exists/);
    } finally {
      await Lab.down(name);
    }
    expectGone(name);
  });
});
