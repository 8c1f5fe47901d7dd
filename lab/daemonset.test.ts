/**
 * The image run with exactly the DaemonSet's settings: lab/kubelet-standin.ts reads the pod
 * template of deploy/kubernetes/xmasq.yaml and runs it on the two hosts of a lab (each a node
 * with its own dockerd inside the host's network namespace and a mount namespace of its own:
 * see that file), from the image `npm run image` imported into the lab's dockerd. Then: what
 * the kernel shows of each container (capabilities, namespaces, mounts, cgroup limits, args)
 * against the manifest; the plugin installed into the node's CNI directory and chained into
 * the overlay's conflist, and chained again by the sidecar after the overlay rewrites it; a
 * pod that existed before XMasq discovered and one created through the node's chain after
 * it, both on the fast path; the README's Kubernetes steps (rollout status, `xmasq status`
 * through exec, the cni-chain log, an upgrade by `set image` with the preStop hand-over
 * under a UDP stream that loses nothing, the uninstall's node clean-up script as written).
 * There is no API server here: the stand-in does what kubectl and kubelet would.
 */
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentClient } from '../dataplane/agent/protocol.ts';
import { ROOT, TSX } from '../testing/root.ts';
import { CONTENT_LABEL, checkoutDigest } from '../scripts/image.ts';
import { netnsPath, run, spawnIn } from '../testing/command.ts';
import { hookNames } from '../testing/hooks.ts';
import { DOCKER_PACKAGES, DockerDaemon } from './docker.ts';
import { daemonSetTemplate, KubeletStandin, type PodTemplate, type RunningPod } from './kubelet-standin.ts';
import { Lab, type LabPod } from './lab.ts';
import { capture, UDP_ECHO, wireKind } from './traffic.ts';
import { until } from '../testing/until.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'dockerd, network and mount namespaces, BPF');

const MANIFEST = join(ROOT, 'deploy/kubernetes/xmasq.yaml');
const README = join(ROOT, 'README.md');
const ds = daemonSetTemplate(MANIFEST);
const IMAGE = ds.template.spec.containers[0].image;
const name = `ds${process.pid % 100000}`;
const FLANNEL_CONF = '10-flannel.conflist';
const STOCK = ['bridge', 'host-local', 'loopback'].map((p) => `/usr/lib/cni/${p}`);
const UDP_PORT = 7001;

let lab: Lab | undefined;
let docker: DockerDaemon | undefined;
const nodes: Record<string, KubeletStandin> = {};
const pods: Record<string, RunningPod> = {};
let old1: LabPod, old2: LabPod;
const machineCniBefore = readdirSync('/etc/cni/net.d').sort();
const bpffsBefore: Record<string, string> = {};
const timings: Record<string, number> = {};

const agentSocket = (host: string) => nodes[host].nodePath('/run/xmasq/agent.sock');
const agentList = async (host: string) => (await AgentClient.request(agentSocket(host), { op: 'list' })).pods;
const counters = async (host: string) => (await AgentClient.request(agentSocket(host), { op: 'status' })).status.counters;
const podName = (host: string, gen = 1) => `${ds.name}-${host}-${gen}`;
const container = (pod: RunningPod, c: string) => pod.containers.find((x) => x.name === c)!;
const spec = (c: string) => [...(ds.template.spec.initContainers ?? []), ...ds.template.spec.containers].find((x) => x.name === c)!;


/** CAP_* numbers (linux/capability.h) of the names the manifest uses. */
const CAP_BITS: Record<string, number> = { NET_ADMIN: 12, SYS_PTRACE: 19, SYS_ADMIN: 21, PERFMON: 38, BPF: 39 };
function capMask(names: readonly string[]): bigint {
  return names.reduce((m, n) => {
    if (CAP_BITS[n] === undefined) throw new Error(`the test knows no bit for capability ${n}`);
    return m | (1n << BigInt(CAP_BITS[n]));
  }, 0n);
}

function procStatus(pid: number): Record<string, string> {
  return Object.fromEntries(readFileSync(`/proc/${pid}/status`, 'utf8').split('\n').filter(Boolean).map((l) => [l.split(':')[0], l.slice(l.indexOf(':') + 1).trim()]));
}

