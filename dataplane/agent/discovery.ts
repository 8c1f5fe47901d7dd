/**
 * Pod discovery: the pods already on this host, found from the host's own
 * devices rather than told by the CNI plugin (pods that existed before XMasq,
 * or that started or stopped while the agent was down).
 *
 * A pod here is the far end of a host-side veth: survey() looks at every veth
 * of the agent's network namespace whose peer is in another namespace, finds
 * that namespace by the id the kernel gives it (never by a name the pod
 * could choose), reads the peer device there (by ifindex, so a renamed
 * interface is the same interface), and takes its MAC and its one IPv4
 * address, provided the host routes that address back through the veth or
 * through the switch (bridge, OVS) the veth is a port of.
 *
 * Pods are not trusted. What a pod can set (its addresses, its MAC, its
 * interface's name) never lets it take an address another pod holds:
 * planDiscovery() serves a claim only when no other veth makes the same one
 * and no pod the CNI plugin gave holds the address, and a claim the host
 * does not route to the veth is no claim at all. What a pod gains by being
 * served is what the overlay already gives whoever answers ARP for that
 * address on the bridge.
 */
import { execFile } from 'node:child_process';
import { closeSync, openSync, readdirSync, statSync } from 'node:fs';
import { withNetns } from '../libbpf.ts';
import { NetnsIds } from '../netlink.ts';

/** Where runtimes keep their pods' network namespaces: ip netns, containerd, CRI-O, podman (/run/netns), Docker. */
export const NETNS_DIRS: readonly string[] = ['/run/netns', '/var/run/netns', '/var/run/docker/netns'];

/** A veth end in the agent's network namespace. */
export interface HostVeth {
  ifindex: number;
  name: string;
  /** The bridge or OVS datapath it is a port of. */
  master?: string;
}

/** A pod as discovery found it: what an `add` would carry. */
export interface FoundPod {
  ip: string;
  mac: string;
  hostVethIfindex: number;
  hostVeth: string;
  /** A path of the pod's network namespace (a bind mount if there is one, else /proc/<pid>/ns/net). */
  netns: string;
  /** The pod's end of the veth, as named now. */
  ifname: string;
}

/**
 * What one host-side veth holds: a pod; something that is no pod we may serve
 * (skipped, with why); or nothing we could tell this time (unreadable: a
 * namespace that went away mid-survey, a command that failed), which changes
 * nothing about a pod already served on it.
 */
export type Finding =
  | { veth: HostVeth; pod: FoundPod }
  | { veth: HostVeth; skipped: string }
  | { veth: HostVeth; unreadable: string };

export interface SurveyOptions {
  /** The NIC, which is no pod's veth even when it is a veth (the lab's is). */
  nicIfindex: number;
  /** Directories of namespace files, searched before /proc (default NETNS_DIRS). */
  netnsDirs?: readonly string[];
  /** The namespace to survey, if not the caller's: a path like /run/netns/h1 (tests). */
  hostNetns?: string;
  /** Per command (default 5000). */
  timeoutMs?: number;
}

interface IpLink {
  ifindex: number;
  ifname: string;
  address?: string;
  master?: string;
  /** A veth's peer's ifindex, in the peer's namespace. */
  link_index?: number;
  /** The id of the namespace a veth's peer is in; absent when it is in this one. */
  link_netnsid?: number;
  linkinfo?: { info_kind?: string };
  addr_info?: Array<{ family?: string; local?: string; prefixlen?: number }>;
}

interface IpRoute { dst?: string; dev?: string; type?: string; gateway?: string }

/** Reads of a pod namespace at once. */
const PARALLEL_READS = 4;
/** A namespace that prints more than this about its devices is not read (a pod can make many devices). */
const MAX_OUTPUT = 4 * 1024 * 1024;

