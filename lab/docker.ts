/**
 * Pods as real containers: a Docker daemon (the system's, or one started by hand that leaves
 * the host network alone), a busybox image built locally without any registry, and containers
 * started with `--network none` whose netns is then given to the lab's CNI chain for one of
 * its hosts, exactly as a container runtime hands a sandbox to CNI.
 *
 * Why the plain `docker` CLI and not testcontainers: what testcontainers adds (pulling images,
 * port mapping and wait strategies, the Ryuk reaper) is either impossible here (no registry)
 * or unused (`--network none`: no ports; the teardown must run CNI DEL first, which a reaper
 * would skip), while the two things this file needs, `docker import` of a local rootfs and
 * the container's PID for its netns, are one CLI call each. The CLI needs no dependency in
 * package.json, talks to the daemon's own API version, and every command it runs can be
 * pasted into a shell to reproduce a failure.
 *
 * The daemon started here (only when `docker info` fails) keeps everything of its own under
 * /run/xmasq-docker (socket, pidfile, exec root, log) and /var/lib/xmasq-docker (data root,
 * so the image survives between runs), and runs with `--iptables=false --ip6tables=false
 * --bridge=none --ip-forward=false --ip-masq=false`: no docker0, no NAT rule, no sysctl
 * change in the caller's namespace. Containers run with `--network none`, so the daemon never
 * creates an interface: the only one a container gets is the eth0 the CNI chain puts in it.
 */