/** /proc/<pid>/mountinfo: mount point -> { fstype, options (per mount and per superblock), optional fields }. */
function mounts(pid: number): Map<string, { fstype: string; opts: string; superOpts: string; optional: string }> {
  const out = new Map<string, { fstype: string; opts: string; superOpts: string; optional: string }>();
  for (const line of readFileSync(`/proc/${pid}/mountinfo`, 'utf8').split('\n').filter(Boolean)) {
    const [pre, post] = line.split(' - ');
    const f = pre.split(' ');
    const [fstype, , superOpts] = post.split(' ');
    out.set(f[4], { fstype, opts: f[5], superOpts, optional: f.slice(6).join(' ') });
  }
  return out;
}

/** The memory and cpu cgroup v1 directories of a process (this machine's hierarchy). */
function cgroupDir(pid: number, controller: string): string {
  const line = readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n').find((l) => l.split(':')[1]?.split(',').includes(controller));
  if (!line) throw new Error(`process ${pid} has no ${controller} cgroup`);
  return join('/sys/fs/cgroup', controller, line.split(':')[2]);
}
const cgroupValue = (pid: number, controller: string, file: string) => readFileSync(join(cgroupDir(pid, controller), file), 'utf8').trim();

/** A UDP client sending one datagram every gapMs for durationMs; prints {sent, echoed, missing} once the last answer had a second to come. */
const UDP_STREAM = (ip: string, port: number, durationMs: number, gapMs: number) => `const d = require('dgram').createSocket('udp4');
  const got = new Set(); let seq = 0;
  d.on('message', (m) => got.add(Number(String(m))));
  const t = setInterval(() => d.send(String(seq++), ${port}, '${ip}'), ${gapMs});
  setTimeout(() => { clearInterval(t); setTimeout(() => { const missing = []; for (let i = 0; i < seq; i++) if (!got.has(i)) missing.push(i);
    console.log(JSON.stringify({ sent: seq, echoed: got.size, missing })); process.exit(0); }, 1000); }, ${durationMs});`;

