/**
 * What BPF_PROG_TEST_RUN cannot show: masq on a real veth, where a pod's
 * TCP/UDP checksum is usually PARTIAL (offloaded: the field holds only the
 * pseudo-header sum) and bpf_l4_csum_replace must update it as such.
 *
 * pod netns --p0/h0--> host netns (masq at h0 TC ingress) --nic0/w0--> wire netns
 *
 * nic0 has TX checksum offload off, so the kernel completes any partial
 * checksum at xmit (skb_checksum_help): what the capture on w0 shows is the
 * checksum a real NIC would put on the wire. With the pod's offload on, that
 * tests the partial path; with it off, the full one.
 *
 * masq carries only flows the host's conntrack admits (bpf/conntrack.h), so the
 * flows are real: the wire netns also holds REMOTE_POD and answers, routed
 * through the host's stack, whose conntrack sees them established; the test
 * plays the agent's part and makes the TCP entry liberal.
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConntrackDrain } from './agent/conntrack.ts';
import { stderrLog } from './agent/log.ts';
import { BpfObject, tcAttach, withNetns } from './libbpf.ts';
import { fillEgressFilter } from './agent/filter.ts';
import { NO_HOST_NETNS, NO_OVERLAY, NO_SERVICES, FLANNEL_PORTS, arrayIndex, config, egressKey, path, podInfo, podIp } from './maps.ts';
import { readPcap } from '../testing/pcap.ts';
import { l4ChecksumInfo, verifyIpv4Header } from '../testing/packet/checksum.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'network namespaces, BPF');

const id = `${process.pid}`.slice(-5);
const NS = { pod: `xo${id}-pod`, host: `xo${id}-host`, wire: `xo${id}-wire` };
const POD_IP = '10.244.1.5';
const REMOTE_POD = '10.244.2.7';
const HOST_IP = '192.0.2.1';
const PEER_IP = '192.0.2.2';
const OBJECT = new URL('../bpf/build/xmasq.bpf.o', import.meta.url).pathname;

function sh(ns: string | undefined, cmd: string, ...args: string[]): string {
  const argv = ns ? ['--net=/run/netns/' + ns, cmd, ...args] : args;
  return execFileSync(ns ? 'nsenter' : cmd, argv, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

// Over netlink: nsenter --net keeps the caller's /sys, whose class/net is another namespace's.
function link(ns: string, dev: string): { address: string; ifindex: number } {
  return JSON.parse(sh(undefined, 'ip', '-n', ns, '-j', 'link', 'show', 'dev', dev))[0];
}
const mac = (ns: string, dev: string) => link(ns, dev).address;
const ifindex = (ns: string, dev: string) => link(ns, dev).ifindex;

let obj: BpfObject | undefined;
let dir: string;
let servers: ReturnType<typeof spawn>[] = [];

/** A node one-liner in a netns. */
function nodeIn(ns: string, script: string) {
  return spawn('nsenter', [`--net=/run/netns/${ns}`, process.execPath, '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
}

beforeAll(async () => {
  for (const ns of Object.values(NS)) sh(undefined, 'ip', 'netns', 'add', ns);
  sh(undefined, 'ip', 'link', 'add', 'p0', 'netns', NS.pod, 'type', 'veth', 'peer', 'name', 'h0', 'netns', NS.host);
  sh(undefined, 'ip', 'link', 'add', 'nic0', 'netns', NS.host, 'type', 'veth', 'peer', 'name', 'w0', 'netns', NS.wire);
  sh(NS.pod, 'ip', 'link', 'set', 'lo', 'up');
  sh(NS.pod, 'ip', 'addr', 'add', `${POD_IP}/24`, 'dev', 'p0');
  sh(NS.pod, 'ip', 'link', 'set', 'p0', 'up');
  sh(NS.pod, 'ip', 'route', 'add', 'default', 'via', '10.244.1.1');
  sh(NS.pod, 'ip', 'neigh', 'add', '10.244.1.1', 'lladdr', mac(NS.host, 'h0'), 'dev', 'p0');
  sh(NS.host, 'ip', 'link', 'set', 'h0', 'up');
  sh(NS.host, 'ip', 'addr', 'add', `${HOST_IP}/24`, 'dev', 'nic0');
  sh(NS.host, 'ip', 'link', 'set', 'nic0', 'up');
  sh(NS.host, 'ethtool', '-K', 'nic0', 'tx', 'off');
  sh(NS.wire, 'ip', 'addr', 'add', `${PEER_IP}/24`, 'dev', 'w0');
  sh(NS.wire, 'ip', 'link', 'set', 'w0', 'up');
  // The stack's path for the flows' first packets: host -> wire, which holds REMOTE_POD too.
  sh(NS.host, 'sysctl', '-q', '-w', 'net.ipv4.ip_forward=1');
  sh(NS.host, 'ip', 'route', 'add', `${REMOTE_POD}/32`, 'via', PEER_IP, 'dev', 'nic0');
  sh(NS.host, 'ip', 'route', 'add', '10.244.1.0/24', 'dev', 'h0');
  sh(NS.host, 'ip', 'neigh', 'add', POD_IP, 'lladdr', mac(NS.pod, 'p0'), 'dev', 'h0');
  sh(NS.wire, 'ip', 'addr', 'add', `${REMOTE_POD}/32`, 'dev', 'w0');
  sh(NS.wire, 'ip', 'route', 'add', '10.244.1.0/24', 'via', HOST_IP);
  // As on every node (kube-proxy): conntrack tracks in the host's netns.
  sh(NS.host, 'iptables', '-w', '-A', 'FORWARD', '-m', 'conntrack', '--ctstate', 'INVALID', '-j', 'DROP');

  // One learned pair, POD_IP -> REMOTE_POD, whose peer (the wire netns) uses key 23.
  obj = BpfObject.open(OBJECT);
  obj.load();
  obj.map('config').update(arrayIndex.encode({ index: 0 }), config.encode({ nic_ifindex: ifindex(NS.host, 'nic0'), flags: 0, ...NO_OVERLAY, ...NO_SERVICES, ...FLANNEL_PORTS }));
  obj.map('egress_cache').update(egressKey.encode({ local_pod: POD_IP, remote_pod: REMOTE_POD }), path.encode({
    last_seen: 1n, local_mac: mac(NS.host, 'nic0'), remote_mac: mac(NS.wire, 'w0'), local_ip: HOST_IP, remote_ip: PEER_IP,
    // The pod's veth, as init records it: masq carries only packets that arrive on it (h0).
    ifindex: ifindex(NS.host, 'h0'), local_key: 9, remote_key: 23, remote_ready: 1,
  }));
  // and its bit in egress_filter, as init sets it when it creates the entry (masq passes a pair without one)
  fillEgressFilter(obj.map('egress_cache'), obj.map('egress_filter'));
  // The pod, as the agent records it.
  obj.map('pod_info').update(podIp.encode({ ip: POD_IP }), podInfo.encode({ ifindex: ifindex(NS.host, 'h0'), mac: mac(NS.pod, 'p0'), ...NO_HOST_NETNS }));
  const masq = obj.program('masq');
  withNetns(`/run/netns/${NS.host}`, () => tcAttach(ifindex(NS.host, 'h0'), 'ingress', masq));
  dir = mkdtempSync(`${tmpdir()}/xmasq-offload-`);
  for (const script of [
    `require('net').createServer((c) => { c.on('data', () => {}); c.on('error', () => {}); }).listen(80, '${REMOTE_POD}', () => console.log('ready'))`,
    `const d = require('dgram').createSocket('udp4'); d.on('message', (m, r) => d.send(m, r.port, r.address)); d.bind(9000, '${REMOTE_POD}', () => console.log('ready'))`,
  ]) {
    const srv = nodeIn(NS.wire, script);
    servers.push(srv);
    await new Promise<void>((resolve, reject) => {
      srv.stdout!.on('data', (d) => { if (String(d).includes('ready')) resolve(); });
      srv.once('exit', (c) => reject(new Error(`server in ${NS.wire} exited ${c}`)));
    });
  }
});

afterAll(() => {
  for (const srv of servers) srv.kill();
  servers = [];
  obj?.close();
  for (const ns of Object.values(NS)) {
    try {
      sh(undefined, 'ip', 'netns', 'del', ns);
    } catch {
      // already gone
    }
  }
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/**
 * Captures on w0 while the pod sends UDP datagrams (one flow, answered) and TCP segments
 * (one connection), 10 each, 100 ms apart, while the test makes TCP entries liberal.
 */
async function captureFromPod(file: string): Promise<Uint8Array[]> {
  const dump = spawn('nsenter', [`--net=/run/netns/${NS.wire}`, 'tcpdump', '-i', 'w0', '--immediate-mode', '-U', '-w', file, 'ip'], { stdio: ['ignore', 'ignore', 'pipe'] });
  await new Promise<void>((resolve, reject) => {
    let err = '';
    dump.stderr.on('data', (d) => {
      err += d;
      if (err.includes('listening on')) resolve();
    });
    dump.on('exit', (code) => reject(new Error(`tcpdump exited (${code}): ${err}`)));
  });
  const drain = new ConntrackDrain(obj!.map('ct_pending'), obj!.map('ct_admitted'), stderrLog(false, 'offload.test:'));
  const drainer = setInterval(() => withNetns(`/run/netns/${NS.host}`, () => drain.drain()), 50);
  const pod = nodeIn(NS.pod, `const u = require('dgram').createSocket('udp4'); const s = require('net').connect(80, '${REMOTE_POD}');
    s.setNoDelay(true); s.on('error', () => {});
    u.bind(() => { let i = 0; const t = setInterval(() => { u.send('hello-over-udp-' + i, 9000, '${REMOTE_POD}'); if (++i === 10) clearInterval(t); }, 100); });
    s.on('connect', () => { let j = 0; const t = setInterval(() => { s.write('hello-over-tcp-' + j); if (++j === 10) clearInterval(t); }, 100); });
    setTimeout(() => process.exit(0), 1500);`);
  await new Promise((r) => pod.once('exit', r));
  clearInterval(drainer);
  drain.close();
  await new Promise((r) => setTimeout(r, 300));
  dump.kill('SIGINT');
  await new Promise((r) => dump.once('exit', r));
  return readPcap(file);
}

describe.each([
  ['partial (pod offload on)', 'on'],
  ['full (pod offload off)', 'off'],
])('masq keeps L4 checksums valid on the wire: %s', (_label, offload) => {
  it('UDP datagrams and TCP segments of established flows leave the NIC masqueraded with valid checksums', async () => {
    sh(NS.pod, 'ethtool', '-K', 'p0', 'tx', offload);
    const frames = await captureFromPod(`${dir}/${offload}.pcap`);
    const masqueraded = frames.filter((f) => f.length > 34 && f[23] !== 0 && Buffer.from(f).subarray(26, 30).equals(Buffer.from([192, 0, 2, 1])));
    const protocols = masqueraded.map((f) => f[23]).sort();
    expect(protocols, 'TCP segments and UDP datagrams masqueraded').toEqual(expect.arrayContaining([6, 17]));
    for (const f of masqueraded) {
      expect((f[20] << 8) & 0x8000, 'RF set').toBe(0x8000);
      expect(f[15] >> 2, 'DSCP = the peer key').toBe(23);
      expect(verifyIpv4Header(f, 14), 'IPv4 header checksum').toBe(true);
      const l4 = l4ChecksumInfo(f, 14)!;
      expect({ proto: l4.protocol, valid: l4.valid, stored: l4.stored }).toEqual({ proto: l4.protocol, valid: true, stored: l4.expected });
    }
  });
});
