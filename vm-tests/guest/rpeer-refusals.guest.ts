/**
 * bpf_redirect_rpeer itself, with vm-tests/bpf/rpeer_probe.bpf.o, which sends every
 * packet with the target and flags the test sets. A pod netns P (eth0, veth peer pv
 * in the host netns H), a NIC nic0 in H wired to wire0 in W. The redirect must carry
 * a packet from eth0's egress straight out of nic0 (never through pv), and must drop
 * it for flags != 0, a missing or down target, an ingress hook, a device without a
 * peer and a target in the packet's own netns.
 *
 * "Dropped" is shown by counters: the program ran on every packet, and neither the
 * veth peer, the target, the wire nor the destination's IP stack saw any of them.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mustRunIn, runIn } from '../../testing/command.ts';
import { BpfObject, tcAttach, tcDestroyHook, withNetns, type TcHookPoint } from '../../dataplane/libbpf.ts';
import { VM_BUILD, addNetns, counters, deleteNetns, gained, ifindex, ipBatch, link } from './netns.ts';

if (process.getuid?.() !== 0) throw new Error('rpeer-refusals.guest.ts needs root (network namespaces, BPF): it runs as PID 1 of the test VM');

const TC_ACT_SHOT = 2, TC_ACT_REDIRECT = 7;
const tag = `vr${process.pid % 10000}`;
const P = `${tag}-pod`, H = `${tag}-host`, W = `${tag}-wire`, F = `${tag}-flat`;
const NOBODY_MAC = '02:00:00:00:00:01';
const PACKETS = 3;

let obj: BpfObject;

function setSettings(target: number, flags: bigint): void {
  const settings = obj.map('settings');
  const put = (slot: number, v: bigint) => {
    const k = Buffer.alloc(4), val = Buffer.alloc(8);
    k.writeUInt32LE(slot);
    val.writeBigUInt64LE(v);
    settings.update(k, val);
  };
  put(0, BigInt(target));
  put(1, flags);
}

function result(slot: 0 | 1): bigint {
  const k = Buffer.alloc(4);
  k.writeUInt32LE(slot);
  return obj.map('results').lookup(k)!.readBigInt64LE(0);
}

/** Runs `during` with the probe attached at dev's hook in netns, then removes the clsact qdisc again. */
async function withProbe<T>(netns: string, dev: string, where: TcHookPoint, during: () => Promise<T>): Promise<T> {
  const idx = await ifindex(netns, dev);
  withNetns(`/run/netns/${netns}`, () => tcAttach(idx, where, obj.program('rpeer_probe')));
  try {
    return await during();
  } finally {
    withNetns(`/run/netns/${netns}`, () => tcDestroyHook(idx));
  }
}

/** PACKETS pings from netns to ip; how many were answered. */
async function ping(netns: string, ip: string): Promise<number> {
  const r = await runIn(netns, 'ping', ['-c', String(PACKETS), '-i', '0.2', '-W', '1', ip]);
  const m = /(\d+) received/.exec(r.stdout);
  if (!m) throw new Error(`ping ${ip} in ${netns} printed no summary: ${r.stdout}${r.stderr}`);
  return Number(m[1]);
}

async function icmpIn(netns: string): Promise<number> {
  const snmp = (await mustRunIn(netns, 'cat', ['/proc/net/snmp'])).stdout.split('\n').filter((l) => l.startsWith('Icmp:'));
  const names = snmp[0].split(/\s+/), values = snmp[1].split(/\s+/);
  return Number(values[names.indexOf('InMsgs')]);
}

const watched = (): Array<[string, string]> => [[H, 'pv'], [H, 'nic0'], [W, 'wire0']];

beforeAll(async () => {
  for (const ns of [P, H, W, F]) await addNetns(ns);
  await ipBatch(H, [
    `link add pv type veth peer name eth0 netns ${P}`,
    `link add nic0 type veth peer name wire0 netns ${W}`,
    'link set pv up', 'link set nic0 up',
    'addr add 10.77.0.1/24 dev pv',
  ], 'pod and NIC veths');
  // Pod and host reach each other without ARP (an ARP reply would itself be redirected).
  const pvMac = (await link(H, 'pv')).address, eth0Mac = (await link(P, 'eth0')).address;
  await ipBatch(P, ['link set eth0 up', 'addr add 10.77.0.2/24 dev eth0', `neigh replace 10.77.0.1 lladdr ${pvMac} dev eth0 nud permanent`], 'pod eth0');
  await ipBatch(H, [`neigh replace 10.77.0.2 lladdr ${eth0Mac} dev pv nud permanent`], 'host neighbour of the pod');
  await ipBatch(W, ['link set wire0 up'], 'wire');
  // Both ends of one veth pair in F (a0, a1), and a target t0 in F too, wired to W.
  await ipBatch(F, [
    'link add a0 type veth peer name a1', `link add t0 type veth peer name t1 netns ${W}`,
    'link set a0 up', 'link set a1 up', 'link set t0 up',
    'addr add 10.78.0.2/24 dev a0', `neigh replace 10.78.0.1 lladdr ${NOBODY_MAC} dev a0 nud permanent`,
  ], 'same-netns pair');
  await ipBatch(W, ['link set t1 up'], 'wire end of t0');
  obj = BpfObject.open(`${VM_BUILD}rpeer_probe.bpf.o`);
  obj.load();
});

afterAll(async () => {
  obj?.close();
  for (const ns of [P, H, W, F]) await deleteNetns(ns);
});

