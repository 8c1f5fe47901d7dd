/**
 * Room for other TC programs (issue 14, item 7): a program attached behind
 * ours on the same hook still sees every packet we leave alone, because our
 * programs end those with TC_ACT_UNSPEC (bpf/verdict.h), not TC_ACT_OK, which
 * would end the hook's classification there. Under tcx TC_ACT_UNSPEC is
 * TCX_NEXT: the next tcx program runs, then the cls_bpf chain. Real kernel,
 * real chains, each way ours and the other program can be attached:
 *
 *   netns a --a0/b0-- netns b: restore then "behind" at b0's TC ingress;
 *                              init then "behind" at its egress
 *   cls_bpf/cls_bpf  ours at priority 1, behind at priority 2
 *   tcx/tcx          behind linked first, ours linked in front of it
 *   tcx/cls_bpf      ours on tcx, behind on the clsact qdisc (runs after tcx)
 *
 * "behind" (testdata/behind.bpf.c) counts what reaches it.
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BpfObject, closeLink, haveTcx, tcAttach, tcxAttach, tcxQuery, withNetns, type BpfProgram, type TcHookPoint } from './libbpf.ts';
import { COUNTER_NAMES, NO_OVERLAY, NO_SERVICES, FLANNEL_PORTS, arrayIndex, config, counterValue } from './maps.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'network namespaces, BPF');

const id = `${process.pid}`.slice(-5);
const A_IP = '192.0.2.1', B_IP = '192.0.2.2';
const OBJECT = fileURLToPath(new URL('../bpf/build/xmasq.bpf.o', import.meta.url));
const BEHIND = fileURLToPath(new URL('./testdata/behind.bpf.c', import.meta.url));
const DATAGRAMS = 20;

const sh = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const ifindexOf = (ns: string, dev: string): number => JSON.parse(sh('ip', '-n', ns, '-j', 'link', 'show', 'dev', dev))[0].ifindex;

type Attach = 'cls_bpf' | 'tcx';
const CASES: Array<[Attach, Attach]> = [['cls_bpf', 'cls_bpf'], ['tcx', 'tcx'], ['tcx', 'cls_bpf']];

describe.each(CASES)('ours on %s, the other program on %s', (oursOn, behindOn) => {
  const NS = { a: `xc${id}${oursOn[0]}${behindOn[0]}-a`, b: `xc${id}${oursOn[0]}${behindOn[0]}-b` };
  let ours: BpfObject | undefined;
  let behind: BpfObject | undefined;
  let dir: string | undefined;
  const links: number[] = [];

  beforeAll(() => {
    if ((oursOn === 'tcx' || behindOn === 'tcx') && !haveTcx()) throw new Error('this kernel has no tcx (Linux 6.6+): the tcx cases cannot run here');
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
    const attach = (how: Attach, where: TcHookPoint, prog: BpfProgram, priority: number) => {
      if (how === 'tcx') links.push(tcxAttach(b0, where, prog));
      else tcAttach(b0, where, prog, { priority });
    };
    withNetns(`/run/netns/${NS.b}`, () => {
      // Behind first: tcxAttach puts a program in front of those already linked.
      attach(behindOn, 'ingress', behind!.program('behind'), 2);
      attach(behindOn, 'egress', behind!.program('behind'), 2);
      attach(oursOn, 'ingress', ours!.program('restore'), 1);
      attach(oursOn, 'egress', ours!.program('init'), 1);
      if (oursOn === 'tcx' && behindOn === 'tcx') {
        expect(tcxQuery(b0, 'ingress')).toEqual([ours!.program('restore').id, behind!.program('behind').id]);
        expect(tcxQuery(b0, 'egress')).toEqual([ours!.program('init').id, behind!.program('behind').id]);
      }
    });
  });

  afterAll(() => {
    for (const l of links) closeLink(l);
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
});
