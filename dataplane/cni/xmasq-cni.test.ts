/**
 * The `xmasq` CNI plugin run as a runtime runs it: the executable `dataplane/cni/xmasq`
 * with CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME and CNI_PATH in its environment
 * and the config on stdin, inside a "node" network namespace that holds a real xmasq-agent.
 * Pods come from the real bridge + host-local plugins (lab/cni.ts, a minimal runtime) for
 * every cniVersion those plugins speak, and from veths made by hand for the shapes of
 * prevResult that Calico and Antrea print. Agents that misbehave are small unix-socket
 * servers in this process, named for what they do.
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { fileURLToPath } from 'node:url';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cniAdd, cniCheck, cniDel, type CniConfList, type CniInvocation, type CniResult } from '../../lab/cni.ts';
import { deleteNetns, removePins } from '../../testing/teardown.ts';
import { AgentClient, type PodRecord } from '../agent/protocol.ts';
import { runCni, SUPPORTED_VERSIONS } from './plugin.ts';
import { requireRoot } from '../../testing/privileges.ts';

const REPO = fileURLToPath(new URL('../../', import.meta.url));
const CNI_DIR = fileURLToPath(new URL('./', import.meta.url)).replace(/\/$/, '');
const PLUGIN = `${CNI_DIR}/xmasq`;
const AGENT = fileURLToPath(new URL('../agent/main.ts', import.meta.url));
const OBJECT = fileURLToPath(new URL('../../bpf/build/xmasq.bpf.o', import.meta.url));
const CNI_PATH = ['/usr/lib/cni', CNI_DIR];

const ID = `xc${process.pid}`;
const NODE = `${ID}-node`;
const WIRE = `${ID}-wire`;
const PIN = `/sys/fs/bpf/xmasq-cni-test-${process.pid}`;
let TMP = '';
let SOCK = '';
const made: string[] = []; // pod netns to delete at the end

const VERSIONS = [...SUPPORTED_VERSIONS];
/** What Debian's bridge and host-local (containernetworking-plugins 1.1.1) speak. */
const BRIDGE_VERSIONS = ['0.3.0', '0.3.1', '0.4.0', '1.0.0'];
const before1 = (v: string) => v.startsWith('0.');

function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}
const ip = (...args: string[]) => sh('ip', args);

interface Link { ifindex: number; ifname: string; address: string; link_index?: number }
const link = (ns: string, dev: string) => (JSON.parse(ip('-n', ns, '-j', 'link', 'show', 'dev', dev)) as Link[])[0];

interface Ran { code: number; stdout: string; stderr: string }

/** The plugin as a process in the node netns, as a runtime starts it. stdin may be any bytes. */
function plugin(env: Record<string, string | undefined>, stdin: string | Uint8Array): Promise<Ran> {
  return new Promise((resolve) => {
    const e: NodeJS.ProcessEnv = {};
    for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('CNI_')) e[k] = v;
    for (const [k, v] of Object.entries(env)) if (v !== undefined) e[k] = v;
    const child = spawn('nsenter', [`--net=/run/netns/${NODE}`, '--', PLUGIN], { env: e, cwd: '/', stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.stdin.on('error', () => {}); // the plugin may exit before reading everything
    child.on('close', (code) => resolve({ code: code ?? 128, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() }));
    child.stdin.end(stdin);
  });
}

interface PodRef { ns: string; containerId: string }
const envFor = (cmd: string | undefined, pod: PodRef, ifname = 'eth0') => ({
  CNI_COMMAND: cmd, CNI_CONTAINERID: pod.containerId, CNI_NETNS: `/run/netns/${pod.ns}`, CNI_IFNAME: ifname, CNI_PATH: CNI_PATH.join(':'),
});

/** A Node stack frame ("    at f (file:1:2)"): never to be shown to a runtime. */
const STACK = /^\s+at .+:\d+:\d+\)?$/m;

/** A CNI error as the spec has it: exit status non-zero, one JSON object on stdout. */
function cniError(r: Ran, code?: number): { cniVersion: string; code: number; msg: string; details?: string } {
  expect(r.code, `stdout ${r.stdout}\nstderr ${r.stderr}`).not.toBe(0);
  expect(r.stdout.trim().split('\n')).toHaveLength(1);
  const e = JSON.parse(r.stdout) as { cniVersion: string; code: number; msg: string; details?: string };
  expect(typeof e.cniVersion).toBe('string');
  expect(VERSIONS).toContain(e.cniVersion);
  expect(Number.isInteger(e.code)).toBe(true);
  expect(typeof e.msg === 'string' && e.msg.length > 0).toBe(true);
  if (code !== undefined) expect(e.code, e.msg).toBe(code);
  expect(r.stdout + r.stderr).not.toMatch(STACK);
  return e;
}

function ok(r: Ran): void {
  expect(r.code, `stdout ${r.stdout}\nstderr ${r.stderr}`).toBe(0);
  expect(r.stderr).not.toMatch(STACK);
}

async function agentPods(): Promise<PodRecord[]> {
  return (await AgentClient.request(SOCK, { op: 'list' }, { timeoutMs: 10_000 })).pods;
}

