/**
 * A stand-in for kubelet: no API server and no kubelet can run here, so this takes the pod
 * template of a DaemonSet as parsed from its YAML (deploy/kubernetes/xmasq.yaml) and runs it
 * on one lab host the way kubelet runs a pod through a container runtime: init containers
 * one after another, each to completion, then the containers; startup, readiness and
 * liveness probes (httpGet) from the node's network namespace, a container killed and
 * started again after failureThreshold liveness failures; on deletion the preStop exec hooks,
 * then SIGTERM and the grace period. Every setting comes from a field of the spec
 * (dockerRunArgs); a field it does not know is refused, never ignored, so the manifest
 * cannot gain a setting that the lab silently leaves out.
 *
 * What a node is here. A lab host is a network namespace; the lab's hosts share this
 * machine's file system and PID namespace. For a pod with `hostNetwork: true` to be in the
 * host's network namespace, each node gets a container runtime of its own started inside
 * that namespace: a dockerd (Debian's docker.io, as lab/docker.ts starts one: no bridge, no
 * iptables, no NAT) whose `--network host` is the lab host's namespace, as a node's runtime's
 * is the node's. That dockerd also runs in a mount namespace of the node's own, in which
 * the node's /opt, /etc/cni/net.d, /run/xmasq and /sys/fs/bpf are directories under the
 * node's root (nodeRoot below) bind-mounted over the machine's: so the manifest's hostPath
 * volumes are used unchanged (a hostPath names a path on the node), two nodes never share
 * a socket, pins or CNI files, and nothing of the machine's own is written. The node's
 * /sys/fs/bpf starts as a plain directory on a shared mount, so the manifest's privileged
 * init container really mounts bpffs there, and its Bidirectional propagation is what makes
 * that mount the node's. hostPID: the containers see this machine's PIDs, which are the
 * node's too. Everything else of the node's file system (/proc, /var/run/netns, /usr) is the
 * machine's.
 *
 * Pods that are not hostNetwork (the workloads the agent serves) are sandboxes as a CRI
 * runtime makes them: a network namespace pinned under /run/netns and the node's CNI chain
 * run into it: the first conflist of the node's /etc/cni/net.d by name, its plugins from the
 * node's /opt/cni/bin, run in the node's network and mount namespaces (the xmasq plugin
 * reaches the agent at /run/xmasq/agent.sock, the node's).
 *
 * Not done, because nothing here needs it: pulling images (the image must be on the node:
 * imagePullPolicy IfNotPresent or Never), environment values from references, Services,
 * non-hostNetwork pods with containers, memory requests (kubelet sets no cgroup value for
 * them with cgroup v1, this machine's), scheduling fields (a DaemonSet pod runs on every
 * node; priorityClassName and tolerations only matter for eviction and taints).
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { parse as parseYaml } from 'yaml';
import { cniAdd, cniDel, type CniConfList, type CniInvocation, type CniResult } from './cni.ts';
import { CommandError, mustRun, netnsPath, pidAlive, run, type RunOptions, type RunResult } from '../testing/command.ts';
import { DockerDaemon } from './docker.ts';
import type { Lab, LabHost, LabPod } from './lab.ts';

/** Nodes' roots and runtimes' sockets: /run/xmasq-kubelet/<lab>/<host>/. */
export const STANDIN_RUN_DIR = '/run/xmasq-kubelet';
/** Each node's image store, kept between runs (loading the image takes seconds): /var/lib/xmasq-kubelet/<host>. */
export const STANDIN_DATA_ROOT = '/var/lib/xmasq-kubelet';
/** Label on every container the stand-in runs: the pod's name. */
const POD_LABEL = 'xmasq.kubelet-standin.pod';
const SYSTEM_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
/** The node's directories bind-mounted over the machine's in the node's mount namespace. */
const NODE_DIRS = ['/opt', '/etc/cni/net.d', '/run/xmasq', '/sys/fs/bpf'] as const;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// ---- the spec ---------------------------------------------------------------------------

type Json = Record<string, unknown>;
const isObject = (x: unknown): x is Json => typeof x === 'object' && x !== null && !Array.isArray(x);

export interface HttpGetProbe {
  httpGet: { host?: string; port: number; path?: string; scheme?: string };
  initialDelaySeconds?: number;
  periodSeconds?: number;
  timeoutSeconds?: number;
  failureThreshold?: number;
  successThreshold?: number;
}

export interface ContainerSpec {
  name: string;
  image: string;
  imagePullPolicy?: string;
  command?: string[];
  args?: string[];
  env?: { name: string; value?: string }[];
  securityContext?: {
    privileged?: boolean;
    allowPrivilegeEscalation?: boolean;
    readOnlyRootFilesystem?: boolean;
    capabilities?: { add?: string[]; drop?: string[] };
  };
  volumeMounts?: { name: string; mountPath: string; mountPropagation?: string; readOnly?: boolean }[];
  resources?: { requests?: Record<string, string | number>; limits?: Record<string, string | number> };
  startupProbe?: HttpGetProbe;
  livenessProbe?: HttpGetProbe;
  readinessProbe?: HttpGetProbe;
  lifecycle?: { preStop?: { exec: { command: string[] } } };
}

export interface VolumeSpec {
  name: string;
  hostPath?: { path: string; type?: string };
  emptyDir?: { medium?: string; sizeLimit?: string };
}

export interface PodSpec {
  hostNetwork?: boolean;
  hostPID?: boolean;
  priorityClassName?: string;
  tolerations?: unknown[];
  nodeSelector?: Record<string, string>;
  automountServiceAccountToken?: boolean;
  terminationGracePeriodSeconds?: number;
  initContainers?: ContainerSpec[];
  containers: ContainerSpec[];
  volumes?: VolumeSpec[];
}

export interface PodTemplate {
  metadata: { labels?: Record<string, string>; annotations?: Record<string, string> };
  spec: PodSpec;
}