/** Runs ip, in netns if given; resolves with what it printed and its exit status. */
function runIp(args: string[], o: { netns?: string; input?: string; timeoutMs: number }): Promise<{ stdout: string; stderr: string; code: number }> {
  // nsenter, as the CNI plugin does: a namespace is any path, not only a name under /run/netns.
  const [cmd, argv] = o.netns ? ['nsenter', [`--net=${o.netns}`, '--', 'ip', ...args]] : ['ip', args];
  return new Promise((resolve, reject) => {
    const child = execFile(cmd, argv, { encoding: 'utf8', timeout: o.timeoutMs, maxBuffer: MAX_OUTPUT }, (err, stdout, stderr) => {
      const e = err as (NodeJS.ErrnoException & { code?: number | string; killed?: boolean }) | null;
      if (e?.code === 'ENOENT') return reject(new Error(`'${cmd}' is not installed (apt-get install ${cmd === 'ip' ? 'iproute2' : 'util-linux'})`));
      if (e && typeof e.code !== 'number') return reject(new Error(`'${[cmd, ...argv].join(' ')}' ${e.killed ? `took over ${o.timeoutMs} ms` : `failed: ${e.message}`}`));
      resolve({ stdout, stderr, code: typeof e?.code === 'number' ? e.code : 0 });
    });
    // A command that exits before reading its input (nsenter into a namespace gone meanwhile) closes the pipe: EPIPE, already told by its exit.
    child.stdin?.on('error', () => {});
    child.stdin?.end(o.input ?? '');
  });
}

async function ipJson<T>(args: string[], o: { netns?: string; timeoutMs: number }): Promise<T> {
  const r = await runIp(['-j', ...args], o);
  if (r.code !== 0) throw new Error(`'ip -j ${args.join(' ')}'${o.netns ? ` in ${o.netns}` : ''} failed: ${r.stderr.trim() || `exit status ${r.code}`}`);
  return (r.stdout.trim() ? JSON.parse(r.stdout) : []) as T;
}

/** Runs fn over items, at most n at a time. */
async function eachLimited<T>(items: readonly T[], n: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]);
  };
  await Promise.all(Array.from({ length: Math.min(n, items.length) }, worker));
}

/**
 * The path of each wanted namespace id: the first file under dirs that is
 * that namespace, else a /proc/<pid>/ns/net of a process in it. The ids are
 * the kernel's (NetnsIds), asked in hostNetns.
 */
export function netnsPaths(wanted: ReadonlySet<number>, dirs: readonly string[], hostNetns?: string): Map<number, string> {
  const found = new Map<number, string>();
  if (wanted.size === 0) return found;
  const ids = hostNetns ? withNetns(hostNetns, () => new NetnsIds()) : new NetnsIds();
  const seen = new Set<string>();
  const tryPath = (path: string) => {
    let fd: number | undefined;
    try {
      const st = statSync(path);
      const inode = `${st.dev}:${st.ino}`;
      if (seen.has(inode)) return;
      seen.add(inode);
      fd = openSync(path, 'r');
      const id = ids.of(fd);
      if (wanted.has(id) && !found.has(id)) found.set(id, path);
    } catch {
      // not a namespace (a stale mount point), gone meanwhile, or not ours to open
    } finally {
      if (fd !== undefined) closeSync(fd);
    }
  };
  const list = (dir: string): string[] => {
    try {
      return readdirSync(dir);
    } catch {
      return [];
    }
  };
  try {
    for (const dir of dirs) {
      for (const name of list(dir)) {
        tryPath(`${dir}/${name}`);
        if (found.size === wanted.size) return found;
      }
    }
    for (const pid of list('/proc')) {
      if (!/^\d+$/.test(pid)) continue;
      tryPath(`/proc/${pid}/ns/net`);
      if (found.size === wanted.size) return found;
    }
    return found;
  } finally {
    ids.close();
  }
}

const MAC = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;

