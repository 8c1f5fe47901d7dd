/**
 * The lab: N simulated hosts, each a network namespace, joined by a "wire" (a Linux bridge in
 * its own namespace), running a Flannel-style VXLAN overlay programmed exactly as flannel's
 * vxlan backend does it, with pods attached by the real CNI plugins (bridge + host-local).
 *
 * Every address of the lab lives only inside the lab's own namespaces: nothing is created,
 * changed or sent in the namespace the caller runs in.
 *
 * A lab is described by a state file (/run/xmasq-lab/<name>/state.json), rewritten after every
 * change, so that another process can load it, add or delete pods, or tear it down. Every netns
 * is recorded in the state BEFORE it is created: whatever point setup fails or is killed at,
 * `down` knows everything there is to remove.
 */
import type { ChildProcess, SpawnOptions } from 'node:child_process';
import { accessSync, constants, existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { mustRun, netnsPath, run, runIn, spawnIn, type RunOptions, type RunResult } from '../testing/command.ts';
import { checkPlugins, cniAdd, cniDel, type CniConfList, type CniInvocation, type CniPluginConf, type CniResult } from './cni.ts';
import { baseRestore } from './kubeproxy.ts';

export const STATE_ROOT = '/run/xmasq-lab';
export const DEFAULT_CNI_PATH: readonly string[] = ['/usr/lib/cni'];
export const DEFAULT_LAB_NAME = 'xmq';

/** Underlay: hosts are .1, .2, … of this /24, which exists only on the lab's wire. */
const UNDERLAY_PREFIX = '172.31.250';
export const CLUSTER_CIDR = '10.244.0.0/16';
/** Clients outside the cluster (addExternal) get .200, .201, … of the underlay /24. */
const EXTERNAL_BASE = 200;
const NIC = 'nic0';
const WIRE_BRIDGE = 'br0';
const VXLAN_DEV = 'flannel.1';
const VXLAN_VNI = 1;
/** Flannel's default: the Linux kernel's historical VXLAN port, not IANA's 4789 (LabOptions.vxlanPort). */
const VXLAN_PORT = 8472;
/**
 * Geneve mode (LabOptions.overlay): one collect_md ("external") Geneve device per host on
 * IANA's port, each peer's pod CIDR routed through it with a lightweight-tunnel route naming
 * the peer's underlay address, as Antrea's OVS sets each packet's tunnel destination. It has
 * no FDB and no fixed remote: the agents get the peers from --nodes.
 */
const GENEVE_DEV = 'gnv0';
const GENEVE_PORT = 6081;
const GENEVE_VNI = 1;
const UNDERLAY_MTU = 1500;
/** The underlay MTU minus VXLAN's 50 bytes of outer headers, as flannel computes it. */
const POD_MTU = UNDERLAY_MTU - 50;
const CNI_BRIDGE = 'cni0';
const CNI_NETWORK = 'xmasq-lab';
const POD_IFNAME = 'eth0';
const MAX_HOSTS = 254;

export interface LabOptions {
  /** Prefix of every netns of the lab; lower-case letters and digits, starting with a letter. Default 'xmq'. */
  name?: string;
  /** Default 2, at most 254. */
  hosts?: number;
  /** Pods created by `up` on every host, named h<i>-p<j>. Default 2. */
  podsPerHost?: number;
  /**
   * Default true. false turns rx/tx checksum offload off on both ends of every wire veth and
   * pod veth, so packets on the wire carry real checksums: veths otherwise pass packets with
   * CHECKSUM_PARTIAL and hide a wrong checksum written by a program.
   */
  checksumOffload?: boolean;
  /** The VXLAN devices' UDP port: default 8472 (Flannel's); 4789 as Calico's and Antrea's VXLAN. */
  vxlanPort?: number;
  /**
   * The overlay: 'vxlan' (default; Flannel's vxlan backend) or 'geneve' (a collect_md Geneve
   * device on 6081 with a tunnel route per peer, as Antrea's default; needs a kernel with
   * CONFIG_GENEVE and CONFIG_LWTUNNEL, such as the VM tests' guest).
   */
  overlay?: 'vxlan' | 'geneve';
  /** Plugins appended to the CNI chain after `bridge` (e.g. our own `xmasq` plugin), on every host; "{host}" in a string field becomes the host name. */
  cniPlugins?: CniPluginConf[];
  /** Directories searched for CNI plugin binaries (CNI_PATH). Default ['/usr/lib/cni']. */
  cniPath?: string[];
  /**
   * Default true: every host gets kube-proxy's FORWARD rule dropping what conntrack finds
   * INVALID, as every Kubernetes node has; it also makes conntrack track flows in the host's
   * netns, which XMasq's admission check needs. false: no rule, so the hosts' conntrack
   * tracks nothing and XMasq admits no flow (everything stays on the overlay).
   */
  conntrack?: boolean;
  /**
   * Default false. A Kubernetes node's host stack on every host: kube-proxy's chains in
   * iptables mode (nat KUBE-SERVICES, KUBE-POSTROUTING, KUBE-MARK-MASQ; filter KUBE-FORWARD,
   * whose INVALID drop replaces the bare one of `conntrack`) and a policy engine's dispatch
   * chain, with no Service or policy yet; declare those with lab/k8s.ts. Needs `conntrack`.
   */
  k8s?: boolean;
}

/** A machine outside the cluster on the underlay (a netns on the wire), e.g. a NodePort client. */
export interface LabExternal {
  name: string;
  netns: string;
  /** Its address in the underlay /24 (no prefix length). */
  ip: string;
}

export interface LabHost {
  /** 'h1', 'h2', … */
  name: string;
  index: number;
  netns: string;
  /** The host's underlay interface, inside its netns. */
  nic: string;
  nicIfindex: number;
  /** Underlay address (no prefix length), only meaningful inside the lab. */
  ip: string;
  mac: string;
  /** The wire-side end of the host's underlay veth, in the wire netns. */
  wirePort: string;
  podCidr: string;
  /** The overlay's tunnel device: flannel.1 (VXLAN), or gnv0 in Geneve mode. */
  vxlan: string;
  vxlanIfindex: number;
  /** The VXLAN device's own address (the pod CIDR's network address, /32) and MAC, as flannel assigns them. */
  vtepIp: string;
  vtepMac: string;
  /** The pods' gateway on the host's cni0 bridge. */
  gateway: string;
}

export interface LabPod {
  name: string;
  /** Name of the host (LabHost.name). */
  host: string;
  netns: string;
  ip: string;
  mac: string;
  /** The host end of the pod's veth, in the host's netns. */
  hostVeth: string;
  hostVethIfindex: number;
  ifname: 'eth0';
  /** Ifindex of eth0 inside the pod's netns. */
  ifindex: number;
  containerId: string;
}

export interface AddPodOptions {
  /** Ask host-local for this address (CNI_ARGS IP=…), e.g. to reuse a deleted pod's IP. */
  ip?: string;
}

export interface LabStatus {
  name: string;
  stateFile: string;
  checksumOffload: boolean;
  k8s: boolean;
  wire: { netns: string; exists: boolean };
  externals: (LabExternal & { netnsExists: boolean })[];
  hosts: (LabHost & { netnsExists: boolean })[];
  pods: (LabPod & { netnsExists: boolean })[];
  /** Pods whose CNI ADD started but did not finish (a crashed addPod); `down` DELs them too. */
  incompletePods: string[];
}

export interface DownReport {
  /** Problems that did not stop the teardown, e.g. a CNI DEL that failed before its netns was deleted anyway. */
  warnings: string[];
}

/** What `down` and `deletePod` need to run CNI DEL, kept from the moment ADD starts. */
interface Attachment {
  host: string;
  netns: string;
  containerId: string;
  list: CniConfList;
  args: Record<string, string>;
  /** Absent while ADD runs, or if it never finished. */
  result?: CniResult;
}

interface LabState {
  version: 1;
  name: string;
  createdAt: string;
  checksumOffload: boolean;
  /** Hosts carry kube-proxy's INVALID drop (LabOptions.conntrack); absent in older state files: true. */
  conntrack?: boolean;
  /** Hosts carry kube-proxy's and a policy engine's chains (LabOptions.k8s); absent: false. */
  k8s?: boolean;
  /** The VXLAN devices' UDP port (LabOptions.vxlanPort); absent in older state files: 8472. */
  vxlanPort?: number;
  /** LabOptions.overlay; absent in older state files: 'vxlan'. */
  overlay?: 'vxlan' | 'geneve';
  /** Clients outside the cluster attached to the wire (addExternal); absent in older state files. */
  externals?: LabExternal[];
  cniPath: string[];
  cniPlugins: CniPluginConf[];
  wire: string;
  /** Every netns this lab created (or was about to), in creation order. */
  netns: string[];
  hosts: LabHost[];
  pods: LabPod[];
  attachments: Record<string, Attachment>;
}

export function stateDir(name: string): string {
  return join(STATE_ROOT, name);
}

function stateFile(name: string): string {
  return join(stateDir(name), 'state.json');
}

function validateLabName(name: string): void {
  // No '-': the netns names are '<lab>-…', so one lab's prefix can never match another lab's.
  if (!/^[a-z][a-z0-9]{0,15}$/.test(name)) {
    throw new Error(`invalid lab name ${JSON.stringify(name)}: use 1-16 lower-case letters and digits, starting with a letter`);
  }
}

function validatePodName(name: string): void {
  if (!/^[a-z0-9][a-z0-9-]{0,39}$/.test(name) || name === 'wire' || /^h\d+$/.test(name)) {
    throw new Error(`invalid pod name ${JSON.stringify(name)}: use lower-case letters, digits and '-', and not 'wire' or 'h<number>' (those are the lab's own namespaces)`);
  }
}

const hex2 = (n: number) => n.toString(16).padStart(2, '0');

/** Fixed, readable addresses so that captures and map dumps of two runs compare. */
function hostPlan(lab: string, i: number) {
  return {
    name: `h${i}`,
    index: i,
    netns: `${lab}-h${i}`,
    ip: `${UNDERLAY_PREFIX}.${i}`,
    mac: `02:00:ac:1f:fa:${hex2(i)}`,
    wirePort: `h${i}`,
    podCidr: `10.244.${i}.0/24`,
    vtepIp: `10.244.${i}.0`,
    vtepMac: `0e:00:0a:f4:${hex2(i)}:00`,
    gateway: `10.244.${i}.1`,
  };
}

const TOOLS: Record<string, string> = {
  ip: 'iproute2',
  bridge: 'iproute2',
  nsenter: 'util-linux',
  sysctl: 'procps',
  ethtool: 'ethtool',
  ping: 'iputils-ping',
};

function requireTool(tool: string): void {
  for (const dir of (process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(delimiter)) {
    try {
      accessSync(join(dir, tool), constants.X_OK);
      return;
    } catch {
      // next PATH entry
    }
  }
  throw new Error(`'${tool}' not found in PATH; install it with 'apt-get install ${TOOLS[tool] ?? tool}'`);
}

function requireRoot(): void {
  if (process.getuid?.() !== 0) {
    throw new Error('the lab needs root (it creates network namespaces, veths, bridges and a vxlan device): run it as root');
  }
}

/** Adds the fix to the kernel's terse message when a link type is missing. */
function explain(e: unknown): never {
  if (e instanceof Error && /Unknown device type/.test(e.message)) {
    e.message += '\n  (the kernel lacks one of the link types the lab needs: veth, bridge, vxlan, or geneve for the Geneve overlay; try \'modprobe veth bridge vxlan geneve\')';
  }
  throw e;
}

async function ipBatch(netns: string, lines: string[], what: string): Promise<void> {
  await mustRun('ip', ['-n', netns, '-batch', '-'], { input: lines.join('\n') + '\n', what }).catch(explain);
}

async function linkInfo(netns: string, dev: string): Promise<{ ifindex: number; address: string; link_index?: number }> {
  const r = await mustRun('ip', ['-n', netns, '-j', 'link', 'show', 'dev', dev], { what: `reading ${dev} in netns ${netns}` });
  const [info] = JSON.parse(r.stdout) as { ifindex: number; address: string; link_index?: number }[];
  return info;
}

export class Lab {
  private downed = false;

  private constructor(private state: LabState) {}

  get name(): string {
    return this.state.name;
  }
  get hosts(): LabHost[] {
    return this.state.hosts;
  }
  /** The overlay's kind (LabOptions.overlay). */
  get overlay(): 'vxlan' | 'geneve' {
    return this.state.overlay ?? 'vxlan';
  }
  private get geneve(): boolean {
    return this.overlay === 'geneve';
  }
  /**
   * What an xmasq-agent on a host of this lab needs told about the overlay: nothing for
   * VXLAN (it reads flannel.1's FDB); for Geneve the device (bound to no NIC, it is not
   * found by itself) and the nodes (no FDB, no fixed remote), as on an Antrea node.
   */
  agentOverlayArgs(): string[] {
    return this.geneve ? ['--overlay-dev', GENEVE_DEV, '--nodes', this.state.hosts.map((h) => h.ip).join(',')] : [];
  }
  get pods(): LabPod[] {
    return this.state.pods;
  }
  get wireNetns(): string {
    return this.state.wire;
  }
  get checksumOffload(): boolean {
    return this.state.checksumOffload;
  }
  /** Whether the hosts are Kubernetes nodes (LabOptions.k8s): Services and policies go through lab/k8s.ts. */
  get k8s(): boolean {
    return this.state.k8s ?? false;
  }
  get externals(): LabExternal[] {
    return this.state.externals ?? [];
  }
  get stateFile(): string {
    return stateFile(this.state.name);
  }
  /** Every netns of the lab: wire, hosts, pods. */
  get namespaces(): string[] {
    return [...this.state.netns];
  }

  static async up(opts: LabOptions = {}): Promise<Lab> {
    const name = opts.name ?? DEFAULT_LAB_NAME;
    const hosts = opts.hosts ?? 2;
    const podsPerHost = opts.podsPerHost ?? 2;
    validateLabName(name);
    if (!Number.isInteger(hosts) || hosts < 1 || hosts > MAX_HOSTS) throw new Error(`hosts must be an integer in 1..${MAX_HOSTS}, got ${hosts}`);
    if (!Number.isInteger(podsPerHost) || podsPerHost < 0 || podsPerHost > 250) throw new Error(`podsPerHost must be an integer in 0..250, got ${podsPerHost}`);
    requireRoot();
    const checksumOffload = opts.checksumOffload ?? true;
    const conntrack = opts.conntrack ?? true;
    const k8s = opts.k8s ?? false;
    const vxlanPort = opts.vxlanPort ?? VXLAN_PORT;
    const overlay = opts.overlay ?? 'vxlan';
    if (overlay !== 'vxlan' && overlay !== 'geneve') throw new Error(`overlay must be 'vxlan' or 'geneve', got ${JSON.stringify(overlay)}`);
    if (overlay === 'geneve' && opts.vxlanPort !== undefined) throw new Error('vxlanPort is for the VXLAN overlay; the Geneve overlay uses 6081');
    if (!Number.isInteger(vxlanPort) || vxlanPort < 1 || vxlanPort > 65535) throw new Error(`vxlanPort must be a UDP port in 1..65535, got ${vxlanPort}`);
    // kube-proxy's rules are conntrack's users: without it there is no NAT and no INVALID drop.
    if (k8s && !conntrack) throw new Error('k8s needs conntrack: a Kubernetes node\'s Services and policies are conntrack rules');
    for (const t of ['ip', 'bridge', 'nsenter', 'sysctl', 'ping', ...(conntrack ? ['iptables'] : []), ...(k8s ? ['iptables-save', 'iptables-restore'] : []), ...(checksumOffload ? [] : ['ethtool'])]) requireTool(t);

    if (existsSync(stateFile(name))) {
      throw new Error(`lab "${name}" already exists (${stateFile(name)}); take it down first (Lab.down('${name}'), or 'npm run lab -- down')`);
    }
    const lab = new Lab({
      version: 1,
      name,
      createdAt: new Date().toISOString(),
      checksumOffload,
      conntrack,
      k8s,
      vxlanPort,
      overlay,
      externals: [],
      cniPath: opts.cniPath ?? [...DEFAULT_CNI_PATH],
      cniPlugins: opts.cniPlugins ?? [],
      wire: `${name}-wire`,
      netns: [],
      hosts: [],
      pods: [],
      attachments: {},
    });
    // Before anything exists: a missing plugin is the most likely setup error.
    checkPlugins(lab.confList(hostPlan(name, 1)), lab.state.cniPath);
    mkdirSync(stateDir(name), { recursive: true });
    lab.save();

    try {
      await lab.createWire();
      await settleAll(Array.from({ length: hosts }, (_, k) => lab.createHost(k + 1)));
      lab.state.hosts.sort((a, b) => a.index - b.index);
      lab.save();
      await settleAll(lab.state.hosts.map((h) => lab.programOverlay(h)));
      // Pods of one host one after the other: concurrent bridge-plugin ADDs race to create cni0.
      await settleAll(
        lab.state.hosts.map(async (h) => {
          for (let j = 1; j <= podsPerHost; j++) await lab.addPod(h, `${h.name}-p${j}`);
        }),
      );
      // Hosts ran in parallel; list pods as h1-p1, h1-p2, h2-p1… whatever order they finished in.
      const order = (p: LabPod) => lab.host(p.host).index * 1000 + Number(p.name.slice(p.name.lastIndexOf('-p') + 2));
      lab.state.pods.sort((a, b) => order(a) - order(b));
      lab.save();
    } catch (e) {
      try {
        const { warnings } = await lab.down();
        if (warnings.length && e instanceof Error) e.message += `\n  (while cleaning up: ${warnings.join('; ')})`;
      } catch (cleanup) {
        if (e instanceof Error) e.message += `\n  (cleanup failed too, run down again: ${(cleanup as Error).message})`;
      }
      throw e;
    }
    return lab;
  }

  /** The lab named `name` as its state file describes it, or undefined when there is none. */
  static async load(name: string = DEFAULT_LAB_NAME): Promise<Lab | undefined> {
    validateLabName(name);
    const file = stateFile(name);
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw e;
    }
    let state: LabState;
    try {
      state = JSON.parse(text) as LabState;
    } catch (e) {
      throw new Error(`lab state ${file} is not valid JSON (${(e as Error).message}); remove the lab's namespaces by hand ('ip netns list | grep ^${name}-') and delete ${stateDir(name)}`);
    }
    if (state.version !== 1 || state.name !== name) throw new Error(`lab state ${file} has version ${state.version} / name ${state.name}; expected version 1 / name ${name}`);
    return new Lab(state);
  }

  /** Tears down the lab named `name` if it exists; does nothing otherwise. */
  static async down(name: string = DEFAULT_LAB_NAME): Promise<DownReport> {
    const lab = await Lab.load(name);
    return lab ? lab.down() : { warnings: [] };
  }

  /** A host by name ('h1'), netns name, index (1-based) or LabHost. */
  host(ref: string | number | LabHost): LabHost {
    const key = typeof ref === 'object' ? ref.name : ref;
    const h = this.state.hosts.find((x) => (typeof key === 'number' ? x.index === key : x.name === key || x.netns === key));
    if (!h) throw new Error(`host ${JSON.stringify(key)} is not in lab ${this.name} (hosts: ${this.state.hosts.map((x) => x.name).join(', ')})`);
    return h;
  }

  pod(name: string): LabPod {
    const p = this.state.pods.find((x) => x.name === name || x.netns === name);
    if (!p) throw new Error(`pod ${JSON.stringify(name)} is not in lab ${this.name} (pods: ${this.state.pods.map((x) => x.name).join(', ') || 'none'})`);
    return p;
  }

  /** The CNI chain a pod on `host` is ADDed with: flannel's bridge delegate, then the configured extra plugins. */
  confList(host: Pick<LabHost, 'name' | 'podCidr'>): CniConfList {
    return {
      cniVersion: '1.0.0',
      name: CNI_NETWORK,
      plugins: [
        {
          type: 'bridge',
          bridge: CNI_BRIDGE,
          isGateway: true,
          // As kube-flannel's delegate: pods route everything via cni0. The host netns has no
          // default route, so nothing outside the cluster CIDR can leave the lab.
          isDefaultGateway: true,
          ipMasq: false,
          mtu: POD_MTU,
          hairpinMode: true,
          ipam: {
            type: 'host-local',
            ranges: [[{ subnet: host.podCidr }]],
            routes: [{ dst: CLUSTER_CIDR }],
            // Per host: host-local keeps one last_reserved_ip file per range index, so two
            // hosts sharing a directory would steer each other's allocations.
            dataDir: join(stateDir(this.state.name), 'ipam', host.name),
          },
        },
        // Chained plugins may name per-host things (each host has its own agent):
        // "{host}" in a string field becomes the host's name.
        ...this.state.cniPlugins.map((p) => JSON.parse(JSON.stringify(p).replaceAll('{host}', host.name)) as CniPluginConf),
      ],
    };
  }

  async addPod(hostRef: string | number | LabHost, name: string, opts: AddPodOptions = {}): Promise<LabPod> {
    this.assertUp();
    const host = this.host(hostRef);
    validatePodName(name);
    if (this.state.attachments[name] || this.state.pods.some((p) => p.name === name)) throw new Error(`pod ${name} already exists in lab ${this.name}`);
    const netns = `${this.name}-${name}`;
    const list = this.confList(host);
    checkPlugins(list, this.state.cniPath);
    const args: Record<string, string> = { K8S_POD_NAMESPACE: this.name, K8S_POD_NAME: name };
    if (opts.ip !== undefined) args.IP = opts.ip;

    if (existsSync(netnsPath(netns))) {
      throw new Error(`netns ${netns} already exists and is not lab ${this.name}'s pod ${name}; delete it ('ip netns delete ${netns}') or pick another pod name`);
    }
    const attachment: Attachment = { host: host.name, netns, containerId: netns, list, args };
    try {
      await this.addNetns(netns);
      this.state.attachments[name] = attachment;
      this.save();
      // cniAdd DELs the chain itself when a plugin fails.
      const result = await cniAdd(list, this.invocation(attachment));
      attachment.result = result;
      this.save();
      const pod = await this.describePod(host, name, netns, result);
      await this.announce(pod, result);
      if (!this.state.checksumOffload) {
        await this.offloadOff(netns, POD_IFNAME);
        await this.offloadOff(host.netns, pod.hostVeth);
      }
      this.state.pods.push(pod);
      this.save();
      return pod;
    } catch (e) {
      if (attachment.result) {
        await cniDel(list, this.invocation(attachment), attachment.result).catch((d: Error) => {
          if (e instanceof Error) e.message += `\n  (cleanup DEL failed too, the IP may stay allocated: ${d.message})`;
        });
      }
      delete this.state.attachments[name];
      this.save();
      await this.deleteNetns(netns).catch(() => {});
      throw e;
    }
  }

  /**
   * A machine outside the cluster: a netns `<lab>-<name>` on the wire with the next free
   * address of .200-.254 of the underlay /24 and no route beyond it, so it reaches the hosts'
   * underlay addresses (NodePorts) and nothing else. `down` removes it with the lab.
   */
  async addExternal(name: string): Promise<LabExternal> {
    this.assertUp();
    validatePodName(name);
    const externals = (this.state.externals ??= []);
    if (externals.some((e) => e.name === name) || this.state.pods.some((p) => p.name === name) || this.state.attachments[name]) {
      throw new Error(`${name} already exists in lab ${this.name}`);
    }
    let k = EXTERNAL_BASE;
    while (externals.some((e) => e.ip === `${UNDERLAY_PREFIX}.${k}`)) k++;
    if (k > 254) throw new Error(`lab ${this.name} has no free external address left (.${EXTERNAL_BASE}-.254)`);
    const ext: LabExternal = { name, netns: `${this.name}-${name}`, ip: `${UNDERLAY_PREFIX}.${k}` };
    await this.addNetns(ext.netns);
    await this.configureNetns(ext.netns, []);
    // A wire port like a host's, named after the address (a bridge port name has 15 characters at most).
    const port = `x${k}`;
    await ipBatch(this.state.wire, [
      `link add ${port} mtu ${UNDERLAY_MTU} type veth peer name ${NIC} netns ${ext.netns}`,
      `link set ${port} master ${WIRE_BRIDGE} up`,
    ], `wiring external ${name}`);
    await ipBatch(ext.netns, [`link set ${NIC} mtu ${UNDERLAY_MTU} up`, `addr add ${ext.ip}/24 dev ${NIC}`], `setting up external ${name}`);
    if (!this.state.checksumOffload) {
      await this.offloadOff(ext.netns, NIC);
      await this.offloadOff(this.state.wire, port);
    }
    externals.push(ext);
    this.save();
    return ext;
  }

  /** CNI DEL (which releases the IP), then the pod's netns. On a DEL error the pod is kept, so it can be retried. */
  async deletePod(name: string): Promise<void> {
    this.assertUp();
    const pod = this.state.pods.find((p) => p.name === name || p.netns === name);
    const key = pod?.name ?? name;
    const attachment = this.state.attachments[key];
    if (!attachment) throw new Error(`pod ${JSON.stringify(name)} is not in lab ${this.name} (pods: ${this.state.pods.map((x) => x.name).join(', ') || 'none'})`);
    await cniDel(attachment.list, this.invocation(attachment), attachment.result);
    await this.deleteNetns(attachment.netns);
    delete this.state.attachments[key];
    this.state.pods = this.state.pods.filter((p) => p.name !== key);
    this.save();
  }

  /**
   * Removes everything the lab created: CNI DEL for every pod (so chained plugins can clean
   * up what they keep outside the lab's namespaces), every netns, the state directory.
   * Idempotent; tolerates a half-built lab. Throws only if a netns could not be deleted.
   */
  async down(): Promise<DownReport> {
    if (this.downed) return { warnings: [] };
    if (!this.reloadIfPresent()) {
      // Our lab was taken down elsewhere and a new one of the same name built since: not ours to remove.
      this.downed = true;
      return { warnings: [`lab ${this.name} was replaced by one created at a different time; left alone`] };
    }
    const warnings: string[] = [];
    const byHost = new Map<string, [string, Attachment][]>();
    for (const entry of Object.entries(this.state.attachments)) {
      const list = byHost.get(entry[1].host) ?? [];
      list.push(entry);
      byHost.set(entry[1].host, list);
    }
    await Promise.all(
      [...byHost.values()].map(async (entries) => {
        for (const [name, a] of entries) {
          const hostNetns = this.state.hosts.find((h) => h.name === a.host)?.netns ?? `${this.name}-${a.host}`;
          if (!existsSync(netnsPath(hostNetns))) {
            warnings.push(`pod ${name}: host netns ${hostNetns} is gone, CNI DEL skipped`);
            continue;
          }
          try {
            await cniDel(a.list, this.invocation(a), a.result);
          } catch (e) {
            warnings.push(`pod ${name}: ${(e as Error).message}`);
          }
        }
      }),
    );
    const failed: string[] = [];
    for (const ns of [...this.state.netns].reverse()) {
      try {
        await this.deleteNetns(ns, false);
      } catch (e) {
        failed.push((e as Error).message);
      }
    }
    if (failed.length) {
      this.save();
      throw new Error(`lab ${this.name}: could not delete ${failed.length} netns (state kept in ${this.stateFile}; run down again):\n  ${failed.join('\n  ')}`);
    }
    rmSync(stateDir(this.name), { recursive: true, force: true });
    this.state.attachments = {};
    this.state.pods = [];
    this.state.hosts = [];
    this.state.netns = [];
    this.downed = true;
    return { warnings };
  }

  /** The directories searched for CNI plugins (CNI_PATH) in this lab. */
  get cniPath(): readonly string[] {
    return this.state.cniPath;
  }

  status(): LabStatus {
    const exists = (ns: string) => existsSync(netnsPath(ns));
    return {
      name: this.name,
      stateFile: this.stateFile,
      checksumOffload: this.state.checksumOffload,
      k8s: this.k8s,
      wire: { netns: this.state.wire, exists: exists(this.state.wire) },
      externals: this.externals.map((e) => ({ ...e, netnsExists: exists(e.netns) })),
      hosts: this.state.hosts.map((h) => ({ ...h, netnsExists: exists(h.netns) })),
      pods: this.state.pods.map((p) => ({ ...p, netnsExists: exists(p.netns) })),
      incompletePods: Object.keys(this.state.attachments).filter((n) => !this.state.pods.some((p) => p.name === n)),
    };
  }

  /**
   * Runs a program in one of the lab's namespaces (given by name, or as a host or pod). Only
   * the lab's own namespaces are accepted, so a typo can never run traffic in the caller's.
   * Never rejects on a non-zero exit: look at `code`.
   */
  async exec(netns: string | { netns: string }, cmd: string, args: readonly string[] = [], opts: RunOptions = {}): Promise<RunResult> {
    return runIn(this.ownNetns(netns), cmd, args, opts);
  }

  /** Like exec, for long-running programs (tcpdump, servers): the caller owns the child. */
  spawn(netns: string | { netns: string }, cmd: string, args: readonly string[] = [], opts: SpawnOptions = {}): ChildProcess {
    return spawnIn(this.ownNetns(netns), cmd, args, opts);
  }

  // ---- internals -------------------------------------------------------------------------

  private ownNetns(ref: string | { netns: string }): string {
    const ns = typeof ref === 'string' ? ref : ref.netns;
    if (!this.state.netns.includes(ns)) {
      throw new Error(`netns ${JSON.stringify(ns)} is not part of lab ${this.name} (its namespaces: ${this.state.netns.join(', ')})`);
    }
    return ns;
  }

  private assertUp(): void {
    if (this.downed) throw new Error(`lab ${this.name} is down`);
  }

  /** Synchronous, so memory and disk never differ at an await point, whatever runs concurrently. */
  private save(): void {
    const file = this.stateFile;
    const tmp = `${file}.tmp${process.pid}`;
    writeFileSync(tmp, JSON.stringify(this.state, null, 2) + '\n');
    renameSync(tmp, file);
  }

  /**
   * down() from a Lab object that another process has since changed must see the new pods.
   * False when the file on disk describes a different lab of the same name (another createdAt).
   */
  private reloadIfPresent(): boolean {
    let state: LabState;
    try {
      state = JSON.parse(readFileSync(this.stateFile, 'utf8')) as LabState;
    } catch {
      return true; // no (readable) state on disk: what we have in memory is all there is
    }
    if (state.version !== 1 || state.name !== this.name) return true;
    if (state.createdAt !== this.state.createdAt) return false;
    this.state = state;
    return true;
  }

  private invocation(a: Attachment): CniInvocation {
    return {
      containerId: a.containerId,
      netns: a.netns,
      ifname: POD_IFNAME,
      path: this.state.cniPath,
      args: a.args,
      pluginNetns: this.state.hosts.find((h) => h.name === a.host)?.netns ?? `${this.name}-${a.host}`,
    };
  }

  private async addNetns(netns: string): Promise<void> {
    if (existsSync(netnsPath(netns))) {
      throw new Error(`netns ${netns} already exists and was not created by this run of lab ${this.name}; delete it ('ip netns delete ${netns}') or use another lab name`);
    }
    this.state.netns.push(netns);
    this.save();
    await mustRun('ip', ['netns', 'add', netns], { what: `creating netns ${netns}` });
    await mustRun('ip', ['-n', netns, 'link', 'set', 'lo', 'up'], { what: `bringing up lo in ${netns}` });
  }

  private async deleteNetns(netns: string, forget = true): Promise<void> {
    if (existsSync(netnsPath(netns))) {
      const r = await run('ip', ['netns', 'delete', netns]);
      if (r.code !== 0 && existsSync(netnsPath(netns))) throw new Error(`deleting netns ${netns}: ${r.stderr.trim()}`);
    }
    if (forget) {
      this.state.netns = this.state.netns.filter((n) => n !== netns);
      this.save();
    }
  }

  /**
   * Settings of the wire and host namespaces (pods keep the kernel defaults, like real pods):
   * IPv6 off so that router solicitations, DAD and MLD never appear on the wire and a capture
   * shows only what a test sent; the bridge netfilter hooks off so iptables (of any other
   * software that loaded br_netfilter) never sees frames crossing cni0 or the wire bridge.
   */
  private async configureNetns(netns: string, extra: string[]): Promise<void> {
    await mustRun('nsenter', [`--net=${netnsPath(netns)}`, '--', 'sysctl', '-q', '-w',
      'net.ipv6.conf.all.disable_ipv6=1', 'net.ipv6.conf.default.disable_ipv6=1', ...extra], { what: `sysctls of ${netns}` });
    // These exist only when br_netfilter is loaded (and are per netns since Linux 5.3); absent means nothing to turn off.
    await run('nsenter', [`--net=${netnsPath(netns)}`, '--', 'sysctl', '-q', '-w',
      'net.bridge.bridge-nf-call-iptables=0', 'net.bridge.bridge-nf-call-ip6tables=0', 'net.bridge.bridge-nf-call-arptables=0']);
  }

  private async offloadOff(netns: string, dev: string): Promise<void> {
    await mustRun('nsenter', [`--net=${netnsPath(netns)}`, '--', 'ethtool', '-K', dev, 'rx', 'off', 'tx', 'off'], { what: `checksum offload off on ${dev} in ${netns}` });
  }

  private async createWire(): Promise<void> {
    const ns = this.state.wire;
    await this.addNetns(ns);
    await this.configureNetns(ns, []);
    // STP off and no forward delay: a port forwards as soon as it is up.
    await ipBatch(ns, [`link add ${WIRE_BRIDGE} type bridge stp_state 0 forward_delay 0`, `link set ${WIRE_BRIDGE} up`], 'creating the wire bridge');
  }

  private async createHost(i: number): Promise<void> {
    const p = hostPlan(this.name, i);
    await this.addNetns(p.netns);
    await this.configureNetns(p.netns, ['net.ipv4.ip_forward=1']);
    // Created from the wire netns with the peer moved straight into the host netns, so the
    // veth never appears in the caller's namespace.
    await ipBatch(this.state.wire, [
      `link add ${p.wirePort} mtu ${UNDERLAY_MTU} type veth peer name ${NIC} netns ${p.netns}`,
      `link set ${p.wirePort} master ${WIRE_BRIDGE} up`,
    ], `wiring host ${p.name}`);
    await ipBatch(p.netns, [
      `link set ${NIC} address ${p.mac} mtu ${UNDERLAY_MTU} up`,
      `addr add ${p.ip}/24 dev ${NIC}`,
      ...(this.geneve ? [
        // Geneve, as Antrea's tunnel: collect_md, the destination per packet from the route
        // (programOverlay); no options, so the same 50 bytes of outer headers as VXLAN.
        `link add ${GENEVE_DEV} address ${p.vtepMac} type geneve external dstport ${GENEVE_PORT}`,
        `link set ${GENEVE_DEV} mtu ${POD_MTU} up`,
        `addr add ${p.vtepIp}/32 dev ${GENEVE_DEV}`,
      ] : [
        // flannel's vxlan backend: learning off (it programs the FDB itself), its own port, the
        // underlay address as source, bound to the underlay interface.
        `link add ${VXLAN_DEV} address ${p.vtepMac} type vxlan id ${VXLAN_VNI} local ${p.ip} dev ${NIC} dstport ${this.state.vxlanPort ?? VXLAN_PORT} nolearning`,
        `link set ${VXLAN_DEV} mtu ${POD_MTU} up`,
        `addr add ${p.vtepIp}/32 dev ${VXLAN_DEV}`,
      ]),
    ], `setting up host ${p.name}`);
    // Every Kubernetes node has kube-proxy's KUBE-FORWARD rule dropping what conntrack finds
    // INVALID. It also makes conntrack track in the host's netns, which XMasq's admission
    // check reads (bpf/conntrack.h): without a user, a netns's conntrack tracks nothing.
    if (this.state.k8s) {
      // kube-proxy (and Flannel) need bridged frames to cross iptables: a Service endpoint on
      // the same host answers its client over cni0 at layer 2, and without the bridge hooks its
      // reply would skip conntrack, which un-DNATs it (the client would get the answer from the
      // endpoint's address instead of the ClusterIP). Policies see same-host pod traffic the same way.
      const r = await run('nsenter', [`--net=${netnsPath(p.netns)}`, '--', 'sysctl', '-q', '-w', 'net.bridge.bridge-nf-call-iptables=1']);
      if (r.code !== 0) throw new Error(`k8s mode needs br_netfilter for Services with an endpoint on the client's host ('modprobe br_netfilter'): ${r.stderr.trim()}`);
      // A Kubernetes node: KUBE-FORWARD holds the same INVALID drop, among kube-proxy's chains.
      await mustRun('nsenter', [`--net=${netnsPath(p.netns)}`, '--', 'iptables-restore', '-w', '--noflush'],
        { input: baseRestore({ services: [], policies: [], masqueradeAll: false, clusterCidr: CLUSTER_CIDR }), what: `kube-proxy's chains on ${p.name}` });
    } else if (this.state.conntrack ?? true) {
      await mustRun('nsenter', [`--net=${netnsPath(p.netns)}`, '--', 'iptables', '-w', '-A', 'FORWARD', '-m', 'conntrack', '--ctstate', 'INVALID', '-j', 'DROP'],
        { what: `kube-proxy's INVALID drop on ${p.name}` });
    }
    if (!this.state.checksumOffload) {
      await this.offloadOff(p.netns, NIC);
      await this.offloadOff(this.state.wire, p.wirePort);
    }
    const nic = await linkInfo(p.netns, NIC);
    const tunnel = this.geneve ? GENEVE_DEV : VXLAN_DEV;
    const vx = await linkInfo(p.netns, tunnel);
    this.state.hosts.push({ ...p, nic: NIC, nicIfindex: nic.ifindex, vxlan: tunnel, vxlanIfindex: vx.ifindex });
    this.save();
  }

  /**
   * What flannel's vxlan backend programs for every other node: a route to its pod CIDR via
   * its VTEP address (onlink, as that /32 is on no local subnet), a permanent ARP entry for
   * that address with its VTEP MAC, and a permanent FDB entry sending that MAC to its
   * underlay IP. No flooding, no learning: the kernel never has to guess.
   */
  private async programOverlay(h: LabHost): Promise<void> {
    const others = this.state.hosts.filter((o) => o.index !== h.index);
    if (!others.length) return;
    if (this.geneve) {
      // The same routes and ARP entries, the peer's underlay address carried by the route
      // (a lightweight tunnel) instead of an FDB entry.
      await ipBatch(h.netns, others.flatMap((o) => [
        `neigh replace ${o.vtepIp} lladdr ${o.vtepMac} dev ${GENEVE_DEV} nud permanent`,
        `route replace ${o.podCidr} via ${o.vtepIp} dev ${GENEVE_DEV} onlink encap ip id ${GENEVE_VNI} dst ${o.ip}`,
      ]), `overlay routes of ${h.name}`);
      return;
    }
    await ipBatch(h.netns, others.flatMap((o) => [
      `neigh replace ${o.vtepIp} lladdr ${o.vtepMac} dev ${VXLAN_DEV} nud permanent`,
      `route replace ${o.podCidr} via ${o.vtepIp} dev ${VXLAN_DEV} onlink`,
    ]), `overlay routes of ${h.name}`);
    await mustRun('bridge', ['-n', h.netns, '-batch', '-'], {
      input: others.map((o) => `fdb replace ${o.vtepMac} dev ${VXLAN_DEV} dst ${o.ip} self permanent`).join('\n') + '\n',
      what: `overlay FDB of ${h.name}`,
    });
  }

  /**
   * Makes the pod ARP for its gateway, as a real pod does with its first packet. That also
   * overrides the host's neighbour entry when the pod's IP belonged to a deleted pod: the
   * bridge plugin's own gratuitous ARP (arp_notify on eth0) goes out the moment eth0 comes up,
   * before the kernel has moved the new cni0 port to forwarding, and is dropped, so without
   * this the host keeps sending the reused IP's traffic to the old pod's MAC until the entry
   * expires (tens of seconds).
   */
  private async announce(pod: LabPod, result: CniResult): Promise<void> {
    const gw = result.ips?.find((x) => x.gateway?.includes('.'))?.gateway ?? this.host(pod.host).gateway;
    let last: RunResult | undefined;
    for (let i = 0; i < 3; i++) {
      last = await runIn(pod.netns, 'ping', ['-c', '1', '-W', '1', gw]);
      if (last.code === 0) return;
    }
    throw new Error(`pod ${pod.name} cannot reach its gateway ${gw} on ${CNI_BRIDGE}: ${(last!.stdout + last!.stderr).trim().split('\n').pop()}`);
  }

  /**
   * The host end of the veth is found from eth0's peer ifindex rather than from the CNI
   * result, so it is right whatever plugins the chain holds.
   */
  private async describePod(host: LabHost, name: string, netns: string, result: CniResult): Promise<LabPod> {
    const eth0 = await linkInfo(netns, POD_IFNAME);
    if (eth0.link_index === undefined) throw new Error(`pod ${name}: ${POD_IFNAME} in ${netns} has no peer; the CNI chain did not create a veth`);
    const r = await mustRun('ip', ['-n', host.netns, '-j', 'link', 'show'], { what: `listing links of ${host.netns}` });
    const peer = (JSON.parse(r.stdout) as { ifindex: number; ifname: string }[]).find((l) => l.ifindex === eth0.link_index);
    if (!peer) throw new Error(`pod ${name}: the peer of ${POD_IFNAME} (ifindex ${eth0.link_index}) is not in host netns ${host.netns}`);
    const v4 = result.ips?.find((x) => x.address.includes('.'));
    if (!v4) throw new Error(`pod ${name}: the CNI result has no IPv4 address: ${JSON.stringify(result)}`);
    return {
      name,
      host: host.name,
      netns,
      ip: v4.address.split('/')[0],
      mac: eth0.address,
      hostVeth: peer.ifname,
      hostVethIfindex: peer.ifindex,
      ifname: POD_IFNAME,
      ifindex: eth0.ifindex,
      containerId: netns,
    };
  }
}

/** Waits for every task, so nothing is still creating links when a failure triggers cleanup. */
async function settleAll(tasks: Promise<unknown>[]): Promise<void> {
  const results = await Promise.allSettled(tasks);
  const failed = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed.length) throw failed[0].reason;
}
