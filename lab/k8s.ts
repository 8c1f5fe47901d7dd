/**
 * Services and network policies on a lab whose hosts are Kubernetes nodes (LabOptions.k8s):
 * what kube-proxy (iptables mode) and a policy engine would write on each node for the
 * objects declared here, rewritten on every change (lab/kubeproxy.ts has the rules).
 *
 * Services go to every host, as kube-proxy runs on every node; a policy goes to the host of
 * its pod. The declarations live in the lab's state directory (k8s.json), so another process
 * (`npm run lab -- status`) sees them, and `down`, which deletes the hosts' namespaces with their
 * rules, deletes them too. `clear()` removes every Service and policy and leaves the node
 * chains as `up` made them.
 *
 * ```ts
 * const lab = await Lab.up({ name: 'xmq', k8s: true });
 * const kube = await Kube.open(lab);
 * await kube.addService({ name: 'web', clusterIP: '10.96.0.10', ports: [{ protocol: 'tcp', port: 80, targetPort: 8080, nodePort: 30080 }], endpoints: ['h2-p1'] });
 * const id = await kube.addPolicy({ pod: 'h2-p1', direction: 'ingress', peer: 'h1-p1', protocol: 'tcp', port: 8080, action: 'allow' });
 * await kube.removePolicy(id);
 * await kube.setMasqueradeAll(true);     // kube-proxy --masquerade-all
 * ```
 */
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { mustRunIn } from '../testing/command.ts';
import { CLUSTER_CIDR, stateDir, type Lab, type LabHost, type LabPod } from './lab.ts';
import { savedChains, syncRestore, type PolicyRule, type Protocol, type ServicePort, type ServiceSpec } from './kubeproxy.ts';

export type { PolicyRule, Protocol, ServicePort, ServiceSpec } from './kubeproxy.ts';

/** The lab cluster's Service range (kube-apiserver --service-cluster-ip-range), which its agents are given. */
export const SERVICE_CIDR = '10.96.0.0/12';

/** A pod by name (or LabPod), or a plain IP/CIDR. */
export type Peer = string | LabPod;

export interface ServiceInput extends Omit<ServiceSpec, 'endpoints'> {
  /** Endpoint pods (names or LabPods) or IPs. */
  endpoints: Peer[];
}

export interface PolicyInput {
  /** The pod the rule selects (name or LabPod). */
  pod: string | LabPod;
  direction: 'ingress' | 'egress';
  /** The other end (pod or IP/CIDR); absent = anyone. */
  peer?: Peer;
  port?: number;
  protocol?: Protocol;
  action: 'allow' | 'deny';
}

export interface KubeState {
  masqueradeAll: boolean;
  services: ServiceSpec[];
  /** With the host of each rule's pod. */
  policies: (PolicyRule & { host: string })[];
  nextPolicyId: number;
}

const file = (lab: Lab) => join(stateDir(lab.name), 'k8s.json');
const empty = (): KubeState => ({ masqueradeAll: false, services: [], policies: [], nextPolicyId: 1 });

export class Kube {
  private constructor(private readonly lab: Lab, private state: KubeState) {}

  /** The lab's Services and policies (none yet on a fresh lab). The lab must be up with k8s. */
  static async open(lab: Lab): Promise<Kube> {
    if (!lab.k8s) throw new Error(`lab ${lab.name} was not brought up as Kubernetes nodes (LabOptions.k8s, 'npm run lab -- up --k8s')`);
    return new Kube(lab, Kube.read(lab) ?? empty());
  }

  /** What k8s.json holds, or undefined: for status, without touching any rule. */
  static read(lab: Lab): KubeState | undefined {
    try {
      return JSON.parse(readFileSync(file(lab), 'utf8')) as KubeState;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw e;
    }
  }

  get services(): readonly ServiceSpec[] {
    return this.state.services;
  }
  get policies(): readonly (PolicyRule & { host: string })[] {
    return this.state.policies;
  }
  get masqueradeAll(): boolean {
    return this.state.masqueradeAll;
  }

  /** Adds a Service (or replaces the one of that namespace/name) on every host. */
  async addService(input: ServiceInput): Promise<ServiceSpec> {
    this.reload();
    for (const p of input.ports) {
      if (p.nodePort !== undefined && (p.nodePort < 1 || p.nodePort > 65535)) throw new Error(`nodePort ${p.nodePort} out of range`);
    }
    const spec: ServiceSpec = { ...input, ports: input.ports.map((p: ServicePort) => ({ ...p })), endpoints: input.endpoints.map((e) => this.ip(e)) };
    const key = (s: ServiceSpec) => `${s.namespace ?? 'default'}/${s.name}`;
    this.state.services = [...this.state.services.filter((s) => key(s) !== key(spec)), spec];
    await this.commit(this.lab.hosts);
    return spec;
  }

