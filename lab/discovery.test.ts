/**
 * Pod discovery in the lab: pods come from the CNI chain bridge + host-local
 * alone (no xmasq plugin), as on a cluster XMasq is installed on, or while
 * its agent is down. The agents find them on their hosts' veths, serve them,
 * and purge what went while they were down.
 */
import type { ChildProcess } from 'node:child_process';
import { rmSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentClient, type PodRecord } from '../dataplane/agent/protocol.ts';
import { monotonicCoarseNs } from '../dataplane/agent/native.ts';
import { BpfMap } from '../dataplane/libbpf.ts';
import { NO_HOST_NETNS, egressKey, path, podInfo, podIp } from '../dataplane/maps.ts';
import type { LabAgents } from './agents.ts';
import { labWithAgents } from './fixture.ts';
import type { Lab, LabPod } from './lab.ts';
import { UDP_ECHO, UDP_ROUND_TRIPS, nodeIn, output, server } from './traffic.ts';
import { until } from '../testing/until.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'network namespaces, BPF');

const name = `xd${process.pid % 100000}`;
const runDir = `/run/xmasq-discovery-${name}`;
const PORT = 5353;
/** Short idle limits, so that the peer retires a pair learned by a deleted pod soon (lab/stale.test.ts). */
const AGENT_ARGS = ['--egress-idle', '3', '--ingress-idle', '5', '--scan-interval', '0.5', '--discover-interval', '1', '--verbose'];

let lab: Lab;
let agents: LabAgents;
let a: LabPod, b: LabPod, e: LabPod;
const echoes: ChildProcess[] = [];

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const list = async (host: string): Promise<PodRecord[]> => (await AgentClient.request(agents.socket(host), { op: 'list' })).pods;
const status = async (host: string) => (await AgentClient.request(agents.socket(host), { op: 'status' })).status;
const counters = (host: string) => agents.counters(host);


function withPinned<T>(host: string, map: string, fn: (m: BpfMap) => T): T {
  const m = BpfMap.fromPinned(`${agents.pinDir(host)}/${map}`);
  try {
    return fn(m);
  } finally {
    m.close();
  }
}

/** The pod_info entry of an IP on a host, from the pinned map. */
function podInfoOf(host: string, ip: string): { ifindex: number; mac: string } | undefined {
  return withPinned(host, 'pod_info', (m) => {
    const v = m.lookup(podIp.encode({ ip }));
    return v && podInfo.decode(v);
  });
}

/** The egress cache keys of a host whose local pod is ip. */
function egressOf(host: string, ip: string): string[] {
  return withPinned(host, 'egress_cache', (m) => m.keys().map((k) => egressKey.decode(k)).filter((k) => k.local_pod === ip).map((k) => k.remote_pod));
}

/** The live (not tombstoned) ingress entries of a host that restore into ip. */
function liveIngressTo(host: string, ip: string): number {
  return withPinned(host, 'ingress_cache', (m) => m.lookupBatch().map(([, v]) => path.decode(v)).filter((p) => p.ifindex !== 0 && p.local_ip === ip).length);
}

/** What a served pod looks like when discovery found it on its veth. */
function found(pod: LabPod): Partial<PodRecord> {
  return { ip: pod.ip, mac: pod.mac, hostVeth: pod.hostVeth, hostVethIfindex: pod.hostVethIfindex, netns: `/run/netns/${pod.netns}`, ifname: 'eth0', attached: true, discovered: true };
}

const byIp = <T extends Partial<PodRecord>>(pods: T[]) => [...pods].sort((x, y) => String(x.ip).localeCompare(String(y.ip)));

// No xmasq plugin in the chain: no agent is ever told about a pod. The agents start in the tests.
labWithAgents({
  name, runDir, agentArgs: AGENT_ARGS, checksumOffload: true, xmasqPlugin: false, startAgents: false, pods: [['h1', 'a'], ['h1', 'e'], ['h2', 'b']],
}, (f) => ({ lab, agents, pods: [a, e, b] } = f));

beforeAll(async () => {
  echoes.push(await server(lab, b, UDP_ECHO(PORT)));
});

afterAll(() => {
  for (const x of echoes) x.kill();
});