/** The agent holds the pod with masq attached, on this host veth and with this MAC. */
async function expectAttached(podIp: string, hostVeth: string, mac: string): Promise<void> {
  const rec = (await agentPods()).find((p) => p.ip === podIp);
  expect(rec, `the agent should hold ${podIp}`).toBeDefined();
  expect(rec!.attached).toBe(true);
  expect(rec!.hostVethIfindex).toBe(link(NODE, hostVeth).ifindex);
  expect(rec!.mac).toBe(mac);
}

async function expectForgotten(podIp: string): Promise<void> {
  expect((await agentPods()).map((p) => p.ip)).not.toContain(podIp);
}

/** A pod made by hand: netns with eth0 (IPv4, MAC) whose veth peer `hostEnd` is in the node netns. */
function vethPod(name: string, hostEnd: string, podIp: string, mac: string): PodRef & { hostEnd: string; ip: string; mac: string } {
  const ns = `${ID}-${name}`;
  ip('netns', 'add', ns);
  made.push(ns);
  ip('link', 'add', hostEnd, 'netns', NODE, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns);
  ip('-n', ns, 'link', 'set', 'eth0', 'address', mac, 'up');
  ip('-n', ns, 'addr', 'add', `${podIp}/24`, 'dev', 'eth0');
  ip('-n', NODE, 'link', 'set', hostEnd, 'up');
  return { ns, containerId: `c-${name}`, hostEnd, ip: podIp, mac };
}

// ---- agents that misbehave, for the fail-open / fail-closed rules ----

function standIn(path: string, onLine: (sock: Socket, line: string) => void): Promise<Server> {
  return new Promise((resolve) => {
    const srv = createServer((sock) => {
      let buf = '';
      sock.setEncoding('utf8');
      sock.on('error', () => {});
      sock.on('data', (d: string) => {
        buf += d;
        for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
          onLine(sock, buf.slice(0, nl));
          buf = buf.slice(nl + 1);
        }
      });
    });
    srv.listen(path, () => resolve(srv));
  });
}
/** Accepts and reads, never answers: a hung agent. */
const silentAgentStandIn = (path: string) => standIn(path, () => {});
/** Answers every request with a line that is not JSON. */
const garbageAgentStandIn = (path: string) => standIn(path, (s) => s.write('HTTP/1.1 400 Bad Request\r\n\r\n<html>\n'));
/** Answers JSON that is not the protocol (no "ok"). */
const wrongShapeAgentStandIn = (path: string) => standIn(path, (s) => s.write('[1,2,3]\n'));
/** Answers as an agent that is up but will not take pods yet. */
const refusingAgentStandIn = (path: string) => standIn(path, (s) => s.write(`${JSON.stringify({ ok: false, error: 'not ready: the datapath is still being attached' })}\n`));

/** A socket file whose agent died without removing it: connect() gets ECONNREFUSED. */
async function staleSocketOfDeadAgent(path: string): Promise<void> {
  const child = spawn(process.execPath, ['-e', 'require("net").createServer().listen(process.argv[1], () => process.kill(process.pid, "SIGKILL"))', path], { stdio: 'ignore' });
  await new Promise((r) => child.on('exit', r));
  if (!existsSync(path)) throw new Error(`the dead agent left no socket at ${path}`);
}

// ---- the real agent ----

let agentChild: ReturnType<typeof spawn> | undefined;

function startAgent(): Promise<void> {
  // A long scan interval: the agent must not drop a pod whose veth went away by itself
  // during a test, or a DEL that forgot nothing would pass unnoticed.
  const child = spawn('nsenter', [`--net=/run/netns/${NODE}`, process.execPath, '--import', 'tsx', AGENT,
    '--nic', 'eth0', '--pin-dir', PIN, '--socket', SOCK, '--state-dir', `${TMP}/state`, '--object', OBJECT,
    '--scan-interval', '600', '--ingress-idle', '700', '--metrics-listen', 'off'], { cwd: REPO, stdio: ['ignore', 'ignore', 'pipe'] });
  agentChild = child;
  let err = '';
  child.stderr!.setEncoding('utf8');
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`agent not ready within 30 s:\n${err}`)), 30_000);
    child.stderr!.on('data', (s: string) => {
      err += s;
      if (/xmasq-agent: ready/.test(err)) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`agent exited with ${code} before it was ready:\n${err}`));
    });
  });
}

function teardown(): void {
  deleteNetns([...made, NODE, WIRE]);
  removePins(PIN);
}