function nodeScript(where: { netns: string }, script: string) {
  return spawnIn(where.netns, process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
}

async function udpEchoServer(where: { netns: string }) {
  const s = nodeScript(where, UDP_ECHO(UDP_PORT));
  await new Promise<void>((resolve, reject) => {
    s.stdout!.on('data', (d) => { if (String(d).includes('ready')) resolve(); });
    s.once('exit', (c) => reject(new Error(`UDP echo in ${where.netns} exited ${c}`)));
  });
  return s;
}

async function udpStream(from: { netns: string }, to: string, durationMs: number, gapMs = 50): Promise<{ sent: number; echoed: number; missing: number[] }> {
  const c = nodeScript(from, UDP_STREAM(to, UDP_PORT, durationMs, gapMs));
  let out = '';
  c.stdout!.on('data', (d) => { out += d; });
  c.stderr!.on('data', (d) => { out += d; });
  await new Promise((r) => c.once('exit', r));
  return JSON.parse(out.trim().split('\n').pop()!) as { sent: number; echoed: number; missing: number[] };
}

beforeAll(async () => {
  await KubeletStandin.cleanupLeftovers(name);
  const t0 = Date.now();
  try {
    docker = await DockerDaemon.ensure();
  } catch (e) {
    throw new Error(`lab/daemonset.test.ts needs a Docker daemon (Debian packages: ${DOCKER_PACKAGES.join(', ')}): ${(e as Error).message}`);
  }
  // The image must hold this checkout's agent, plugin and objects: a missing or stale one
  // (its content label differs from what stage() makes of the tree now) is built here.
  const want = checkoutDigest();
  const label = await docker.run(['image', 'inspect', '--format', `{{index .Config.Labels "${CONTENT_LABEL}"}}`, IMAGE]);
  const have = label.code === 0 ? label.stdout.trim() : 'none';
  if (have !== want) {
    console.error(`daemonset.test: the image ${IMAGE} in the lab's dockerd is ${have === 'none' ? 'missing' : 'stale'}: building it (npm run image, a few minutes)`);
    const t = Date.now();
    const code = await new Promise<number | null>((resolve) => {
      const c = spawn(TSX, [join(ROOT, 'scripts/image.ts'), '--tag', IMAGE], { stdio: ['ignore', 'inherit', 'inherit'] });
      c.once('exit', resolve);
      c.once('error', () => resolve(null));
    });
    if (code !== 0) throw new Error(`building the image ${IMAGE} failed (exit ${code}; output above): the suite runs the image of this checkout (README, "Kubernetes"; needs mmdebstrap and apt's network access)`);
    timings.imageBuild = Date.now() - t;
  }
  lab = await Lab.up({ name, hosts: 2, podsPerHost: 0, checksumOffload: false });
  // Pods of the overlay alone, there before XMasq is installed.
  old1 = await lab.addPod('h1', 'old1');
  old2 = await lab.addPod('h2', 'old2');
  timings.lab = Date.now() - t0;
  for (const h of ['h1', 'h2']) {
    const t = Date.now();
    nodes[h] = await KubeletStandin.start(lab, h, { conflist: { file: FLANNEL_CONF, list: lab.confList(lab.host(h)) }, stockPlugins: STOCK });
    bpffsBefore[h] = (await nodes[h].onNode('stat', ['-f', '-c', '%T', '/sys/fs/bpf'])).stdout.trim();
    // README, Install, step 2: the saved image loaded on every node.
    const loaded = await nodes[h].loadImage(docker, IMAGE);
    timings[`${h}.node`] = Date.now() - t;
    timings[`${h}.imageLoaded`] = loaded.loaded ? 1 : 0;
  }
  // README, Install, step 3: kubectl apply; the DaemonSet puts one pod on every node.
  await Promise.all(['h1', 'h2'].map(async (h) => {
    const t = Date.now();
    pods[h] = await nodes[h].runPod(podName(h), ds.template);
    timings[`${h}.podReady`] = Date.now() - t;
  }));
}, 1_800_000);

afterAll(async () => {
  const problems: string[] = [];
  for (const n of Object.values(nodes)) problems.push(...await n.stop().catch((e: Error) => [e.message]));
  await lab?.down().catch((e: Error) => problems.push(e.message));
  await docker?.stop().catch((e: Error) => problems.push(e.message));
  console.log(`daemonset.test timings (ms): ${JSON.stringify(timings)}`);
  if (problems.length) throw new Error(`cleanup:\n  ${problems.join('\n  ')}`);
}, 180_000);

describe('the DaemonSet of deploy/kubernetes/xmasq.yaml on two lab nodes (kubelet stand-in, the image from npm run image)', () => {
  it('init containers: mount-bpffs mounted bpffs on the node (not the machine), install-cni put the plugin in the node\'s /opt/cni/bin and chained it last', async () => {
    for (const h of ['h1', 'h2']) {
      const n = nodes[h];
      expect(pods[h].init.map((i) => [i.name, i.code])).toEqual((ds.template.spec.initContainers ?? []).map((c) => [c.name, 0]));
      // The node's /sys/fs/bpf was a plain directory; the privileged init container's mount,
      // through its Bidirectional volume, is the node's now.
      expect(bpffsBefore[h]).not.toBe('bpf_fs');
      expect((await n.onNode('stat', ['-f', '-c', '%T', '/sys/fs/bpf'])).stdout.trim()).toBe('bpf_fs');
      expect((await n.onNode('ls', ['/sys/fs/bpf/xmasq'])).stdout).toMatch(/\bconfig\b/);
      expect(readdirSync(n.nodePath('/opt/cni/bin')).sort()).toEqual(['bridge', 'host-local', 'loopback', 'xmasq', 'xmasq-cni.mjs', 'xmasq-node']);
      const list = n.nodeConfList();
      expect(list.file).toBe(FLANNEL_CONF);
      expect(list.list.plugins.map((p) => p.type)).toEqual(['bridge', 'xmasq']);
      expect(list.list.plugins[1]).toEqual({ type: 'xmasq', agentSocket: '/run/xmasq/agent.sock' });
    }
    // Nothing of the machine's own: its CNI configs and its bpffs.
    expect(readdirSync('/etc/cni/net.d').sort()).toEqual(machineCniBefore);
    expect(existsSync('/sys/fs/bpf/xmasq')).toBe(false);
  });

  it('the agent runs with exactly the manifest\'s capabilities, namespaces, mounts, limits and args', async () => {
    const agent = spec('agent');
    expect(agent.securityContext?.capabilities?.drop).toEqual(['ALL']);
    const want = capMask(agent.securityContext!.capabilities!.add!);
    for (const h of ['h1', 'h2']) {
      const pid = container(pods[h], 'agent').pid;
      const st = procStatus(pid);
      // Exactly the five capabilities, effective and as the bounding set; no privilege escalation; no seccomp filter (kubelet's default).
      expect(BigInt(`0x${st.CapEff}`)).toBe(want);
      expect(BigInt(`0x${st.CapBnd}`)).toBe(want);
      expect(st.NoNewPrivs).toBe('1');
      expect(st.Seccomp).toBe('0');
      // hostNetwork: the lab host's netns; hostPID: ours.
      expect(statSync(`/proc/${pid}/ns/net`).ino).toBe(statSync(netnsPath(lab!.host(h).netns)).ino);
      expect(statSync(`/proc/${pid}/ns/pid`).ino).toBe(statSync('/proc/self/ns/pid').ino);
      expect(statSync(`/proc/${pid}/ns/mnt`).ino).not.toBe(statSync(`/proc/${nodes[h].dockerdPid}/ns/mnt`).ino);
      // The shell of `command` exec'd the agent with the manifest's args.
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean);
      expect(argv.slice(-agent.args!.length)).toEqual(agent.args);
      expect(argv.join(' ')).toMatch(/xmasq-agent/);
      expect(readFileSync(nodes[h].nodePath('/run/xmasq/agent.pid'), 'utf8').trim()).toBe(String(pid));

      const m = mounts(pid);
      expect(m.get('/')!.opts.split(',')).toContain('ro');
      // HostToContainer: a slave of the node's mount (master:N), the node's bpffs.
      expect(m.get('/sys/fs/bpf')!.fstype).toBe('bpf');
      expect(m.get('/sys/fs/bpf')!.optional).toMatch(/master:\d+/);
      const netns = m.get('/run/netns') ?? m.get('/var/run/netns');
      expect(netns!.opts.split(',')).toContain('ro');
      expect(netns!.optional).toMatch(/master:\d+/);
      expect(m.get('/run/xmasq')!.opts.split(',')).toContain('rw');
      expect(m.get('/tmp')!.fstype).toBe('tmpfs');
      expect(agent.volumeMounts!.find((v) => v.mountPath === '/tmp')).toBeDefined();
      expect(ds.template.spec.volumes!.find((v) => v.name === 'tmp')!.emptyDir).toEqual({ medium: 'Memory', sizeLimit: '16Mi' });
      expect(m.get('/tmp')!.superOpts).toMatch(/size=16384k/);

      // Resources as kubelet sets them with cgroup v1: memory limit, CFS quota, shares.
      expect(agent.resources).toEqual({ requests: { cpu: '50m', memory: '128Mi' }, limits: { cpu: '1', memory: '512Mi' } });
      expect(cgroupValue(pid, 'memory', 'memory.limit_in_bytes')).toBe(String(512 * 2 ** 20));
      expect(Number(cgroupValue(pid, 'cpu', 'cpu.cfs_quota_us')) / Number(cgroupValue(pid, 'cpu', 'cpu.cfs_period_us'))).toBe(1);
      expect(cgroupValue(pid, 'cpu', 'cpu.shares')).toBe(String(Math.floor(50 * 1024 / 1000)));

      // The sidecar: no capability at all, a read-only root.
      const side = container(pods[h], 'cni-chain').pid;
      expect(BigInt(`0x${procStatus(side).CapEff}`)).toBe(0n);
      expect(mounts(side).get('/')!.opts.split(',')).toContain('ro');
    }
  });

  it('the probes on /healthz pass from the node\'s network namespace (rollout status), and the README\'s exec and logs work', async () => {
    for (const h of ['h1', 'h2']) {
      const a = container(pods[h], 'agent');
      expect(a.ready).toBe(true);
      expect(a.probes.find((p) => p.kind === 'startup' && p.ok)?.detail).toBe('http://127.0.0.1:9477/healthz: 200');
      // From the machine's own network namespace nothing listens there: the port is the node's.
      const outside = await run('curl', ['-s', '-o', '/dev/null', '-w', '%{http_code}', '--max-time', '2', 'http://127.0.0.1:9477/healthz']);
      expect(outside.stdout).not.toBe('200');
      // kubectl -n kube-system exec ds/xmasq-agent -c agent -- xmasq status
      const status = await nodes[h].exec(pods[h], 'agent', ['xmasq', 'status']);
      expect(status.code, status.stderr).toBe(0);
      expect(status.stdout).toMatch(new RegExp(`nic\\s*:?\\s*${lab!.host(h).nic}|${lab!.host(h).nic}`));
      // kubectl -n kube-system logs ds/xmasq-agent -c install-cni and -c cni-chain: the README quotes these lines.
      expect(pods[h].init.find((i) => i.name === 'install-cni')!.logs).toMatch(/chained xmasq last into \/host\/etc\/cni\/net\.d\/10-flannel\.conflist/);
      await until(`cni-chain's first look on ${h}`, async () => /\/host\/etc\/cni\/net\.d\/10-flannel\.conflist has xmasq last/.test(await nodes[h].logs(pods[h], 'cni-chain')), 20_000, 200);
    }
  });

  it('a pod that existed before is discovered; a pod created through the node\'s chain is added by the plugin; both masqueraded to h2 and restored', async () => {
    const h1 = nodes.h1;
    const listed = await until('old1 discovered on h1', async () => (await agentList('h1')).find((p) => p.ip === old1.ip && p.attached), 20_000, 200);
    expect(listed.hostVethIfindex).toBe(old1.hostVethIfindex);
    expect((await agentList('h2')).some((p) => p.ip === old2.ip && p.attached)).toBe(true);

    const fresh = await h1.addSandbox('new1');
    // Told by the plugin during CNI ADD (not found by a later scan: the list has it right away).
    expect((await agentList('h1')).find((p) => p.ip === fresh.ip)).toMatchObject({ mac: fresh.mac, hostVethIfindex: fresh.hostVethIfindex, attached: true });

    const srv = await udpEchoServer(old2);
    try {
      const host = lab!.host('h1');
      const hostIps = new Set(lab!.hosts.map((x) => x.ip));
      const before1 = await counters('h1'), before2 = await counters('h2');
      const { frames, result } = await capture(lab!, host, host.nic, 'udp', `${join(h1.nodeRoot, '..')}/wire.pcap`, async () =>
        Promise.all([udpStream(fresh, old2.ip, 3000), udpStream(old1, old2.ip, 3000)]));
      for (const r of result) expect(r.missing).toEqual([]);
      const kinds = frames.map((f) => wireKind(f, hostIps));
      expect(kinds[0]).toBe('vxlan');
      const masq = frames.filter((_, i) => kinds[i] === 'masq');
      // Both directions on the fast path, from both pods of h1.
      const src = (f: Uint8Array) => f.subarray(26, 30).join('.');
      expect(new Set(masq.map(src))).toEqual(new Set([host.ip, lab!.host('h2').ip]));
      const after1 = await counters('h1'), after2 = await counters('h2');
      expect(after1.masqueraded - before1.masqueraded).toBeGreaterThan(20);
      expect(after2.restored - before2.restored).toBeGreaterThan(20);
      expect(after2.masqueraded - before2.masqueraded).toBeGreaterThan(20);
      expect(after1.restored - before1.restored).toBeGreaterThan(20);
    } finally {
      srv.kill();
    }
  }, 60_000);

  it('the overlay rewrites its conflist without xmasq: the cni-chain sidecar chains it again, and the next pod is served', async () => {
    const n = nodes.h1;
    const file = join(n.nodePath('/etc/cni/net.d'), FLANNEL_CONF);
    // As flannel's install-cni does when its pod restarts: its own conflist, written whole.
    writeFileSync(file, `${JSON.stringify(lab!.confList(lab!.host('h1')), null, 2)}\n`);
    expect(n.nodeConfList().list.plugins.map((p) => p.type)).toEqual(['bridge']);
    await until('xmasq chained again', () => n.nodeConfList().list.plugins.at(-1)?.type === 'xmasq', 20_000, 200);
    const p = await n.addSandbox('new2');
    expect((await agentList('h1')).find((x) => x.ip === p.ip)?.attached).toBe(true);
  }, 60_000);

  it('upgrade as the README says (set image, one node): preStop hands over with SIGUSR2, the new agent takes the filters over, a UDP stream loses nothing', async () => {
    const n = nodes.h1;
    // kubectl set image ds/xmasq-agent '*=xmasq:NEW': every container's image; here the same content under a new tag.
    const NEW = `${IMAGE.split(':')[0]}:rollout-test`;
    await n.docker.must(['tag', IMAGE, NEW]);
    const next = JSON.parse(JSON.stringify(ds.template)) as PodTemplate;
    for (const c of [...(next.spec.initContainers ?? []), ...next.spec.containers]) c.image = NEW;

    const fresh = n.sandboxes.get('new1')!;
    const srv = await udpEchoServer(old2);
    try {
      const stream = udpStream(fresh, old2.ip, 30_000, 20);
      await new Promise((r) => setTimeout(r, 2000));
      const oldPid = container(pods.h1, 'agent').pid;
      const t = Date.now();
      const gone = await n.deletePod(podName('h1'));
      timings.rolloutDelete = Date.now() - t;
      // preStop found the recorded pid to be the agent's, signalled it and waited for it to exit.
      expect(gone.preStop.agent?.code, `preStop: ${gone.preStop.agent?.stderr}\nagent's log:\n${gone.logs.agent}`).toBe(0);
      expect(gone.exitCodes.agent).toBe(0);
      // Meanwhile the programs are still attached (no agent on the node now): tcx links pinned on the node's bpffs, or filters.
      expect(hookNames(netnsPath(lab!.host('h1').netns), fresh.hostVeth, 'ingress')).toEqual(['masq']);
      pods.h1 = await n.runPod(podName('h1', 2), next);
      timings.rolloutTotal = Date.now() - t;
      expect(container(pods.h1, 'agent').pid).not.toBe(oldPid);
      const r = await stream;
      expect(r.sent).toBeGreaterThan(500);
      expect(r.missing).toEqual([]);
      const log = await n.logs(pods.h1, 'agent');
      expect(log).not.toMatch(/\bERROR\b|\berror\b.*attach/);
      const before = await counters('h1');
      const again = await udpStream(fresh, old2.ip, 2000);
      expect(again.missing).toEqual([]);
      expect((await counters('h1')).masqueraded - before.masqueraded).toBeGreaterThan(20);
      expect((await agentList('h1')).find((p) => p.ip === fresh.ip)?.attached).toBe(true);
    } finally {
      srv.kill();
    }
  }, 180_000);

  it('uninstall as the README says: delete the DaemonSet (hand-over), then its node clean-up script in a node debug pod leaves nothing of XMasq on the node', async () => {
    // The README's loop body, as written: the script kubectl debug runs on each node.
    const readme = readFileSync(README, 'utf8');
    const block = /kubectl debug "\$node" --profile=sysadmin --image=(\S+) -- sh -c '([^']+)'/.exec(readme);
    expect(block, 'the README\'s uninstall block').not.toBeNull();
    const [, debugImage, script] = block!;
    expect(debugImage).toBe(IMAGE);
    // kubectl delete -f deploy/kubernetes/xmasq.yaml
    for (const h of ['h1', 'h2']) await nodes[h].deletePod(pods[h].name);
    for (const h of ['h1', 'h2']) {
      const n = nodes[h];
      // What `kubectl debug node/… --profile=sysadmin` creates (kubectl's pod, not ours): host
      // network, PID and IPC namespaces, the node's root at /host, privileged.
      const debugPod: PodTemplate = {
        metadata: {},
        spec: {
          hostNetwork: true, hostPID: true, automountServiceAccountToken: false,
          containers: [],
          initContainers: [{
            name: 'debugger', image: debugImage, command: ['sh', '-c', script], securityContext: { privileged: true },
            volumeMounts: [{ name: 'host-root', mountPath: '/host' }],
          }],
          volumes: [{ name: 'host-root', hostPath: { path: '/' } }],
        },
      };
      const done = await n.runPod(`node-debugger-${h}`, debugPod);
      expect(done.init[0].code, done.init[0].logs).toBe(0);
      await n.deletePod(done.name);
      expect(readdirSync(n.nodePath('/opt/cni/bin')).sort()).toEqual(['bridge', 'host-local', 'loopback']);
      expect(n.nodeConfList().list.plugins.map((p) => p.type)).toEqual(['bridge']);
      // What the kernel puts in every new bpffs (bpf_preload) stays; nothing of ours.
      expect((await n.onNode('ls', ['-A', '/sys/fs/bpf'])).stdout.split('\n').filter((f) => f && !/^(maps|progs)\.debug$/.test(f))).toEqual([]);
      expect(existsSync(agentSocket(h))).toBe(false);
      // The NIC and every pod's veth, those the plugin added and those discovery found.
      const veths = (JSON.parse((await run('ip', ['-n', lab!.host(h).netns, '-j', 'link', 'show', 'type', 'veth'])).stdout) as { ifname: string }[]).map((l) => l.ifname);
      expect(veths.length).toBeGreaterThan(0);
      for (const dev of [lab!.host(h).nic, ...veths]) {
        for (const dir of ['ingress', 'egress'] as const) expect(hookNames(netnsPath(lab!.host(h).netns), dev, dir), `${h} ${dev} ${dir}`).toEqual([]);
      }
    }
    // Pods keep working on the overlay alone.
    const srv = await udpEchoServer(old2);
    try {
      expect((await udpStream(nodes.h1.sandboxes.get('new1')!, old2.ip, 1000)).missing).toEqual([]);
    } finally {
      srv.kill();
    }
  }, 180_000);
});

