/**
 * Tunnel ports from configuration (issue 14, item 6): a lab whose VXLAN devices
 * use IANA's 4789, as Calico's and Antrea's VXLAN do, instead of Flannel's 8472
 * (the other suites). The agents read the port off the devices; the overlay
 * carries the first packets on 4789, then the flows are masqueraded. A pod's
 * datagrams to 4789 stay on the overlay (they would look like ours); to 8472,
 * no tunnel port here, they take the fast path like any other flow.
 */
import { describe, expect, it } from 'vitest';
import { AgentClient } from '../dataplane/agent/protocol.ts';
import type { LabAgents } from './agents.ts';
import { labWithAgents } from './fixture.ts';
import { Lab, type LabPod } from './lab.ts';
import { UDP_ECHO, UDP_ROUND_TRIPS, capture, nodeIn, output, server, wireKind } from './traffic.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'network namespaces, BPF');

const name = `xp${process.pid % 100000}`;
let lab: Lab;
let agents: LabAgents;
let a: LabPod, b: LabPod;

labWithAgents({ name, runDir: `/run/xmasq-ports-${name}`, vxlanPort: 4789, pods: [['h1', 'a'], ['h2', 'b']] }, (f) => ({ lab, agents, pods: [a, b] } = f));

describe('an overlay on VXLAN port 4789', () => {
  it('the agents take the port off the VXLAN device', async () => {
    for (const h of ['h1', 'h2']) {
      const s = (await AgentClient.request(agents.socket(h), { op: 'status' })).status;
      expect(s.mode).toBe('veth');
    }
    expect(agents.log('h1')).toContain('tunnel ports: vxlan 4789 (flannel.1)');
  });

  it('UDP crosses as VXLAN on 4789 first, then masqueraded; a pod\'s datagrams to 4789 stay on the overlay, to 8472 they do not', async () => {
    const servers = [await server(lab, b, UDP_ECHO(5353)), await server(lab, b, UDP_ECHO(4789)), await server(lab, b, UDP_ECHO(8472))];
    try {
      const hostIps = new Set(lab.hosts.map((h) => h.ip));
      const h1 = lab.host('h1');
      const before = await agents.counters('h1');
      const { frames, result } = await capture(lab, h1, h1.nic, 'ip and not igmp', `${agents.runDir}/wire.pcap`, async () => [
        (await output(nodeIn(lab, a, UDP_ROUND_TRIPS(b.ip, 5353, 30, 50)))).out.trim(),
        (await output(nodeIn(lab, a, UDP_ROUND_TRIPS(b.ip, 4789, 30, 50)))).out.trim(),
        (await output(nodeIn(lab, a, UDP_ROUND_TRIPS(b.ip, 8472, 30, 50)))).out.trim(),
      ]);
      expect(result).toEqual(['udp-echoed 30', 'udp-echoed 30', 'udp-echoed 30']);
      const kinds = frames.map((f) => wireKind(f, hostIps));
      // The overlay's frames went to 4789 (the sim decoder names any VXLAN port 'vxlan'; the UDP port says which).
      const vxlanPorts = new Set(frames.filter((_, i) => kinds[i] === 'vxlan').map((f) => (f[36] << 8) | f[37]));
      expect([...vxlanPorts]).toEqual([4789]);
      expect(kinds.filter((k) => k === 'masq').length).toBeGreaterThan(20);
      const after = await agents.counters('h1');
      expect(after.masqueraded - before.masqueraded).toBeGreaterThan(10);
      // The pod's flow to 4789 never left the overlay; its flow to 8472, no tunnel port here, did.
      const masqTo = (port: number) => frames.filter((f, i) => {
        const l4 = 14 + (f[14] & 0x0f) * 4;
        return kinds[i] === 'masq' && f[23] === 17 && ((f[l4 + 2] << 8) | f[l4 + 3]) === port;
      }).length;
      expect(masqTo(4789)).toBe(0);
      expect(masqTo(8472)).toBeGreaterThan(5);
    } finally {
      for (const s of servers) s.kill();
    }
  });
});