/** Which fields of each object the stand-in acts on. Anything else in the manifest is refused. */
const KNOWN: Record<string, readonly string[]> = {
  template: ['metadata', 'spec'],
  metadata: ['labels', 'annotations'],
  pod: ['hostNetwork', 'hostPID', 'priorityClassName', 'tolerations', 'nodeSelector', 'automountServiceAccountToken',
    'terminationGracePeriodSeconds', 'initContainers', 'containers', 'volumes'],
  container: ['name', 'image', 'imagePullPolicy', 'command', 'args', 'env', 'securityContext', 'volumeMounts', 'resources',
    'startupProbe', 'livenessProbe', 'readinessProbe', 'lifecycle'],
  env: ['name', 'value'],
  securityContext: ['privileged', 'allowPrivilegeEscalation', 'readOnlyRootFilesystem', 'capabilities'],
  capabilities: ['add', 'drop'],
  volumeMount: ['name', 'mountPath', 'mountPropagation', 'readOnly'],
  resources: ['requests', 'limits'],
  quantities: ['cpu', 'memory'],
  probe: ['httpGet', 'initialDelaySeconds', 'periodSeconds', 'timeoutSeconds', 'failureThreshold', 'successThreshold'],
  httpGet: ['host', 'port', 'path', 'scheme'],
  lifecycle: ['preStop'],
  preStop: ['exec'],
  exec: ['command'],
  volume: ['name', 'hostPath', 'emptyDir'],
  hostPath: ['path', 'type'],
  emptyDir: ['medium', 'sizeLimit'],
};

function checkKeys(what: string, kind: keyof typeof KNOWN, o: unknown): void {
  if (!isObject(o)) throw new Error(`kubelet stand-in: ${what} is not an object`);
  const unknown = Object.keys(o).filter((k) => !KNOWN[kind].includes(k));
  if (unknown.length) throw new Error(`kubelet stand-in: ${what} has ${unknown.join(', ')}, which this stand-in does not run; teach lab/kubelet-standin.ts what it means first`);
}

/** Refuses any field the stand-in would not carry out. */
export function checkTemplate(t: PodTemplate): void {
  checkKeys('the pod template', 'template', t);
  checkKeys('the pod metadata', 'metadata', t.metadata ?? {});
  checkKeys('the pod spec', 'pod', t.spec);
  for (const c of [...(t.spec.initContainers ?? []), ...t.spec.containers]) {
    const w = `container ${c.name}`;
    checkKeys(w, 'container', c);
    for (const e of c.env ?? []) checkKeys(`${w} env ${e.name}`, 'env', e);
    if (c.securityContext) {
      checkKeys(`${w} securityContext`, 'securityContext', c.securityContext);
      if (c.securityContext.capabilities) checkKeys(`${w} capabilities`, 'capabilities', c.securityContext.capabilities);
    }
    for (const m of c.volumeMounts ?? []) checkKeys(`${w} volumeMount ${m.name}`, 'volumeMount', m);
    if (c.resources) {
      checkKeys(`${w} resources`, 'resources', c.resources);
      for (const q of [c.resources.requests, c.resources.limits]) if (q) checkKeys(`${w} resources`, 'quantities', q);
    }
    for (const p of [c.startupProbe, c.livenessProbe, c.readinessProbe]) {
      if (!p) continue;
      checkKeys(`${w} probe`, 'probe', p);
      checkKeys(`${w} probe httpGet`, 'httpGet', p.httpGet);
    }
    if (c.lifecycle) {
      checkKeys(`${w} lifecycle`, 'lifecycle', c.lifecycle);
      if (c.lifecycle.preStop) {
        checkKeys(`${w} preStop`, 'preStop', c.lifecycle.preStop);
        checkKeys(`${w} preStop exec`, 'exec', c.lifecycle.preStop.exec);
      }
    }
  }
  for (const v of t.spec.volumes ?? []) {
    checkKeys(`volume ${v.name}`, 'volume', v);
    if (v.hostPath) checkKeys(`volume ${v.name} hostPath`, 'hostPath', v.hostPath);
    if (v.emptyDir) checkKeys(`volume ${v.name} emptyDir`, 'emptyDir', v.emptyDir);
  }
  if (!t.spec.hostNetwork) throw new Error('kubelet stand-in: only hostNetwork pods run as containers here (workload pods are sandboxes: KubeletStandin.addSandbox)');
  if (t.spec.automountServiceAccountToken !== false) throw new Error('kubelet stand-in: there is no API server here, so no ServiceAccount token to mount: the pod must set automountServiceAccountToken: false');
  for (const [k, v] of Object.entries(t.spec.nodeSelector ?? {})) {
    if (!(k === 'kubernetes.io/os' && v === process.platform)) throw new Error(`kubelet stand-in: nodeSelector ${k}=${v} does not match a lab node (kubernetes.io/os=${process.platform})`);
  }
}

/** The pod template of the DaemonSet in a manifest file (the first DaemonSet when there are several documents). */
export function daemonSetTemplate(file: string): { name: string; namespace: string; template: PodTemplate } {
  const docs = readFileSync(file, 'utf8').split(/^---\s*$/m).map((d) => parseYaml(d) as unknown).filter(isObject);
  const ds = docs.find((d) => d.kind === 'DaemonSet') as { metadata: { name: string; namespace?: string }; spec: { template: PodTemplate } } | undefined;
  if (!ds) throw new Error(`${file} holds no DaemonSet`);
  checkTemplate(ds.spec.template);
  return { name: ds.metadata.name, namespace: ds.metadata.namespace ?? 'default', template: ds.spec.template };
}

