/**
 * The datapath end to end in the lab, on this machine's stock kernel: each
 * host gets its own copy of the production object, attached by hand the way
 * the agent attaches it (init/restore on the NIC, masq at the TC ingress of
 * each pod's host-side veth). Pods then talk across hosts: the first packets
 * cross the overlay as VXLAN, later ones cross the wire masqueraded. UDP: with
 * no agent to make TCP entries liberal, a UDP flow is what the hosts' conntrack
 * admits once it has seen a reply (bpf/conntrack.h); the lab's hosts track
 * flows as every node does (kube-proxy's INVALID drop).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BpfObject, tcAttach, withNetns } from '../dataplane/libbpf.ts';
import { NO_HOST_NETNS, NO_OVERLAY, NO_SERVICES, FLANNEL_PORTS, COUNTER_NAMES, NodeFlag, arrayIndex, config, counterValue, nodeInfo, nodeIp, podIp, podInfo, type CounterName } from '../dataplane/maps.ts';
import { readPcap } from '../testing/pcap.ts';
import { decodeFrame, findLayer } from '../testing/packet/decode.ts';
import { l4ChecksumInfo, verifyIpv4Header } from '../testing/packet/checksum.ts';
import { Lab } from './lab.ts';
import { UDP_ECHO, UDP_ROUND_TRIPS, nodeIn, output, server } from './traffic.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'network namespaces, BPF');

const OBJECT = new URL('../bpf/build/xmasq.bpf.o', import.meta.url).pathname;
const name = `xd${process.pid % 100000}`;
let lab: Lab;
const objects = new Map<string, BpfObject>();

function counters(host: string): Record<CounterName, number> {
  const m = objects.get(host)!.map('counters');
  const out = {} as Record<CounterName, number>;
  COUNTER_NAMES.forEach((n, i) => {
    const all = m.lookup(arrayIndex.encode({ index: i }))!;
    let sum = 0n;
    for (let off = 0; off < all.length; off += 8) sum += counterValue.decode(all.subarray(off, off + 8)).value;
    out[n] = Number(sum);
  });
  return out;
}

beforeAll(async () => {
  lab = await Lab.up({ name, hosts: 2, podsPerHost: 1, checksumOffload: false });
  for (const host of lab.hosts) {
    const obj = BpfObject.open(OBJECT);
    obj.load();
    objects.set(host.name, obj);
    obj.map('config').update(arrayIndex.encode({ index: 0 }), config.encode({ nic_ifindex: host.nicIfindex, flags: 0, ...NO_OVERLAY, ...NO_SERVICES, ...FLANNEL_PORTS }));
    // The node set, as the agent writes it: every host, this one SELF.
    for (const h of lab.hosts) obj.map('nodes').update(nodeIp.encode({ ip: h.ip }), nodeInfo.encode({ flags: h === host ? NodeFlag.SELF : 0 }));
    const pods = lab.pods.filter((p) => p.host === host.name);
    for (const p of pods) obj.map('pod_info').update(podIp.encode({ ip: p.ip }), podInfo.encode({ ifindex: p.hostVethIfindex, mac: p.mac, ...NO_HOST_NETNS }));
    withNetns(`/run/netns/${host.netns}`, () => {
      tcAttach(host.nicIfindex, 'egress', obj.program('init'));
      tcAttach(host.nicIfindex, 'ingress', obj.program('restore'));
      for (const p of pods) tcAttach(p.hostVethIfindex, 'ingress', obj.program('masq'));
    });
  }
}, 60_000);

afterAll(async () => {
  for (const o of objects.values()) o.close();
  await lab?.down();
});

describe('datapath in a two-host lab (stock kernel: masq at the host veth, bpf_redirect)', () => {
  it('UDP round trips across hosts: the first exchange is VXLAN, later ones masqueraded, checksums valid', async () => {
    const [a, b] = [lab.pods.find((p) => p.host === 'h1')!, lab.pods.find((p) => p.host === 'h2')!];
    const h1 = lab.host('h1');
    const file = `/run/xmasq-lab/${name}/wire.pcap`;
    // IGMP: the hosts' own multicast reports, which the datapath rightly ignores.
    const dump = lab.spawn(h1, 'tcpdump', ['-i', h1.nic, '--immediate-mode', '-U', '-w', file, 'ip and not igmp']);
    await new Promise<void>((resolve, reject) => {
      let err = '';
      dump.stderr!.on('data', (d) => {
        err += d;
        if (err.includes('listening on')) resolve();
      });
      dump.on('exit', (code) => reject(new Error(`tcpdump exited (${code}): ${err}`)));
    });

    const echo = await server(lab, b, UDP_ECHO(5353));
    const client = await output(nodeIn(lab, a, UDP_ROUND_TRIPS(b.ip, 5353, 8, 200)));
    echo.kill();
    expect(client.out).toContain('udp-echoed 8');

    await new Promise((r) => setTimeout(r, 300));
    dump.kill('SIGINT');
    await new Promise((r) => dump.once('exit', r));

    const frames = await readPcap(file);
    const hostIps = new Set(lab.hosts.map((h) => h.ip));
    const kinds = frames.map((f) => {
      const d = decodeFrame(f);
      if (findLayer(d, 'vxlan')) return 'vxlan';
      const ip = findLayer(d, 'ipv4');
      // Masqueraded: host to host, RF set (high bit of frag_off), a key in DSCP.
      const masqueraded = ip && hostIps.has(String(ip.fields.src)) && hostIps.has(String(ip.fields.dst)) && (f[20] & 0x80) !== 0 && f[15] >> 2 !== 0;
      return masqueraded ? 'masq' : 'other';
    });
    console.log(`wire: ${kinds.join(' ')}`);
    // Learning takes the first exchange (request and reply), which also shows both hosts'
    // conntrack the flow's reply; the other 7 round trips are fast path.
    expect(kinds).toEqual(['vxlan', 'vxlan', ...new Array(14).fill('masq')]);
    for (const f of frames.filter((_, i) => kinds[i] === 'masq')) {
      expect(verifyIpv4Header(f, 14)).toBe(true);
      expect(l4ChecksumInfo(f, 14)?.valid).toBe(true);
    }

    const c1 = counters('h1'), c2 = counters('h2');
    expect(c1.MASQUERADED).toBeGreaterThan(0);
    expect(c2.MASQUERADED).toBeGreaterThan(0);
    expect(c1.RESTORED).toBeGreaterThan(0);
    expect(c2.RESTORED).toBeGreaterThan(0);
    expect(c1.RESTORE_MISS + c2.RESTORE_MISS).toBe(0);
  }, 60_000);
});