import { spawn } from 'node:child_process';
import {
  chmodSync, closeSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, symlinkSync, writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { CommandError, mustRun, netnsPath, pidAlive, run, type RunOptions, type RunResult } from '../testing/command.ts';
import { cniAdd, cniDel, type CniConfList, type CniInvocation, type CniResult } from './cni.ts';
import type { Lab, LabHost, LabPod } from './lab.ts';

/** Socket, pidfile, exec root and log of a daemon started here. */
export const DOCKER_RUN_DIR = '/run/xmasq-docker';
/** Its data root: images (the busybox one) stay there between runs. */
export const DOCKER_DATA_ROOT = '/var/lib/xmasq-docker';
export const BUSYBOX_IMAGE = 'xmasq/busybox:local';
/** What Debian must provide: dockerd + CLI (pulls containerd, runc, tini), and a busybox that needs no libc. */
export const DOCKER_PACKAGES = ['docker.io', 'busybox-static'] as const;

const SOCKET = `${DOCKER_RUN_DIR}/docker.sock`;
const PIDFILE = `${DOCKER_RUN_DIR}/dockerd.pid`;
const EXEC_ROOT = `${DOCKER_RUN_DIR}/exec`;
const LOG = `${DOCKER_RUN_DIR}/dockerd.log`;
/** The daemon starts its own containerd (no --containerd given); it writes its pid here. */
const CONTAINERD_PIDFILE = `${EXEC_ROOT}/containerd/containerd.pid`;
const BUSYBOX_PATHS = ['/bin/busybox', '/usr/bin/busybox'];
/** Docker's own CLI from docker.io matches the daemon; any other `docker` on PATH negotiates the API down. */
const DEBIAN_DOCKER_CLI = '/usr/bin/docker';
const SYSTEM_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
const POD_IFNAME = 'eth0';
/** Containers of a lab carry this label (value: the lab name), so leftovers of a crashed run can be found. */
export const LAB_LABEL = 'xmasq.lab';

function onPath(tool: string): string | undefined {
  for (const dir of `${process.env.PATH ?? ''}:${SYSTEM_PATH}`.split(':')) {
    if (dir && existsSync(join(dir, tool))) return join(dir, tool);
  }
  return undefined;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const tail = (text: string, lines = 15) => text.trim().split('\n').slice(-lines).join('\n  ');

function readPid(file: string): number | undefined {
  try {
    const pid = Number(readFileSync(file, 'utf8').trim());
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** True when the ELF file has no PT_INTERP program header, i.e. runs without a dynamic loader (and libc) in the image. */
export function isStaticElf(file: string): boolean {
  const fd = openSync(file, 'r');
  try {
    const head = Buffer.alloc(64);
    readSync(fd, head, 0, 64, 0);
    if (head.readUInt32BE(0) !== 0x7f454c46 || head[4] !== 2 || head[5] !== 1) return false; // ELF64 little-endian only
    const phoff = Number(head.readBigUInt64LE(32));
    const phentsize = head.readUInt16LE(54), phnum = head.readUInt16LE(56);
    const ph = Buffer.alloc(phentsize * phnum);
    readSync(fd, ph, 0, ph.length, phoff);
    for (let i = 0; i < phnum; i++) if (ph.readUInt32LE(i * phentsize) === 3 /* PT_INTERP */) return false;
    return true;
  } finally {
    closeSync(fd);
  }
}

function staticBusybox(): string | undefined {
  return BUSYBOX_PATHS.find((p) => existsSync(p) && isStaticElf(p));
}

/**
 * Installs docker.io and busybox-static with apt-get when dockerd or a static busybox is
 * missing (scripts/setup.sh should already have). While apt runs, a policy-rc.d (when the
 * system has none) keeps the package's docker.service from starting: that stock daemon would
 * create docker0 and iptables rules in the host's namespace. Throws with the command to run
 * by hand when the install fails.
 */
export async function ensureDockerPackages(): Promise<void> {
  const missing = () => [...(onPath('dockerd') && onPath('containerd') && onPath('runc') ? [] : ['docker.io']), ...(staticBusybox() ? [] : ['busybox-static'])];
  const want = missing();
  if (!want.length) return;
  if (process.getuid?.() !== 0) throw new Error(`${want.join(', ')} missing and not root: run 'apt-get install -y ${want.join(' ')}' as root`);
  const policy = '/usr/sbin/policy-rc.d';
  const ownPolicy = !existsSync(policy);
  if (ownPolicy) {
    writeFileSync(policy, '#!/bin/sh\n# written by xmasq lab/docker.ts while it installs docker.io; removed right after\nexit 101\n');
    chmodSync(policy, 0o755);
  }
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive', PATH: `${process.env.PATH ?? ''}:${SYSTEM_PATH}` };
  const install = () => run('apt-get', ['install', '-y', '-q', '--no-install-recommends', ...want], { env, timeoutMs: 300_000 });
  try {
    let r = await install();
    if (r.code !== 0) {
      // A machine that never ran apt-get update has no package lists yet.
      await run('apt-get', ['update', '-q'], { env, timeoutMs: 300_000 });
      r = await install();
    }
    if (r.code !== 0 || missing().length) {
      throw new Error(`${want.join(', ')} could not be installed ('apt-get install -y --no-install-recommends ${want.join(' ')}' exited ${r.code}):\n  ${tail(r.stderr || r.stdout)}\n` +
        `  install them by hand (scripts/setup.sh) and run again`);
    }
  } finally {
    if (ownPolicy) rmSync(policy, { force: true });
  }
}

/**
 * A Docker daemon the CLI can reach: the system's (whatever `docker info` reaches), or one
 * started here. stop() stops only a daemon started here.
 */
export class DockerDaemon {
  private constructor(
    readonly cli: string,
    /** ['-H', 'unix://…'] for the daemon started here, [] for the system's. */
    readonly hostArgs: string[],
    /**
     * 'system': whatever `docker info` reached first (left running by stop()); 'started': by
     * this process; 'adopted': one a crashed run of this file left on our socket.
     */
    readonly origin: 'system' | 'started' | 'adopted',
    readonly pid: number | undefined,
    /** How long the daemon took to answer, 0 when it was already running. */
    readonly startMs: number,
  ) {}

  /**
   * Installs the packages when needed, then: the system daemon if `docker info` works;
   * else the daemon of a previous (crashed) run if our socket answers; else starts one.
   * XMASQ_OWN_DOCKERD=1 skips the system daemon even when it answers.
   */
  static async ensure(opts: { timeoutMs?: number } = {}): Promise<DockerDaemon> {
    await ensureDockerPackages();
    const cli = existsSync(DEBIAN_DOCKER_CLI) ? DEBIAN_DOCKER_CLI : onPath('docker');
    if (!cli) throw new Error(`no docker CLI found; install it with 'apt-get install -y docker.io'`);
    const hostArgs = ['-H', `unix://${SOCKET}`];
    if (!process.env.XMASQ_OWN_DOCKERD && (await run(cli, ['info'], { timeoutMs: 15_000 })).code === 0) {
      return new DockerDaemon(cli, [], 'system', undefined, 0);
    }
    if (existsSync(SOCKET) && (await run(cli, [...hostArgs, 'info'], { timeoutMs: 15_000 })).code === 0) {
      return new DockerDaemon(cli, hostArgs, 'adopted', readPid(PIDFILE), 0);
    }
    const dockerd = onPath('dockerd');
    if (!dockerd) throw new Error(`dockerd not found; install it with 'apt-get install -y docker.io'`);
    const stale = readPid(PIDFILE);
    if (stale !== undefined && pidAlive(stale)) {
      throw new Error(`a dockerd (pid ${stale}, ${PIDFILE}) runs but does not answer on ${SOCKET}; see ${LOG}, stop it ('kill ${stale}') and run again`);
    }
    mkdirSync(DOCKER_RUN_DIR, { recursive: true });
    mkdirSync(DOCKER_DATA_ROOT, { recursive: true });
    const log = openSync(LOG, 'w');
    const started = Date.now();
    // Detached, in its own process group: it outlives a test worker killed midway, and the
    // next run adopts it through the socket instead of failing on the pidfile.
    const child = spawn(dockerd, [
      '--host', `unix://${SOCKET}`, '--pidfile', PIDFILE, '--exec-root', EXEC_ROOT, '--data-root', DOCKER_DATA_ROOT,
      '--iptables=false', '--ip6tables=false', '--ip-forward=false', '--ip-masq=false', '--bridge=none',
    ], { detached: true, stdio: ['ignore', log, log], env: { ...process.env, PATH: `${process.env.PATH ?? ''}:${SYSTEM_PATH}` } });
    closeSync(log);
    let exit: string | undefined;
    child.once('exit', (code, signal) => { exit = signal ?? String(code); });
    child.once('error', (e) => { exit = e.message; });
    child.unref();
    const deadline = started + (opts.timeoutMs ?? 30_000);
    for (;;) {
      if (existsSync(SOCKET) && (await run(cli, [...hostArgs, 'info'], { timeoutMs: 5_000 })).code === 0) break;
      if (exit !== undefined || Date.now() > deadline) {
        if (exit === undefined && child.pid) process.kill(child.pid, 'SIGKILL');
        const text = existsSync(LOG) ? readFileSync(LOG, 'utf8') : '';
        throw new Error(`dockerd ${exit !== undefined ? `exited (${exit})` : `did not answer on ${SOCKET} within ${opts.timeoutMs ?? 30_000} ms`}; last lines of ${LOG}:\n  ${tail(text)}`);
      }
      await sleep(100);
    }
    return new DockerDaemon(cli, hostArgs, 'started', child.pid, Date.now() - started);
  }

  /**
   * A daemon someone else started and stops (the kubelet stand-in's per-node runtimes), reached
   * on its own socket; stop() leaves it alone.
   */
  static at(socket: string, pid: number | undefined): DockerDaemon {
    const cli = existsSync(DEBIAN_DOCKER_CLI) ? DEBIAN_DOCKER_CLI : onPath('docker');
    if (!cli) throw new Error(`no docker CLI found; install it with 'apt-get install -y docker.io'`);
    return new DockerDaemon(cli, ['-H', `unix://${socket}`], 'system', pid, 0);
  }

  /** Whether stop() stops it: a daemon started or adopted here. */
  get ownedByUs(): boolean {
    return this.origin !== 'system';
  }

  /** A docker CLI command; never rejects (see RunResult.code). */
  run(args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
    return run(this.cli, [...this.hostArgs, ...args], { timeoutMs: 60_000, ...opts });
  }

  async must(args: readonly string[], opts: RunOptions & { what?: string } = {}): Promise<RunResult> {
    return mustRun(this.cli, [...this.hostArgs, ...args], { timeoutMs: 60_000, ...opts });
  }

  /**
   * Stops the daemon if this process owns it: SIGTERM (it stops its containerd itself), then
   * SIGKILL to both after timeoutMs. A system daemon is left alone. The data root stays.
   */
  async stop(timeoutMs = 20_000): Promise<void> {
    if (!this.ownedByUs) return;
    const pid = this.pid ?? readPid(PIDFILE);
    if (pid === undefined || !pidAlive(pid)) return;
    const containerd = readPid(CONTAINERD_PIDFILE);
    process.kill(pid, 'SIGTERM');
    const deadline = Date.now() + timeoutMs;
    while (pidAlive(pid) && Date.now() < deadline) await sleep(100);
    if (pidAlive(pid)) {
      process.kill(pid, 'SIGKILL');
      if (containerd !== undefined && pidAlive(containerd)) process.kill(containerd, 'SIGKILL');
      while (pidAlive(pid)) await sleep(50);
    }
  }
}

/**
 * The busybox image, imported from a rootfs made here (busyboxRootfsTar). Skipped when the
 * image exists. No registry involved.
 */
export async function ensureBusyboxImage(docker: DockerDaemon, image: string = BUSYBOX_IMAGE): Promise<{ image: string; built: boolean }> {
  if ((await docker.run(['image', 'inspect', '--format', '{{.Id}}', image])).code === 0) return { image, built: false };
  const work = mkdtempSync(join(tmpdir(), 'xmasq-busybox-'));
  try {
    const tar = await busyboxRootfsTar(work);
    await docker.must(['import', '--change', 'CMD ["sh"]', '--change', 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin', '--message', 'xmasq lab: Debian busybox-static', tar, image],
      { what: `importing ${image}`, timeoutMs: 120_000 });
    return { image, built: true };
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/**
 * Writes <work>/rootfs.tar, a root filesystem for `docker import` or `podman import`:
 * Debian's static busybox, a symlink for each of its applets (sh, ping, nc, wget, sleep…),
 * a minimal /etc/passwd and /etc/group. Returns the tar's path.
 */
export async function busyboxRootfsTar(work: string): Promise<string> {
  const busybox = staticBusybox();
  if (!busybox) throw new Error(`no statically linked busybox at ${BUSYBOX_PATHS.join(' or ')}; install it with 'apt-get install -y busybox-static'`);
  const root = join(work, 'rootfs');
  for (const d of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'etc', 'root', 'proc', 'sys', 'dev', 'tmp']) mkdirSync(join(root, d), { recursive: true });
  chmodSync(join(root, 'tmp'), 0o1777);
  copyFileSync(busybox, join(root, 'bin/busybox'));
  chmodSync(join(root, 'bin/busybox'), 0o755);
  const list = await mustRun(busybox, ['--list-full'], { what: 'listing the busybox applets' });
  for (const applet of list.stdout.split('\n').map((l) => l.trim()).filter(Boolean)) {
    if (applet === 'bin/busybox' || applet.includes('..') || existsSync(join(root, applet))) continue;
    mkdirSync(dirname(join(root, applet)), { recursive: true });
    symlinkSync('/bin/busybox', join(root, applet));
  }
  writeFileSync(join(root, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n');
  writeFileSync(join(root, 'etc/group'), 'root:x:0:\nnogroup:x:65534:\n');
  const tar = join(work, 'rootfs.tar');
  await mustRun('tar', ['-C', root, '--numeric-owner', '--owner=0', '--group=0', '-cf', tar, '.'], { what: 'packing the busybox rootfs' });
  return tar;
}

/**
 * A pod that is a container: a lab pod (its netns pinned as /run/netns/<netns>, as CRI
 * runtimes pin a sandbox's, so DEL finds it even when the container's process is gone)
 * with what docker and DEL need besides.
 */
export interface ContainerPod extends LabPod {
  containerName: string;
  /** PID of the container's init (sleep) in the caller's PID namespace. */
  pid: number;
  /** What DEL needs. */
  cni: { list: CniConfList; invocation: CniInvocation; result: CniResult };
}

export interface ContainerPodOptions {
  image?: string;
  /**
   * CNI_PATH. Default: the one the lab was created with.
   */
  cniPath?: readonly string[];
  /** Ask host-local for this address. */
  ip?: string;
}


/** Netns names with '_', which neither lab names nor pod names may contain: never one of a lab's own. */
const netnsName = (labName: string, pod: string) => `xmasq_ctr_${labName}_${pod}`;
export const containerName = (labName: string, pod: string) => `xmasq-${labName}-${pod}`;

async function linkInfo(netns: string, dev: string): Promise<{ ifindex: number; ifname: string; address: string; link_index?: number }> {
  const r = await mustRun('ip', ['-n', netns, '-j', 'link', 'show', 'dev', dev], { what: `reading ${dev} in netns ${netns}` });
  return (JSON.parse(r.stdout) as { ifindex: number; ifname: string; address: string; link_index?: number }[])[0];
}

/**
 * Starts a container (`--network none`, kept alive by `sleep 3600`), pins its netns and runs
 * the lab host's CNI chain (bridge + host-local + whatever the lab appends, e.g. xmasq) into
 * it, with the plugins running in the host's netns. Like lab.addPod it then turns checksum
 * offload off when the lab has it off, and makes the container ARP for its gateway. On any
 * failure everything done so far is undone before the error is thrown.
 */
export async function addContainerPod(docker: DockerDaemon, lab: Lab, hostRef: string | number | LabHost, name: string, opts: ContainerPodOptions = {}): Promise<ContainerPod> {
  if (!/^[a-z0-9][a-z0-9-]{0,30}$/.test(name)) throw new Error(`invalid container pod name ${JSON.stringify(name)}: lower-case letters, digits and '-'`);
  const host = lab.host(hostRef);
  const cname = containerName(lab.name, name);
  const netns = netnsName(lab.name, name);
  if (existsSync(netnsPath(netns))) throw new Error(`netns ${netns} already exists; remove it ('ip netns delete ${netns}') or use another pod name`);
  const list = lab.confList(host);
  const image = opts.image ?? BUSYBOX_IMAGE;

  const started = await docker.must(['run', '--detach', '--name', cname, '--hostname', name, '--network', 'none',
    '--label', `${LAB_LABEL}=${lab.name}`, '--log-driver', 'none', image, 'sleep', '3600'], { what: `starting container ${cname}` });
  const containerId = started.stdout.trim().split('\n').pop()!;
  const args: Record<string, string> = { K8S_POD_NAMESPACE: lab.name, K8S_POD_NAME: name, K8S_POD_INFRA_CONTAINER_ID: containerId };
  if (opts.ip !== undefined) args.IP = opts.ip;
  const invocation: CniInvocation = {
    containerId, netns, ifname: POD_IFNAME, path: opts.cniPath ?? lab.cniPath, args, pluginNetns: host.netns,
  };
  let result: CniResult | undefined;
  try {
    const pid = Number((await docker.must(['inspect', '--format', '{{.State.Pid}}', containerId], { what: `pid of ${cname}` })).stdout.trim());
    if (!Number.isInteger(pid) || pid <= 0) throw new Error(`container ${cname} is not running (State.Pid ${pid})`);
    await mustRun('ip', ['netns', 'attach', netns, String(pid)], { what: `pinning the netns of ${cname} (/proc/${pid}/ns/net)` });
    // cniAdd DELs the chain itself when a plugin fails.
    result = await cniAdd(list, invocation);

    const eth0 = await linkInfo(netns, POD_IFNAME);
    if (eth0.link_index === undefined) throw new Error(`${cname}: ${POD_IFNAME} has no peer; the CNI chain did not create a veth`);
    const links = JSON.parse((await mustRun('ip', ['-n', host.netns, '-j', 'link', 'show'], { what: `links of ${host.netns}` })).stdout) as { ifindex: number; ifname: string }[];
    const peer = links.find((l) => l.ifindex === eth0.link_index);
    if (!peer) throw new Error(`${cname}: the peer of ${POD_IFNAME} (ifindex ${eth0.link_index}) is not in ${host.netns}`);
    const v4 = result.ips?.find((x) => x.address.includes('.'));
    if (!v4) throw new Error(`${cname}: the CNI result has no IPv4 address: ${JSON.stringify(result)}`);
    if (!lab.checksumOffload) {
      for (const [ns, dev] of [[netns, POD_IFNAME], [host.netns, peer.ifname]]) {
        await mustRun('nsenter', [`--net=${netnsPath(ns)}`, '--', 'ethtool', '-K', dev, 'rx', 'off', 'tx', 'off'], { what: `checksum offload off on ${dev} in ${ns}` });
      }
    }
    // As lab.addPod: the first packet ARPs for the gateway, so the host learns the new MAC now.
    const gw = v4.gateway ?? host.gateway;
    let ping: RunResult | undefined;
    for (let i = 0; i < 3 && ping?.code !== 0; i++) ping = await run('nsenter', [`--net=${netnsPath(netns)}`, '--', 'ping', '-c', '1', '-W', '1', gw]);
    if (ping!.code !== 0) throw new CommandError('ping', [gw], ping!, `${cname} cannot reach its gateway`);
    return {
      name, host: host.name, containerName: cname, containerId, pid, netns,
      ip: v4.address.split('/')[0], mac: eth0.address, hostVeth: peer.ifname, hostVethIfindex: peer.ifindex,
      ifname: POD_IFNAME, ifindex: eth0.ifindex, cni: { list, invocation, result },
    };
  } catch (e) {
    const problems: string[] = [];
    if (result) await cniDel(list, invocation, result).catch((d: Error) => problems.push(`CNI DEL: ${d.message}`));
    const rm = await docker.run(['rm', '--force', containerId]);
    if (rm.code !== 0) problems.push(`docker rm: ${rm.stderr.trim()}`);
    if (existsSync(netnsPath(netns))) await run('ip', ['netns', 'delete', netns]);
    if (problems.length && e instanceof Error) e.message += `\n  (cleanup: ${problems.join('; ')})`;
    throw e;
  }
}

/**
 * CNI DEL (the xmasq plugin's DEL runs before host-local frees the IP), then `docker rm -f`,
 * then the netns pin. Every step is tried; the errors are thrown together.
 */
export async function deleteContainerPod(docker: DockerDaemon, pod: ContainerPod): Promise<void> {
  const problems: string[] = [];
  await cniDel(pod.cni.list, pod.cni.invocation, pod.cni.result).catch((e: Error) => problems.push(`CNI DEL: ${e.message}`));
  const rm = await docker.run(['rm', '--force', pod.containerId]);
  if (rm.code !== 0 && !/No such container/i.test(rm.stderr)) problems.push(`docker rm ${pod.containerName}: ${rm.stderr.trim()}`);
  if (existsSync(netnsPath(pod.netns))) {
    const r = await run('ip', ['netns', 'delete', pod.netns]);
    if (r.code !== 0 && existsSync(netnsPath(pod.netns))) problems.push(`ip netns delete ${pod.netns}: ${r.stderr.trim()}`);
  }
  if (problems.length) throw new Error(`deleting container pod ${pod.name}:\n  ${problems.join('\n  ')}`);
}

/** Runs a command in the container (`docker exec`); never rejects. */
export function containerExec(docker: DockerDaemon, pod: Pick<ContainerPod, 'containerId'>, cmd: string, args: readonly string[] = [], opts: RunOptions = {}): Promise<RunResult> {
  return docker.run(['exec', pod.containerId, cmd, ...args], opts);
}

/**
 * Safety net for a crashed run: removes every container labelled with the lab's name and
 * every netns pin of its container pods, without CNI DEL (the lab's own teardown removes what
 * the chain created on its hosts). Returns what it removed.
 */
export async function removeLabContainers(docker: DockerDaemon, labName: string): Promise<string[]> {
  const removed: string[] = [];
  const ps = await docker.run(['ps', '--all', '--quiet', '--filter', `label=${LAB_LABEL}=${labName}`]);
  for (const id of ps.stdout.split('\n').map((l) => l.trim()).filter(Boolean)) {
    if ((await docker.run(['rm', '--force', id])).code === 0) removed.push(`container ${id.slice(0, 12)}`);
  }
  const prefix = netnsName(labName, '');
  const list = await run('ip', ['netns', 'list']);
  for (const ns of list.stdout.split('\n').map((l) => l.split(' ')[0]).filter((n) => n.startsWith(prefix))) {
    if ((await run('ip', ['netns', 'delete', ns])).code === 0) removed.push(`netns ${ns}`);
  }
  return removed;
}
