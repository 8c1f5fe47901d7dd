/** Traffic and captures in the lab: small node servers and clients in pods, tcpdump on a host NIC. */
import type { ChildProcess } from 'node:child_process';
import { readPcap } from '../testing/pcap.ts';
import { l4ChecksumInfo, onesComplementSum, pseudoHeaderSum, verifyIpv4Header } from '../testing/packet/checksum.ts';
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

/** A TCP client writing 1000 bytes `writes` times, gapMs apart, to an echo; prints 'tcp-echoed <bytes>' once the echo closes. */
export const TCP_STREAM = (ip: string, port: number, writes: number, gapMs: number) => `const s = require('net').connect(${port}, '${ip}'); let got = ''; let n = 0;
  s.on('connect', () => { const tick = () => { s.write('x'.repeat(1000)); if (++n < ${writes}) setTimeout(tick, ${gapMs}); else s.end(); }; tick(); });
  s.on('data', (d) => { got += d; }); s.on('end', () => console.log('tcp-echoed', got.length));`;

/** n datagrams from one socket, 100 ms apart, to an echo; prints 'udp-echoed <k>' at the nth answer, or (exit 1) at timeoutMs. */
export const UDP_DATAGRAMS = (ip: string, port: number, n: number, timeoutMs: number) => `const d = require('dgram').createSocket('udp4'); let n = 0;
  d.on('message', () => { if (++n === ${n}) { console.log('udp-echoed', n); d.close(); } });
  for (let i = 0; i < ${n}; i++) setTimeout(() => d.send('ping-' + i, ${port}, '${ip}'), i * 100);
  setTimeout(() => { console.log('udp-echoed', n); process.exit(1); }, ${timeoutMs});`;

/** n round trips on ONE TCP connection, 1 byte each; prints 'tcp-rt <k>' (exit 1 at an error or at timeoutMs). */
export const TCP_ROUND_TRIPS = (ip: string, port: number, n: number, timeoutMs: number) => `const s = require('net').connect(${port}, '${ip}'); let k = 0;
  s.setNoDelay(true);
  s.on('connect', () => s.write('x'));
  s.on('data', (d) => { k += d.length; if (k >= ${n}) { console.log('tcp-rt', k); process.exit(0); } else s.write('x'); });
  s.on('error', (e) => { console.log('tcp-error', e.code); process.exit(1); });
  setTimeout(() => { console.log('tcp-rt', k); process.exit(1); }, ${timeoutMs});`;

/**
 * A TCP stream to an echo: 1 KiB every everyMs for forMs, closed lingerMs later; prints
 * 'done <bytes sent> <bytes echoed>' once closed, or 'error <code>' (exit 1).
 */
export const TCP_ECHOED_STREAM = (ip: string, port: number, everyMs: number, forMs: number, lingerMs: number) =>
  `const s = require('net').connect(${port}, '${ip}'); let got = 0, sent = 0;
  s.on('connect', () => { const t = setInterval(() => { s.write(Buffer.alloc(1024, 7)); sent += 1024; }, ${everyMs}); setTimeout(() => { clearInterval(t); setTimeout(() => s.end(), ${lingerMs}); }, ${forMs}); });
  s.on('data', (d) => { got += d.length; }); s.on('error', (e) => { console.log('error', e.code); process.exit(1); });
  s.on('close', () => console.log('done', sent, got));`;

/** A TCP connect that must fail within 3 s; prints 'connected' or 'refused-or-timeout'. */
export const TCP_CONNECT = (ip: string, port: number) => `const s = require('net').connect(${port}, '${ip}');
  s.on('connect', () => { s.write('x'); });
  s.on('data', () => { console.log('connected'); process.exit(0); });
  s.on('error', () => { console.log('refused-or-timeout'); process.exit(0); });
  setTimeout(() => { console.log('refused-or-timeout'); process.exit(0); }, 3000);`;

/** Starts a server script that prints 'ready' once listening. */
export async function server(lab: Lab, pod: LabPod, script: string): Promise<ChildProcess> {
  const s = nodeIn(lab, pod, script);
  await new Promise<void>((resolve, reject) => {
    s.stdout!.on('data', (d) => { if (String(d).includes('ready')) resolve(); });
    s.once('exit', (c) => reject(new Error(`server in ${pod.name} exited ${c}`)));
  });
  return s;
}

