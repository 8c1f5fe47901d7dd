/**
 * Pods made by a container runtime nobody here wrote: Debian's podman (4.3) with its CNI
 * network backend, one podman per lab host. podman creates each container's netns itself and
 * runs the host's CNI chain into it through libcni, as kubelet's runtime does for a sandbox:
 * the chain is the lab's own (lab.confList: bridge + host-local + whatever the lab appends,
 * e.g. xmasq), written as the one conflist of that host's network config dir.
 *
 * Each host's podman runs in the host's netns (nsenter --net), so the bridge and the host
 * ends of the veths land there, and keeps everything of its own under <dir>/<host>/:
 * containers.conf, net.d/, storage (vfs: no overlay mounts to leak), run root, tmp dir. Two
 * hosts share nothing but the machine's /run/netns, where podman pins each sandbox as
 * netns-<uuid>. Images come from a local tar (busyboxRootfsTar), imported on every host as
 * each node of a cluster would load it.
 *
 * podman 4.3 keeps two things outside those roots: libcni's result cache (/var/lib/cni, one
 * file per attachment, removed by DEL) and containers/image's blob-info cache
 * (/var/lib/containers/cache); teardown() removes those directories when they did not exist
 * before this object was made.
 */
import { existsSync, mkdirSync, mkdtempSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { mustRun, netnsPath, run, type RunOptions, type RunResult } from '../testing/command.ts';
import { busyboxRootfsTar } from './docker.ts';
import type { Lab, LabHost } from './lab.ts';

/** What Debian must provide: podman (pulls conmon, runc or crun, containers-common) and a busybox that needs no libc. */
export const PODMAN_PACKAGES = ['podman', 'busybox-static'] as const;
export const PODMAN_IMAGE = 'localhost/xmasq/busybox:local';
/** Directories podman 4.3 creates outside the roots given to it (see the file comment). */
const OUTSIDE_ROOTS = ['/var/lib/cni', '/var/lib/containers'];
const SYSTEM_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
const POD_IFNAME = 'eth0';

/** A container podman made on a lab host, as the host and the container's netns see it. */
export interface PodmanPod {
  name: string;
  host: string;
  containerId: string;
  /** The netns podman created and pinned (NetworkSettings.SandboxKey), a name under /run/netns. */
  netns: string;
  ip: string;
  mac: string;
  hostVeth: string;
  hostVethIfindex: number;
}

export interface PodmanRunOptions {
  /** The container's command; default `sleep 3600`. */
  cmd?: string[];
  /** Bind-mount the caller's node and its shared libraries read-only (the image has no libc), so `node` runs in the container. */
  withNode?: boolean;
}

function onPath(tool: string): string | undefined {
  for (const dir of `${process.env.PATH ?? ''}:${SYSTEM_PATH}`.split(':')) {
    if (dir && existsSync(join(dir, tool))) return join(dir, tool);
  }
  return undefined;
}

/** Throws, naming the packages, when podman is not installed. */
export function requirePodman(): string {
  const podman = onPath('podman');
  if (!podman) throw new Error(`podman not found; install it with 'apt-get install -y --no-install-recommends ${PODMAN_PACKAGES.join(' ')}' (scripts/setup.sh does)`);
  return podman;
}

/**
 * The containers' limits: podman asks for nofile and nproc of 1048576 by default, which runc
 * can set only with CAP_SYS_RESOURCE when they exceed the caller's, and a CI container's
 * bounding set often lacks it ("error setting rlimit type 7: operation not permitted").
 * Limits this low fit under any host's.
 */
const CONTAINER_ULIMITS = ['nofile=1024:1024', 'nproc=1024:1024'];

/** `-v` arguments that make the caller's node run in a libc-less image: the binary and every library ldd names, at the paths ldd gives. */
async function nodeMounts(): Promise<string[]> {
  const node = realpathSync(process.execPath);
  const ldd = await mustRun('ldd', [node], { what: `listing the libraries of ${node}` });
  const mounts = [`${node}:/usr/local/bin/node:ro`];
  for (const line of ldd.stdout.split('\n')) {
    // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
    const m = /(?:=>\s*)?(\/\S+)\s+\(0x/.exec(line);
    if (m) mounts.push(`${realpathSync(m[1])}:${m[1]}:ro`);
  }
  return mounts.flatMap((m) => ['-v', m]);
}

export class LabPodman {
  private readonly created: string[];
  private readonly podman: string;

  /** dir: every host's podman state goes under <dir>/<host>/ (removed by teardown). */
  constructor(private readonly lab: Lab, readonly dir: string) {
    this.podman = requirePodman();
    this.created = OUTSIDE_ROOTS.filter((d) => !existsSync(d));
    for (const h of lab.hosts) this.configure(h);
  }

  private hostDir(host: string): string {
    return join(this.dir, host);
  }

  /** containers.conf and the host's conflist. */
  private configure(h: LabHost): void {
    const d = this.hostDir(h.name);
    for (const sub of ['net.d', 'root', 'runroot', 'tmp']) mkdirSync(join(d, sub), { recursive: true });
    const list = this.lab.confList(h);
    writeFileSync(join(d, 'net.d', `${list.name}.conflist`), JSON.stringify(list, null, 2));
    const toml = (xs: readonly string[]) => `[${xs.map((x) => JSON.stringify(x)).join(', ')}]`;
    writeFileSync(join(d, 'containers.conf'), [
      '[containers]',
      `default_ulimits = ${toml(CONTAINER_ULIMITS)}`,
      '[network]',
      'network_backend = "cni"',
      `cni_plugin_dirs = ${toml(this.lab.cniPath)}`,
      `network_config_dir = ${JSON.stringify(join(d, 'net.d'))}`,
      `default_network = ${JSON.stringify(list.name)}`,
      '[engine]',
      'events_logger = "none"',
      'cgroup_manager = "cgroupfs"',
      '',
    ].join('\n'));
  }

  /** The CNI network every pod joins: the lab's. */
  get network(): string {
    return this.lab.confList(this.lab.hosts[0]).name;
  }

  /** A podman command on a host: in the host's netns, with the host's own roots and config; never rejects. */
  run(host: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
    const d = this.hostDir(host);
    // libcni runs the plugins with podman's environment: the xmasq plugin's wrapper needs node on the PATH.
    const env = { ...process.env, CONTAINERS_CONF: join(d, 'containers.conf'), PATH: `${dirname(process.execPath)}:${process.env.PATH ?? ''}:${SYSTEM_PATH}` };
    return run('nsenter', [`--net=${netnsPath(this.lab.host(host).netns)}`, '--', this.podman,
      '--root', join(d, 'root'), '--runroot', join(d, 'runroot'), '--tmpdir', join(d, 'tmp'), '--storage-driver', 'vfs', ...args],
    { timeoutMs: 60_000, ...opts, env });
  }

  async must(host: string, args: readonly string[], what?: string): Promise<RunResult> {
    const r = await this.run(host, args);
    if (r.code !== 0) throw new Error(`podman ${args.join(' ')} on ${host}${what ? ` (${what})` : ''} exited ${r.code}: ${(r.stderr || r.stdout).trim()}`);
    return r;
  }

  /** `podman import` of the busybox rootfs on every host. */
  async importImage(): Promise<void> {
    const work = mkdtempSync(join(this.dir, 'image-'));
    try {
      const tar = await busyboxRootfsTar(work);
      for (const h of this.lab.hosts) {
        await this.must(h.name, ['import', '--change', 'CMD ["sh"]', '--change', 'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
          '--message', 'xmasq lab: Debian busybox-static', tar, PODMAN_IMAGE], `importing ${PODMAN_IMAGE}`);
      }
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  }

  /**
   * `podman run -d` on the host's network: podman creates the netns and runs CNI ADD. Then,
   * as lab.addPod, checksum offload off on both veth ends when the lab has it off, and a ping
   * to the gateway from the pod's netns so the host has its MAC before any test traffic.
   */
  async runPod(hostRef: string, name: string, opts: PodmanRunOptions = {}): Promise<PodmanPod> {
    const host = this.lab.host(hostRef);
    const mounts = opts.withNode ? await nodeMounts() : [];
    const started = await this.must(host.name, ['run', '--detach', '--name', name, '--hostname', name, '--network', this.network,
      ...mounts, PODMAN_IMAGE, ...(opts.cmd ?? ['sleep', '3600'])], `starting ${name}`);
    const containerId = started.stdout.trim().split('\n').pop()!;
    const sandbox = (await this.must(host.name, ['inspect', '--format', '{{.NetworkSettings.SandboxKey}}', containerId])).stdout.trim();
    if (!sandbox.startsWith('/run/netns/')) throw new Error(`${name}: podman's sandbox ${JSON.stringify(sandbox)} is not under /run/netns`);
    const netns = sandbox.slice('/run/netns/'.length);
    const eth0 = (JSON.parse((await mustRun('ip', ['-n', netns, '-j', 'addr', 'show', 'dev', POD_IFNAME])).stdout) as
      { ifindex: number; address: string; link_index?: number; addr_info: { family: string; local: string }[] }[])[0];
    const links = JSON.parse((await mustRun('ip', ['-n', host.netns, '-j', 'link', 'show'])).stdout) as { ifindex: number; ifname: string }[];
    const peer = links.find((l) => l.ifindex === eth0.link_index);
    if (!peer) throw new Error(`${name}: the peer of ${POD_IFNAME} (ifindex ${eth0.link_index}) is not in ${host.netns}`);
    const ip = eth0.addr_info.find((a) => a.family === 'inet')?.local;
    if (!ip) throw new Error(`${name}: ${POD_IFNAME} has no IPv4 address`);
    if (!this.lab.checksumOffload) {
      for (const [ns, dev] of [[netns, POD_IFNAME], [host.netns, peer.ifname]]) {
        await mustRun('nsenter', [`--net=${netnsPath(ns)}`, '--', 'ethtool', '-K', dev, 'rx', 'off', 'tx', 'off'], { what: `checksum offload off on ${dev} in ${ns}` });
      }
    }
    await mustRun('nsenter', [`--net=${netnsPath(netns)}`, '--', 'ping', '-c', '1', '-W', '2', host.gateway], { what: `${name} pinging its gateway` });
    return { name, host: host.name, containerId, netns, ip, mac: eth0.address, hostVeth: peer.ifname, hostVethIfindex: peer.ifindex };
  }

  /** `podman exec` in a pod; never rejects. */
  exec(pod: PodmanPod, cmd: string, args: readonly string[] = [], opts: RunOptions = {}): Promise<RunResult> {
    return this.run(pod.host, ['exec', pod.containerId, cmd, ...args], opts);
  }

  /** `podman rm --force --time 0`: podman runs CNI DEL (xmasq first, host-local last) and deletes the netns. */
  async removePod(pod: PodmanPod): Promise<void> {
    await this.must(pod.host, ['rm', '--force', '--time', '0', pod.containerId], `removing ${pod.name}`);
  }

  /**
   * Every container of every host removed (with CNI DEL: run it while the agents still run),
   * then the roots, then what podman created outside them. Throws what failed, after trying it all.
   */
  async teardown(): Promise<void> {
    const problems: string[] = [];
    for (const h of this.lab.hosts) {
      if (!existsSync(join(this.hostDir(h.name), 'containers.conf'))) continue;
      const r = await this.run(h.name, ['rm', '--all', '--force', '--time', '0']);
      if (r.code !== 0) problems.push(`podman rm --all on ${h.name}: ${r.stderr.trim()}`);
    }
    rmSync(this.dir, { recursive: true, force: true });
    for (const d of this.created) rmSync(d, { recursive: true, force: true });
    if (problems.length) throw new Error(`podman teardown:\n  ${problems.join('\n  ')}`);
  }
}