describe('pod discovery: pods the CNI plugin never reported', () => {
  it('--discover-pods off: the agent serves none of the pods already on its host', async () => {
    await agents.start('h1', ['--discover-pods', 'off']);
    expect(await list('h1')).toEqual([]);
    expect((await status('h1')).discovery).toMatchObject({ enabled: false, rounds: 0 });
    expect(podInfoOf('h1', a.ip)).toBeUndefined();
    await agents.stop('h1');
  }, 30_000);

  it('pods created before the agent started are served at its start: pod_info and masq on their veths', async () => {
    await agents.start('h1');
    await agents.start('h2');
    expect(byIp(await list('h1'))).toMatchObject(byIp([a, e].map(found)));
    expect(await list('h2')).toMatchObject([found(b)]);
    for (const [host, pod] of [['h1', a], ['h1', e], ['h2', b]] as const) {
      expect(podInfoOf(host, pod.ip), `${host} pod_info ${pod.ip}`).toEqual({ ifindex: pod.hostVethIfindex, mac: pod.mac, ...NO_HOST_NETNS });
    }
    const masqAt = (await status('h1')).attachments.filter((x) => x.program === 'masq').map((x) => x.dev).sort();
    expect(masqAt).toEqual([a.hostVeth, e.hostVeth].sort());
    expect((await status('h1')).discovery).toMatchObject({ enabled: true, discoveredPods: 2, notServed: [] });
  }, 60_000);

  it('their traffic takes the fast path both ways', async () => {
    const c1 = await counters('h1'), c2 = await counters('h2');
    for (const pod of [a, e]) {
      const r = await output(nodeIn(lab, pod, UDP_ROUND_TRIPS(b.ip, PORT, 15, 100)));
      expect(r.out, pod.name).toContain('udp-echoed 15');
    }
    expect((await counters('h1')).masqueraded).toBeGreaterThan(c1.masqueraded);
    expect((await counters('h1')).restored).toBeGreaterThan(c1.restored);
    expect((await counters('h2')).masqueraded).toBeGreaterThan(c2.masqueraded);
    expect(egressOf('h1', e.ip)).toEqual([b.ip]);
  }, 60_000);

  it('a pod deleted while its agent was down is purged at the restart; its IP, given meanwhile to a new pod, ends with the new pod\'s entry', async () => {
    await agents.stop('h1');
    await lab.deletePod('e');
    await lab.deletePod('a');
    const c = await lab.addPod('h1', 'c', { ip: a.ip });
    expect(c.ip).toBe(a.ip);
    expect(c.mac).not.toBe(a.mac);
    // Until the restart, the pins still hold the deleted pods.
    expect(podInfoOf('h1', e.ip)).toEqual({ ifindex: e.hostVethIfindex, mac: e.mac, ...NO_HOST_NETNS });
    expect(egressOf('h1', e.ip)).toEqual([b.ip]);

    await agents.start('h1');
    expect(await list('h1')).toMatchObject([found(c)]);
    expect(podInfoOf('h1', e.ip)).toBeUndefined();
    expect(egressOf('h1', e.ip)).toEqual([]);
    expect(liveIngressTo('h1', e.ip)).toBe(0);
    expect(podInfoOf('h1', c.ip)).toEqual({ ifindex: c.hostVethIfindex, mac: c.mac, ...NO_HOST_NETNS });

    // c reaches b, and once b's host has retired the pair a learned, on the fast path.
    await until('c to reach b on the fast path', async () => {
      const m0 = (await counters('h1')).masqueraded;
      const r = await output(nodeIn(lab, c, UDP_ROUND_TRIPS(b.ip, PORT, 10, 100)));
      return r.out.includes('udp-echoed 10') && (await counters('h1')).masqueraded > m0;
    }, 30_000);
    expect(podInfoOf('h1', c.ip)).toEqual({ ifindex: c.hostVethIfindex, mac: c.mac, ...NO_HOST_NETNS });
  }, 90_000);

  it('a pod started while the agent runs is found by the next round, and dropped once deleted', async () => {
    const f = await lab.addPod('h1', 'f');
    await until('f to be served', async () => (await list('h1')).some((p) => p.ip === f.ip && p.attached), 5000);
    expect(podInfoOf('h1', f.ip)).toEqual({ ifindex: f.hostVethIfindex, mac: f.mac, ...NO_HOST_NETNS });
    await lab.deletePod('f');
    await until('f to be dropped', async () => !(await list('h1')).some((p) => p.ip === f.ip), 5000);
    expect(podInfoOf('h1', f.ip)).toBeUndefined();
  }, 30_000);

  it('without its state file, the agent keeps only the pinned pod_info entries the host confirms: a stale one is purged', async () => {
    const c = lab.pod('c');
    const stale = '10.244.1.77';
    await agents.stop('h1');
    rmSync(`${runDir}/h1/pods.json`);
    // What a pod deleted long ago would leave if its veth's ifindex had gone to c's veth since.
    withPinned('h1', 'pod_info', (m) => m.update(podIp.encode({ ip: stale }), podInfo.encode({ ifindex: c.hostVethIfindex, mac: '0a:58:0a:f4:01:4d', ...NO_HOST_NETNS })));
    withPinned('h1', 'egress_cache', (m) => m.update(egressKey.encode({ local_pod: stale, remote_pod: b.ip }), path.encode({
      last_seen: monotonicCoarseNs(), local_mac: '02:00:00:00:00:01', remote_mac: '02:00:00:00:00:02', local_ip: lab.host('h1').ip, remote_ip: lab.host('h2').ip,
      ifindex: c.hostVethIfindex, local_key: 0, remote_key: 0, remote_ready: 0,
    })));

    await agents.start('h1');
    expect(await list('h1')).toMatchObject([found(c)]);
    expect(podInfoOf('h1', stale)).toBeUndefined();
    expect(egressOf('h1', stale)).toEqual([]);
    expect(podInfoOf('h1', c.ip)).toEqual({ ifindex: c.hostVethIfindex, mac: c.mac, ...NO_HOST_NETNS });
    expect((await status('h1')).attachments.filter((x) => x.program === 'masq').map((x) => x.dev)).toEqual([c.hostVeth]);
    const r = await output(nodeIn(lab, c, UDP_ROUND_TRIPS(b.ip, PORT, 5, 100)));
    expect(r.out).toContain('udp-echoed 5');
  }, 60_000);

  it('a hostile pod cannot take a neighbour\'s IP: a second address leaves it unserved, the address alone serves neither', async () => {
    const c = lab.pod('c');
    const g = await lab.addPod('h1', 'g');
    await until('g to be served', async () => (await list('h1')).some((p) => p.ip === g.ip), 5000);
    const inG = (...args: string[]) => lab.exec(g, 'ip', args);

    // g adds c's address beside its own (a /32: not a secondary of g's /24, which would go with it below):
    // which one is g's cannot be told, so g is dropped; c stays.
    await inG('addr', 'add', `${c.ip}/32`, 'dev', 'eth0');
    await until('g to be dropped', async () => !(await list('h1')).some((p) => p.ip === g.ip), 5000);
    const notServed = (await status('h1')).discovery.notServed;
    expect(notServed.find((n) => n.hostVeth === g.hostVeth)?.why).toMatch(/2 IPv4 addresses/);
    expect(podInfoOf('h1', c.ip)).toEqual({ ifindex: c.hostVethIfindex, mac: c.mac, ...NO_HOST_NETNS });
    expect(podInfoOf('h1', g.ip)).toBeUndefined();

    // g keeps only c's address: two veths claim it, and neither is served: never g.
    await inG('addr', 'del', `${g.ip}/24`, 'dev', 'eth0');
    await until('c to be dropped as claimed twice', async () => !(await list('h1')).some((p) => p.ip === c.ip), 5000);
    expect(podInfoOf('h1', c.ip)).toBeUndefined();
    const why = (await status('h1')).discovery.notServed.filter((n) => n.why.includes(`${c.ip} is claimed by several veths`)).map((n) => n.hostVeth).sort();
    expect(why).toEqual([c.hostVeth, g.hostVeth].sort());
    await sleep(1500);
    expect(podInfoOf('h1', c.ip)).toBeUndefined();

    // g gives c's address back: both are served again, each on its own veth.
    await inG('addr', 'del', `${c.ip}/32`, 'dev', 'eth0');
    await inG('addr', 'add', `${g.ip}/24`, 'dev', 'eth0');
    await until('c and g to be served again', async () => (await list('h1')).length === 2, 5000);
    expect(byIp(await list('h1'))).toMatchObject(byIp([c, g].map(found)));
    expect(podInfoOf('h1', c.ip)).toEqual({ ifindex: c.hostVethIfindex, mac: c.mac, ...NO_HOST_NETNS });
  }, 60_000);
});