beforeAll(async () => {
  requireRoot(import.meta.url, 'network namespaces, xmasq-agent');
  if (!existsSync(OBJECT)) throw new Error(`${OBJECT} is missing: build it with 'make -C bpf'`);
  for (const p of ['bridge', 'host-local']) {
    if (!existsSync(`/usr/lib/cni/${p}`)) throw new Error(`/usr/lib/cni/${p} is missing: apt-get install containernetworking-plugins`);
  }
  TMP = mkdtempSync('/tmp/xmasq-cni-test-');
  SOCK = `${TMP}/agent.sock`;
  ip('netns', 'add', NODE);
  ip('netns', 'add', WIRE);
  ip('-n', NODE, 'link', 'set', 'lo', 'up');
  // The node's uplink is a veth named eth0, as on kind or docker-in-docker nodes: a pod's
  // eth0 in prevResult must never be taken for the host side of the pod.
  ip('link', 'add', 'eth0', 'netns', NODE, 'type', 'veth', 'peer', 'name', 'wire0', 'netns', WIRE);
  ip('-n', NODE, 'addr', 'add', '192.168.78.1/24', 'dev', 'eth0');
  ip('-n', NODE, 'link', 'set', 'eth0', 'up');
  ip('-n', WIRE, 'link', 'set', 'wire0', 'up');
  await startAgent();
});

afterAll(() => {
  agentChild?.kill('SIGKILL');
  teardown();
  if (TMP) rmSync(TMP, { recursive: true, force: true });
});

describe('xmasq CNI plugin: versions', () => {
  it('VERSION lists every supported version and answers in the version asked', async () => {
    for (const v of VERSIONS) {
      const r = await plugin({ CNI_COMMAND: 'VERSION' }, JSON.stringify({ cniVersion: v }));
      ok(r);
      expect(JSON.parse(r.stdout)).toEqual({ cniVersion: v, supportedVersions: ['0.3.0', '0.3.1', '0.4.0', '1.0.0', '1.1.0'] });
    }
    // Runtimes before 1.1.0 send nothing on stdin for VERSION.
    const bare = await plugin({ CNI_COMMAND: 'VERSION' }, '');
    ok(bare);
    expect(JSON.parse(bare.stdout).supportedVersions).toEqual(VERSIONS);
  });

  for (const v of BRIDGE_VERSIONS) {
    it(`cniVersion ${v}: the real bridge + host-local + xmasq chain attaches the pod, passes the result through, and DEL forgets it`, async () => {
      const n = BRIDGE_VERSIONS.indexOf(v);
      const ns = `${ID}-chain${n}`;
      ip('netns', 'add', ns);
      made.push(ns);
      const list: CniConfList = {
        cniVersion: v, name: 'xmasq-cni-test',
        plugins: [
          { type: 'bridge', bridge: `xcbr${n}`, isGateway: true, ipMasq: false, ipam: { type: 'host-local', dataDir: `${TMP}/ipam`, ranges: [[{ subnet: `10.250.${n}.0/24` }]] } },
          { type: 'xmasq', agentSocket: SOCK, required: true },
        ],
      };
      const inv: CniInvocation = { containerId: `chain-${n}`, netns: ns, ifname: 'eth0', path: CNI_PATH, pluginNetns: NODE };
      const result = await cniAdd(list, inv);

      // The bridge's result, in v: [bridge, host veth, eth0 in the sandbox], IPs carrying `version` before 1.0.0.
      expect(result.cniVersion).toBe(v);
      expect(result.interfaces!.map((i) => i.name)[0]).toBe(`xcbr${n}`);
      expect(result.interfaces![2]).toMatchObject({ name: 'eth0', sandbox: `/run/netns/${ns}` });
      const ipc = result.ips![0] as { address: string; version?: string; interface?: number };
      expect(ipc.interface).toBe(2);
      expect(ipc.version).toBe(before1(v) ? '4' : undefined);
      const podIp = ipc.address.split('/')[0];
      const hostVeth = result.interfaces![1].name;
      const eth0 = link(ns, 'eth0');
      expect(link(NODE, hostVeth).ifindex).toBe(eth0.link_index);
      await expectAttached(podIp, hostVeth, eth0.address);

      // CHECK: in 0.4.0+ the whole chain passes; in 0.3.x xmasq refuses it as the spec's code 1.
      if (before1(v) && v !== '0.4.0') {
        cniError(await plugin(envFor('CHECK', { ns, containerId: inv.containerId }), JSON.stringify({ cniVersion: v, name: list.name, type: 'xmasq', agentSocket: SOCK, prevResult: result })), 1);
      } else {
        await cniCheck(list, inv, result);
      }

      // xmasq's DEL alone first, while the veth still exists: the agent must forget the pod
      // because of it, not because the veth vanished. 0.3.x runtimes send no prevResult on DEL.
      const delConf: Record<string, unknown> = { cniVersion: v, name: list.name, type: 'xmasq', agentSocket: SOCK, required: true };
      if (v === '0.4.0' || !before1(v)) delConf.prevResult = result;
      const del = await plugin(envFor('DEL', { ns, containerId: inv.containerId }), JSON.stringify(delConf));
      ok(del);
      expect(del.stdout).toBe('');
      await expectForgotten(podIp);
      // Twice is fine (the spec: DEL for what is gone succeeds).
      ok(await plugin(envFor('DEL', { ns, containerId: inv.containerId }), JSON.stringify(delConf)));
      await cniDel(list, inv, v === '0.4.0' || !before1(v) ? result : undefined);
      expect(existsSync(`/sys/class/net/${hostVeth}`)).toBe(false);
    });
  }

  it('cniVersion 1.1.0: ADD passes the 1.1.0 result through unchanged, CHECK, STATUS and GC succeed, DEL forgets', async () => {
    // Debian's bridge speaks up to 1.0.0, whose result layout 1.1.0 keeps: run it at 1.0.0
    // and hand its result to xmasq as a 1.1.0 runtime would.
    const ns = `${ID}-chain11`;
    ip('netns', 'add', ns);
    made.push(ns);
    const bridgeOnly: CniConfList = {
      cniVersion: '1.0.0', name: 'xmasq-cni-test',
      plugins: [{ type: 'bridge', bridge: 'xcbr11', isGateway: true, ipMasq: false, ipam: { type: 'host-local', dataDir: `${TMP}/ipam`, ranges: [[{ subnet: '10.250.11.0/24' }]] } }],
    };
    const inv: CniInvocation = { containerId: 'chain-11', netns: ns, ifname: 'eth0', path: CNI_PATH, pluginNetns: NODE };
    const bridged = await cniAdd(bridgeOnly, inv);
    const prevResult: CniResult = { ...bridged, cniVersion: '1.1.0', interfaces: bridged.interfaces!.map((i) => (i.sandbox ? { ...i, mtu: 1500 } : i)) };
    const conf = { cniVersion: '1.1.0', name: 'xmasq-cni-test', type: 'xmasq', agentSocket: SOCK, required: true, prevResult };
    const pod = { ns, containerId: inv.containerId };
    const add = await plugin(envFor('ADD', pod), JSON.stringify(conf));
    ok(add);
    expect(JSON.parse(add.stdout)).toEqual(prevResult);
    const podIp = bridged.ips![0].address.split('/')[0];
    await expectAttached(podIp, bridged.interfaces![1].name, link(ns, 'eth0').address);
    ok(await plugin(envFor('CHECK', pod), JSON.stringify(conf)));
    ok(await plugin({ CNI_COMMAND: 'STATUS', CNI_PATH: CNI_PATH.join(':') }, JSON.stringify({ ...conf, prevResult: undefined })));
    ok(await plugin({ CNI_COMMAND: 'GC', CNI_PATH: CNI_PATH.join(':') }, JSON.stringify({ ...conf, prevResult: undefined, 'cni.dev/attachments': [{ containerID: 'chain-11', ifname: 'eth0' }] })));
    ok(await plugin(envFor('DEL', pod), JSON.stringify(conf)));
    await expectForgotten(podIp);
    await cniDel(bridgeOnly, inv, bridged);
  });
});

