/**
 * Stale state in the lab, with agents that expire entries quickly:
 * (a) idle entries go, and the pair learns again from the overlay;
 * (b) a pod deleted and its IP given to a new pod: the new pod gets nothing
 *     the old pod's state would have delivered, and becomes reachable on its
 *     own once the sender's egress entry, which the sender keeps busy, is
 *     retired because the peer no longer answers on it.
 * The traffic is UDP: the hosts' conntrack admits TCP and UDP flows only to
 * the fast path (bpf/conntrack.h), so pings would stay on the overlay.
 */
import type { ChildProcess } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentClient } from '../dataplane/agent/protocol.ts';
import { readPcapFile, type PcapRecord } from '../testing/pcap.ts';
import type { LabAgents } from './agents.ts';
import { labWithAgents } from './fixture.ts';
import { Lab, type LabPod } from './lab.ts';
import { UDP_ECHO, UDP_ROUND_TRIPS, nodeIn, output, server, snmp, wireKind } from './traffic.ts';
import { until } from '../testing/until.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'network namespaces, BPF');

// Not 2: the new pod comes up ~1.3 s after the DEL starts (two CNI chains of
// node processes), and (b) needs it up while h1 still holds the old entry.
const EGRESS_IDLE = 3;
const INGRESS_IDLE = 5;
const SCAN = 0.5;
/** The UDP echo port of b (and of c, which takes b's IP). */
const PORT = 5353;

const name = `xs${process.pid % 100000}`;
const runDir = `/run/xmasq-stale-${name}`;
let lab: Lab;
let agents: LabAgents;
let a: LabPod, b: LabPod;
const echoes: ChildProcess[] = [];

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const counters = (host: string) => agents.counters(host);
const dump = async (host: string) => AgentClient.request(agents.socket(host), { op: 'cache-dump', cache: 'both' });



/** tcpdump into a pcap file until stop(); records keep their capture timestamps. */
async function startCapture(where: { netns: string }, dev: string, filter: string, file: string): Promise<() => Promise<PcapRecord[]>> {
  const tcpdump = lab.spawn(where, 'tcpdump', ['-i', dev, '--immediate-mode', '-U', '-w', file, filter]);
  await new Promise<void>((resolve, reject) => {
    let err = '';
    tcpdump.stderr!.on('data', (d) => { err += d; if (err.includes('listening on')) resolve(); });
    tcpdump.once('exit', (c) => reject(new Error(`tcpdump exited ${c}: ${err}`)));
  });
  return async () => {
    await sleep(200);
    const exited = new Promise((r) => tcpdump.once('exit', r));
    tcpdump.kill('SIGINT');
    await exited;
    return (await readPcapFile(file)).records;
  };
}

const seconds = (r: PcapRecord) => r.tsSec + r.tsUsec / 1e6;
const hostIps = () => new Set(lab.hosts.map((h) => h.ip));
/** a's datagrams to PORT (on the wire as VXLAN or masqueraded): what a sends. */
function isRequestFrom(r: PcapRecord, from: string): boolean {
  const f = r.data;
  const kind = wireKind(f, hostIps());
  const inner = kind === 'vxlan' ? 14 + 20 + 8 + 8 + 14 : 14;
  if (kind === 'other' || f.length < inner + 21) return false;
  const src = Array.from(f.subarray(inner + 12, inner + 16)).join('.');
  const ihl = (f[inner] & 0x0f) * 4;
  // masq leaves the pod's address out of the header: a is the only pod of h1, so h1's IP stands for it.
  const fromA = kind === 'vxlan' ? src === from : src === lab.host('h1').ip;
  return fromA && f[inner + 9] === 17 && ((f[inner + ihl + 2] << 8) | f[inner + ihl + 3]) === PORT;
}

