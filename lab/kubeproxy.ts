/**
 * The iptables rules of a Kubernetes node, as text for `iptables-restore --noflush`:
 * kube-proxy's in iptables mode (Services, NodePorts, masquerade, KUBE-FORWARD) and a policy
 * engine's (per-pod chains in the filter table, as Calico and kube-router install them).
 *
 * Pure functions, no I/O: lab/k8s.ts decides what a host carries and applies the text. The
 * layout follows what kube-proxy's proxier writes (pkg/proxy/iptables/proxier.go, as its
 * tests show it): chain names from the same hashes, rules in the same order with the same
 * matches, so that the lab puts XMasq in front of the packet paths a real node has.
 *
 * Every sync rewrites all of our chains, as kube-proxy does: a chain declared in the
 * restore input is flushed and refilled, a chain of ours that is no longer wanted is
 * declared and deleted (-X). Rules of anyone else are left alone (--noflush).
 */
import { createHash } from 'node:crypto';

/** kube-proxy's masquerade mark (--iptables-masquerade-bit 14, the default). */
export const MASQ_MARK = '0x4000';
/** Chain prefixes we own: a sync deletes those of them it no longer declares. */
const OWN_PREFIXES = ['KUBE-SVC-', 'KUBE-SEP-', 'KUBE-EXT-', 'LAB-POD-IN-', 'LAB-POD-OUT-'];
/** The policy engine's dispatch chain, jumped to first from FORWARD (as cali-FORWARD is). */
export const POLICY_CHAIN = 'LAB-POLICY';

export type Protocol = 'tcp' | 'udp';

export interface ServicePort {
  /** The port's name in the Service ("" or absent for a single unnamed port). */
  name?: string;
  protocol: Protocol;
  /** The ClusterIP port. */
  port: number;
  /** The endpoints' port. Default: port. */
  targetPort?: number;
  /** Opens this port on every node's addresses (a NodePort Service). */
  nodePort?: number;
}

export interface ServiceSpec {
  /** Default 'default'. */
  namespace?: string;
  name: string;
  clusterIP: string;
  ports: ServicePort[];
  /** Endpoint pod IPs (ready endpoints), in the order kube-proxy would list them. */
  endpoints: string[];
  /**
   * Only 'Cluster' (the default): external traffic may go to an endpoint on any node and is
   * masqueraded (KUBE-EXT-… marks it first).
   */
  externalTrafficPolicy?: 'Cluster';
}

export interface PolicyRule {
  id: number;
  /** The selected pod: its IP, and "<namespace>/<name>" for comments. */
  pod: { ip: string; name: string };
  direction: 'ingress' | 'egress';
  /** The other end: an IP or CIDR; absent = anyone. */
  peer?: string;
  /** The destination port (of the selected pod for ingress, of the peer for egress); absent = any. */
  port?: number;
  /** Absent = any protocol (then port must be absent too). */
  protocol?: Protocol;
  action: 'allow' | 'deny';
}

/** The chains a node has now, per table (from iptables-save). */
export interface ExistingChains {
  nat: Iterable<string>;
  filter: Iterable<string>;
}

export interface NodeRules {
  services: ServiceSpec[];
  /** Only the policies of pods on this node. */
  policies: PolicyRule[];
  /** kube-proxy --masquerade-all: every packet to a ClusterIP is masqueraded. */
  masqueradeAll: boolean;
  /** kube-proxy --cluster-cidr: traffic from outside it to a ClusterIP is masqueraded. */
  clusterCidr: string;
}

const B32 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';