// ---- prevResult shapes of real CNIs, on veths made by hand ----

type Shape = (p: { ns: string; hostEnd: string; ip: string; mac: string; hostMac: string }) => CniResult;
/** ips[] as a plugin prints them in v: `version` only before 1.0.0. */
type Ip = NonNullable<CniResult['ips']>[number];
const ipsIn = (v: string, ips: Ip[]): Ip[] => ips.map((x) => (before1(v) ? ({ version: '4', ...x } as Ip) : x));

const SHAPES: Record<string, (v: string) => Shape> = {
  // Flannel delegates to bridge: [cni0, host veth, eth0 with sandbox], the IP on interface 2.
  'flannel (bridge)': (v) => (p) => ({
    cniVersion: v,
    interfaces: [{ name: 'cni0', mac: '0a:58:0a:f4:00:01' }, { name: p.hostEnd, mac: p.hostMac }, { name: 'eth0', mac: p.mac, sandbox: `/run/netns/${p.ns}` }],
    ips: ipsIn(v, [{ address: `${p.ip}/24`, gateway: '10.251.0.1', interface: 2 }]),
    routes: [{ dst: '0.0.0.0/0', gw: '10.251.0.1' }],
    dns: {},
  }),
  // Calico for Kubernetes (v3.2x+): only the host-side cali… interface, carrying the
  // container's MAC and CNI_NETNS as its sandbox; no interface index, no gateway.
  'calico (k8s)': (v) => (p) => ({
    cniVersion: v,
    interfaces: [{ name: p.hostEnd, mac: p.mac, mtu: 1450, sandbox: `/run/netns/${p.ns}` }],
    ips: ipsIn(v, [{ address: `${p.ip}/32` }]),
    dns: {},
  }),
  // Older Calico: the cali… name alone.
  'calico (old)': (v) => (p) => ({ cniVersion: v, interfaces: [{ name: p.hostEnd }], ips: ipsIn(v, [{ address: `${p.ip}/32` }]), dns: {} }),
  // Calico's non-Kubernetes path: the endpoint name ("eth0") in the sandbox field of the host interface.
  'calico (endpoint as sandbox)': (v) => (p) => ({ cniVersion: v, interfaces: [{ name: p.hostEnd, sandbox: 'eth0' }], ips: ipsIn(v, [{ address: `${p.ip}/32` }]) }),
  // Antrea: [host interface, container interface], the IP on interface 1.
  antrea: (v) => (p) => ({
    cniVersion: v,
    interfaces: [{ name: p.hostEnd, mac: p.hostMac }, { name: 'eth0', mac: p.mac, sandbox: `/run/netns/${p.ns}` }],
    ips: ipsIn(v, [{ address: `${p.ip}/24`, gateway: '10.251.0.1', interface: 1 }]),
    routes: [{ dst: '0.0.0.0/0' }],
  }),
  // No host interface at all (a plugin that lists only what it put in the sandbox): found from eth0's peer.
  'container side only': (v) => (p) => ({
    cniVersion: v,
    interfaces: [{ name: 'eth0', mac: p.mac, sandbox: `/run/netns/${p.ns}` }],
    ips: ipsIn(v, [{ address: `${p.ip}/24`, interface: 0 }]),
  }),
  // A host interface name that is not there (renamed by a later plugin, say): found from eth0's peer.
  'stale host name': (v) => (p) => ({
    cniVersion: v,
    interfaces: [{ name: 'caligone0000' }, { name: 'eth0', sandbox: `/run/netns/${p.ns}` }],
    ips: ipsIn(v, [{ address: `${p.ip}/24`, interface: 1 }]),
  }),
};