/** Why ip cannot be a pod's address, or undefined. */
function notAPodAddress(ip: string): string | undefined {
  const [a, b] = ip.split('.').map(Number);
  if (a === 0 || a === 127 || a >= 224) return `${ip} is no unicast address a pod may have`;
  if (a === 169 && b === 254) return `${ip} is link-local`;
  return undefined;
}

/** What the veth's peer device says about the pod, or why it is none. */
function readPeer(veth: HostVeth, peerIndex: number, netns: string, links: IpLink[]): Finding {
  const peer = links.find((l) => l.ifindex === peerIndex);
  if (!peer) return { veth, unreadable: `no device with ifindex ${peerIndex} in ${netns} (going away?)` };
  const at = `${peer.ifname} (ifindex ${peer.ifindex}) in ${netns}`;
  if (peer.linkinfo?.info_kind !== 'veth' || peer.link_index !== veth.ifindex || peer.link_netnsid === undefined) {
    return { veth, skipped: `${at} is not its veth peer` };
  }
  const mac = (peer.address ?? '').toLowerCase();
  if (!MAC.test(mac) || (parseInt(mac.slice(0, 2), 16) & 1) === 1 || mac === '00:00:00:00:00:00') {
    return { veth, skipped: `${at} has MAC ${JSON.stringify(peer.address ?? null)}, not a unicast Ethernet address` };
  }
  const v4 = (peer.addr_info ?? []).filter((a) => a.family === 'inet' && typeof a.local === 'string').map((a) => a.local!);
  if (v4.length === 0) return { veth, skipped: `${at} has no IPv4 address (XMasq serves IPv4 pods)` };
  if (v4.length > 1) return { veth, skipped: `${at} has ${v4.length} IPv4 addresses (${v4.join(', ')}): which one is the pod's cannot be told` };
  const bad = notAPodAddress(v4[0]);
  if (bad) return { veth, skipped: `${at}: ${bad}` };
  return { veth, pod: { ip: v4[0], mac, hostVethIfindex: veth.ifindex, hostVeth: veth.name, netns, ifname: peer.ifname } };
}

/**
 * The host's route to each address, by `ip route get` in one batch (-force:
 * an address with no route fails its line only).
 */
async function routes(ips: string[], o: { netns?: string; timeoutMs: number }): Promise<Map<string, IpRoute>> {
  const out = new Map<string, IpRoute>();
  if (ips.length === 0) return out;
  const r = await runIp(['-j', '-force', '-batch', '-'], { ...o, input: ips.map((ip) => `route get ${ip}\n`).join('') });
  for (const line of r.stdout.split('\n')) {
    if (!line.trim()) continue;
    for (const route of JSON.parse(line) as IpRoute[]) if (route.dst) out.set(route.dst, route);
  }
  return out;
}

/**
 * Every veth of the surveyed namespace (but the NIC) and what it holds,
 * ordered by ifindex. Throws only when the host's own devices cannot be
 * listed; a pod namespace that cannot be read makes its veths unreadable.
 */
