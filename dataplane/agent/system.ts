/**
 * What the agent asks of the machine before it touches the datapath:
 * capabilities, bpffs, clsact, which kernel helper set it has, and the
 * network devices of the namespace it runs in.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, statfsSync } from 'node:fs';
import { dirname } from 'node:path';
import { gunzipSync } from 'node:zlib';

const BPF_FS_MAGIC = 0xcafe4a11;

const CAP_NET_ADMIN = 12;
const CAP_SYS_ADMIN = 21;
const CAP_BPF = 39;

/** The problem with our effective capabilities, or undefined when we have what the datapath needs. */
export function capabilityProblem(): string | undefined {
  let eff: bigint;
  try {
    const m = /^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'));
    if (!m) return undefined;
    eff = BigInt(`0x${m[1]}`);
  } catch {
    return undefined; // no procfs: let the first bpf() call tell
  }
  const has = (c: number) => (eff & (1n << BigInt(c))) !== 0n;
  const missing: string[] = [];
  if (!has(CAP_BPF) && !has(CAP_SYS_ADMIN)) missing.push('CAP_BPF');
  if (!has(CAP_NET_ADMIN)) missing.push('CAP_NET_ADMIN');
  if (missing.length === 0) return undefined;
  return `missing ${missing.join(' and ')} (uid ${process.getuid?.()}): run xmasq-agent as root, or grant it CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (for setns)`;
}

/** The nearest existing ancestor of path (path itself if it exists). */
function existingAncestor(path: string): string {
  let p = path;
  while (!existsSync(p)) {
    const up = dirname(p);
    if (up === p) break;
    p = up;
  }
  return p;
}

/** Why pinDir cannot hold pins, or undefined. */
export function bpffsProblem(pinDir: string): string | undefined {
  const at = existingAncestor(pinDir);
  let type: number;
  try {
    type = statfsSync(at).type;
  } catch (e) {
    return `cannot stat ${at} (for pin dir "${pinDir}"): ${(e as Error).message}`;
  }
  if (type === BPF_FS_MAGIC) return undefined;
  if (pinDir.startsWith('/sys/fs/bpf/')) {
    return `bpffs is not mounted at /sys/fs/bpf (pin dir "${pinDir}"): mount it with 'mount -t bpf bpf /sys/fs/bpf'`;
  }
  return `pin dir "${pinDir}" is not on a BPF file system (${at} is not bpffs): set --pin-dir to a directory under a bpffs mount such as /sys/fs/bpf/xmasq, or mount one with 'mount -t bpf bpf <dir>'`;
}

function kernelConfig(): string | undefined {
  try {
    return gunzipSync(readFileSync('/proc/config.gz')).toString('utf8');
  } catch {
    // fall through to /boot
  }
  try {
    const release = readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim();
    return readFileSync(`/boot/config-${release}`, 'utf8');
  } catch {
    return undefined;
  }
}

/**
 * Why clsact/cls_bpf are unavailable, or undefined (also when we cannot tell:
 * then the first attach says, and the agent rolls back).
 */
export function clsactProblem(): string | undefined {
  if (existsSync('/sys/module/sch_ingress') && existsSync('/sys/module/cls_bpf')) return undefined;
  const cfg = kernelConfig();
  if (!cfg) return undefined;
  const missing: string[] = [];
  for (const opt of ['CONFIG_NET_SCH_INGRESS', 'CONFIG_NET_CLS_BPF']) {
    if (!new RegExp(`^${opt}=[ym]$`, 'm').test(cfg)) missing.push(opt);
  }
  if (missing.length === 0) return undefined;
  return `this kernel lacks ${missing.join(' and ')} (the clsact qdisc and the BPF classifier): the TC programs cannot be attached; use a kernel built with them`;
}

// ---------------------------------------------------------------------------
// kfunc detection: a FUNC of that name in the kernel's BTF.
// ---------------------------------------------------------------------------

const BTF_MAGIC = 0xeb9f;
const BTF_KIND_FUNC = 12;
/** Bytes that follow struct btf_type for each kind: fixed part, and per vlen entry. */
const BTF_KIND_EXTRA: Record<number, [number, number]> = {
  1: [4, 0], 2: [0, 0], 3: [12, 0], 4: [0, 12], 5: [0, 12], 6: [0, 8], 7: [0, 0], 8: [0, 0], 9: [0, 0],
  10: [0, 0], 11: [0, 0], 12: [0, 0], 13: [0, 8], 14: [4, 0], 15: [0, 12], 16: [0, 0], 17: [4, 0],
  18: [0, 0], 19: [0, 12],
};