  /** The Service's new endpoints (e.g. a scale-up, or none: kube-proxy then rejects). */
  async setEndpoints(name: string, endpoints: Peer[], namespace = 'default'): Promise<void> {
    this.reload();
    const svc = this.state.services.find((s) => s.name === name && (s.namespace ?? 'default') === namespace);
    if (!svc) throw new Error(`no Service ${namespace}/${name} in lab ${this.lab.name}`);
    svc.endpoints = endpoints.map((e) => this.ip(e));
    await this.commit(this.lab.hosts);
  }

  async removeService(name: string, namespace = 'default'): Promise<void> {
    this.reload();
    const before = this.state.services.length;
    this.state.services = this.state.services.filter((s) => !(s.name === name && (s.namespace ?? 'default') === namespace));
    if (this.state.services.length === before) throw new Error(`no Service ${namespace}/${name} in lab ${this.lab.name}`);
    await this.commit(this.lab.hosts);
  }

  /** A policy rule on the pod's host; returns its id (for removePolicy). Rules of a pod apply in the order added. */
  async addPolicy(input: PolicyInput): Promise<number> {
    this.reload();
    const pod = typeof input.pod === 'string' ? this.lab.pod(input.pod) : input.pod;
    if (input.port !== undefined && !input.protocol) throw new Error('a policy port needs a protocol');
    const id = this.state.nextPolicyId++;
    this.state.policies.push({
      id, host: pod.host, pod: { ip: pod.ip, name: `${this.lab.name}/${pod.name}` }, direction: input.direction, action: input.action,
      ...(input.peer !== undefined ? { peer: this.ip(input.peer) } : {}),
      ...(input.protocol ? { protocol: input.protocol } : {}),
      ...(input.port !== undefined ? { port: input.port } : {}),
    });
    await this.commit([this.lab.host(pod.host)]);
    return id;
  }

  async removePolicy(id: number): Promise<void> {
    this.reload();
    const rule = this.state.policies.find((r) => r.id === id);
    if (!rule) throw new Error(`no policy ${id} in lab ${this.lab.name}`);
    this.state.policies = this.state.policies.filter((r) => r.id !== id);
    await this.commit([this.lab.host(rule.host)]);
  }

  /** kube-proxy's --masquerade-all on every node: every packet to a ClusterIP is masqueraded. */
  async setMasqueradeAll(on: boolean): Promise<void> {
    this.reload();
    this.state.masqueradeAll = on;
    await this.commit(this.lab.hosts);
  }

  /** Removes every Service and policy: the hosts keep only the chains `up` made. */
  async clear(): Promise<void> {
    this.reload();
    this.state = { ...empty(), nextPolicyId: this.state.nextPolicyId };
    await this.commit(this.lab.hosts);
  }

  /** Our chains on a host as iptables-save prints them (nat and filter). */
  async save(host: string | LabHost): Promise<string> {
    const h = this.lab.host(host);
    return (await mustRunIn(h.netns, 'iptables-save', ['-t', 'nat'])).stdout + (await mustRunIn(h.netns, 'iptables-save', ['-t', 'filter'])).stdout;
  }

  /** Another Kube object (or process) may have changed the declarations since: start from what is on disk. */
  private reload(): void {
    this.state = Kube.read(this.lab) ?? this.state;
  }

  private ip(p: Peer): string {
    if (typeof p !== 'string') return p.ip;
    if (/^\d+\.\d+\.\d+\.\d+(\/\d+)?$/.test(p)) return p;
    return this.lab.pod(p).ip;
  }

  /** Saves the declarations, then rewrites every given host's chains from them (a full sync, as kube-proxy does). */
  private async commit(hosts: LabHost[]): Promise<void> {
    const path = file(this.lab);
    writeFileSync(`${path}.tmp`, JSON.stringify(this.state, null, 2) + '\n');
    renameSync(`${path}.tmp`, path);
    for (const h of hosts) {
      const existing = {
        nat: savedChains((await mustRunIn(h.netns, 'iptables-save', ['-t', 'nat'])).stdout),
        filter: savedChains((await mustRunIn(h.netns, 'iptables-save', ['-t', 'filter'])).stdout),
      };
      const input = syncRestore({
        services: this.state.services, masqueradeAll: this.state.masqueradeAll, clusterCidr: CLUSTER_CIDR,
        policies: this.state.policies.filter((r) => r.host === h.name),
      }, existing);
      await mustRunIn(h.netns, 'iptables-restore', ['-w', '--noflush'], { input, what: `kube-proxy and policy rules on ${h.name}` });
    }
  }
}