describe('xmasq CNI plugin: prevResult shapes', () => {
  const names = Object.keys(SHAPES);
  for (const [s, name] of names.entries()) {
    it(`${name}: ADD gives the agent the right veth and MAC and passes prevResult through, in every version; DEL forgets`, async () => {
      const p = vethPod(`shape${s}`, `cali${s}${ID}`.slice(0, 15), `10.251.${s}.5`, `0a:58:0a:fb:0${s}:05`);
      const hostMac = link(NODE, p.hostEnd).address;
      for (const [k, v] of VERSIONS.entries()) {
        const prevResult = SHAPES[name](v)({ ...p, hostMac });
        const conf = { cniVersion: v, name: 'shapes', type: 'xmasq', agentSocket: SOCK, required: true, prevResult };
        const add = await plugin(envFor('ADD', p), JSON.stringify(conf));
        ok(add);
        expect(JSON.parse(add.stdout), v).toEqual(prevResult);
        await expectAttached(p.ip, p.hostEnd, p.mac);
        // Half the DELs without prevResult (0.3.x runtimes never send one, later ones may not have it).
        const del = await plugin(envFor('DEL', p), JSON.stringify(k % 2 ? { ...conf, prevResult: undefined } : conf));
        ok(del);
        await expectForgotten(p.ip);
      }
    });
  }

  it('a prevResult in the other layout is printed in the config\'s version (ips[].version added before 1.0.0, dropped from 1.0.0)', async () => {
    const p = vethPod('layout', `xclay${process.pid}`.slice(0, 15), '10.252.0.5', '0a:58:0a:fc:00:05');
    const base = { interfaces: [{ name: p.hostEnd }, { name: 'eth0', mac: p.mac, sandbox: `/run/netns/${p.ns}` }] };
    const old = await plugin(envFor('ADD', p), JSON.stringify({ cniVersion: '0.3.1', name: 'l', agentSocket: SOCK, required: true, prevResult: { cniVersion: '0.3.1', ...base, ips: [{ address: `${p.ip}/24`, interface: 1 }] } }));
    ok(old);
    expect(JSON.parse(old.stdout).ips).toEqual([{ address: `${p.ip}/24`, interface: 1, version: '4' }]);
    await expectAttached(p.ip, p.hostEnd, p.mac);
    const modern = await plugin(envFor('ADD', p), JSON.stringify({ cniVersion: '1.0.0', name: 'l', agentSocket: SOCK, required: true, prevResult: { cniVersion: '1.0.0', ...base, ips: [{ version: '4', address: `${p.ip}/24`, interface: 1 }] } }));
    ok(modern);
    expect(JSON.parse(modern.stdout).ips).toEqual([{ address: `${p.ip}/24`, interface: 1 }]);
    ok(await plugin(envFor('DEL', p), JSON.stringify({ cniVersion: '1.0.0', name: 'l', agentSocket: SOCK })));
    await expectForgotten(p.ip);
  });

  it('an IPv6-only pod is passed through untouched, even with "required"', async () => {
    const p = vethPod('v6', `xcv6${process.pid}`.slice(0, 15), '10.252.1.5', '0a:58:0a:fc:01:05');
    const prevResult = { cniVersion: '1.0.0', interfaces: [{ name: p.hostEnd }, { name: 'eth0', sandbox: `/run/netns/${p.ns}` }], ips: [{ address: 'fd00::5/64', interface: 1 }] };
    const r = await plugin(envFor('ADD', p), JSON.stringify({ cniVersion: '1.0.0', name: 'v6', agentSocket: SOCK, required: true, prevResult }));
    ok(r);
    expect(JSON.parse(r.stdout)).toEqual(prevResult);
    expect(r.stderr).toContain('IPv4 only');
  });
});

// ---- DEL when things are gone ----

