/**
 * Stale state in the lab, with agents that expire entries quickly:
 * (a) idle entries go, and the pair learns again from the overlay;
 * (b) a pod deleted and its IP given to a new pod: the new pod gets nothing
 *     the old pod's state would have delivered, and becomes reachable on its
 *     own once the sender's egress entry, which the sender keeps busy, is
 *     retired because the peer no longer answers on it.
 */
import type { ChildProcess } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentClient } from '../dataplane/agent/protocol.ts';
import { BpfMap } from '../dataplane/libbpf.ts';
import { egressKey, path, type Path } from '../dataplane/maps.ts';
import { readPcapFile, type PcapRecord } from '../fixtures/pcap.ts';
import { LabAgents, upWithAgents } from './agents.ts';
import { Lab, type LabPod } from './lab.ts';
import { snmp, wireKind } from './traffic.ts';

if (process.getuid?.() !== 0) throw new Error('lab/stale.test.ts needs root (network namespaces, BPF): run it as root');

// Not 2: the new pod comes up ~1.3 s after the DEL starts (two CNI chains of
// node processes), and (b) needs it up while h1 still holds the old entry.
const EGRESS_IDLE = 3;
const INGRESS_IDLE = 5;
const SCAN = 0.5;

const name = `xs${process.pid % 100000}`;
const runDir = `/run/xmasq-stale-${name}`;
let lab: Lab;
let agents: LabAgents;
let a: LabPod, b: LabPod;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const counters = (host: string) => agents.counters(host);
const dump = async (host: string) => AgentClient.request(agents.socket(host), { op: 'cache-dump', cache: 'both' });

/** The egress entry straight from the pinned map: cheap enough to poll every few ms. */
function egressEntry(host: string, local: string, remote: string): Path | undefined {
  const m = BpfMap.fromPinned(`${agents.pinDir(host)}/egress_cache`);
  try {
    const v = m.lookup(egressKey.encode({ local_pod: local, remote_pod: remote }));
    return v && path.decode(v);
  } finally {
    m.close();
  }
}

async function until<T>(what: string, fn: () => Promise<T | undefined | false> | T | undefined | false, ms: number, every = 50): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(every);
  }
}

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
/** ICMP echo requests from a (on the wire as VXLAN or masqueraded): what a sends. */
function isEchoRequestFrom(r: PcapRecord, from: string): boolean {
  const f = r.data;
  const kind = wireKind(f, hostIps());
  const inner = kind === 'vxlan' ? 14 + 20 + 8 + 8 + 14 : 14;
  if (kind === 'other' || f.length < inner + 21) return false;
  const src = Array.from(f.subarray(inner + 12, inner + 16)).join('.');
  const ihl = (f[inner] & 0x0f) * 4;
  // masq leaves the pod's address out of the header: a is the only pod of h1, so h1's IP stands for it.
  const fromA = kind === 'vxlan' ? src === from : src === lab.host('h1').ip;
  return fromA && f[inner + 9] === 1 && f[inner + ihl] === 8;
}

/** A continuous ping with a timestamp on every reply line (-D). */
function pinger(pod: LabPod, dst: string): { child: ChildProcess; replies: () => number[] } {
  const child = lab.spawn(pod, 'ping', ['-D', '-n', '-i', '0.1', dst]);
  let out = '';
  child.stdout!.on('data', (d) => { out += d; });
  return {
    child,
    replies: () => [...out.matchAll(/^\[(\d+\.\d+)\] \d+ bytes from /gm)].map((m) => Number(m[1])),
  };
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGINT');
  await exited;
}

beforeAll(async () => {
  ({ lab, agents } = await upWithAgents({
    name, runDir, checksumOffload: true,
    agentArgs: ['--egress-idle', String(EGRESS_IDLE), '--ingress-idle', String(INGRESS_IDLE), '--scan-interval', String(SCAN), '--verbose'],
  }));
  a = await lab.addPod('h1', 'a');
  b = await lab.addPod('h2', 'b');
}, 120_000);