/** Runs during() while a server script (server()) runs in pod, and stops the server after. */
export async function withServer<T>(lab: Lab, pod: LabPod, script: string, during: () => Promise<T>): Promise<T> {
  const s = await server(lab, pod, script);
  try {
    return await during();
  } finally {
    s.kill();
  }
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

export interface MixedTraffic {
  /** What h1's NIC carried meanwhile (IPv4 but IGMP). */
  frames: Uint8Array[];
  ping: { code: number | null; stdout: string; stderr: string };
  tcp: { code: number | null; out: string };
  udp: { code: number | null; out: string };
}

/**
 * Each kind of pod traffic from a (on h1) to b in turn, captured at h1's NIC: 4 pings,
 * a TCP stream (TCP_STREAM) and UDP datagrams (UDP_DATAGRAMS) to echoes that b serves
 * on tcpPort and udpPort for the while. clientTimeoutMs bounds each client (output()).
 */
export async function mixedTraffic(lab: Lab, a: LabPod, b: LabPod, o: {
  file: string; tcpPort: number; udpPort: number; writes: number; gapMs: number; datagrams: number; udpTimeoutMs: number; clientTimeoutMs?: number;
}): Promise<MixedTraffic> {
  const tcp = await server(lab, b, TCP_ECHO(o.tcpPort));
  const udp = await server(lab, b, UDP_ECHO(o.udpPort));
  try {
    const h1 = lab.host('h1');
    const { frames, result } = await capture(lab, h1, h1.nic, 'ip and not igmp', o.file, async () => ({
      ping: await lab.exec(a, 'ping', ['-c', '4', '-i', '0.2', '-W', '2', b.ip]),
      tcp: await output(nodeIn(lab, a, TCP_STREAM(b.ip, o.tcpPort, o.writes, o.gapMs)), o.clientTimeoutMs),
      udp: await output(nodeIn(lab, a, UDP_DATAGRAMS(b.ip, o.udpPort, o.datagrams, o.udpTimeoutMs)), o.clientTimeoutMs),
    }));
    return { frames, ...result };
  } finally {
    tcp.kill();
    udp.kill();
  }
}

/**
 * What a capture at a host's NIC says of the fast path: the kind of its first frame, the
 * IP protocols it saw masqueraded, how many VXLAN frames carried ICMP (an IPv4 inner header
 * right after the outer IPv4, UDP, VXLAN and Ethernet headers), and how many masqueraded
 * frames had a wrong IPv4 header or L4 checksum.
 */
export function wireFacts(frames: Uint8Array[], hostIps: Set<string>): { first: string | undefined; masqProtocols: number[]; icmpInVxlan: number; masqBadChecksums: number } {
  const kinds = frames.map((f) => wireKind(f, hostIps));
  const masq = frames.filter((_, i) => kinds[i] === 'masq');
  return {
    first: kinds[0],
    masqProtocols: [...new Set(masq.map((f) => f[23]))].sort((x, y) => x - y),
    icmpInVxlan: frames.filter((f, i) => kinds[i] === 'vxlan' && f[14 + 20 + 8 + 8 + 14 + 9] === 1).length,
    masqBadChecksums: masq.filter((f) => !verifyIpv4Header(f, 14) || wireChecksumValid(f) !== true).length,
  };
}

/** Packets counted by the first rule of a host's iptables chain whose text has all the words (iptables -L -v -x). */
export async function rulePackets(lab: Lab, host: string, table: string, chain: string, words: string[]): Promise<number> {
  const r = await lab.exec(lab.host(host), 'iptables', ['-w', '-t', table, '-L', chain, '-v', '-x', '-n']);
  if (r.code !== 0) throw new Error(`iptables -t ${table} -L ${chain} on ${host}: ${r.stderr}`);
  const line = r.stdout.split('\n').find((l) => words.every((w) => l.includes(w)));
  if (!line) throw new Error(`no rule with ${words.join(' ')} in ${table}/${chain} on ${host}:\n${r.stdout}`);
  return Number(line.trim().split(/\s+/)[0]);
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