describe('xmasq CNI plugin: DEL when the pod or the agent is gone', () => {
  it('DEL with neither prevResult nor netns left finds the pod in the agent by its netns; then succeeds when nothing is left', async () => {
    const p = vethPod('gone', `xcgone${process.pid}`.slice(0, 15), '10.252.2.5', '0a:58:0a:fc:02:05');
    const prevResult = SHAPES.antrea('0.3.0')({ ...p, hostMac: link(NODE, p.hostEnd).address });
    ok(await plugin(envFor('ADD', p), JSON.stringify({ cniVersion: '0.3.0', name: 'g', agentSocket: SOCK, required: true, prevResult })));
    await expectAttached(p.ip, p.hostEnd, p.mac);
    // The netns file is still named in CNI_NETNS but now empty of eth0: the runtime tore the sandbox down.
    ip('-n', p.ns, 'link', 'del', 'eth0');
    const del = await plugin(envFor('DEL', p), JSON.stringify({ cniVersion: '0.3.0', name: 'g', agentSocket: SOCK, required: true }));
    ok(del);
    await expectForgotten(p.ip);
    // The netns itself gone, and no CNI_NETNS at all (both allowed on DEL).
    ip('netns', 'del', p.ns);
    ok(await plugin(envFor('DEL', p), JSON.stringify({ cniVersion: '0.3.0', name: 'g', agentSocket: SOCK, required: true })));
    ok(await plugin({ ...envFor('DEL', p), CNI_NETNS: undefined }, JSON.stringify({ cniVersion: '1.0.0', name: 'g', agentSocket: SOCK, required: true, prevResult })));
  });

  it('DEL with prevResult succeeds when no agent runs, "required" or not', async () => {
    const p = vethPod('noagent', `xcna${process.pid}`.slice(0, 15), '10.252.3.5', '0a:58:0a:fc:03:05');
    const prevResult = SHAPES['calico (k8s)']('1.0.0')({ ...p, hostMac: '' });
    for (const required of [false, true]) {
      const r = await plugin(envFor('DEL', p), JSON.stringify({ cniVersion: '1.0.0', name: 'n', agentSocket: `${TMP}/nobody.sock`, required, prevResult }));
      ok(r);
      expect(r.stderr).toContain('no agent listens');
    }
  });
});

// ---- agents that are absent, dead, silent, babbling or refusing ----

describe('xmasq CNI plugin: agent trouble', () => {
  interface Trouble { name: string; path: () => string; code: number; delFailsWhenRequired: boolean }
  const servers: Server[] = [];
  const troubles: Trouble[] = [
    { name: 'no socket', path: () => `${TMP}/absent.sock`, code: 11, delFailsWhenRequired: false },
    { name: 'stale socket of a dead agent (ECONNREFUSED)', path: () => `${TMP}/dead.sock`, code: 11, delFailsWhenRequired: false },
    { name: 'silent agent', path: () => `${TMP}/silent.sock`, code: 11, delFailsWhenRequired: true },
    { name: 'agent answering garbage', path: () => `${TMP}/garbage.sock`, code: 101, delFailsWhenRequired: true },
    { name: 'agent answering JSON that is not the protocol', path: () => `${TMP}/shape.sock`, code: 101, delFailsWhenRequired: true },
    { name: 'agent refusing (ok: false)', path: () => `${TMP}/refusing.sock`, code: 100, delFailsWhenRequired: true },
  ];
  let p: ReturnType<typeof vethPod>;

  beforeAll(async () => {
    await staleSocketOfDeadAgent(`${TMP}/dead.sock`);
    servers.push(await silentAgentStandIn(`${TMP}/silent.sock`));
    servers.push(await garbageAgentStandIn(`${TMP}/garbage.sock`));
    servers.push(await wrongShapeAgentStandIn(`${TMP}/shape.sock`));
    servers.push(await refusingAgentStandIn(`${TMP}/refusing.sock`));
    p = vethPod('trouble', `xctr${process.pid}`.slice(0, 15), '10.252.4.5', '0a:58:0a:fc:04:05');
  });
  afterAll(async () => {
    for (const s of servers) await new Promise((r) => s.close(r));
  });

  for (const [k, t] of troubles.entries()) {
    it(`${t.name}: "required": false passes prevResult through and logs; true fails ADD and CHECK with code ${t.code}`, async () => {
      const v = VERSIONS[k % VERSIONS.length];
      const checkV = before1(v) && v !== '0.4.0' ? '1.0.0' : v;
      const prev = (ver: string) => SHAPES.antrea(ver)({ ...p, hostMac: link(NODE, p.hostEnd).address });
      const conf = (ver: string, required: boolean) => JSON.stringify({ cniVersion: ver, name: 't', type: 'xmasq', agentSocket: t.path(), agentTimeoutMs: 400, required, prevResult: prev(ver) });

      const open = await plugin(envFor('ADD', p), conf(v, false));
      ok(open);
      expect(JSON.parse(open.stdout)).toEqual(prev(v));
      expect(open.stderr).toMatch(/stays on the overlay/);
      ok(await plugin(envFor('CHECK', p), conf(checkV, false)));
      ok(await plugin(envFor('DEL', p), conf(v, false)));

      const closed = await plugin(envFor('ADD', p), conf(v, true));
      expect(cniError(closed, t.code).cniVersion).toBe(v);
      cniError(await plugin(envFor('CHECK', p), conf(checkV, true)), t.code);
      const del = await plugin(envFor('DEL', p), conf(v, true));
      if (t.delFailsWhenRequired) cniError(del, t.code);
      else ok(del);
      // STATUS (1.1.0) reports the agent missing only when ADD would fail for it.
      const status = (required: boolean) => plugin({ CNI_COMMAND: 'STATUS', CNI_PATH: CNI_PATH.join(':') }, JSON.stringify({ cniVersion: '1.1.0', name: 't', agentSocket: t.path(), agentTimeoutMs: 400, required }));
      ok(await status(false));
      cniError(await status(true), 50);
    });
  }

  it('the real agent is judged healthy by the same rules: STATUS and CHECK pass, CHECK fails for a pod it does not hold', async () => {
    const prevResult = SHAPES.antrea('1.0.0')({ ...p, hostMac: link(NODE, p.hostEnd).address });
    const conf = { cniVersion: '1.0.0', name: 't', type: 'xmasq', agentSocket: SOCK, required: true, prevResult };
    cniError(await plugin(envFor('CHECK', p), JSON.stringify(conf)), 103);
    ok(await plugin(envFor('ADD', p), JSON.stringify(conf)));
    ok(await plugin(envFor('CHECK', p), JSON.stringify(conf)));
    ok(await plugin({ CNI_COMMAND: 'STATUS', CNI_PATH: '/usr/lib/cni' }, JSON.stringify({ ...conf, cniVersion: '1.1.0', prevResult: undefined })));
    ok(await plugin(envFor('DEL', p), JSON.stringify(conf)));
    await expectForgotten(p.ip);
  });
});