export async function survey(o: SurveyOptions): Promise<Finding[]> {
  const timeoutMs = o.timeoutMs ?? 5000;
  const host = { netns: o.hostNetns, timeoutMs };
  const links = await ipJson<IpLink[]>(['-d', 'link', 'show'], host);
  const byName = new Map(links.map((l) => [l.ifname, l]));
  const findings: Finding[] = [];
  /** Veths whose peer is elsewhere: the peer's ifindex there, and the id of its namespace here. */
  const remote: Array<{ veth: HostVeth; peerIndex: number; nsid: number }> = [];
  for (const l of links) {
    if (l.linkinfo?.info_kind !== 'veth' || l.ifindex === o.nicIfindex) continue;
    const veth: HostVeth = { ifindex: l.ifindex, name: l.ifname, ...(l.master ? { master: l.master } : {}) };
    if (l.link_netnsid === undefined || l.link_index === undefined) {
      findings.push({ veth, skipped: 'its peer is in this network namespace: no pod' });
    } else {
      remote.push({ veth, peerIndex: l.link_index, nsid: l.link_netnsid });
    }
  }

  const dirs = o.netnsDirs ?? NETNS_DIRS;
  const paths = netnsPaths(new Set(remote.map((r) => r.nsid)), dirs, o.hostNetns);
  const byNetns = new Map<string, typeof remote>();
  for (const r of remote) {
    const path = paths.get(r.nsid);
    if (!path) findings.push({ veth: r.veth, unreadable: `its peer's network namespace (id ${r.nsid} here) has no file under ${dirs.join(', ')} and no process` });
    else byNetns.set(path, [...(byNetns.get(path) ?? []), r]);
  }

  const candidates: Array<Extract<Finding, { pod: FoundPod }>> = [];
  await eachLimited([...byNetns], PARALLEL_READS, async ([netns, list]) => {
    let inside: IpLink[];
    try {
      inside = await ipJson<IpLink[]>(['-d', 'addr', 'show'], { netns, timeoutMs });
    } catch (e) {
      for (const r of list) findings.push({ veth: r.veth, unreadable: (e as Error).message });
      return;
    }
    for (const r of list) {
      const f = readPeer(r.veth, r.peerIndex, netns, inside);
      if ('pod' in f) candidates.push(f);
      else findings.push(f);
    }
  });

  // The host decides where an address lives: only a pod the host routes back
  // through its own veth (Calico), or into the switch the veth is a port of
  // (a bridge: Flannel; OVS: Antrea's gateway port), is this host's pod.
  const routeOf = await routes([...new Set(candidates.map((c) => c.pod.ip))], host);
  for (const { veth, pod } of candidates) {
    const r = routeOf.get(pod.ip);
    const dev = r?.dev;
    const intoSwitch = veth.master !== undefined && (dev === veth.master || (dev !== undefined && byName.get(dev)?.master === veth.master));
    if (!r || !dev) findings.push({ veth, skipped: `its peer has ${pod.ip}, to which this host has no route` });
    else if (r.type !== undefined && r.type !== 'unicast') findings.push({ veth, skipped: `its peer has ${pod.ip}, which is a ${r.type} address of this host` });
    else if (r.gateway || (dev !== veth.name && !intoSwitch)) {
      findings.push({ veth, skipped: `its peer has ${pod.ip}, which this host routes through ${dev}${r.gateway ? ` via ${r.gateway}` : ''}, not through ${veth.name}${veth.master ? ` or ${veth.master}` : ''}: not this host's pod` });
    } else findings.push({ veth, pod });
  }
  return findings.sort((a, b) => a.veth.ifindex - b.veth.ifindex);
}

// ---------------------------------------------------------------------------
// What to do with what was found.
// ---------------------------------------------------------------------------

/** A pod the agent serves, as discovery weighs it. */
export interface HeldPod {
  ip: string;
  mac: string;
  hostVethIfindex: number;
  hostVeth: string;
  netns?: string;
  ifname?: string;
  /** Served because discovery found it (false: an `add` gave it, the CNI plugin's word). */
  discovered: boolean;
}

export interface DiscoveryPlan {
  /** Pods to serve as an `add` would: new ones, and ones replacing a discovered pod. */
  serve: FoundPod[];
  /** Discovered pods to drop (and purge), with why. */
  drop: Array<{ ip: string; hostVeth: string; why: string }>;
  /** Pods found and not served, with why. */
  ignored: Array<{ pod: FoundPod; why: string }>;
}

/**
 * Weighs a survey against the pods served now. The rules:
 * - a pod an `add` gave (the CNI plugin) is the plugin's word: discovery
 *   never drops or replaces it, and no veth may claim its address;
 * - an address claimed by several veths is served on none of them (and a
 *   discovered pod holding it is dropped): which one is real cannot be told;
 * - a discovered pod stays only while its veth still holds it: it goes when
 *   its veth's peer has another address, several, or is no pod any more (not
 *   when its veth could not be read this time, nor when the veth is gone,
 *   which the agent's scan handles as for any pod);
 * - a claim whose address a DEL just freed, or from the veth of a pod a DEL
 *   removed (its runtime is tearing it down), waits: deletedWhy says why.
 */