/** Whether raw BTF (e.g. /sys/kernel/btf/vmlinux) declares a function named name. */
export function btfHasFunc(btf: Buffer, name: string): boolean {
  if (btf.length < 24 || btf.readUInt16LE(0) !== BTF_MAGIC) throw new Error('not raw little-endian BTF');
  const hdrLen = btf.readUInt32LE(4);
  const typeOff = hdrLen + btf.readUInt32LE(8);
  const typeLen = btf.readUInt32LE(12);
  const strOff = hdrLen + btf.readUInt32LE(16);
  const strLen = btf.readUInt32LE(20);
  const strs = btf.subarray(strOff, strOff + strLen);
  // The name's offset(s) in the string section: whole strings only.
  const wanted = new Set<number>();
  const needle = Buffer.from(`${name}\0`);
  for (let at = strs.indexOf(needle); at >= 0; at = strs.indexOf(needle, at + 1)) {
    if (at === 0 || strs[at - 1] === 0) wanted.add(at);
  }
  if (wanted.size === 0) return false;
  for (let p = typeOff; p + 12 <= typeOff + typeLen;) {
    const nameOff = btf.readUInt32LE(p);
    const info = btf.readUInt32LE(p + 4);
    const kind = (info >>> 24) & 0x1f;
    const vlen = info & 0xffff;
    if (kind === BTF_KIND_FUNC && wanted.has(nameOff)) return true;
    const extra = BTF_KIND_EXTRA[kind];
    if (!extra) throw new Error(`unknown BTF kind ${kind} at offset ${p}`);
    p += 12 + extra[0] + extra[1] * vlen;
  }
  return false;
}

/**
 * Whether the running kernel has the bpf_redirect_rpeer kfunc
 * (kernel-patch/). Kfuncs live in BTF, not in the helper list, so the
 * kernel's own BTF is where to look.
 */
export function kernelHasRpeer(vmlinuxBtf = '/sys/kernel/btf/vmlinux'): { present: boolean; why: string } {
  let raw: Buffer;
  try {
    raw = readFileSync(vmlinuxBtf);
  } catch (e) {
    return { present: false, why: `cannot read ${vmlinuxBtf} (${(e as NodeJS.ErrnoException).code}): assuming a stock kernel` };
  }
  try {
    const present = btfHasFunc(raw, 'bpf_redirect_rpeer');
    return { present, why: present ? `${vmlinuxBtf} declares bpf_redirect_rpeer` : `${vmlinuxBtf} has no bpf_redirect_rpeer kfunc` };
  } catch (e) {
    // An unknown BTF kind from a newer kernel: fall back to the name alone.
    const present = raw.includes(Buffer.from('\0bpf_redirect_rpeer\0'));
    return { present, why: `${vmlinuxBtf} could not be walked (${(e as Error).message}); the name is ${present ? '' : 'not '}in its strings` };
  }
}

// ---------------------------------------------------------------------------
// Devices of the agent's network namespace, through iproute2 (netlink), which
// follows our namespace where /sys/class/net would not.
// ---------------------------------------------------------------------------

