/** Traffic and captures in the lab: small node servers and clients in pods, tcpdump on a host NIC. */
import type { ChildProcess } from 'node:child_process';
import { readPcap } from '../testing/pcap.ts';
import { l4ChecksumInfo, onesComplementSum, pseudoHeaderSum } from '../testing/packet/checksum.ts';
import { decodeFrame, findLayer } from '../testing/packet/decode.ts';
import type { Lab, LabPod } from './lab.ts';

/** A node one-liner in a pod's (or host's) netns. */
export function nodeIn(lab: Lab, where: LabPod | { netns: string }, script: string): ChildProcess {
  return lab.spawn(where, process.execPath, ['-e', script]);
}

/** Waits for a child to exit (killing it after timeoutMs) and collects what it printed. */
export async function output(child: ChildProcess, timeoutMs = 15_000): Promise<{ code: number | null; out: string }> {
  let out = '';
  child.stdout?.on('data', (d) => { out += d; });
  child.stderr?.on('data', (d) => { out += d; });
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  const code = await new Promise<number | null>((r) => child.once('exit', r));
  clearTimeout(timer);
  return { code, out };
}

export const TCP_ECHO = (port: number) => `require('net').createServer((s) => s.pipe(s)).listen(${port}, '0.0.0.0', () => console.log('ready'))`;
export const UDP_ECHO = (port: number) => `const d = require('dgram').createSocket('udp4'); d.on('message', (m, r) => d.send(m, r.port, r.address)); d.bind(${port}, () => console.log('ready'))`;

/**
 * A UDP client doing n round trips one after another (each datagram sent once the last was
 * echoed, a gap apart); prints 'udp-echoed <k>' with how many came back. ICMP would not do for
 * fast-path tests: the host's conntrack admits only TCP and UDP flows (bpf/conntrack.h).
 */
export const UDP_ROUND_TRIPS = (ip: string, port: number, n: number, gapMs = 100) => `const d = require('dgram').createSocket('udp4'); let k = 0;
  const send = () => d.send('rt-' + k, ${port}, '${ip}');
  d.on('message', () => { if (++k === ${n}) { console.log('udp-echoed', k); process.exit(0); } else setTimeout(send, ${gapMs}); });
  send(); setTimeout(() => { console.log('udp-echoed', k); process.exit(1); }, ${n} * ${gapMs} + 5000);`;

/** Starts a server script that prints 'ready' once listening. */
export async function server(lab: Lab, pod: LabPod, script: string): Promise<ChildProcess> {
  const s = nodeIn(lab, pod, script);
  await new Promise<void>((resolve, reject) => {
    s.stdout!.on('data', (d) => { if (String(d).includes('ready')) resolve(); });
    s.once('exit', (c) => reject(new Error(`server in ${pod.name} exited ${c}`)));
  });
  return s;
}

/** Runs during() while tcpdump captures on a netns interface (immediate mode: no frame held back at the end). */
export async function capture<T>(lab: Lab, where: { netns: string }, dev: string, filter: string, file: string, during: () => Promise<T>): Promise<{ frames: Uint8Array[]; result: T }> {
  const dump = lab.spawn(where, 'tcpdump', ['-i', dev, '--immediate-mode', '-U', '-w', file, filter]);
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

/** What a frame on the wire is: overlay (VXLAN, Geneve on 6081), masqueraded (host to host, RF: a key in DSCP or a carrier), or anything else. */
export function wireKind(f: Uint8Array, hostIps: Set<string>): 'vxlan' | 'geneve' | 'masq' | 'other' {
  const d = decodeFrame(f);
  if (findLayer(d, 'vxlan')) return 'vxlan';
  if (findLayer(d, 'geneve')) return 'geneve';
  const ip = findLayer(d, 'ipv4');
  const hostToHost = ip && hostIps.has(String(ip.fields.src)) && hostIps.has(String(ip.fields.dst));
  return hostToHost && (f[20] & 0x80) !== 0 ? 'masq' : 'other';
}

/**
 * Whether the L4 checksum of a frame (IPv4 at 14) is the one its receiver
 * will verify. A masqueraded UDP datagram under a wide key (RF, DSCP 0) holds
 * the key in its length field, while its checksum covers the true length, the
 * one the IPv4 header implies and the pseudo header counts: restore puts it back.
 */
export function wireChecksumValid(f: Uint8Array): boolean | undefined {
  const wideUdp = f[23] === 17 && (f[20] & 0x80) !== 0 && f[15] >> 2 === 0;
  if (!wideUdp) return l4ChecksumInfo(f, 14)?.valid;
  const l4 = 14 + (f[14] & 0x0f) * 4;
  const end = 14 + ((f[16] << 8) | f[17]);
  if (f[l4 + 6] === 0 && f[l4 + 7] === 0) return true; // "no checksum"
  // masq updated the checksum for the key in the length word, so the datagram as sent sums
  // right with the pseudo header of the true length.
  return onesComplementSum(f, l4, end, pseudoHeaderSum(f.subarray(26, 30), f.subarray(30, 34), 17, end - l4)) === 0xffff;
}

/** /proc/net/snmp of a pod (it follows the reader's netns): group -> field -> value. */
export async function snmp(lab: Lab, pod: LabPod): Promise<Record<string, Record<string, number>>> {
  const { stdout } = await lab.exec(pod, 'cat', ['/proc/net/snmp']);
  const out: Record<string, Record<string, number>> = {};
  const lines = stdout.split('\n');
  // Lines come in pairs: "Tcp: Name Name ..." then "Tcp: 1 2 ...".
  for (let i = 0; i + 1 < lines.length; i += 2) {
    const head = lines[i].trim().split(/\s+/), vals = lines[i + 1].trim().split(/\s+/);
    if (!head[0] || head[0] !== vals[0]) continue;
    const group = head[0].replace(':', '');
    out[group] = Object.fromEntries(head.slice(1).map((h, j) => [h, Number(vals[j + 1])]));
  }
  return out;
}

/** Tcp, Udp and Icmp InCsumErrors: packets a receiver dropped for a bad checksum. */
export async function csumErrors(lab: Lab, pod: LabPod): Promise<number> {
  const s = await snmp(lab, pod);
  return (s.Tcp?.InCsumErrors ?? 0) + (s.Udp?.InCsumErrors ?? 0) + (s.Icmp?.InCsumErrors ?? 0);
}

export async function tcpRetransSegs(lab: Lab, pod: LabPod): Promise<number> {
  return (await snmp(lab, pod)).Tcp?.RetransSegs ?? 0;
}