// ---- what a runtime (or anything else) may put in env and on stdin ----

describe('xmasq CNI plugin: bad input', () => {
  const pod: PodRef = { ns: 'nowhere', containerId: 'bad-input' };
  const good = { cniVersion: '1.0.0', name: 'bad', type: 'xmasq', agentSocket: '/nonexistent/agent.sock' };
  const cases: Array<[string, Record<string, string | undefined>, string, number]> = [
    ['stdin "null"', envFor('ADD', pod), 'null', 6],
    ['empty stdin', envFor('ADD', pod), '', 6],
    ['an array', envFor('ADD', pod), '[]', 6],
    ['a number', envFor('DEL', pod), '42', 6],
    ['truncated JSON', envFor('ADD', pod), JSON.stringify(good).slice(0, 20), 6],
    ['cniVersion a number', envFor('ADD', pod), JSON.stringify({ ...good, cniVersion: 1 }), 7],
    ['cniVersion 0.2.0', envFor('ADD', pod), JSON.stringify({ ...good, cniVersion: '0.2.0' }), 1],
    ['cniVersion 2.0.0', envFor('DEL', pod), JSON.stringify({ ...good, cniVersion: '2.0.0' }), 1],
    ['no cniVersion (0.1.0 to libcni)', envFor('ADD', pod), JSON.stringify({ ...good, cniVersion: undefined }), 1],
    ['no name', envFor('ADD', pod), JSON.stringify({ ...good, name: undefined }), 7],
    ['required "yes"', envFor('ADD', pod), JSON.stringify({ ...good, required: 'yes' }), 7],
    ['agentSocket a number', envFor('DEL', pod), JSON.stringify({ ...good, agentSocket: 5 }), 7],
    ['agentTimeoutMs -1', envFor('ADD', pod), JSON.stringify({ ...good, agentTimeoutMs: -1 }), 7],
    ['prevResult a string', envFor('ADD', pod), JSON.stringify({ ...good, prevResult: 'x' }), 7],
    ['ADD without prevResult', envFor('ADD', pod), JSON.stringify(good), 7],
    ['prevResult.interfaces a string, required', envFor('ADD', pod), JSON.stringify({ ...good, required: true, prevResult: { interfaces: 'eth0', ips: [{ address: '10.9.9.9/24' }] } }), 102],
    ['no CNI_COMMAND', envFor(undefined, pod), JSON.stringify(good), 4],
    ['unknown CNI_COMMAND', envFor('FROB', pod), JSON.stringify(good), 4],
    ['lower-case add', envFor('add', pod), JSON.stringify(good), 4],
    ['ADD without CNI_NETNS', { ...envFor('ADD', pod), CNI_NETNS: undefined }, JSON.stringify(good), 4],
    ['DEL without CNI_CONTAINERID', { ...envFor('DEL', pod), CNI_CONTAINERID: undefined }, JSON.stringify(good), 4],
    ['CNI_IFNAME with a slash', envFor('ADD', pod, 'eth/0'), JSON.stringify(good), 4],
    ['CNI_CONTAINERID with a space', { ...envFor('ADD', pod), CNI_CONTAINERID: 'a b' }, JSON.stringify(good), 4],
    ['CHECK in 0.3.0', envFor('CHECK', pod), JSON.stringify({ ...good, cniVersion: '0.3.0' }), 1],
    ['CHECK in 0.3.1', envFor('CHECK', pod), JSON.stringify({ ...good, cniVersion: '0.3.1' }), 1],
    ['CHECK without prevResult', envFor('CHECK', pod), JSON.stringify(good), 7],
    ['STATUS in 1.0.0', { CNI_COMMAND: 'STATUS' }, JSON.stringify(good), 1],
    ['GC in 0.4.0', { CNI_COMMAND: 'GC' }, JSON.stringify({ ...good, cniVersion: '0.4.0' }), 1],
  ];
  for (const [name, env, stdin, code] of cases) {
    it(`${name}: a CNI error with code ${code}`, async () => {
      cniError(await plugin(env, stdin), code);
    });
  }

  it('fuzzed stdin (random bytes, truncated and mistyped configs) through the real process: a result or a CNI error, never a crash', async () => {
    const inputs = fc.sample(stdinArb(), { numRuns: 36, seed: 14 });
    const cmds = ['ADD', 'DEL', 'CHECK', 'GC', 'STATUS'];
    // Two at a time: the machine has two cores.
    for (let i = 0; i < inputs.length; i += 2) {
      await Promise.all(inputs.slice(i, i + 2).map(async (input, j) => {
        const cmd = cmds[(i + j) % cmds.length];
        expectWellFormed(await plugin(envFor(cmd, pod), input), cmd, input);
      }));
    }
  });

  it('fuzzed env and stdin in-process (the same code the process runs), many more cases', async () => {
    await fc.assert(fc.asyncProperty(
      fc.constantFrom('ADD', 'DEL', 'CHECK', 'VERSION', 'GC', 'STATUS', undefined, '', 'add', 'ADD '),
      fc.option(fc.string(), { nil: undefined }), fc.option(fc.string(), { nil: undefined }),
      stdinArb(),
      async (cmd, containerId, ifname, input) => {
        const log: string[] = [];
        const out = await runCni({
          env: { CNI_COMMAND: cmd, CNI_CONTAINERID: containerId, CNI_NETNS: '/nonexistent/netns', CNI_IFNAME: ifname },
          stdin: typeof input === 'string' ? input : Buffer.from(input).toString('utf8'),
          log: (l) => log.push(l),
        });
        expectWellFormed({ code: out.exitCode, stdout: out.stdout ? `${out.stdout}\n` : '', stderr: log.join('\n') }, cmd ?? '', input);
      },
    ), { numRuns: 400, seed: 14 });
  });
});