/** RFC 4648 base32 (Go's base32.StdEncoding), enough of it for the first 16 characters. */
function base32(bytes: Uint8Array): string {
  let out = '', bits = 0, value = 0;
  for (const b of bytes) {
    value = (value << 8) | b;
    bits += 8;
    while (bits >= 5) {
      out += B32[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
    value &= (1 << bits) - 1;
  }
  if (bits > 0) out += B32[(value << (5 - bits)) & 31];
  return out;
}

/** kube-proxy's portProtoHash: the first 16 base32 characters of sha256 over the parts. */
export function chainHash(...parts: string[]): string {
  return base32(createHash('sha256').update(parts.join('')).digest()).slice(0, 16);
}

/** "namespace/name:port" (":port" only for a named port): kube-proxy's ServicePortName. */
export function servicePortName(svc: ServiceSpec, port: ServicePort): string {
  return `${svc.namespace ?? 'default'}/${svc.name}${port.name ? `:${port.name}` : ''}`;
}

export const svcChain = (spn: string, proto: Protocol) => `KUBE-SVC-${chainHash(spn, proto)}`;
export const extChain = (spn: string, proto: Protocol) => `KUBE-EXT-${chainHash(spn, proto)}`;
export const sepChain = (spn: string, proto: Protocol, endpoint: string) => `KUBE-SEP-${chainHash(spn, proto, endpoint)}`;
export const podChain = (dir: 'ingress' | 'egress', podIp: string) => `LAB-POD-${dir === 'ingress' ? 'IN' : 'OUT'}-${chainHash(podIp).slice(0, 12)}`;

/** A comment argument as iptables-save prints it: quoted when it has more than one word. */
function comment(text: string): string {
  return /^[\w./:-]+$/.test(text) ? `-m comment --comment ${text}` : `-m comment --comment "${text}"`;
}

const host32 = (ip: string) => (ip.includes('/') ? ip : `${ip}/32`);
const l4 = (p: Protocol) => `-m ${p} -p ${p}`;

/**
 * The jumps from the built-in chains into ours, created once per host (kube-proxy "ensures"
 * them at start); the policy engine's goes first in FORWARD, so that kube-proxy's
 * "mark 0x4000 → ACCEPT" cannot let a Service packet past a policy.
 */
export function baseRestore(node: NodeRules, existing: ExistingChains = { nat: [], filter: [] }): string {
  return syncRestore(node, existing, [
    '*nat',
    '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
  ], [
    '*filter',
    `-A FORWARD -m comment --comment "policy engine: per-pod chains" -j ${POLICY_CHAIN}`,
    '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
    '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
    '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
    '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
  ]);
}

/**
 * The whole content of our chains on one node, for `iptables-restore --noflush`. Chains
 * in `existing` (per table) with one of our prefixes that the node no longer needs are deleted.
 */
export function syncRestore(node: NodeRules, existing: ExistingChains = { nat: [], filter: [] }, natHead: string[] = ['*nat'], filterHead: string[] = ['*filter']): string {
  const natChains = ['KUBE-SERVICES', 'KUBE-NODEPORTS', 'KUBE-POSTROUTING', 'KUBE-MARK-MASQ'];
  const filterChains = ['KUBE-FORWARD', 'KUBE-SERVICES', 'KUBE-EXTERNAL-SERVICES', POLICY_CHAIN];
  const nat: string[] = [
    // KUBE-POSTROUTING: only marked packets are masqueraded; the mark is cleared first, so a
    // packet that is re-routed (e.g. IPsec) is not masqueraded twice.
    `-A KUBE-POSTROUTING -m mark ! --mark ${MASQ_MARK}/${MASQ_MARK} -j RETURN`,
    `-A KUBE-POSTROUTING -j MARK --xor-mark ${MASQ_MARK}`,
    '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
    `-A KUBE-MARK-MASQ -j MARK --or-mark ${MASQ_MARK}`,
  ];
  const filter: string[] = [
    '-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP',
    `-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark ${MASQ_MARK}/${MASQ_MARK} -j ACCEPT`,
    '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT',
  ];
  const services: string[] = [];
  const nodePorts: string[] = [];
  const perService: string[] = [];

  for (const svc of node.services) {
    for (const port of svc.ports) {
      const spn = servicePortName(svc, port);
      const p = port.protocol;
      const svcName = svcChain(spn, p);
      const target = port.targetPort ?? port.port;
      const clusterMatch = `${comment(`${spn} cluster IP`)} ${l4(p)} -d ${host32(svc.clusterIP)} --dport ${port.port}`;
      if (svc.endpoints.length === 0) {
        // No endpoints: kube-proxy rejects in the filter table instead of leaving the packet to time out.
        filter.push(`-A KUBE-SERVICES ${comment(`${spn} has no endpoints`)} ${l4(p)} -d ${host32(svc.clusterIP)} --dport ${port.port} -j REJECT`);
        if (port.nodePort) filter.push(`-A KUBE-EXTERNAL-SERVICES ${comment(`${spn} has no endpoints`)} -m addrtype --dst-type LOCAL ${l4(p)} --dport ${port.nodePort} -j REJECT`);
        continue;
      }
      natChains.push(svcName);
      services.push(`-A KUBE-SERVICES ${clusterMatch} -j ${svcName}`);
      // Who gets masqueraded on the way to an endpoint: everything with --masquerade-all,
      // otherwise what does not come from a pod (a node process, or a client outside the cluster).
      perService.push(node.masqueradeAll
        ? `-A ${svcName} ${clusterMatch} -j KUBE-MARK-MASQ`
        : `-A ${svcName} ${clusterMatch} ! -s ${node.clusterCidr} -j KUBE-MARK-MASQ`);
      const n = svc.endpoints.length;
      svc.endpoints.forEach((ip, i) => {
        const endpoint = `${ip}:${target}`;
        const sep = sepChain(spn, p, endpoint);
        natChains.push(sep);
        // Endpoint i of n is taken with probability 1/(n-i) of what the ones before left: uniform.
        const pick = i < n - 1 ? ` -m statistic --mode random --probability ${(1 / (n - i)).toFixed(10)}` : '';
        perService.push(`-A ${svcName} ${comment(`${spn} -> ${endpoint}`)}${pick} -j ${sep}`);
        // Hairpin: a pod reaching itself through the Service must see the reply come from
        // the Service, so its own packets are masqueraded (to the node's bridge address).
        perService.push(`-A ${sep} ${comment(spn)} -s ${host32(ip)} -j KUBE-MARK-MASQ`);
        perService.push(`-A ${sep} ${comment(spn)} ${l4(p)} -j DNAT --to-destination ${endpoint}`);
      });
      if (port.nodePort) {
        const ext = extChain(spn, p);
        natChains.push(ext);
        nodePorts.push(`-A KUBE-NODEPORTS ${comment(spn)} ${l4(p)} --dport ${port.nodePort} -j ${ext}`);
        // externalTrafficPolicy: Cluster: the endpoint may be on another node, whose reply must
        // come back through this one, so the client is masqueraded to this node's address.
        perService.push(`-A ${ext} ${comment(`masquerade traffic for ${spn} external destinations`)} -j KUBE-MARK-MASQ`);
        perService.push(`-A ${ext} -j ${svcName}`);
      }
    }
  }
  // NodePorts last: any local address, after every ClusterIP had its chance.
  services.push('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS');

  const policy: string[] = [];
  for (const dir of ['ingress', 'egress'] as const) {
    const byPod = new Map<string, PolicyRule[]>();
    for (const r of node.policies.filter((x) => x.direction === dir)) byPod.set(r.pod.ip, [...(byPod.get(r.pod.ip) ?? []), r]);
    for (const [ip, rules] of byPod) {
      const chain = podChain(dir, ip);
      const who = `${rules[0].pod.name} ${dir}`;
      filterChains.push(chain);
      filter.push(`-A ${POLICY_CHAIN} ${comment(who)} ${dir === 'ingress' ? '-d' : '-s'} ${host32(ip)} -j ${chain}`);
      // As Calico's and kube-router's per-pod chains: a flow once allowed stays allowed (rules
      // decide at its first packet), and what conntrack cannot place is dropped.
      policy.push(`-A ${chain} ${comment(who)} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT`);
      policy.push(`-A ${chain} -m conntrack --ctstate INVALID -j DROP`);
      for (const r of rules) {
        const peer = r.peer ? ` ${dir === 'ingress' ? '-s' : '-d'} ${host32(r.peer)}` : '';
        const proto = r.protocol ? ` ${l4(r.protocol)}` : '';
        const port = r.port !== undefined ? ` --dport ${r.port}` : '';
        policy.push(`-A ${chain} ${comment(`policy ${r.id}: ${r.action}`)}${peer}${proto}${port} -j ${r.action === 'allow' ? 'ACCEPT' : 'DROP'}`);
      }
      // A pod that some rule allows is isolated in that direction (NetworkPolicy semantics):
      // whatever no rule allowed is dropped. With deny rules only, the rest passes on.
      if (rules.some((r) => r.action === 'allow')) policy.push(`-A ${chain} ${comment(`${who}: isolated, no rule allowed it`)} -j DROP`);
    }
  }

  const stale = (have: Iterable<string>, wanted: string[]) => [...have].filter((c) => OWN_PREFIXES.some((p) => c.startsWith(p)) && !wanted.includes(c));
  const staleNat = stale(existing.nat, natChains);
  const staleFilter = stale(existing.filter, filterChains);
  return [
    natHead[0],
    // Declaring a chain flushes it (or creates it); a stale one is declared too, so that it is
    // empty and nothing jumps to it when -X deletes it.
    ...[...natChains, ...staleNat].map((c) => `:${c} - [0:0]`),
    ...natHead.slice(1),
    ...nat, ...services, ...nodePorts, ...perService,
    ...staleNat.map((c) => `-X ${c}`),
    'COMMIT',
    filterHead[0],
    ...[...filterChains, ...staleFilter].map((c) => `:${c} - [0:0]`),
    ...filterHead.slice(1),
    ...filter, ...policy,
    ...staleFilter.map((c) => `-X ${c}`),
    'COMMIT',
    '',
  ].join('\n');
}

/** Chain names in `iptables-save` output (":NAME POLICY [p:b]" lines). */
export function savedChains(save: string): string[] {
  return save.split('\n').filter((l) => l.startsWith(':')).map((l) => l.slice(1).split(' ')[0]);
}
