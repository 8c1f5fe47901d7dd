/**
 * Room for other TC programs (issue 14, item 7): a program attached behind
 * ours on the same hook still sees every packet we leave alone, because our
 * programs end those with TC_ACT_UNSPEC (bpf/verdict.h), not TC_ACT_OK, which
 * would end the hook's classification there. Real kernel, real cls_bpf chain:
 *
 *   netns a --a0/b0-- netns b: restore (priority 1) then "behind" (priority 2)
 *                              at b0's TC ingress; init then "behind" at its egress
 *
 * "behind" (testdata/behind.bpf.c) counts what reaches it.
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { BpfObject, tcAttach, withNetns } from './libbpf.ts';
import { COUNTER_NAMES, NO_OVERLAY, NO_SERVICES, FLANNEL_PORTS, arrayIndex, config, counterValue } from './maps.ts';

if (process.getuid?.() !== 0) throw new Error('dataplane/chain.test.ts needs root (network namespaces, BPF): run it as root');

const id = `${process.pid}`.slice(-5);
const NS = { a: `xc${id}-a`, b: `xc${id}-b` };
const A_IP = '192.0.2.1', B_IP = '192.0.2.2';
const OBJECT = fileURLToPath(new URL('../bpf/build/xmasq.bpf.o', import.meta.url));
const BEHIND = fileURLToPath(new URL('./testdata/behind.bpf.c', import.meta.url));
const DATAGRAMS = 20;

const sh = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const ifindexOf = (ns: string, dev: string): number => JSON.parse(sh('ip', '-n', ns, '-j', 'link', 'show', 'dev', dev))[0].ifindex;

let ours: BpfObject | undefined;
let behind: BpfObject | undefined;
let dir: string | undefined;

beforeAll(() => {
  for (const ns of Object.values(NS)) sh('ip', 'netns', 'add', ns);
  sh('ip', 'link', 'add', 'a0', 'netns', NS.a, 'type', 'veth', 'peer', 'name', 'b0', 'netns', NS.b);
  for (const [ns, dev, ip] of [[NS.a, 'a0', A_IP], [NS.b, 'b0', B_IP]]) {
    sh('ip', '-n', ns, 'addr', 'add', `${ip}/24`, 'dev', dev);
    sh('ip', '-n', ns, 'link', 'set', dev, 'up');
  }
  dir = mkdtempSync(join(tmpdir(), 'xmasq-chain-'));
  const obj = join(dir, 'behind.bpf.o');
  sh('clang-16', '-O2', '-g', '-target', 'bpf', '-I/usr/include/x86_64-linux-gnu', '-c', BEHIND, '-o', obj);

  ours = BpfObject.open(OBJECT);
  ours.load();
  const b0 = ifindexOf(NS.b, 'b0');
  ours.map('config').update(arrayIndex.encode({ index: 0 }), config.encode({ nic_ifindex: b0, flags: 0, ...NO_OVERLAY, ...NO_SERVICES, ...FLANNEL_PORTS }));
  behind = BpfObject.open(obj);
  behind.load();
  withNetns(`/run/netns/${NS.b}`, () => {
    tcAttach(b0, 'ingress', ours!.program('restore'), { priority: 1 });
    tcAttach(b0, 'egress', ours!.program('init'), { priority: 1 });
    tcAttach(b0, 'ingress', behind!.program('behind'), { priority: 2 });
    tcAttach(b0, 'egress', behind!.program('behind'), { priority: 2 });
  });
});

afterAll(() => {
  ours?.close();
  behind?.close();
  for (const ns of Object.values(NS)) {
    try {
      sh('ip', 'netns', 'del', ns);
    } catch {
      // already gone
    }
  }
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function passedCount(): bigint {
  const per = ours!.map('counters').lookupPerCpu(arrayIndex.encode({ index: COUNTER_NAMES.indexOf('PASSED') })) ?? [];
  return per.reduce((s, v) => s + counterValue.decode(v).value, 0n);
}
const seenBehind = (): bigint => behind!.map('seen').lookup(arrayIndex.encode({ index: 0 }))!.readBigUInt64LE(0);

it('a program behind ours on the same hook sees every packet ours leaves alone, both directions', async () => {
  let echo = '';
  const passedBefore = passedCount(), seenBefore = seenBehind();
  // Host-to-host UDP, answered: nothing of ours, so restore and init pass each packet on.
  const server = spawn('nsenter', [`--net=/run/netns/${NS.b}`, process.execPath, '-e',
    `const d = require('dgram').createSocket('udp4'); d.on('message', (m, r) => d.send(m, r.port, r.address)); d.bind(7000, '${B_IP}', () => console.log('ready'));`],
  { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    await new Promise<void>((resolve, reject) => {
      server.stdout!.on('data', (d) => { if (String(d).includes('ready')) resolve(); });
      server.once('exit', (c) => reject(new Error(`echo server exited ${c}`)));
    });
    echo = execFileSync('nsenter', [`--net=/run/netns/${NS.a}`, process.execPath, '-e',
      `const d = require('dgram').createSocket('udp4'); let got = 0, sent = 0; d.on('message', () => { got++; });
       const t = setInterval(() => { if (sent++ < ${DATAGRAMS}) return d.send('x', 7000, '${B_IP}'); clearInterval(t); setTimeout(() => { console.log(got); d.close(); }, 300); }, 20);`],
    { encoding: 'utf8' });
  } finally {
    server.kill();
  }
  expect(Number(echo.trim()), 'datagrams answered').toBe(DATAGRAMS);
  const passed = passedCount() - passedBefore, seen = seenBehind() - seenBefore;
  // Each datagram in and each answer out passed ours (ARP is no IPv4: it passes too).
  expect(passed).toBeGreaterThanOrEqual(BigInt(2 * DATAGRAMS));
  // ...and reached the program behind, which TC_ACT_OK would have kept from running.
  expect(seen).toBeGreaterThanOrEqual(passed);
});