/** A datagram to dst:PORT every 100 ms from one socket (one flow), printing the time of every echo. */
function pinger(pod: LabPod, dst: string): { child: ChildProcess; replies: () => number[] } {
  const child = nodeIn(lab, pod, `const d = require('dgram').createSocket('udp4'); let k = 0;
    d.on('message', () => console.log('reply', (Date.now() / 1000).toFixed(3)));
    setInterval(() => d.send('p' + k++, ${PORT}, '${dst}'), 100);`);
  let out = '';
  child.stdout!.on('data', (d) => { out += d; });
  return {
    child,
    replies: () => [...out.matchAll(/^reply (\d+\.\d+)$/gm)].map((m) => Number(m[1])),
  };
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGINT');
  await exited;
}

labWithAgents({
  name, runDir, checksumOffload: true, pods: [['h1', 'a'], ['h2', 'b']],
  agentArgs: ['--egress-idle', String(EGRESS_IDLE), '--ingress-idle', String(INGRESS_IDLE), '--scan-interval', String(SCAN), '--verbose'],
}, (f) => ({ lab, agents, pods: [a, b] } = f));

beforeAll(async () => {
  echoes.push(await server(lab, b, UDP_ECHO(PORT)));
});

afterAll(() => {
  for (const e of echoes) e.kill();
});