export function planDiscovery(findings: readonly Finding[], held: readonly HeldPod[], deletedWhy: (p: FoundPod) => string | undefined): DiscoveryPlan {
  const plan: DiscoveryPlan = { serve: [], drop: [], ignored: [] };
  const byVeth = new Map(findings.map((f) => [f.veth.ifindex, f]));
  const claims = new Map<string, FoundPod[]>();
  for (const f of findings) if ('pod' in f) claims.set(f.pod.ip, [...(claims.get(f.pod.ip) ?? []), f.pod]);
  const several = (ip: string) => (claims.get(ip) ?? []).map((p) => p.hostVeth).join(', ');

  const dropped = new Set<string>();
  for (const h of held) {
    if (!h.discovered) continue;
    const f = byVeth.get(h.hostVethIfindex);
    if (!f || f.veth.name !== h.hostVeth || 'unreadable' in f) continue;
    let why: string | undefined;
    if ('skipped' in f) why = `its veth ${h.hostVeth}: ${f.skipped}`;
    else if (f.pod.ip !== h.ip) why = `the peer of its veth ${h.hostVeth} now has ${f.pod.ip}`;
    else if ((claims.get(h.ip) ?? []).length > 1) why = `${h.ip} is claimed by several veths (${several(h.ip)})`;
    if (why) {
      plan.drop.push({ ip: h.ip, hostVeth: h.hostVeth, why });
      dropped.add(h.ip);
    }
  }
  const heldByIp = new Map(held.filter((h) => !dropped.has(h.ip)).map((h) => [h.ip, h]));
  const heldByVeth = new Map(held.filter((h) => !dropped.has(h.ip)).map((h) => [h.hostVethIfindex, h]));

  for (const [ip, list] of claims) {
    if (list.length > 1) {
      for (const pod of list) plan.ignored.push({ pod, why: `${ip} is claimed by several veths (${several(ip)}): none is served` });
      continue;
    }
    const pod = list[0];
    const deleted = deletedWhy(pod);
    if (deleted) {
      plan.ignored.push({ pod, why: deleted });
      continue;
    }
    const h = heldByIp.get(ip);
    if (h && h.hostVethIfindex === pod.hostVethIfindex && h.hostVeth === pod.hostVeth) {
      // Served already. A discovered pod follows its MAC, namespace and interface name (a record
      // adopted from pod_info has neither of the last two); an added one is the plugin's word.
      if (h.discovered && (h.mac !== pod.mac || h.netns !== pod.netns || h.ifname !== pod.ifname)) plan.serve.push(pod);
      continue;
    }
    if (h && !h.discovered) {
      plan.ignored.push({ pod, why: `${ip} belongs to the pod on ${h.hostVeth}, which the CNI plugin gave` });
      continue;
    }
    if (h) {
      // A discovered pod on another veth that was not dropped: that veth could not be read,
      // or is gone (the scan drops it). Only the second lets this one take the address.
      const f = byVeth.get(h.hostVethIfindex);
      if (f && f.veth.name === h.hostVeth) {
        plan.ignored.push({ pod, why: `${ip} is held by the pod on ${h.hostVeth}, which could not be read this time` });
        continue;
      }
    }
    const other = heldByVeth.get(pod.hostVethIfindex);
    if (other && other.ip !== ip && !other.discovered) {
      plan.ignored.push({ pod, why: `${pod.hostVeth} serves pod ${other.ip}, which the CNI plugin gave` });
      continue;
    }
    plan.serve.push(pod);
  }
  return plan;
}