/** A Kubernetes quantity in bytes (memory) or in thousandths (cpu: "10m", "1", "0.5"). */
export function quantity(q: string | number, kind: 'cpu' | 'memory'): number {
  const m = /^([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$/.exec(String(q));
  if (!m) throw new Error(`kubelet stand-in: cannot read the ${kind} quantity ${JSON.stringify(q)}`);
  const n = Number(m[1]);
  if (kind === 'cpu') {
    if (m[2] && m[2] !== 'm') throw new Error(`kubelet stand-in: cpu quantity ${q}: only plain cores or millicores`);
    return Math.round(m[2] === 'm' ? n : n * 1000);
  }
  const unit: Record<string, number> = { Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, Ti: 2 ** 40, k: 1e3, M: 1e6, G: 1e9, T: 1e12, m: 1e-3 };
  return Math.round(n * (m[2] ? unit[m[2]] : 1));
}

/** Docker's propagation for Kubernetes' mountPropagation (what containerd's CRI plugin does too). */
const PROPAGATION: Record<string, string> = { None: 'rprivate', HostToContainer: 'rslave', Bidirectional: 'rshared' };
/** Kubernetes names capabilities without CAP_; Docker takes both. */
const cap = (c: string) => c.toUpperCase().replace(/^CAP_/, '');

/**
 * Capabilities Debian's Docker 20.10 does not know (Linux 5.8's and 5.9's): it refuses them
 * in --cap-add, so the stand-in hands them to its OCI runtime wrapper (RUNTIME_SCRIPT) in this
 * variable, which adds them to the container's sets and removes the variable.
 */
const NEW_CAPS = ['PERFMON', 'BPF', 'CHECKPOINT_RESTORE'];
export const CAPS_ENV = 'XMASQ_KUBELET_STANDIN_CAP_ADD';

export interface RunContext {
  /** The node runtime's data root: Docker refuses a private bind of a tree that holds it. */
  dataRoot: string;
  /** The pod's name (containers are named <pod>-<container>). */
  pod: string;
  /** Docker volume per emptyDir of the pod. */
  emptyDirVolume: (name: string) => string;
}

/**
 * `docker run` arguments (after `run`) for one container of a hostNetwork pod, each from a
 * field of the spec. Kubelet's defaults where the spec says nothing: seccomp Unconfined
 * (kubelet's default unless a profile is set or SeccompDefault is on), the runtime's
 * default AppArmor profile unless the pod's annotation names another.
 */
export function dockerRunArgs(t: PodTemplate, c: ContainerSpec, ctx: RunContext): string[] {
  const s = t.spec;
  const a: string[] = ['--name', `${ctx.pod}-${c.name}`, '--label', `${POD_LABEL}=${ctx.pod}`];
  if (c.imagePullPolicy === 'Always') throw new Error(`kubelet stand-in: container ${c.name} asks to pull its image always; there is no registry here (IfNotPresent or Never)`);
  // hostNetwork: the node's runtime's host network, i.e. the lab host's namespace. Kubelet gives
  // such a pod the node's UTS namespace too (its hostname is the node's).
  if (s.hostNetwork) a.push('--network', 'host', '--uts', 'host');
  if (s.hostPID) a.push('--pid', 'host');
  const sc = c.securityContext ?? {};
  // Privileged: every capability of the runtime's bounding set (the wrapper drops those Docker
  // 20.10 asks for beyond it, as containerd does), every device, no confinement.
  if (sc.privileged) a.push('--privileged');
  for (const d of sc.capabilities?.drop ?? []) a.push('--cap-drop', cap(d));
  const add = (sc.capabilities?.add ?? []).map(cap);
  for (const d of add.filter((x) => !NEW_CAPS.includes(x))) a.push('--cap-add', d);
  const newer = add.filter((x) => NEW_CAPS.includes(x));
  if (newer.length) a.push('--env', `${CAPS_ENV}=${newer.join(',')}`);
  if (sc.allowPrivilegeEscalation === false) a.push('--security-opt', 'no-new-privileges');
  if (sc.readOnlyRootFilesystem) a.push('--read-only');
  a.push('--security-opt', 'seccomp=unconfined');
  const apparmor = t.metadata.annotations?.[`container.apparmor.security.beta.kubernetes.io/${c.name}`];
  if (apparmor !== undefined) {
    if (apparmor === 'unconfined') a.push('--security-opt', 'apparmor=unconfined');
    else if (apparmor !== 'runtime/default') throw new Error(`kubelet stand-in: AppArmor profile ${apparmor} of ${c.name} is not one the lab has`);
  }
  for (const m of c.volumeMounts ?? []) {
    const v = (s.volumes ?? []).find((x) => x.name === m.name);
    if (!v) throw new Error(`kubelet stand-in: container ${c.name} mounts volume ${m.name}, which the pod does not have`);
    const ro = m.readOnly ? ',readonly' : '';
    if (v.hostPath) {
      let prop = PROPAGATION[m.mountPropagation ?? 'None'];
      // Docker (not containerd) refuses a private bind of a tree holding its data root (a
      // node debug pod's "/"); rslave differs only in showing mounts the node makes later.
      const src = v.hostPath.path.endsWith('/') ? v.hostPath.path : `${v.hostPath.path}/`;
      if (prop === 'rprivate' && `${ctx.dataRoot}/`.startsWith(src)) prop = 'rslave';
      if (!prop) throw new Error(`kubelet stand-in: mountPropagation ${m.mountPropagation} of ${m.name} is not a Kubernetes value`);
      if (m.mountPropagation === 'Bidirectional' && !sc.privileged) throw new Error(`kubelet stand-in: ${c.name} mounts ${m.name} Bidirectional without being privileged, which Kubernetes refuses`);
      a.push('--mount', `type=bind,source=${v.hostPath.path},target=${m.mountPath},bind-propagation=${prop}${ro}`);
    } else if (v.emptyDir) {
      a.push('--mount', `type=volume,source=${ctx.emptyDirVolume(v.name)},target=${m.mountPath}${ro}`);
    } else throw new Error(`kubelet stand-in: volume ${v.name} is neither hostPath nor emptyDir`);
  }
  const req = c.resources?.requests ?? {}, lim = c.resources?.limits ?? {};
  // Kubelet: cpu.shares = millicores × 1024 / 1000 (at least 2); the CFS quota of the limit; the memory limit.
  if (req.cpu !== undefined) a.push('--cpu-shares', String(Math.max(2, Math.floor(quantity(req.cpu, 'cpu') * 1024 / 1000))));
  if (lim.cpu !== undefined) a.push('--cpus', String(quantity(lim.cpu, 'cpu') / 1000));
  if (lim.memory !== undefined) a.push('--memory', `${quantity(lim.memory, 'memory')}b`);
  for (const e of c.env ?? []) {
    if (e.value === undefined) throw new Error(`kubelet stand-in: env ${e.name} of ${c.name} has no value (references are not supported)`);
    a.push('--env', `${e.name}=${e.value}`);
  }
  // command replaces the image's ENTRYPOINT, args its CMD.
  if (c.command?.length) a.push('--entrypoint', c.command[0]);
  a.push(c.image);
  if (c.command?.length) a.push(...c.command.slice(1));
  a.push(...(c.args ?? []));
  return a;
}

// ---- the node ---------------------------------------------------------------------------

export interface RunningContainer {
  name: string;
  id: string;
  /** Its main process in this machine's PID namespace. */
  pid: number;
  /** Probe results, oldest first, and restarts after liveness failures. */
  probes: { kind: 'startup' | 'liveness' | 'readiness'; ok: boolean; detail: string; at: number }[];
  restarts: number;
  ready: boolean;
}

export interface RunningPod {
  name: string;
  template: PodTemplate;
  /** Init containers' exit codes and logs, in the order they ran. */
  init: { name: string; code: number; logs: string }[];
  containers: RunningContainer[];
  /** Stops the probe loops. */
  stopProbes: () => void;
}

/** A workload pod: a network namespace the node's CNI chain wired. Shaped like a LabPod for the traffic helpers. */
export interface Sandbox extends LabPod {
  cni: { list: CniConfList; invocation: CniInvocation; result: CniResult };
}

/**
 * The node's OCI runtime: runc behind a wrapper that, on `create`, edits the bundle's
 * config.json the way a current runtime would have written it. (1) Capabilities named in
 * CAPS_ENV are added to the bounding, effective and permitted sets (containerd's CRI
 * plugin knows CAP_BPF and CAP_PERFMON; Debian's Docker 20.10 does not) and the variable is
 * removed from the container's environment. (2) Capabilities outside the runtime's own
 * bounding set are removed from every set: containerd gives a privileged container the
 * capabilities it has, Docker 20.10 asks for every one it knows, and runc cannot grant what
 * the bounding set lacks (this machine's has no CAP_SYS_RESOURCE).
 */
export const RUNTIME_FIX = `const fs = require('fs'); const file = process.argv[2];
const c = JSON.parse(fs.readFileSync(file, 'utf8')); const p = c.process; if (!p) process.exit(0);
const bnd = BigInt('0x' + /^CapBnd:\\s*([0-9a-f]+)$/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))[1]);
const nr = { CAP_PERFMON: 38, CAP_BPF: 39, CAP_CHECKPOINT_RESTORE: 40 };
const v = (p.env || []).find((e) => e.startsWith('${CAPS_ENV}='));
const add = v ? v.slice(${CAPS_ENV.length + 1}).split(',').filter(Boolean).map((x) => 'CAP_' + x) : [];
p.env = (p.env || []).filter((e) => e !== v);
const names = ['CHOWN','DAC_OVERRIDE','DAC_READ_SEARCH','FOWNER','FSETID','KILL','SETGID','SETUID','SETPCAP','LINUX_IMMUTABLE','NET_BIND_SERVICE','NET_BROADCAST','NET_ADMIN','NET_RAW','IPC_LOCK','IPC_OWNER','SYS_MODULE','SYS_RAWIO','SYS_CHROOT','SYS_PTRACE','SYS_PACCT','SYS_ADMIN','SYS_BOOT','SYS_NICE','SYS_RESOURCE','SYS_TIME','SYS_TTY_CONFIG','MKNOD','LEASE','AUDIT_WRITE','AUDIT_CONTROL','SETFCAP','MAC_OVERRIDE','MAC_ADMIN','SYSLOG','WAKE_ALARM','BLOCK_SUSPEND','AUDIT_READ','PERFMON','BPF','CHECKPOINT_RESTORE'].map((n) => 'CAP_' + n);
const has = (n) => { const i = names.indexOf(n); return i >= 0 && (bnd >> BigInt(i)) & 1n; };
const caps = p.capabilities || (p.capabilities = {});
for (const set of ['bounding', 'effective', 'permitted']) caps[set] = [...new Set([...(caps[set] || []), ...add])];
for (const set of Object.keys(caps)) caps[set] = caps[set].filter(has);
fs.writeFileSync(file, JSON.stringify(c));`;

function runtimeScript(fixFile: string): string {
  return `#!/bin/sh
# OCI runtime of a kubelet stand-in node (lab/kubelet-standin.ts): runc, after fixing the capabilities on create.
prev=; bundle=; create=
for a in "$@"; do [ "$prev" = --bundle ] && bundle=$a; [ "$a" = create ] && create=1; prev=$a; done
if [ -n "$create" ] && [ -f "$bundle/config.json" ]; then
  ${process.execPath} ${fixFile} "$bundle/config.json" || { echo "kubelet stand-in runtime: cannot fix $bundle/config.json" >&2; exit 1; }
fi
exec runc "$@"
`;
}

export class KubeletStandin {
  readonly pods = new Map<string, RunningPod>();
  readonly sandboxes = new Map<string, Sandbox>();

  private constructor(
    readonly lab: Lab,
    readonly host: LabHost,
    /** The node's file system root for the directories of NODE_DIRS. */
    readonly nodeRoot: string,
    /** The node's runtime. */
    readonly docker: DockerDaemon,
    /** Its pid, whose namespaces are the node's mount namespace. */
    readonly dockerdPid: number,
    readonly dataRoot: string,
    private readonly createdMountpoints: string[],
  ) {}

  /** The node's mount namespace, for nsenter. */
  get mountNs(): string {
    return `/proc/${this.dockerdPid}/ns/mnt`;
  }

  /** A path of the node's file system as seen from this machine (only for NODE_DIRS). */
  nodePath(path: string): string {
    if (!NODE_DIRS.some((d) => path === d || path.startsWith(`${d}/`))) throw new Error(`${path} is the machine's, not the node's own`);
    return join(this.nodeRoot, path);
  }

  /**
   * Makes the lab host a node: its root with what the overlay's own DaemonSet would have put
   * there (the stock CNI plugins in /opt/cni/bin, `conflist` in /etc/cni/net.d), a default
   * route through its NIC (nodes have one; the agent finds the NIC by it), and its runtime.
   */
  static async start(lab: Lab, hostRef: string | LabHost, opts: { conflist: { file: string; list: CniConfList }; stockPlugins: string[] }): Promise<KubeletStandin> {
    if (process.getuid?.() !== 0) throw new Error('the kubelet stand-in needs root (dockerd, mount and network namespaces)');
    const host = lab.host(hostRef);
    const runDir = join(STANDIN_RUN_DIR, lab.name, host.name);
    const nodeRoot = join(runDir, 'root');
    if (existsSync(runDir)) throw new Error(`${runDir} exists: a node of lab ${lab.name} is already up (or a crashed run left it: see KubeletStandin.cleanupLeftovers)`);
    for (const d of NODE_DIRS) mkdirSync(join(nodeRoot, d), { recursive: true });
    mkdirSync(join(nodeRoot, '/opt/cni/bin'), { recursive: true });
    for (const p of opts.stockPlugins) {
      await mustRun('cp', ['--preserve=mode', p, join(nodeRoot, '/opt/cni/bin')], { what: `putting ${p} on node ${host.name}` });
    }
    writeFileSync(join(nodeRoot, '/etc/cni/net.d', opts.conflist.file), `${JSON.stringify(opts.conflist.list, null, 2)}\n`);
    // Only where the machine lacks them: mount points for the node's directories, left empty.
    const createdMountpoints = NODE_DIRS.filter((d) => !existsSync(d));
    for (const d of createdMountpoints) mkdirSync(d, { recursive: true });
    await mustRun('ip', ['-n', host.netns, 'route', 'replace', 'default', 'dev', host.nic], { what: `a default route on ${host.name}` });

    const dataRoot = join(STANDIN_DATA_ROOT, host.name);
    mkdirSync(dataRoot, { recursive: true });
    const socket = join(runDir, 'docker.sock');
    const log = join(runDir, 'dockerd.log');
    // The node's mount namespace: a slave of this one (nothing mounted in it leaks out), the
    // node's directories bound over the machine's. The machine's bpffs is unmounted there
    // first (the node has none of its own yet; Docker judges a path's propagation by the
    // first mount it finds on it), and the node's /sys/fs/bpf made shared, so that a
    // Bidirectional volume can carry a mount back to the node. Every mount of the node is
    // shared within it (so a bind may be rslave), as systemd makes them on a node.
    const fix = join(runDir, 'runtime-fix.cjs'), runtime = join(runDir, 'runtime');
    writeFileSync(fix, `${RUNTIME_FIX}\n`);
    writeFileSync(runtime, runtimeScript(fix), { mode: 0o755 });
    const binds = NODE_DIRS.map((d) => `mount --bind ${join(nodeRoot, d)} ${d}`).join(' && ');
    const script = `set -e; mount --make-rshared /; while mountpoint -q /sys/fs/bpf; do umount -l /sys/fs/bpf; done; ${binds}; mount --make-private /sys/fs/bpf; mount --make-shared /sys/fs/bpf; ` +
      `exec nsenter --net=${netnsPath(host.netns)} -- dockerd --host unix://${socket} --pidfile ${runDir}/dockerd.pid ` +
      `--exec-root ${runDir}/exec --data-root ${dataRoot} --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false --bridge=none ` +
      `--add-runtime standin=${runtime} --default-runtime standin`;
    const { openSync, closeSync } = await import('node:fs');
    const fd = openSync(log, 'w');
    const child = spawn('unshare', ['--mount', '--propagation', 'slave', '--', 'sh', '-c', script], {
      detached: true, stdio: ['ignore', fd, fd], env: { ...process.env, PATH: `${process.env.PATH ?? ''}:${SYSTEM_PATH}` },
    });
    closeSync(fd);
    let exit: string | undefined;
    child.once('exit', (code, signal) => { exit = signal ?? String(code); });
    child.unref();
    const docker = DockerDaemon.at(socket, child.pid);
    const deadline = Date.now() + 60_000;
    for (;;) {
      if (existsSync(socket) && (await docker.run(['info'], { timeoutMs: 5_000 })).code === 0) break;
      if (exit !== undefined || Date.now() > deadline) {
        if (exit === undefined && child.pid) process.kill(child.pid, 'SIGKILL');
        throw new Error(`node ${host.name}'s dockerd ${exit !== undefined ? `exited (${exit})` : 'did not answer in 60 s'}; ${log}:\n  ${readFileSync(log, 'utf8').trim().split('\n').slice(-10).join('\n  ')}`);
      }
      await sleep(200);
    }
    // The data root is the stand-in's alone: containers and volumes a crashed run left in it go.
    const node = new KubeletStandin(lab, host, nodeRoot, docker, child.pid!, dataRoot, createdMountpoints);
    await node.removeAllContainers();
    return node;
  }

  private async removeAllContainers(): Promise<void> {
    const ps = await this.docker.run(['ps', '--all', '--quiet']);
    for (const id of ps.stdout.split('\n').filter(Boolean)) await this.docker.run(['rm', '--force', '--volumes', id], { timeoutMs: 120_000 });
    const vols = await this.docker.run(['volume', 'ls', '--quiet']);
    for (const v of vols.stdout.split('\n').filter(Boolean)) await this.docker.run(['volume', 'rm', '--force', v]);
  }

  /** Runs a command in the node's mount and network namespaces. */
  onNode(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
    return run('nsenter', [`--mount=${this.mountNs}`, `--net=${netnsPath(this.host.netns)}`, '--', cmd, ...args], opts);
  }

  /** Puts `image` on the node from another daemon (as `ctr images import` of a saved image would): skipped when the node has that image id. */
  async loadImage(from: DockerDaemon, image: string, as: string = image): Promise<{ loaded: boolean; id: string }> {
    const id = (await from.must(['image', 'inspect', '--format', '{{.Id}}', image], { what: `the image ${image}` })).stdout.trim();
    const here = await this.docker.run(['image', 'inspect', '--format', '{{.Id}}', as]);
    if (here.code === 0 && here.stdout.trim() === id) return { loaded: false, id };
    const pipe = `${[from.cli, ...from.hostArgs, 'save', image].join(' ')} | ${[this.docker.cli, ...this.docker.hostArgs, 'load'].join(' ')}`;
    await mustRun('bash', ['-o', 'pipefail', '-c', pipe], { what: `loading ${image} on node ${this.host.name}`, timeoutMs: 300_000 });
    if (as !== image) await this.docker.must(['tag', image, as]);
    return { loaded: true, id };
  }

  /**
   * Runs a hostNetwork pod: its emptyDir volumes, hostPath directories (DirectoryOrCreate),
   * init containers one by one (each must exit 0), then its containers, with their probes.
   * Returns once every container with a startup or readiness probe is ready.
   */
  async runPod(name: string, template: PodTemplate, opts: { readyTimeoutMs?: number } = {}): Promise<RunningPod> {
    checkTemplate(template);
    if (this.pods.has(name)) throw new Error(`pod ${name} already runs on ${this.host.name}`);
    const s = template.spec;
    const emptyDirVolume = (v: string) => `${name}-${v}`;
    for (const v of s.volumes ?? []) {
      if (v.hostPath) {
        const type = v.hostPath.type ?? '';
        if (type === 'DirectoryOrCreate') await this.onNode('mkdir', ['-p', v.hostPath.path]);
        else if (type === 'Directory' || type === '') {
          if ((await this.onNode('test', ['-d', v.hostPath.path])).code !== 0 && type === 'Directory') throw new Error(`hostPath ${v.hostPath.path} is not a directory on ${this.host.name}`);
        } else throw new Error(`kubelet stand-in: hostPath type ${type} of ${v.name} is not supported`);
      } else if (v.emptyDir) {
        const o = v.emptyDir.medium === 'Memory'
          ? ['--opt', 'type=tmpfs', '--opt', 'device=tmpfs', '--opt', `o=${v.emptyDir.sizeLimit ? `size=${quantity(v.emptyDir.sizeLimit, 'memory')}` : 'size=64m'}`]
          : [];
        await this.docker.must(['volume', 'create', '--label', `${POD_LABEL}=${name}`, ...o, emptyDirVolume(v.name)], { what: `emptyDir ${v.name}` });
      }
    }
    const pod: RunningPod = { name, template, init: [], containers: [], stopProbes: () => {} };
    this.pods.set(name, pod);
    const ctx: RunContext = { pod: name, emptyDirVolume, dataRoot: this.dataRoot };
    for (const c of s.initContainers ?? []) {
      const r = await this.docker.run(['run', ...dockerRunArgs(template, c, ctx)], { timeoutMs: 120_000 });
      const logs = `${r.stdout}${r.stderr}`;
      pod.init.push({ name: c.name, code: r.code, logs });
      await this.docker.run(['rm', '--force', `${name}-${c.name}`]);
      if (r.code !== 0) throw new Error(`init container ${c.name} of ${name} on ${this.host.name} exited ${r.code}:\n  ${logs.trim().split('\n').slice(-10).join('\n  ')}`);
    }
    for (const c of s.containers) {
      const id = (await this.docker.must(['run', '--detach', ...dockerRunArgs(template, c, ctx)], { what: `starting ${c.name} of ${name}`, timeoutMs: 120_000 })).stdout.trim();
      pod.containers.push({ name: c.name, id, pid: await this.containerPid(id), probes: [], restarts: 0, ready: !c.startupProbe && !c.readinessProbe });
    }
    pod.stopProbes = this.probeLoops(pod);
    const deadline = Date.now() + (opts.readyTimeoutMs ?? 90_000);
    while (!pod.containers.every((c) => c.ready)) {
      if (Date.now() > deadline) {
        const notReady = pod.containers.filter((c) => !c.ready);
        const logs = await Promise.all(notReady.map(async (c) => `${c.name}: ${(await this.logs(pod, c.name)).trim().split('\n').slice(-8).join('\n    ')}`));
        throw new Error(`pod ${name} on ${this.host.name} not ready in ${opts.readyTimeoutMs ?? 90_000} ms:\n  ${logs.join('\n  ')}`);
      }
      await sleep(200);
    }
    return pod;
  }

  private async containerPid(id: string): Promise<number> {
    const pid = Number((await this.docker.must(['inspect', '--format', '{{.State.Pid}}', id])).stdout.trim());
    if (!(pid > 0)) throw new Error(`container ${id.slice(0, 12)} is not running: ${(await this.docker.run(['logs', '--tail', '10', id])).stderr}`);
    return pid;
  }

  /** One GET from the node's network namespace, as kubelet probes a hostNetwork pod. */
  async probe(p: HttpGetProbe): Promise<{ ok: boolean; detail: string }> {
    const g = p.httpGet;
    if ((g.scheme ?? 'HTTP') !== 'HTTP') throw new Error(`kubelet stand-in: probe scheme ${g.scheme} is not supported`);
    const timeout = p.timeoutSeconds ?? 1;
    const url = `http://${g.host ?? this.host.ip}:${g.port}${g.path ?? '/'}`;
    const r = await run('nsenter', [`--net=${netnsPath(this.host.netns)}`, '--', 'curl', '-s', '-o', '/dev/null', '-w', '%{http_code}', '--max-time', String(timeout), url], { timeoutMs: timeout * 1000 + 5000 });
    const status = Number(r.stdout.trim());
    // Kubelet: 200-399 is a success, anything else (or no answer in timeoutSeconds) a failure.
    return { ok: r.code === 0 && status >= 200 && status < 400, detail: `${url}: ${r.code === 0 ? status : `curl exited ${r.code}`}` };
  }

  /**
   * Kubelet's probe workers: the startup probe until it succeeds (failureThreshold failures:
   * the container is killed and started again), then liveness and readiness every
   * periodSeconds. Liveness failing failureThreshold times in a row: preStop, stop within
   * the grace period, start again.
   */
  private probeLoops(pod: RunningPod): () => void {
    let stopped = false;
    const timers: NodeJS.Timeout[] = [];
    const wait = (ms: number) => new Promise<void>((r) => { const t = setTimeout(r, ms); timers.push(t); });
    for (const c of pod.containers) {
      const spec = pod.template.spec.containers.find((x) => x.name === c.name)!;
      const record = (kind: 'startup' | 'liveness' | 'readiness', r: { ok: boolean; detail: string }) => {
        c.probes.push({ kind, ...r, at: Date.now() });
        if (c.probes.length > 200) c.probes.shift();
      };
      void (async () => {
        for (;;) {
          if (spec.startupProbe) {
            const p = spec.startupProbe;
            await wait((p.initialDelaySeconds ?? 0) * 1000);
            let fails = 0, up = false;
            while (!stopped && !up) {
              const r = await this.probe(p);
              record('startup', r);
              if (r.ok) up = true;
              else if (++fails >= (p.failureThreshold ?? 3)) break;
              else await wait((p.periodSeconds ?? 10) * 1000);
            }
            if (stopped) return;
            if (!up) { await this.restartContainer(pod, c); continue; }
          }
          let liveFails = 0;
          let restart = false;
          while (!stopped && !restart) {
            if (spec.readinessProbe) {
              const r = await this.probe(spec.readinessProbe);
              record('readiness', r);
              c.ready = r.ok;
            } else c.ready = true;
            if (spec.livenessProbe) {
              const r = await this.probe(spec.livenessProbe);
              record('liveness', r);
              liveFails = r.ok ? 0 : liveFails + 1;
              if (liveFails >= (spec.livenessProbe.failureThreshold ?? 3)) restart = true;
            }
            if (!restart) await wait((spec.livenessProbe?.periodSeconds ?? spec.readinessProbe?.periodSeconds ?? 10) * 1000);
          }
          if (stopped) return;
          c.ready = false;
          await this.restartContainer(pod, c);
        }
      })().catch((e: Error) => record('liveness', { ok: false, detail: `probe loop failed: ${e.message}` }));
    }
    return () => {
      stopped = true;
      for (const t of timers) clearTimeout(t);
    };
  }

  /** Kubelet killing a container (preStop, then SIGTERM and the grace period) and starting it again. */
  private async restartContainer(pod: RunningPod, c: RunningContainer): Promise<void> {
    await this.stopContainer(pod, c.name);
    await this.docker.must(['start', c.id], { what: `starting ${c.name} of ${pod.name} again` });
    c.pid = await this.containerPid(c.id);
    c.restarts++;
  }

  /** preStop (if any), then `docker stop` with the pod's grace period less the time preStop took. */
  private async stopContainer(pod: RunningPod, name: string): Promise<{ preStop?: RunResult }> {
    const spec = pod.template.spec.containers.find((x) => x.name === name)!;
    const c = pod.containers.find((x) => x.name === name)!;
    const grace = pod.template.spec.terminationGracePeriodSeconds ?? 30;
    const t0 = Date.now();
    let preStop: RunResult | undefined;
    if (spec.lifecycle?.preStop) {
      const [cmd, ...args] = spec.lifecycle.preStop.exec.command;
      preStop = await this.docker.run(['exec', c.id, cmd, ...args], { timeoutMs: grace * 1000 });
    }
    const left = Math.max(2, grace - Math.ceil((Date.now() - t0) / 1000));
    await this.docker.run(['stop', '--time', String(left), c.id], { timeoutMs: (left + 30) * 1000 });
    return { preStop };
  }

  /** The container's logs (stdout and stderr). */
  async logs(pod: RunningPod, container: string): Promise<string> {
    const c = pod.containers.find((x) => x.name === container);
    if (!c) throw new Error(`pod ${pod.name} has no container ${container}`);
    const r = await this.docker.run(['logs', c.id]);
    return `${r.stdout}${r.stderr}`;
  }

  /** `kubectl exec`: a command in a running container. */
  exec(pod: RunningPod, container: string, cmd: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
    const c = pod.containers.find((x) => x.name === container);
    if (!c) throw new Error(`pod ${pod.name} has no container ${container}`);
    return this.docker.run(['exec', c.id, ...cmd], opts);
  }

  /**
   * Deletes a pod as kubelet does: the probes stop, every container's preStop runs (in
   * parallel), then each is stopped within the grace period; then containers and volumes go.
   * Returns each preStop's outcome and how each container's process ended.
   */
  async deletePod(name: string): Promise<{ preStop: Record<string, RunResult | undefined>; exitCodes: Record<string, number>; logs: Record<string, string> }> {
    const pod = this.pods.get(name);
    if (!pod) throw new Error(`no pod ${name} on ${this.host.name}`);
    pod.stopProbes();
    const preStop: Record<string, RunResult | undefined> = {};
    await Promise.all(pod.containers.map(async (c) => { preStop[c.name] = (await this.stopContainer(pod, c.name)).preStop; }));
    const exitCodes: Record<string, number> = {};
    const logs: Record<string, string> = {};
    for (const c of pod.containers) {
      exitCodes[c.name] = Number((await this.docker.run(['inspect', '--format', '{{.State.ExitCode}}', c.id])).stdout.trim());
      logs[c.name] = await this.logs(pod, c.name);
      await this.docker.run(['rm', '--force', c.id]);
    }
    const vols = await this.docker.run(['volume', 'ls', '--quiet', '--filter', `label=${POD_LABEL}=${name}`]);
    for (const v of vols.stdout.split('\n').filter(Boolean)) await this.docker.run(['volume', 'rm', '--force', v]);
    this.pods.delete(name);
    return { preStop, exitCodes, logs };
  }

  /** The conflist a CRI runtime would use: the first .conf/.conflist/.json of the node's /etc/cni/net.d by name. */
  nodeConfList(): { file: string; list: CniConfList } {
    const dir = this.nodePath('/etc/cni/net.d');
    const file = readdirSync(dir).filter((f) => /\.(conflist|conf|json)$/.test(f)).sort()[0];
    if (!file) throw new Error(`node ${this.host.name} has no CNI config in /etc/cni/net.d`);
    return { file, list: JSON.parse(readFileSync(join(dir, file), 'utf8')) as CniConfList };
  }

  /**
   * A workload pod as a CRI runtime makes its sandbox: a netns `<lab>_<host>_<name>` and the
   * node's CNI chain into it. As lab.addPod: checksum offload off when the lab has it off,
   * and a first ping to the gateway so the host has the pod's MAC.
   */
  async addSandbox(name: string, opts: { ip?: string } = {}): Promise<Sandbox> {
    if (this.sandboxes.has(name)) throw new Error(`sandbox ${name} exists on ${this.host.name}`);
    const netns = `${this.lab.name}_${this.host.name}_${name}`;
    const { list } = this.nodeConfList();
    const args: Record<string, string> = { K8S_POD_NAMESPACE: 'default', K8S_POD_NAME: name };
    if (opts.ip) args.IP = opts.ip;
    const invocation: CniInvocation = {
      containerId: netns, netns, ifname: 'eth0', path: [this.nodePath('/opt/cni/bin')], args,
      pluginNetns: this.host.netns, pluginMountNs: this.mountNs,
    };
    await mustRun('ip', ['netns', 'add', netns], { what: `sandbox netns ${netns}` });
    let result: CniResult | undefined;
    try {
      await mustRun('ip', ['-n', netns, 'link', 'set', 'lo', 'up']);
      result = await cniAdd(list, invocation);
      const eth0 = (JSON.parse((await mustRun('ip', ['-n', netns, '-j', 'link', 'show', 'dev', 'eth0'])).stdout) as { ifindex: number; address: string; link_index: number }[])[0];
      const links = JSON.parse((await mustRun('ip', ['-n', this.host.netns, '-j', 'link', 'show'])).stdout) as { ifindex: number; ifname: string }[];
      const peer = links.find((l) => l.ifindex === eth0.link_index);
      if (!peer) throw new Error(`sandbox ${name}: the peer of eth0 is not on ${this.host.name}`);
      const v4 = result.ips?.find((x) => x.address.includes('.'));
      if (!v4) throw new Error(`sandbox ${name}: no IPv4 address in ${JSON.stringify(result)}`);
      if (!this.lab.checksumOffload) {
        for (const [ns, dev] of [[netns, 'eth0'], [this.host.netns, peer.ifname]]) {
          await mustRun('nsenter', [`--net=${netnsPath(ns)}`, '--', 'ethtool', '-K', dev, 'rx', 'off', 'tx', 'off']);
        }
      }
      const gw = v4.gateway ?? this.host.gateway;
      let ping: RunResult | undefined;
      for (let i = 0; i < 3 && ping?.code !== 0; i++) ping = await run('nsenter', [`--net=${netnsPath(netns)}`, '--', 'ping', '-c', '1', '-W', '1', gw]);
      if (ping!.code !== 0) throw new CommandError('ping', [gw], ping!, `sandbox ${name} cannot reach its gateway`);
      const sb: Sandbox = {
        name, host: this.host.name, netns, ip: v4.address.split('/')[0], mac: eth0.address, hostVeth: peer.ifname,
        hostVethIfindex: peer.ifindex, ifname: 'eth0', ifindex: eth0.ifindex, containerId: netns, cni: { list, invocation, result },
      };
      this.sandboxes.set(name, sb);
      return sb;
    } catch (e) {
      if (result) await cniDel(list, invocation, result).catch(() => {});
      await run('ip', ['netns', 'delete', netns]);
      throw e;
    }
  }

  /** CNI DEL through the chain the sandbox was added with, then its netns. */
  async deleteSandbox(name: string): Promise<void> {
    const sb = this.sandboxes.get(name);
    if (!sb) throw new Error(`no sandbox ${name} on ${this.host.name}`);
    try {
      // After an uninstall the xmasq plugin is gone: DEL through the plugins still there.
      const list = { ...sb.cni.list, plugins: sb.cni.list.plugins.filter((p) => existsSync(join(this.nodePath('/opt/cni/bin'), p.type))) };
      await cniDel(list, sb.cni.invocation, sb.cni.result);
    } finally {
      await run('ip', ['netns', 'delete', sb.netns]);
      this.sandboxes.delete(name);
    }
  }

  /**
   * Everything of this node: sandboxes (CNI DEL while the agent may still answer), pods
   * (force-removed: no preStop), the runtime (and with it the node's mount namespace and its
   * bpffs), the node's root, mount points made for it. Every step is tried; errors come back together.
   */
  async stop(): Promise<string[]> {
    const problems: string[] = [];
    for (const name of [...this.sandboxes.keys()]) await this.deleteSandbox(name).catch((e: Error) => problems.push(e.message));
    for (const pod of this.pods.values()) pod.stopProbes();
    this.pods.clear();
    await this.removeAllContainers();
    await stopDaemon(this.dockerdPid).catch((e: Error) => problems.push(e.message));
    killShims(join(STANDIN_RUN_DIR, this.lab.name, this.host.name));
    rmSync(join(STANDIN_RUN_DIR, this.lab.name, this.host.name), { recursive: true, force: true });
    rmSync(join(STANDIN_RUN_DIR, this.lab.name), { recursive: true, force: true });
    for (const d of this.createdMountpoints) await run('rmdir', [d]);
    return problems;
  }

  /** After a crashed run: stops the runtimes of a lab's nodes and removes their roots. */
  static async cleanupLeftovers(labName: string): Promise<void> {
    const dir = join(STANDIN_RUN_DIR, labName);
    if (!existsSync(dir)) return;
    for (const host of readdirSync(dir)) {
      const pidFile = join(dir, host, 'dockerd.pid');
      const pid = existsSync(pidFile) ? Number(readFileSync(pidFile, 'utf8').trim()) : NaN;
      if (pid > 0) await stopDaemon(pid).catch(() => {});
      killShims(join(dir, host));
    }
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * The containerd shims of a node's runtime: a shim whose container was still running when
 * the daemon stopped outlives it, its containerd gone. Found by the socket they name.
 */
function killShims(runDir: string): void {
  const socket = `${runDir}/exec/containerd/containerd.sock`;
  for (const pid of readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    let cmd: string;
    try {
      cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    } catch {
      continue;
    }
    if (cmd.startsWith('/usr/bin/containerd-shim') && cmd.split('\0').includes(socket)) {
      try {
        process.kill(Number(pid), 'SIGKILL');
      } catch {
        // gone meanwhile
      }
    }
  }
}

/** SIGTERM to a node's dockerd (it stops its containerd), SIGKILL after 20 s. */
async function stopDaemon(pid: number): Promise<void> {
  if (!pidAlive(pid)) return;
  process.kill(pid, 'SIGTERM');
  const deadline = Date.now() + 20_000;
  while (pidAlive(pid) && Date.now() < deadline) await sleep(100);
  if (pidAlive(pid)) {
    process.kill(pid, 'SIGKILL');
    while (pidAlive(pid)) await sleep(50);
  }
}