describe(`stale state, agents with --egress-idle ${EGRESS_IDLE} --ingress-idle ${INGRESS_IDLE} --scan-interval ${SCAN}`, () => {
  it('idle entries expire on both hosts, and the pair learns again: VXLAN first, then masqueraded', async () => {
    const m0 = (await counters('h1')).masqueraded;
    const first = await output(nodeIn(lab, a, UDP_ROUND_TRIPS(b.ip, PORT, 5, 200)));
    expect(first.out).toContain('udp-echoed 5');
    expect((await counters('h1')).masqueraded).toBeGreaterThan(m0);
    for (const host of ['h1', 'h2']) {
      const d = await dump(host);
      expect(d.egress!.length, `${host} egress`).toBeGreaterThan(0);
      expect(d.ingress!.length, `${host} ingress`).toBeGreaterThan(0);
    }

    await sleep(INGRESS_IDLE * 1000);
    await until('both hosts\' caches to be empty', async () => {
      const ds = await Promise.all(['h1', 'h2'].map(dump));
      return ds.every((d) => d.egress!.length === 0 && d.ingress!.length === 0);
    }, 2 * SCAN * 1000 + 2000);

    const m1 = (await counters('h1')).masqueraded;
    const stopCapture = await startCapture(lab.host('h1'), lab.host('h1').nic, 'ip and not igmp', `${runDir}/relearn.pcap`);
    const again = await output(nodeIn(lab, a, UDP_ROUND_TRIPS(b.ip, PORT, 5, 200)));
    const frames = await stopCapture();
    expect(again.out).toContain('udp-echoed 5');
    const kinds = frames.map((f) => wireKind(f.data, hostIps()));
    expect(kinds[0]).toBe('vxlan');
    expect(kinds.filter((k) => k === 'masq').length).toBeGreaterThan(0);
    expect(kinds.at(-1)).toBe('masq');
    expect((await counters('h1')).masqueraded).toBeGreaterThan(m1);
  }, 40_000);

  it('a new pod on a deleted pod\'s IP receives nothing through stale state, and is reached once the sender\'s entry is retired', async () => {
    const ping = pinger(a, b.ip);
    let stopCapture: (() => Promise<PcapRecord[]>) | undefined;
    try {
      // The fast path, both ways.
      const old = await until('a fully learned entry a -> b on h1', () => {
        const e = agents.egressEntry('h1', a.ip, b.ip);
        return e && e.local_key && e.remote_key && e.remote_ready ? e : undefined;
      }, 10_000);
      const m0 = (await counters('h1')).masqueraded;
      await until('masqueraded packets from h1', async () => (await counters('h1')).masqueraded > m0 + 3, 5000);
      const stillOld = () => {
        const e = agents.egressEntry('h1', a.ip, b.ip);
        return !!e && e.local_key === old.local_key && e.remote_key === old.remote_key;
      };

      stopCapture = await startCapture(lab.host('h1'), lab.host('h1').nic, `udp port ${PORT} or udp port 8472`, `${runDir}/reuse-wire.pcap`);
      const miss0 = (await counters('h2')).restore_miss;
      const deletedAt = Date.now() / 1000;
      await lab.deletePod('b');
      const c = await lab.addPod('h2', 'c', { ip: b.ip });
      // Not awaited: c must be up while h1 still holds the old entry; a datagram before the
      // server listens still counts (NoPorts) as one c received.
      echoes.push(nodeIn(lab, c, UDP_ECHO(PORT)));
      const cUpAt = Date.now() / 1000;
      expect(c.ip).toBe(b.ip);
      expect(c.mac).not.toBe(b.mac);
      const missAtC = (await counters('h2')).restore_miss;
      const stopInC = await startCapture(c, 'eth0', `udp port ${PORT}`, `${runDir}/reuse-c.pcap`);

      // While h1 still masquerades with the old pod's keys, c receives no
      // datagram of a's: h2 drops them (RESTORE_MISS). c's UDP counters cover
      // even the moment before its capture started. Read them first, then see
      // the old entry still there: it was there for all that c had received by then.
      let lastOldAt = 0;
      let echoesWhileOld = 0;
      let polls = 0;
      await until('h1 to retire the old pod\'s entry', async () => {
        const udp = (await snmp(lab, c)).Udp;
        const got = (udp?.InDatagrams ?? 0) + (udp?.NoPorts ?? 0) + (udp?.InErrors ?? 0);
        if (!stillOld()) return true;
        lastOldAt = Date.now() / 1000;
        echoesWhileOld = got;
        polls++;
        return false;
      }, (EGRESS_IDLE + 3 * SCAN + 2) * 1000, 20);
      const goneAt = Date.now() / 1000;
      expect(polls, `h1's old entry was gone before c came up (${(cUpAt - deletedAt).toFixed(2)} s after the delete): raise EGRESS_IDLE`).toBeGreaterThan(0);
      expect(echoesWhileOld, 'datagrams c received while h1 still used the old pod\'s keys').toBe(0);
      expect((await counters('h2')).restore_miss).toBeGreaterThan(missAtC);
      expect(missAtC).toBeGreaterThan(miss0);

      // Then a reaches c: over the overlay first, then masqueraded.
      const reply = await until('a reply from c', () => ping.replies().find((t) => t > cUpAt), 5000);
      await until('masqueraded packets to c', async () => {
        const e = agents.egressEntry('h1', a.ip, c.ip);
        return !!e && e.remote_key !== 0 && e.remote_ready !== 0 && !stillOld();
      }, 5000);
      const m1 = (await counters('h1')).masqueraded;
      await until('h1 to masquerade to c', async () => (await counters('h1')).masqueraded > m1 + 3, 5000);
      const inC = await stopInC();
      const wire = await stopCapture();
      stopCapture = undefined;

      expect(inC.filter((r) => seconds(r) <= lastOldAt).length, 'frames captured in c before h1 retired the old entry').toBe(0);
      expect(inC.length).toBeGreaterThan(0);
      expect(reply - deletedAt, 'seconds from the delete to c\'s first reply').toBeLessThan(EGRESS_IDLE + 2 * SCAN + 3);
      expect(reply).toBeLessThan(goneAt + 2);

      // On h1's wire: a's datagrams masqueraded with the old keys, then VXLAN, then masqueraded again.
      const requests = wire.filter((r) => isRequestFrom(r, a.ip)).map((r) => ({ t: seconds(r), kind: wireKind(r.data, hostIps()) }));
      const firstVxlan = requests.findIndex((r) => r.kind === 'vxlan');
      expect(firstVxlan, 'a VXLAN echo request after the old entry went').toBeGreaterThan(0);
      expect(requests.slice(0, firstVxlan).every((r) => r.kind === 'masq')).toBe(true);
      expect(requests[firstVxlan].t).toBeGreaterThan(lastOldAt);
      expect(requests.slice(firstVxlan).some((r) => r.kind === 'masq')).toBe(true);
      expect(requests.at(-1)!.kind).toBe('masq');
    } finally {
      await stop(ping.child);
      if (stopCapture) await stopCapture().catch(() => []);
    }
  }, 60_000);
});