/** Sends PACKETS from P with the probe at eth0's egress; what moved. */
async function sendFromPod(target: number, flags: bigint) {
  setSettings(target, flags);
  const runs = result(0);
  const before = await counters(watched(), 'rx');
  const txBefore = (await link(H, 'nic0')).stats64.tx.packets;
  await withProbe(P, 'eth0', 'egress', () => ping(P, '10.77.0.1'));
  return {
    runs: Number(result(0) - runs),
    ret: Number(result(1)),
    rx: gained(before, await counters(watched(), 'rx')),
    nicTx: (await link(H, 'nic0')).stats64.tx.packets - txBefore,
  };
}

describe('bpf_redirect_rpeer', () => {
  it('loads: the kernel resolves the kfunc from its BTF', () => {
    expect(obj.program('rpeer_probe').fd).toBeGreaterThan(0);
  });

  it('sends a packet from the pod eth0 egress out of the target in the peer netns, never through the veth', async () => {
    const r = await sendFromPod(await ifindex(H, 'nic0'), 0n);
    expect(r.runs).toBe(PACKETS);
    expect(r.ret).toBe(TC_ACT_REDIRECT);
    expect(r.nicTx).toBe(PACKETS);
    expect(r.rx).toEqual({ [`${H}/pv`]: 0, [`${H}/nic0`]: 0, [`${W}/wire0`]: PACKETS });
  });

  it('flags != 0: the kfunc returns TC_ACT_SHOT and the packet is dropped', async () => {
    const r = await sendFromPod(await ifindex(H, 'nic0'), 1n);
    // TC_ACT_SHOT at egress fails ping's sendmsg with ENOBUFS, and ping sends again.
    expect(r.runs).toBeGreaterThanOrEqual(PACKETS);
    expect(r.ret).toBe(TC_ACT_SHOT);
    expect(r.nicTx).toBe(0);
    expect(r.rx).toEqual({ [`${H}/pv`]: 0, [`${H}/nic0`]: 0, [`${W}/wire0`]: 0 });
  });

  it('a target ifindex that does not exist in the peer netns: dropped', async () => {
    const r = await sendFromPod(424242, 0n);
    expect(r.runs).toBe(PACKETS);
    expect(r.ret).toBe(TC_ACT_REDIRECT);
    expect(r.nicTx).toBe(0);
    expect(r.rx).toEqual({ [`${H}/pv`]: 0, [`${H}/nic0`]: 0, [`${W}/wire0`]: 0 });
  });

  it('a target that is down: dropped', async () => {
    const nic = await ifindex(H, 'nic0');
    await ipBatch(H, ['link set nic0 down'], 'nic0 down');
    try {
      const r = await sendFromPod(nic, 0n);
      expect(r.runs).toBe(PACKETS);
      expect(r.nicTx).toBe(0);
      expect(r.rx).toEqual({ [`${H}/pv`]: 0, [`${H}/nic0`]: 0, [`${W}/wire0`]: 0 });
    } finally {
      await ipBatch(H, ['link set nic0 up'], 'nic0 up');
    }
  });

  it('attached at ingress: dropped (the pod does not get the packet, the NIC does not send it)', async () => {
    setSettings(await ifindex(H, 'nic0'), 0n);
    // Without the probe the host's pings reach the pod and are answered.
    expect(await ping(H, '10.77.0.2')).toBe(PACKETS);
    const runs = result(0);
    const icmp = await icmpIn(P);
    const before = await counters(watched(), 'rx');
    const txBefore = (await link(H, 'nic0')).stats64.tx.packets;
    const answered = await withProbe(P, 'eth0', 'ingress', () => ping(H, '10.77.0.2'));
    expect(answered).toBe(0);
    expect(Number(result(0) - runs)).toBe(PACKETS);
    expect(await icmpIn(P) - icmp).toBe(0);
    expect((await link(H, 'nic0')).stats64.tx.packets - txBefore).toBe(0);
    expect(gained(before, await counters(watched(), 'rx'))[`${W}/wire0`]).toBe(0);
  });

  it('a device without a peer (lo): dropped', async () => {
    setSettings(await ifindex(H, 'nic0'), 0n);
    expect(await ping(P, '127.0.0.1')).toBe(PACKETS);
    const runs = result(0);
    const before = await counters(watched(), 'rx');
    const answered = await withProbe(P, 'lo', 'egress', () => ping(P, '127.0.0.1'));
    expect(answered).toBe(0);
    expect(Number(result(0) - runs)).toBe(PACKETS);
    expect(gained(before, await counters(watched(), 'rx'))).toEqual({ [`${H}/pv`]: 0, [`${H}/nic0`]: 0, [`${W}/wire0`]: 0 });
  });

  it('a target in the packet\'s own netns (both veth ends in one netns): dropped', async () => {
    setSettings(await ifindex(F, 't0'), 0n);
    const runs = result(0);
    const devs: Array<[string, string]> = [[F, 'a1'], [W, 't1']];
    const before = await counters(devs, 'rx');
    const txBefore = (await link(F, 't0')).stats64.tx.packets;
    await withProbe(F, 'a0', 'egress', () => ping(F, '10.78.0.1'));
    expect(Number(result(0) - runs)).toBe(PACKETS);
    expect(Number(result(1))).toBe(TC_ACT_REDIRECT);
    expect((await link(F, 't0')).stats64.tx.packets - txBefore).toBe(0);
    expect(gained(before, await counters(devs, 'rx'))).toEqual({ [`${F}/a1`]: 0, [`${W}/t1`]: 0 });
  });
});