afterAll(async () => {
  await agents?.teardown();
  await lab?.down();
});

describe(`stale state, agents with --egress-idle ${EGRESS_IDLE} --ingress-idle ${INGRESS_IDLE} --scan-interval ${SCAN}`, () => {
  it('idle entries expire on both hosts, and the pair learns again: VXLAN first, then masqueraded', async () => {
    const m0 = (await counters('h1')).masqueraded;
    const first = await lab.exec(a, 'ping', ['-c', '5', '-i', '0.2', '-W', '2', b.ip]);
    expect(first.stdout, first.stderr).toMatch(/5 packets transmitted, 5 received/);
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
    const again = await lab.exec(a, 'ping', ['-c', '5', '-i', '0.2', '-W', '2', b.ip]);
    const frames = await stopCapture();
    expect(again.stdout, again.stderr).toMatch(/5 packets transmitted, 5 received/);
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
        const e = egressEntry('h1', a.ip, b.ip);
        return e && e.local_key && e.remote_key && e.remote_ready ? e : undefined;
      }, 10_000);
      const m0 = (await counters('h1')).masqueraded;
      await until('masqueraded packets from h1', async () => (await counters('h1')).masqueraded > m0 + 3, 5000);
      const stillOld = () => {
        const e = egressEntry('h1', a.ip, b.ip);
        return !!e && e.local_key === old.local_key && e.remote_key === old.remote_key;
      };

      stopCapture = await startCapture(lab.host('h1'), lab.host('h1').nic, 'icmp or udp port 8472', `${runDir}/reuse-wire.pcap`);
      const miss0 = (await counters('h2')).restore_miss;
      const deletedAt = Date.now() / 1000;
      await lab.deletePod('b');
      const c = await lab.addPod('h2', 'c', { ip: b.ip });
      const cUpAt = Date.now() / 1000;
      expect(c.ip).toBe(b.ip);
      expect(c.mac).not.toBe(b.mac);
      const missAtC = (await counters('h2')).restore_miss;
      const stopInC = await startCapture(c, 'eth0', 'icmp', `${runDir}/reuse-c.pcap`);

      // While h1 still masquerades with the old pod's keys, c receives no echo
      // request: h2 drops them (RESTORE_MISS). c's ICMP counters cover even the
      // moment before its capture started. Read them first, then see the old
      // entry still there: it was there for all that c had received by then.
      let lastOldAt = 0;
      let echoesWhileOld = 0;
      let polls = 0;
      await until('h1 to retire the old pod\'s entry', async () => {
        const echoes = (await snmp(lab, c)).Icmp?.InEchos ?? 0;
        if (!stillOld()) return true;
        lastOldAt = Date.now() / 1000;
        echoesWhileOld = echoes;
        polls++;
        return false;
      }, (EGRESS_IDLE + 3 * SCAN + 2) * 1000, 20);
      const goneAt = Date.now() / 1000;
      expect(polls, `h1's old entry was gone before c came up (${(cUpAt - deletedAt).toFixed(2)} s after the delete): raise EGRESS_IDLE`).toBeGreaterThan(0);
      expect(echoesWhileOld, 'echo requests c received while h1 still used the old pod\'s keys').toBe(0);
      expect((await counters('h2')).restore_miss).toBeGreaterThan(missAtC);
      expect(missAtC).toBeGreaterThan(miss0);

      // Then a reaches c: over the overlay first, then masqueraded.
      const reply = await until('a reply from c', () => ping.replies().find((t) => t > cUpAt), 5000);
      await until('masqueraded packets to c', async () => {
        const e = egressEntry('h1', a.ip, c.ip);
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

      // On h1's wire: a's echo requests masqueraded with the old keys, then VXLAN, then masqueraded again.
      const requests = wire.filter((r) => isEchoRequestFrom(r, a.ip)).map((r) => ({ t: seconds(r), kind: wireKind(r.data, hostIps()) }));
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
