/**
 * Pods from a real container runtime: podman 4.3 with its CNI backend, one per lab host,
 * creates the containers and their netns and calls the lab's chain (bridge + host-local +
 * xmasq) through libcni, as kubelet's runtime does. An agent per host hears of the pods only
 * from the plugin podman ran. TCP and UDP between a container on h1 and one on h2 cross the
 * overlay first, then are masqueraded; `podman rm` runs CNI DEL and the agent purges the pod.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentClient } from '../dataplane/agent/protocol.ts';
import { BpfMap } from '../dataplane/libbpf.ts';
import { NO_HOST_NETNS, podInfo, podIp } from '../dataplane/maps.ts';
import { LabAgents, upWithAgents } from './agents.ts';
import { netnsPath } from '../testing/command.ts';
import { stateDir, type Lab } from './lab.ts';
import { LabPodman, PODMAN_PACKAGES, requirePodman, type PodmanPod } from './podman.ts';
import { TCP_ECHO, UDP_ECHO, UDP_ROUND_TRIPS, capture, wireChecksumValid, wireKind } from './traffic.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'podman, network namespaces, BPF');

const name = `xp${process.pid % 100000}`;
let lab: Lab | undefined;
let agents: LabAgents | undefined;
let podman: LabPodman | undefined;
let a: PodmanPod | undefined, b: PodmanPod | undefined;

function podInfoOf(host: string, ip: string): { ifindex: number; mac: string } | undefined {
  const m = BpfMap.fromPinned(`${agents!.pinDir(host)}/pod_info`);
  try {
    const v = m.lookup(podIp.encode({ ip }));
    return v && podInfo.decode(v);
  } finally {
    m.close();
  }
}

const listed = async (host: string) => (await AgentClient.request(agents!.socket(host), { op: 'list' })).pods
  .map((p) => ({ ip: p.ip, mac: p.mac, ifindex: p.hostVethIfindex, attached: p.attached }));

beforeAll(async () => {
  requirePodman();
  const runDir = `/run/xmasq-podman-test-${name}`;
  // No discovery: the agents hear of the pods only from the plugin podman runs.
  ({ lab, agents } = await upWithAgents({ name, runDir, agentArgs: ['--scan-interval', '0.5', '--discover-pods', 'off'] }));
  podman = new LabPodman(lab!, `${runDir}/podman`);
  const backend = await podman.must('h1', ['info', '--format', '{{.Host.NetworkBackend}}']);
  if (backend.stdout.trim() !== 'cni') {
    throw new Error(`podman's network backend is ${JSON.stringify(backend.stdout.trim())}, not cni, even with network_backend = "cni": this suite needs podman 4.x with CNI (Debian 12: ${PODMAN_PACKAGES.join(', ')})`);
  }
  await podman.importImage();
  // b serves TCP and UDP echo as its main process; a only sleeps, clients run in it with podman exec.
  b = await podman.runPod('h2', 'b', { withNode: true, cmd: ['node', '-e', `${TCP_ECHO(8080)}; ${UDP_ECHO(5353)}`] });
  a = await podman.runPod('h1', 'a', { withNode: true });
}, 120_000);

afterAll(async () => {
  const problems: string[] = [];
  // Containers first, while the agents still run: podman's CNI DEL runs the xmasq plugin.
  await podman?.teardown().catch((e: Error) => problems.push(e.message));
  await agents?.teardown().catch((e: Error) => problems.push(e.message));
  await lab?.down().catch((e: Error) => problems.push(e.message));
  if (problems.length) throw new Error(`cleanup:\n  ${problems.join('\n  ')}`);
}, 60_000);

describe('pods made by podman (CNI backend) on two lab hosts, with the xmasq plugin in the chain', () => {
  it('podman made each netns and ran the chain: the container has the CNI eth0, the host agent lists the pod attached, pod_info holds it', async () => {
    for (const pod of [a!, b!]) {
      expect(pod.netns).toMatch(/^netns-/); // podman's own name for a sandbox, not the lab's
      const addr = await podman!.exec(pod, 'ip', ['-4', '-o', 'addr', 'show', 'eth0']);
      expect(addr.stdout, addr.stderr).toContain(`inet ${pod.ip}/24`);
      const inspect = await podman!.must(pod.host, ['inspect', '--format', '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{$v.IPAddress}} {{$v.MacAddress}}{{end}}', pod.containerId]);
      expect(inspect.stdout.trim()).toBe(`${podman!.network} ${pod.ip} ${pod.mac}`);
      expect(await listed(pod.host)).toEqual([{ ip: pod.ip, mac: pod.mac, ifindex: pod.hostVethIfindex, attached: true }]);
      expect(agents!.log(pod.host)).toContain(`pod ${pod.ip} added: ${pod.mac} on ${pod.hostVeth} (ifindex ${pod.hostVethIfindex})`);
      expect(podInfoOf(pod.host, pod.ip)).toEqual({ ifindex: pod.hostVethIfindex, mac: pod.mac, ...NO_HOST_NETNS });
    }
    expect(a!.ip).toMatch(/^10\.244\.1\./);
    expect(b!.ip).toMatch(/^10\.244\.2\./);
  });

  it('TCP and UDP from the container on h1 to the one on h2: VXLAN first, then masqueraded and restored, checksums valid', async () => {
    const before1 = await agents!.counters('h1'), before2 = await agents!.counters('h2');
    const h1 = lab!.host('h1');
    const hostIps = new Set(lab!.hosts.map((h) => h.ip));
    const { frames, result } = await capture(lab!, h1, h1.nic, 'ip and not igmp', `${agents!.runDir}/wire.pcap`, async () => {
      const tcp = await podman!.exec(a!, 'node', ['-e', `const s = require('net').connect(8080, '${b!.ip}'); let got = 0, n = 0;
        s.on('connect', () => { const tick = () => { s.write('x'.repeat(1000)); if (++n < 20) setTimeout(tick, 20); else s.end(); }; tick(); });
        s.on('data', (d) => { got += d.length; }); s.on('end', () => console.log('tcp-echoed', got));`]);
      const udp = await podman!.exec(a!, 'node', ['-e', UDP_ROUND_TRIPS(b!.ip, 5353, 20, 50)]);
      return { tcp, udp };
    });
    expect(result.tcp.stdout, result.tcp.stderr).toContain('tcp-echoed 20000');
    expect(result.udp.stdout, result.udp.stderr).toContain('udp-echoed 20');

    const kinds = frames.map((f) => wireKind(f, hostIps));
    expect(kinds[0]).toBe('vxlan');
    const masqProtos = new Set(frames.filter((_, i) => kinds[i] === 'masq').map((f) => f[23]));
    expect([...masqProtos].sort((x, y) => x - y)).toEqual([6, 17]);
    for (const f of frames.filter((_, i) => kinds[i] === 'masq')) expect(wireChecksumValid(f)).toBe(true);
    const after1 = await agents!.counters('h1'), after2 = await agents!.counters('h2');
    expect(after1.masqueraded - before1.masqueraded).toBeGreaterThan(0);
    expect(after2.restored - before2.restored).toBeGreaterThan(0);
    expect(after1.restore_miss + after2.restore_miss).toBe(0);
    expect(agents!.egressEntry('h1', a!.ip, b!.ip), 'h1 egress entry a -> b').toBeDefined();
  }, 60_000);

  it('podman rm: its CNI DEL reaches the agent, which purges the pod (list, pod_info, egress cache); podman removes the netns, host-local frees the IP', async () => {
    for (const pod of [a!, b!]) {
      const lease = join(stateDir(name), 'ipam', pod.host, podman!.network, pod.ip);
      expect(existsSync(lease), lease).toBe(true);
      await podman!.removePod(pod);
      expect(existsSync(lease), lease).toBe(false);
      expect(await listed(pod.host), `${pod.host} agent's pods`).toEqual([]);
      // The plugin's DEL, not an expiry scan noticing the veth gone ("dropped pod …").
      expect(agents!.log(pod.host)).toContain(`pod ${pod.ip} deleted: purged`);
      expect(agents!.log(pod.host)).not.toContain(`dropped pod ${pod.ip}`);
      expect(podInfoOf(pod.host, pod.ip)).toBeUndefined();
      expect(existsSync(netnsPath(pod.netns))).toBe(false);
      const veth = await lab!.exec(lab!.host(pod.host), 'ip', ['-o', 'link', 'show', 'dev', pod.hostVeth]);
      expect(veth.code).not.toBe(0);
    }
    expect(agents!.egressEntry('h1', a!.ip, b!.ip)).toBeUndefined();
    const ps = await podman!.must('h1', ['ps', '--all', '--quiet']);
    expect(ps.stdout.trim()).toBe('');
    a = b = undefined;
  }, 30_000);
});
