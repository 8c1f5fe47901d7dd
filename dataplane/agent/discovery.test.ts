/**
 * Pod discovery (discovery.ts): survey() against real veths and network
 * namespaces, hostile pods included, and planDiscovery()'s rules.
 *
 * The topology: a "host" netns with nic0 (a veth to a "wire" netns, as in the
 * lab), a bridge cni0 10.244.9.1/24 with pods on it (Flannel's shape), one
 * pod on a routed veth of its own (Calico's), a route to a remote pod subnet
 * through nic0, and veths that are no pods.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { planDiscovery, survey, type Finding, type FoundPod, type HeldPod } from './discovery.ts';
import { requireRoot } from '../../testing/privileges.ts';

const ID = `xdt${process.pid}`;
const HOST = `${ID}-host`;
const WIRE = `${ID}-wire`;
const PODS = ['p1', 'p2', 'p3', 'p4', 'p5', 'p6', 'p7'] as const;
const nsOf = (pod: string) => `${ID}-${pod}`;

const ip = (...args: string[]) => execFileSync('ip', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const inHost = (...args: string[]) => ip('-n', HOST, ...args);

function mac(ns: string, dev: string): string {
  return (JSON.parse(ip('-n', ns, '-j', 'link', 'show', dev)) as Array<{ address: string }>)[0].address;
}

function ifindexIn(ns: string, dev: string): number {
  return (JSON.parse(ip('-n', ns, '-j', 'link', 'show', dev)) as Array<{ ifindex: number }>)[0].ifindex;
}

/** A pod netns whose eth0 is a veth to hostEnd in the host netns; on cni0 unless routed. */
function makePod(pod: string, hostEnd: string, addrs: string[], opts: { routed?: boolean } = {}): void {
  const ns = nsOf(pod);
  ip('netns', 'add', ns);
  ip('link', 'add', hostEnd, 'netns', HOST, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns);
  for (const a of addrs) ip('-n', ns, 'addr', 'add', a, 'dev', 'eth0');
  ip('-n', ns, 'link', 'set', 'eth0', 'up');
  if (!opts.routed) inHost('link', 'set', hostEnd, 'master', 'cni0');
  inHost('link', 'set', hostEnd, 'up');
}

function teardown(): void {
  for (const ns of [HOST, WIRE, ...PODS.map(nsOf)]) {
    try {
      ip('netns', 'del', ns);
    } catch {
      // never created, or gone already
    }
  }
}

let holder: ChildProcess | undefined;
let findings: Finding[] = [];
const at = (veth: string) => findings.find((f) => f.veth.name === veth);