const sampleConf = {
  cniVersion: '0.4.0', name: 'fuzz', type: 'xmasq', agentSocket: '/nonexistent/agent.sock', required: true, agentTimeoutMs: 300,
  prevResult: { cniVersion: '0.4.0', interfaces: [{ name: 'veth0' }, { name: 'eth0', sandbox: '/nonexistent/netns' }], ips: [{ version: '4', address: '10.1.2.3/24', interface: 1 }] },
};

/** Bytes and strings a broken or hostile caller might send. */
function stdinArb(): fc.Arbitrary<string | Uint8Array> {
  const text = JSON.stringify(sampleConf);
  const paths: string[][] = [['cniVersion'], ['name'], ['agentSocket'], ['required'], ['agentTimeoutMs'], ['prevResult'], ['prevResult', 'interfaces'], ['prevResult', 'ips'], ['prevResult', 'interfaces', '1'], ['prevResult', 'ips', '0', 'address'], ['prevResult', 'ips', '0', 'interface']];
  const mistyped = fc.tuple(fc.constantFrom(...paths), fc.anything()).map(([path, value]) => {
    const c = JSON.parse(text) as Record<string, unknown>;
    let o = c as Record<string, unknown>;
    for (const key of path.slice(0, -1)) o = o[key] as Record<string, unknown>;
    o[path[path.length - 1]] = value;
    return JSON.stringify(c) ?? 'undefined';
  });
  return fc.oneof(
    fc.uint8Array({ maxLength: 300 }),
    fc.nat({ max: text.length }).map((n) => text.slice(0, n)),
    mistyped,
    fc.json(),
    fc.constantFrom('null', 'true', '""', '{}', '[]', '{"cniVersion":null}', '\u0000', '{"__proto__":{"cniVersion":"1.0.0"}}'),
  );
}

/** exit 0 with nothing or one JSON object in a supported version on stdout, or a CNI error; no stack. */
function expectWellFormed(r: Ran, cmd: string, input: unknown): void {
  const why = `CNI_COMMAND=${cmd} stdin=${JSON.stringify(typeof input === 'string' ? input : Array.from(input as Uint8Array))}\nstdout ${r.stdout}\nstderr ${r.stderr}`;
  expect(r.stdout + r.stderr, why).not.toMatch(STACK);
  expect(r.stdout, why).not.toContain('xmasq plugin bug');
  if (r.code === 0) {
    if (r.stdout.trim() === '') return;
    const o = JSON.parse(r.stdout) as { cniVersion?: unknown };
    expect(VERSIONS, why).toContain(o.cniVersion);
  } else {
    expect(r.code, why).toBe(1);
    const e = JSON.parse(r.stdout) as { cniVersion: unknown; code: unknown; msg: unknown };
    expect(VERSIONS, why).toContain(e.cniVersion);
    expect(Number.isInteger(e.code), why).toBe(true);
    expect(typeof e.msg, why).toBe('string');
  }
}
