/**
 * A pod that is a real container: dockerd (the system's or one started by hand, leaving the
 * host network alone), a busybox image imported from Debian's busybox-static, a container
 * with `--network none` whose netns the lab's CNI chain (bridge + host-local + xmasq) wires
 * to host h1. It talks to a normal lab pod on h2 through the agents' fast path.
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentClient } from '../dataplane/agent/protocol.ts';
import { netnsPath, run } from '../testing/command.ts';
import {
  addContainerPod, containerExec, deleteContainerPod, DOCKER_PACKAGES, DockerDaemon, ensureBusyboxImage, LAB_LABEL,
  removeLabContainers, type ContainerPod,
} from './docker.ts';
import { LabAgents, upWithAgents } from './agents.ts';
import { Lab, type LabPod } from './lab.ts';
import { capture, csumErrors, server, wireKind } from './traffic.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'dockerd, network namespaces, BPF');

const name = `xd${process.pid % 100000}`;
const HTTP_PORT = 8080;
const BODY_SIZE = 64 * 1024;
let lab: Lab | undefined;
let agents: LabAgents | undefined;
let docker: DockerDaemon | undefined;
let b: LabPod;
let c: ContainerPod | undefined;
const timings: Record<string, number> = {};
let forwardBefore = '';

const body = () => {
  const buf = Buffer.alloc(BODY_SIZE);
  for (let i = 0; i < buf.length; i++) buf[i] = (i * 31 + 7) & 0xff;
  return buf;
};

async function timed<T>(what: string, f: () => Promise<T>): Promise<T> {
  const t = Date.now();
  try {
    return await f();
  } finally {
    timings[what] = Date.now() - t;
  }
}

/** InCsumErrors of Tcp and Udp as the container's own /proc/net/snmp counts them. */
async function containerCsumErrors(pod: ContainerPod): Promise<number> {
  const { stdout } = await containerExec(docker!, pod, 'cat', ['/proc/net/snmp']);
  const lines = stdout.split('\n');
  let total = 0;
  for (let i = 0; i + 1 < lines.length; i++) {
    const head = lines[i].split(/\s+/), vals = lines[i + 1].split(/\s+/);
    const at = head.indexOf('InCsumErrors');
    if ((head[0] === 'Tcp:' || head[0] === 'Udp:') && vals[0] === head[0] && at > 0 && /^\d+$/.test(vals[at] ?? '')) total += Number(vals[at]);
  }
  return total;
}

beforeAll(async () => {
  forwardBefore = readFileSync('/proc/sys/net/ipv4/ip_forward', 'utf8');
  try {
    docker = await timed('dockerd', () => DockerDaemon.ensure());
  } catch (e) {
    throw new Error(`lab/docker.test.ts needs a Docker daemon (Debian packages: ${DOCKER_PACKAGES.join(', ')}): ${(e as Error).message}`);
  }
  const img = await timed('image', () => ensureBusyboxImage(docker!));
  timings.imageBuilt = img.built ? 1 : 0;

  const runDir = `/run/xmasq-docker-test-${name}`;
  await timed('lab', async () => {
    ({ lab, agents } = await upWithAgents({ name, runDir }));
    b = await lab.addPod('h2', 'b');
  });
  c = await timed('container', () => addContainerPod(docker!, lab!, 'h1', 'c'));
}, 180_000);

afterAll(async () => {
  const problems: string[] = [];
  const t = Date.now();
  // Containers first, while the agents still run: the xmasq plugin's DEL talks to them.
  if (c && docker) await deleteContainerPod(docker, c).catch((e: Error) => problems.push(e.message));
  if (docker) await removeLabContainers(docker, name).catch((e: Error) => problems.push(e.message));
  await agents?.teardown().catch((e: Error) => problems.push(e.message));
  await lab?.down().catch((e: Error) => problems.push(e.message));
  await docker?.stop().catch((e: Error) => problems.push(e.message));
  timings.teardown = Date.now() - t;
  console.log(`docker.test timings (ms): ${JSON.stringify(timings)}; daemon: ${docker?.origin ?? 'none'}`);
  if (problems.length) throw new Error(`cleanup:\n  ${problems.join('\n  ')}`);
}, 60_000);