function ipJson<T>(args: string[]): T {
  let out: string;
  try {
    out = execFileSync('ip', ['-j', ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    const err = e as NodeJS.ErrnoException & { stderr?: string };
    if (err.code === 'ENOENT') throw new Error("'ip' is not installed (apt-get install iproute2)");
    throw new Error(`'ip -j ${args.join(' ')}' failed: ${(err.stderr || err.message).trim()}`);
  }
  return (out.trim() ? JSON.parse(out) : []) as T;
}

interface IpLink {
  ifindex: number;
  ifname: string;
  address?: string;
  operstate?: string;
  flags?: string[];
  link_type?: string;
  /** info_data.link: the device a VXLAN device sends through, by name. */
  linkinfo?: { info_kind?: string; info_data?: { link?: string } };
}

export function listLinks(): IpLink[] {
  return ipJson<IpLink[]>(['-d', 'link', 'show']);
}

export function linkByIndex(ifindex: number): IpLink | undefined {
  return listLinks().find((l) => l.ifindex === ifindex);
}

export interface OverlayDevice { ifindex: number; name: string; mac: string }

/**
 * The overlay's tunnel device, to which restore hands restored pod packets
 * the host stack must see: the one named (it must exist and be an Ethernet
 * device), else the only VXLAN or Geneve device bound to the NIC (Flannel's
 * flannel.1, Calico's vxlan.calico), else the only one at all. Undefined when
 * there is none or no single one (Antrea's OVS tunnel ports are not host
 * devices a packet can be received on): restore then hands to the stack at
 * the NIC. Throws when a named device is unusable.
 */
export function overlayDevice(nicName: string, named?: string): { dev?: OverlayDevice; why: string } {
  const links = listLinks();
  const usable = (l: IpLink) => l.link_type === 'ether' && !!l.address;
  const as = (l: IpLink): OverlayDevice => ({ ifindex: l.ifindex, name: l.ifname, mac: l.address! });
  if (named === 'none') return { why: 'none, by --overlay-dev' };
  if (named) {
    const l = links.find((x) => x.ifname === named);
    if (!l) throw new Error(`--overlay-dev ${named}: no such device in this network namespace (see 'ip link')`);
    if (!usable(l)) throw new Error(`--overlay-dev ${named}: not an Ethernet device (link type ${l.link_type ?? 'unknown'})`);
    return { dev: as(l), why: 'set by --overlay-dev' };
  }
  const tunnels = links.filter((l) => (l.linkinfo?.info_kind === 'vxlan' || l.linkinfo?.info_kind === 'geneve') && usable(l));
  const onNic = tunnels.filter((l) => l.linkinfo?.info_data?.link === nicName);
  if (onNic.length === 1) return { dev: as(onNic[0]), why: `the only VXLAN/Geneve device on ${nicName}` };
  if (onNic.length === 0 && tunnels.length === 1) return { dev: as(tunnels[0]), why: 'the only VXLAN/Geneve device' };
  const list = (onNic.length ? onNic : tunnels).map((l) => l.ifname);
  return { why: list.length ? `several VXLAN/Geneve devices (${list.join(', ')}): set --overlay-dev` : 'no VXLAN/Geneve device' };
}

/**
 * The NIC when none is configured: the device of the default route, else the
 * only device other than lo with an IPv4 address.
 */
export function defaultNic(): { nic?: string; problem?: string } {
  const routes = ipJson<Array<{ dev?: string }>>(['-4', 'route', 'show', 'default']);
  const viaDefault = [...new Set(routes.map((r) => r.dev).filter((d): d is string => !!d))];
  if (viaDefault.length === 1) return { nic: viaDefault[0] };
  if (viaDefault.length > 1) {
    return { problem: `cannot pick the nic: default routes leave through ${viaDefault.join(', ')}; set --nic` };
  }
  const addrs = ipJson<Array<{ ifname: string; addr_info?: Array<{ family: string }> }>>(['-4', 'addr', 'show']);
  const withV4 = addrs.filter((a) => a.ifname !== 'lo' && (a.addr_info ?? []).some((i) => i.family === 'inet')).map((a) => a.ifname);
  if (withV4.length === 1) return { nic: withV4[0] };
  if (withV4.length === 0) return { problem: "cannot pick the nic: there is no default route and no device but lo has an IPv4 address in this network namespace; set --nic (see 'ip -4 addr')" };
  return { problem: `cannot pick the nic: there is no default route and ${withV4.length} devices have an IPv4 address (${withV4.join(', ')}); set --nic` };
}

// ---------------------------------------------------------------------------
// The overlay's nodes (README "Threat model"): what the agent gives the
// datapath's node set.
// ---------------------------------------------------------------------------

interface IpLinkDetail extends IpLink {
  linkinfo?: { info_kind?: string; info_data?: { local?: string; remote?: string; link?: string; port?: number } };
}

/** The kinds of tunnel device whose peers are nodes: VXLAN (flannel, Calico) and Geneve. */
const TUNNEL_KINDS = new Set(['vxlan', 'geneve']);

/** A tunnel device, with the local and remote addresses and the UDP port its own config gives. */
export interface TunnelDevice { name: string; kind: string; local?: string; remote?: string; port?: number }

/**
 * The overlay's tunnel devices: the one named (an error if it is none), or,
 * with name undefined, every VXLAN or Geneve device bound to the NIC (its
 * `dev`) or sending from one of the NIC's addresses (its `local`).
 */
export function tunnelDevices(name: string | undefined, nic: string): TunnelDevice[] {
  const links = ipJson<IpLinkDetail[]>(['-d', 'link', 'show']);
  const dev = (l: IpLinkDetail): TunnelDevice => ({
    name: l.ifname, kind: l.linkinfo?.info_kind ?? 'plain',
    ...(l.linkinfo?.info_data?.local ? { local: l.linkinfo.info_data.local } : {}),
    ...(l.linkinfo?.info_data?.remote ? { remote: l.linkinfo.info_data.remote } : {}),
    ...(l.linkinfo?.info_data?.port ? { port: l.linkinfo.info_data.port } : {}),
  });
  if (name !== undefined) {
    const l = links.find((x) => x.ifname === name);
    if (!l) throw new Error(`overlay device "${name}" not found in this network namespace; see 'ip -d link'`);
    // Another kind of device (one restore delivers to) has no FDB to read: --nodes names the nodes.
    return TUNNEL_KINDS.has(l.linkinfo?.info_kind ?? '') ? [dev(l)] : [];
  }
  const nicAddrs = new Set(ipv4Addresses(nic));
  return links.filter((l) => TUNNEL_KINDS.has(l.linkinfo?.info_kind ?? '') &&
    (l.linkinfo?.info_data?.link === nic || nicAddrs.has(l.linkinfo?.info_data?.local ?? ''))).map(dev);
}

/** IANA's ports, for an overlay whose tunnels are no host devices (Antrea's OVS ports). */
export const IANA_TUNNEL_PORTS = { vxlan: 4789, geneve: 6081 } as const;

/**
 * The overlay's UDP port of each kind (VXLAN, Geneve) the datapath takes for
 * overlay traffic: the flag's (0: none), else the one the overlay's devices of
 * that kind use, else IANA's. Throws when the devices disagree.
 */
export function tunnelPorts(devices: readonly TunnelDevice[], flags: { vxlan?: number; geneve?: number }): { vxlan: number; geneve: number; why: string } {
  const out = { vxlan: 0, geneve: 0 };
  const why: string[] = [];
  for (const kind of ['vxlan', 'geneve'] as const) {
    const flag = flags[kind];
    if (flag !== undefined) {
      out[kind] = flag;
      why.push(`${kind} ${flag || 'none'} (--${kind}-port)`);
      continue;
    }
    const ports = [...new Set(devices.filter((d) => d.kind === kind && d.port).map((d) => d.port!))];
    if (ports.length > 1) {
      throw new Error(`the ${kind === 'vxlan' ? 'VXLAN' : 'Geneve'} devices ${devices.filter((d) => d.kind === kind).map((d) => d.name).join(', ')} use several ports (${ports.join(', ')}); set --${kind}-port`);
    }
    out[kind] = ports[0] ?? IANA_TUNNEL_PORTS[kind];
    why.push(ports.length ? `${kind} ${ports[0]} (${devices.filter((d) => d.kind === kind).map((d) => d.name).join(', ')})` : `${kind} ${IANA_TUNNEL_PORTS[kind]} (IANA's: no ${kind} device)`);
  }
  return { ...out, why: why.join(', ') };
}

/** The IPv4 addresses of a device. */
export function ipv4Addresses(dev: string): string[] {
  const addrs = ipJson<Array<{ addr_info?: Array<{ family: string; local?: string }> }>>(['-4', 'addr', 'show', 'dev', dev]);
  return addrs.flatMap((a) => (a.addr_info ?? []).filter((i) => i.family === 'inet' && i.local).map((i) => i.local!));
}

/**
 * The unicast IPv4 destinations of a VXLAN device's forwarding database:
 * where it sends, so the nodes of the overlay (flannel and Calico program
 * one entry per node).
 */
export function fdbDestinations(dev: string): string[] {
  let out: string;
  try {
    out = execFileSync('bridge', ['-j', 'fdb', 'show', 'dev', dev], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    const err = e as NodeJS.ErrnoException & { stderr?: string };
    if (err.code === 'ENOENT') throw new Error("'bridge' is not installed (apt-get install iproute2)");
    throw new Error(`'bridge -j fdb show dev ${dev}' failed: ${(err.stderr || err.message).trim()}`);
  }
  const entries = (out.trim() ? JSON.parse(out) : []) as Array<{ dst?: string }>;
  const ipv4 = /^\d{1,3}(\.\d{1,3}){3}$/;
  return [...new Set(entries.map((e) => e.dst).filter((d): d is string => !!d && ipv4.test(d) && !isMulticastOrAny(d)))];
}

function isMulticastOrAny(ip: string): boolean {
  const first = Number(ip.split('.')[0]);
  return ip === '0.0.0.0' || (first >= 224 && first <= 239);
}