describe('survey: the pods behind a host\'s veths', () => {
  beforeAll(async () => {
    requireRoot(import.meta.url, 'network namespaces');
    teardown();
    ip('netns', 'add', HOST);
    ip('netns', 'add', WIRE);
    ip('link', 'add', 'nic0', 'netns', HOST, 'type', 'veth', 'peer', 'name', 'wire0', 'netns', WIRE);
    inHost('addr', 'add', '192.168.79.1/24', 'dev', 'nic0');
    inHost('link', 'set', 'nic0', 'up');
    inHost('route', 'add', 'default', 'via', '192.168.79.254');
    // Another host's pods, as flannel routes them (here through the NIC).
    inHost('route', 'add', '10.244.8.0/24', 'via', '192.168.79.2');
    inHost('link', 'add', 'cni0', 'type', 'bridge');
    inHost('addr', 'add', '10.244.9.1/24', 'dev', 'cni0');
    inHost('link', 'set', 'cni0', 'up');

    makePod('p1', 'vp1', ['10.244.9.5/24']);
    // renames its interface
    makePod('p2', 'vp2', ['10.244.9.6/24']);
    ip('-n', nsOf('p2'), 'link', 'set', 'eth0', 'down');
    ip('-n', nsOf('p2'), 'link', 'set', 'eth0', 'name', 'not-eth0');
    ip('-n', nsOf('p2'), 'link', 'set', 'not-eth0', 'up');
    // adds its neighbour's address to its own
    makePod('p3', 'vp3', ['10.244.9.7/24', '10.244.9.5/32']);
    // holds only its neighbour's address
    makePod('p4', 'vp4', ['10.244.9.5/32']);
    // claims a pod of another host
    makePod('p5', 'vp5', ['10.244.8.9/24']);
    // a routed pod (Calico): a /32 and the host's route through its veth
    makePod('p6', 'cali6', ['10.244.10.6/32'], { routed: true });
    inHost('route', 'add', '10.244.10.6/32', 'dev', 'cali6', 'scope', 'link');
    // claims the bridge's own address
    makePod('p7', 'vp7', ['10.244.9.1/32']);
    // a veth pair inside the host netns, with a pod-looking address
    inHost('link', 'add', 'vh0', 'type', 'veth', 'peer', 'name', 'vh1');
    inHost('addr', 'add', '10.244.9.20/32', 'dev', 'vh1');
    inHost('link', 'set', 'vh0', 'master', 'cni0');
    // a namespace no file under /run/netns names: only its process holds it
    holder = spawn('unshare', ['--net', 'sleep', '120'], { stdio: 'ignore' });
    await new Promise((r) => setTimeout(r, 300));
    ip('link', 'add', 'vproc', 'netns', HOST, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', String(holder.pid));
    execFileSync('nsenter', [`--net=/proc/${holder.pid}/ns/net`, 'ip', 'addr', 'add', '10.244.9.30/24', 'dev', 'eth0']);
    inHost('link', 'set', 'vproc', 'master', 'cni0', 'up');

    findings = await survey({ nicIfindex: ifindexIn(HOST, 'nic0'), hostNetns: `/run/netns/${HOST}` });
  }, 30_000);

  afterAll(() => {
    holder?.kill('SIGKILL');
    teardown();
  });

  it('lists every veth but the NIC, in ifindex order', () => {
    expect(findings.map((f) => f.veth.name).sort()).toEqual(['cali6', 'vh0', 'vh1', 'vp1', 'vp2', 'vp3', 'vp4', 'vp5', 'vp7', 'vproc'].sort());
    expect(findings.map((f) => f.veth.ifindex)).toEqual([...findings.map((f) => f.veth.ifindex)].sort((x, y) => x - y));
  });

  it('a pod on the bridge: its address, its eth0\'s MAC, its netns and veth', () => {
    expect(at('vp1')).toEqual({
      veth: { ifindex: ifindexIn(HOST, 'vp1'), name: 'vp1', master: 'cni0' },
      pod: { ip: '10.244.9.5', mac: mac(nsOf('p1'), 'eth0'), hostVethIfindex: ifindexIn(HOST, 'vp1'), hostVeth: 'vp1', netns: `/run/netns/${nsOf('p1')}`, ifname: 'eth0' },
    });
  });

  it('a pod that renamed its interface is found by ifindex, under its new name', () => {
    expect(at('vp2')).toMatchObject({ pod: { ip: '10.244.9.6', mac: mac(nsOf('p2'), 'not-eth0'), ifname: 'not-eth0' } });
  });

  it('a routed pod (its own /32 route through its veth, no bridge) is found', () => {
    expect(at('cali6')).toMatchObject({ pod: { ip: '10.244.10.6', hostVeth: 'cali6', netns: `/run/netns/${nsOf('p6')}` } });
  });

  it('a namespace only a process holds is found through /proc', () => {
    expect(at('vproc')).toMatchObject({ pod: { ip: '10.244.9.30', netns: `/proc/${holder!.pid}/ns/net` } });
  });

  it('a pod with several addresses is no pod: which one is its own cannot be told', () => {
    expect(at('vp3')).toMatchObject({ skipped: expect.stringMatching(/has 2 IPv4 addresses \(10\.244\.9\.7, 10\.244\.9\.5\)/) });
  });

  it('an address the host routes elsewhere, or its own, is no pod of this host', () => {
    expect(at('vp5')).toMatchObject({ skipped: expect.stringMatching(/10\.244\.8\.9, which this host routes through nic0 via 192\.168\.79\.2/) });
    expect(at('vp7')).toMatchObject({ skipped: expect.stringMatching(/10\.244\.9\.1, which is a local address of this host/) });
  });

  it('a veth whose peer is in the host netns is no pod, whatever address it carries', () => {
    expect(at('vh0')).toMatchObject({ skipped: 'its peer is in this network namespace: no pod' });
    expect(at('vh1')).toMatchObject({ skipped: 'its peer is in this network namespace: no pod' });
  });

  it('a pod holding only its neighbour\'s address is found, and the plan serves neither of the two', () => {
    expect(at('vp4')).toMatchObject({ pod: { ip: '10.244.9.5', hostVeth: 'vp4' } });
    const plan = planDiscovery(findings, [], () => undefined);
    expect(plan.serve.map((p) => p.hostVeth).sort()).toEqual(['cali6', 'vp2', 'vproc']);
    expect(plan.ignored.map((x) => [x.pod.hostVeth, x.why])).toEqual([
      ['vp1', '10.244.9.5 is claimed by several veths (vp1, vp4): none is served'],
      ['vp4', '10.244.9.5 is claimed by several veths (vp1, vp4): none is served'],
    ]);
  });
});

// ---------------------------------------------------------------------------

const veth = (ifindex: number, name = `veth${ifindex}`) => ({ ifindex, name, master: 'cni0' });
function pod(ifindex: number, ip: string, mac = `0a:58:00:00:00:${ifindex.toString(16).padStart(2, '0')}`): Finding & { pod: FoundPod } {
  return { veth: veth(ifindex), pod: { ip, mac, hostVethIfindex: ifindex, hostVeth: `veth${ifindex}`, netns: `/run/netns/pod${ifindex}`, ifname: 'eth0' } };
}
function held(ifindex: number, ip: string, discovered: boolean, mac = `0a:58:00:00:00:${ifindex.toString(16).padStart(2, '0')}`): HeldPod {
  return { ip, mac, hostVethIfindex: ifindex, hostVeth: `veth${ifindex}`, netns: `/run/netns/pod${ifindex}`, ifname: 'eth0', discovered };
}
const none = () => undefined;

describe('planDiscovery: what is served, dropped and left alone', () => {
  it('serves what no one holds, and leaves pods served already as they are', () => {
    const plan = planDiscovery([pod(5, '10.244.1.5'), pod(6, '10.244.1.6')], [held(6, '10.244.1.6', true)], none);
    expect(plan).toEqual({ serve: [pod(5, '10.244.1.5').pod], drop: [], ignored: [] });
  });

  it('a pod the CNI plugin gave is never dropped or replaced, and keeps its address from any other veth', () => {
    const cni = held(5, '10.244.1.5', false);
    expect(planDiscovery([{ veth: veth(5), skipped: 'several addresses' }], [cni], none)).toEqual({ serve: [], drop: [], ignored: [] });
    expect(planDiscovery([pod(5, '10.244.1.9')], [cni], none).ignored.map((x) => x.why)).toEqual(['veth5 serves pod 10.244.1.5, which the CNI plugin gave']);
    expect(planDiscovery([pod(5, '10.244.1.5', '0a:58:99:99:99:99')], [cni], none).serve).toEqual([]);
    const thief = planDiscovery([pod(5, '10.244.1.5'), pod(7, '10.244.1.5')], [cni], none);
    expect(thief.serve).toEqual([]);
    expect(thief.drop).toEqual([]);
    const alone = planDiscovery([pod(7, '10.244.1.5')], [cni], none);
    expect(alone.ignored.map((x) => x.why)).toEqual(['10.244.1.5 belongs to the pod on veth5, which the CNI plugin gave']);
  });

  it('a discovered pod goes once its veth holds something else, not while its veth cannot be read or is gone', () => {
    const d = held(5, '10.244.1.5', true);
    expect(planDiscovery([pod(5, '10.244.1.8')], [d], none)).toMatchObject({
      drop: [{ ip: '10.244.1.5', why: 'the peer of its veth veth5 now has 10.244.1.8' }], serve: [pod(5, '10.244.1.8').pod],
    });
    expect(planDiscovery([{ veth: veth(5), skipped: 'eth0 has 2 IPv4 addresses' }], [d], none).drop)
      .toEqual([{ ip: '10.244.1.5', hostVeth: 'veth5', why: 'its veth veth5: eth0 has 2 IPv4 addresses' }]);
    expect(planDiscovery([pod(5, '10.244.1.5'), pod(7, '10.244.1.5')], [d], none).drop.map((x) => x.why)).toEqual(['10.244.1.5 is claimed by several veths (veth5, veth7)']);
    expect(planDiscovery([{ veth: veth(5), unreadable: 'nsenter timed out' }], [d], none).drop).toEqual([]);
    expect(planDiscovery([], [d], none).drop).toEqual([]);
    // ifindex 5 now names another device: the old veth is gone, which the agent's scan handles.
    expect(planDiscovery([{ veth: veth(5, 'other'), skipped: 'x' }], [d], none).drop).toEqual([]);
  });

  it('a discovered pod follows its MAC, netns and interface name; its address passes to a new veth once its own veth is gone, not while it is unreadable', () => {
    const d = held(5, '10.244.1.5', true);
    expect(planDiscovery([pod(5, '10.244.1.5', '0a:58:99:99:99:99')], [d], none).serve).toEqual([pod(5, '10.244.1.5', '0a:58:99:99:99:99').pod]);
    // Adopted from pod_info without a state file: no netns or interface name yet.
    const { netns: _n, ifname: _i, ...adopted } = d;
    expect(planDiscovery([pod(5, '10.244.1.5')], [adopted], none).serve).toEqual([pod(5, '10.244.1.5').pod]);
    expect(planDiscovery([pod(9, '10.244.1.5')], [d], none).serve).toEqual([pod(9, '10.244.1.5').pod]);
    const unread = planDiscovery([{ veth: veth(5), unreadable: 'gone meanwhile' }, pod(9, '10.244.1.5')], [d], none);
    expect(unread.serve).toEqual([]);
    expect(unread.ignored.map((x) => x.why)).toEqual(['10.244.1.5 is held by the pod on veth5, which could not be read this time']);
  });

  it('a pod a DEL just removed is left alone, as deletedWhy says', () => {
    const plan = planDiscovery([pod(5, '10.244.1.5'), pod(6, '10.244.1.6')], [], (p) => (p.ip === '10.244.1.5' ? 'a DEL removed it' : undefined));
    expect(plan.serve).toEqual([pod(6, '10.244.1.6').pod]);
    expect(plan.ignored).toEqual([{ pod: pod(5, '10.244.1.5').pod, why: 'a DEL removed it' }]);
  });
});