describe('a pod that is a real container (docker, --network none, then CNI into its netns)', () => {
  it('the container has only lo and the CNI eth0; the h1 agent lists it attached; dockerd left the host network alone', async () => {
    const pod = c!;
    const inspect = await docker!.must(['inspect', '--format', '{{.HostConfig.NetworkMode}} {{.State.Running}} {{.Config.Image}}', pod.containerId]);
    expect(inspect.stdout.trim()).toBe('none true xmasq/busybox:local');
    // The container's own view (busybox ip, in the container's namespaces) matches what CNI reported.
    const links = await containerExec(docker!, pod, 'ip', ['-o', 'link']);
    expect(links.code, links.stderr).toBe(0);
    expect(links.stdout.split('\n').filter(Boolean).map((l) => l.split(':')[1].trim().split('@')[0]).sort()).toEqual(['eth0', 'lo']);
    const addr = await containerExec(docker!, pod, 'ip', ['-4', '-o', 'addr', 'show', 'eth0']);
    expect(addr.stdout).toContain(`inet ${pod.ip}/24`);
    expect(pod.ip).toMatch(/^10\.244\.1\./);

    const pods = (await AgentClient.request(agents!.socket('h1'), { op: 'list' })).pods;
    expect(pods.map((p) => ({ ip: p.ip, mac: p.mac, ifindex: p.hostVethIfindex, attached: p.attached })))
      .toEqual([{ ip: pod.ip, mac: pod.mac, ifindex: pod.hostVethIfindex, attached: true }]);

    if (docker!.ownedByUs) {
      expect(readFileSync('/proc/sys/net/ipv4/ip_forward', 'utf8')).toBe(forwardBefore);
      const root = await run('ip', ['-o', 'link', 'show']);
      expect(root.stdout).not.toMatch(/\bdocker0\b|\bbr-[0-9a-f]{12}\b/);
    }
  });

  it('ping and an HTTP fetch from the container to a lab pod on h2: the fetch VXLAN first, then masqueraded, checksums valid; ping on the overlay', async () => {
    const pod = c!;
    const srv = await server(lab!, b, `const body = Buffer.alloc(${BODY_SIZE}); for (let i = 0; i < body.length; i++) body[i] = (i * 31 + 7) & 0xff;
      // The body in 16 pieces 50 ms apart: a connection that lives past the agent's first
      // liberal-marking round (every 100 ms), after which conntrack admits it to the fast path.
      require('http').createServer((q, s) => { s.writeHead(200, { 'content-length': body.length }); let i = 0;
        const t = setInterval(() => { s.write(body.subarray(i * 4096, (i + 1) * 4096)); if (++i === 16) { clearInterval(t); s.end(); } }, 50); })
        .listen(${HTTP_PORT}, '0.0.0.0', () => console.log('ready'))`);
    try {
      const before1 = await agents!.counters('h1'), before2 = await agents!.counters('h2');
      const h1 = lab!.host('h1');
      const hostIps = new Set(lab!.hosts.map((h) => h.ip));
      const { frames, result } = await capture(lab!, h1, h1.nic, 'ip and not igmp', `${agents!.runDir}/wire.pcap`, async () => {
        const ping = await containerExec(docker!, pod, 'ping', ['-c', '4', '-i', '0.2', '-W', '2', b.ip]);
        const fetch = await containerExec(docker!, pod, 'sh', ['-c', `wget -q -O - http://${b.ip}:${HTTP_PORT}/ | sha256sum`]);
        return { ping, fetch };
      });
      expect(result.ping.stdout, result.ping.stderr).toMatch(/4 packets transmitted, 4 packets received/);
      expect(result.fetch.stdout.split(/\s/)[0], result.fetch.stderr).toBe(createHash('sha256').update(body()).digest('hex'));

      const kinds = frames.map((f) => wireKind(f, hostIps));
      expect(kinds[0]).toBe('vxlan');
      const masqProtos = new Set(frames.filter((_, i) => kinds[i] === 'masq').map((f) => f[23]));
      // The hosts' conntrack admits TCP and UDP flows only (bpf/conntrack.h): echoes stay VXLAN.
      expect([...masqProtos]).toEqual([6]);

      const after1 = await agents!.counters('h1'), after2 = await agents!.counters('h2');
      expect(after1.masqueraded - before1.masqueraded).toBeGreaterThan(0);
      expect(after2.restored - before2.restored).toBeGreaterThan(0);
      expect(after1.restore_miss + after2.restore_miss).toBe(0);
      expect(await containerCsumErrors(pod), 'checksum errors in the container').toBe(0);
      expect(await csumErrors(lab!, b), 'checksum errors in pod b').toBe(0);
    } finally {
      srv.kill();
    }
  }, 60_000);

  it('deleting the container pod: CNI DEL tells the agent, then the container and its netns pin are gone', async () => {
    const pod = c!;
    await deleteContainerPod(docker!, pod);
    c = undefined;
    expect((await AgentClient.request(agents!.socket('h1'), { op: 'list' })).pods).toEqual([]);
    expect(existsSync(netnsPath(pod.netns))).toBe(false);
    const ps = await docker!.must(['ps', '--all', '--quiet', '--filter', `label=${LAB_LABEL}=${name}`]);
    expect(ps.stdout.trim()).toBe('');
    const links = await lab!.exec(lab!.host('h1'), 'ip', ['-o', 'link', 'show', 'dev', pod.hostVeth]);
    expect(links.code).not.toBe(0);
  }, 30_000);
});
