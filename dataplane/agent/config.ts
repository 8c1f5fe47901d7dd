/**
 * xmasq-agent's configuration: a JSON file and/or flags (flags win), checked
 * completely before the agent touches the kernel.
 */
import { accessSync, constants, existsSync, readFileSync, statSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { bpfBuildDir } from '../package.ts';
import { LOG_FORMATS, type LogFormat } from './log.ts';
import { DEFAULT_SOCKET } from './protocol.ts';

export type ModeSetting = 'auto' | 'veth' | 'rpeer';
export type AttachSetting = 'auto' | 'tcx' | 'cls_bpf';

export interface AgentConfig {
  /** undefined: the default route's device, or the only non-lo device with IPv4. */
  nic: string | undefined;
  pinDir: string;
  object: string;
  rpeerObject: string;
  mode: ModeSetting;
  /** How the programs sit on their TC hooks: tcx links or cls_bpf filters; auto: tcx where the kernel has it. */
  attach: AttachSetting;
  socket: string;
  stateDir: string;
  /** host:port, or 'off'. */
  metricsListen: string;
  egressIdleSeconds: number;
  ingressIdleSeconds: number;
  scanIntervalSeconds: number;
  /** A socket connection with no request (or whose replies go unread) for this long is closed. */
  socketIdleSeconds: number;
  /** Socket connections served at once. */
  socketMaxConns: number;
  /** Find the pods already on the host and serve them (discovery.ts). */
  discoverPods: boolean;
  /** How often discovery looks again. */
  discoverIntervalSeconds: number;
  /** The overlay's tunnel device (default: found, see system.ts overlayDevice). */
  overlayDev?: string;
  /** Give pairs wide keys (14-bit, in a carrier: TCP urgent pointer, UDP length, ICMP echo code); off: narrow 6-bit keys only. */
  wideKeys: boolean;
  /** Node addresses besides the overlay device's FDB (README "Threat model"). */
  nodes: string[];
  /** The cluster's Service range (ClusterIPs), 'none': masq takes a Service's requests to their backend (README "Services"). */
  serviceCidr: string;
  /** The overlay's UDP ports (0: none); undefined: the overlay devices', else IANA's. */
  vxlanPort?: number;
  genevePort?: number;
  /** Remove the pins and state files on exit, as `xmasq-agent cleanup` does. */
  cleanupOnExit: boolean;
  verbose: boolean;
  logFormat: LogFormat;
}

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

const BUILD = bpfBuildDir();

type Kind = 'string' | 'path' | 'seconds' | 'count' | 'bool' | 'choice' | 'onoff' | 'iplist' | 'cidr' | 'port';
interface FieldDef {
  key: keyof AgentConfig;
  flag: string;
  kind: Kind;
  arg?: string;
  def: AgentConfig[keyof AgentConfig];
  help: string;
  /** The values a choice field takes. */
  choices?: readonly string[];
  /** The range of a seconds or count field, both ends included, and why it ends there. */
  range?: { min: number; max: number; why: string };
}

/*
 * Timers take at most 2^31-1 ms (~24.8 days): node turns a longer delay into
 * 1 ms, so a huge --scan-interval would be a busy loop. Idle limits become
 * nanoseconds on the 64-bit monotonic clock: one past ~584 years (1e300, say)
 * would put the bound before boot and silently end expiry. Every range below
 * stays well inside both.
 */
const DAY = 86_400;

export const FIELDS: readonly FieldDef[] = [
  { key: 'nic', flag: '--nic', kind: 'string', arg: 'DEV', def: undefined, help: 'the underlay NIC (default: the default route\'s device, or the only non-lo device with an IPv4 address)' },
  { key: 'pinDir', flag: '--pin-dir', kind: 'path', arg: 'DIR', def: '/sys/fs/bpf/xmasq', help: 'where the maps are pinned, on bpffs' },
  { key: 'object', flag: '--object', kind: 'path', arg: 'FILE', def: `${BUILD}xmasq.bpf.o`, help: 'the datapath object (veth mode)' },
  { key: 'rpeerObject', flag: '--rpeer-object', kind: 'path', arg: 'FILE', def: `${BUILD}xmasq.rpeer.bpf.o`, help: 'the datapath object for kernels with bpf_redirect_rpeer' },
  { key: 'mode', flag: '--mode', kind: 'choice', choices: ['auto', 'veth', 'rpeer'], arg: 'auto|veth|rpeer', def: 'auto', help: 'where masq runs: rpeer (pod eth0 egress, needs the kfunc) or veth (host veth ingress); auto picks rpeer when the kernel has it' },
  { key: 'attach', flag: '--attach', kind: 'choice', choices: ['auto', 'tcx', 'cls_bpf'], arg: 'auto|tcx|cls_bpf', def: 'auto', help: 'how the programs sit on their TC hooks: tcx links (Linux 6.6+; pinned in --pin-dir) or cls_bpf filters on a clsact qdisc; auto picks tcx where the kernel has it. What an earlier agent attached as the other kind is taken off once the new kind is attached' },
  { key: 'socket', flag: '--socket', kind: 'path', arg: 'PATH', def: DEFAULT_SOCKET, help: 'the unix socket of the pod/policy protocol' },
  { key: 'stateDir', flag: '--state-dir', kind: 'path', arg: 'DIR', def: '/run/xmasq', help: 'where pods.json and policy.json are kept' },
  { key: 'metricsListen', flag: '--metrics-listen', kind: 'string', arg: 'HOST:PORT|off', def: '127.0.0.1:9477', help: 'the /metrics and /healthz HTTP endpoint, in the agent\'s network namespace' },
  { key: 'egressIdleSeconds', flag: '--egress-idle', kind: 'seconds', arg: 'SECONDS', def: 20, help: 'egress cache entries idle longer than this are deleted, and so are fully learned ones whose peer has not talked back for as long (see "expiry" below)',
    range: { min: 1, max: 7 * DAY, why: 'under a second retires busy flows between two of their packets, and no flow needs its entry kept idle for over a week (is the value in milliseconds?)' } },
  { key: 'ingressIdleSeconds', flag: '--ingress-idle', kind: 'seconds', arg: 'SECONDS', def: 40, help: 'ingress cache entries idle longer than this are deleted; at least --egress-idle + --scan-interval',
    range: { min: 1, max: 8 * DAY, why: 'it must outlast --egress-idle plus a scan, at most a week and an hour, and a deleted pod\'s keys stay taken this long' } },
  { key: 'scanIntervalSeconds', flag: '--scan-interval', kind: 'seconds', arg: 'SECONDS', def: 1, help: 'how often the caches are scanned for idle entries',
    range: { min: 0.05, max: 3600, why: 'a tighter loop only burns CPU; scanning less than hourly lets idle entries, and pods gone without a DEL, outlive their limits by hours' } },
  { key: 'socketIdleSeconds', flag: '--socket-idle', kind: 'seconds', arg: 'SECONDS', def: 60, help: 'a socket connection that sends no request, or takes none of its replies, for this long is closed',
    range: { min: 1, max: DAY, why: 'a client needs a moment between requests, and a day is longer than any client needs to hold an idle connection' } },
  { key: 'socketMaxConns', flag: '--socket-max-conns', kind: 'count', arg: 'N', def: 64, help: 'socket connections served at once; more are answered with an error and closed (the CNI plugin and CLI use one each, briefly)',
    range: { min: 1, max: 1024, why: 'each connection may hold a request line (1 MiB) and a reply in the agent\'s memory' } },
  { key: 'discoverPods', flag: '--discover-pods', kind: 'onoff', arg: 'on|off', def: true, help: 'at start and every --discover-interval, find the pods already on this host (the far ends of its veths) and serve them as an add would; off: only the pods the CNI plugin adds (see "discovery" below)' },
  { key: 'discoverIntervalSeconds', flag: '--discover-interval', kind: 'seconds', arg: 'SECONDS', def: 30, help: 'how often pod discovery looks again',
    range: { min: 1, max: 3600, why: 'each round reads every pod\'s namespace, so more often than a second costs CPU for nothing the CNI plugin does not already give, and a pod missed for over an hour stays on the overlay that long' } },
  { key: 'overlayDev', flag: '--overlay-dev', kind: 'string', arg: 'DEV', def: undefined, help: 'the overlay\'s VXLAN/Geneve device, on which restore delivers restored packets the host stack must handle (Services, policy), as the overlay would (none, or default: the only VXLAN/Geneve device on the nic; none: they go up the stack at the nic, where a strict rp_filter drops them)' },
  { key: 'wideKeys', flag: '--wide-keys', kind: 'onoff', arg: 'on|off', def: true, help: 'give pod pairs 14-bit keys carried in the TCP urgent pointer, the UDP length or the ICMP echo code (past 63 pairs per host pair); off if the underlay rewrites urgent pointers, UDP lengths, ICMP codes or IPv4 IDs (the 6-bit keys of DSCP only)' },
  { key: 'nodes', flag: '--nodes', kind: 'iplist', arg: 'IP[,IP...]', def: [], help: 'underlay addresses of nodes besides the FDB destinations of the VXLAN devices on the nic (or of --overlay-dev): the node set init learns towards and restore takes signals and masqueraded packets from (an overlay without a Linux FDB, e.g. Antrea: every node\'s address)' },
  { key: 'serviceCidr', flag: '--service-cidr', kind: 'cidr', arg: 'CIDR|none', def: 'none', help: 'the cluster\'s Service range (kube-apiserver --service-cluster-ip-range, e.g. 10.96.0.0/12): masq takes a Service request whose flow conntrack admits straight to the backend\'s host, with the DNAT conntrack recorded; none: Service requests cross the host stack on the overlay (replies are accelerated either way)' },
  { key: 'vxlanPort', flag: '--vxlan-port', kind: 'port', arg: 'PORT|none', def: undefined, help: 'the overlay\'s VXLAN UDP port (Flannel\'s Port, Calico\'s vxlanPort, Antrea\'s tunnelPort); default: the port of the VXLAN devices on the nic, else 4789; none: no VXLAN' },
  { key: 'genevePort', flag: '--geneve-port', kind: 'port', arg: 'PORT|none', def: undefined, help: 'the overlay\'s Geneve UDP port (Antrea\'s tunnelPort); default: the port of the Geneve devices on the nic, else 6081; none: no Geneve' },
  { key: 'cleanupOnExit', flag: '--cleanup', kind: 'bool', def: false, help: 'on exit, also remove the pinned maps and state files (every cached flow is forgotten)' },
  { key: 'verbose', flag: '--verbose', kind: 'bool', def: false, help: 'also log every filter attached or detached and every expiry scan that deletes something' },
  { key: 'logFormat', flag: '--log-format', kind: 'choice', choices: LOG_FORMATS, arg: 'text|json', def: 'text', help: 'stderr lines as text (time, xmasq-agent:, the message) or as one JSON object each ({"time","level","logger","msg"})' },
];

export interface ParsedArgs {
  command: 'run' | 'cleanup' | 'help' | 'version';
  configFile?: string;
  /** Flag values, still raw strings/booleans, by config key. */
  flags: Partial<Record<keyof AgentConfig, string | boolean>>;
}

export const USAGE = `usage: xmasq-agent [run] [--config FILE] [flags]     run the agent (in the host's network namespace)
       xmasq-agent cleanup [--config FILE] [flags]   detach leftovers of a dead agent, remove its pins and state
       xmasq-agent --help | --version

Run it inside the host network namespace it serves, e.g.
  nsenter --net=/run/netns/<host> node dist/xmasq-agent.mjs --config /etc/xmasq/agent.json

flags (JSON config keys in parentheses; flags override the file):
  --config FILE                   a JSON object with any of the keys below
${FIELDS.map((f) => `  ${`${f.flag}${f.arg ? ` ${f.arg}` : ''}`.padEnd(32)}${f.help} (${f.key}${f.def !== undefined && f.kind !== 'bool' && !(Array.isArray(f.def) && f.def.length === 0) ? `, default ${f.kind === 'onoff' ? (f.def ? 'on' : 'off') : f.def}` : ''}${f.range ? `, ${f.range.min} to ${f.range.max}` : ''})`).join('\n')}
  --help                          this text
  --version                       the version, and exit

expiry: an egress entry unused for --egress-idle is deleted. Idleness alone cannot retire
an entry masq uses, since masq refreshes it on every packet the pod sends even when the
other end drops them all: after the remote pod is deleted (its host purged our key and
drops what we send: restore_miss), and a new pod gets its IP, our pod could never reach
the new one. So an egress entry with both keys is kept only while the peer talks back:
our ingress entry for the pair (peer host, our key) must exist, restore to this very pod
pair, and have been refreshed by restore within --egress-idle. Otherwise it is deleted;
the next packet crosses the overlay and the pair is learned again with fresh keys.
Entries without both keys carry nothing past the overlay and keep the plain idle rule.
The cost: a pair whose peer stops sending (a one-way stream) leaves the fast path after
--egress-idle, until the peer sends again.
Ingress entries go after --ingress-idle without use. When a pod is deleted its ingress
entries become tombstones: their keys stay taken, and what arrives under them is dropped,
for --ingress-idle, so that a peer still sending to the deleted pod under our key can
never reach a pod the key is given to next. So --ingress-idle must be at least
--egress-idle + --scan-interval, with the same settings on every host.

nodes: the datapath learns paths only towards, and takes key signals and masqueraded
packets only from, the overlay's nodes: the destinations of --overlay-dev's FDB (kept
current on every scan, at most once a second; without --overlay-dev, of every VXLAN or
Geneve device on the nic), its fixed remote, and --nodes; this
host's own addresses (the NIC's, the device's local) are marked as ours.

discovery: at start and every --discover-interval the agent looks at each veth of its
network namespace (but the NIC) whose peer is in another namespace: the peer device, found
by ifindex in the namespace the kernel names (bind mounts under /run/netns and
/var/run/docker/netns, else /proc/<pid>/ns/net), is a pod when it has exactly one IPv4
address and a unicast MAC, and the host routes that address back through the veth or the
bridge (or OVS) it is a port of. Such a pod is served as an add would serve it (masq
attached, pod_info written), unless another veth claims the same address (then neither is)
or a pod the CNI plugin added holds it (the plugin's word stands). A discovered pod is
dropped, its cache entries purged, once its veth no longer holds it; pods whose veth is
gone are dropped by the scans, as always. Containers on other bridges (docker0) are served
too, harmlessly: their traffic never crosses the overlay. --discover-pods off leaves only
the CNI plugin's pods.

signals: SIGTERM/SIGINT detach masq from every pod and init from the NIC, leave restore
attached at the NIC ingress and exit, keeping the pinned maps: peers may go on
masquerading to this host for a while (until they retire the pairs), and restore still
delivers those packets, or drops them, so none reaches the host stack. The next agent
replaces restore in place; 'xmasq-agent cleanup' (or --cleanup) removes it too.
On tcx links (--attach tcx, or auto on a kernel with tcx) each program stays on its
hook through its link's pin in --pin-dir (tcx_<dir>_<ifindex>) once the agent is gone;
the next agent swaps the program in the link (BPF_LINK_UPDATE), cleanup detaches the
links and removes their pins.
SIGUSR2 exits for an upgrade: every filter stays attached and keeps working on the
pinned maps until the next agent replaces them in place, so a restart that way loses
no packet.`;

export function parseArgs(argv: readonly string[]): ParsedArgs {
  const out: ParsedArgs = { command: 'run', flags: {} };
  let help = false;
  let version = false;
  let command: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--help' || a === '-h') {
      help = true;
      continue;
    }
    if (a === '--version') {
      version = true;
      continue;
    }
    if (!a.startsWith('-') && command === undefined && (a === 'run' || a === 'cleanup' || a === 'help')) {
      command = a;
      out.command = a;
      continue;
    }
    const eq = a.indexOf('=');
    const name = a.startsWith('--') && eq > 0 ? a.slice(0, eq) : a;
    const inline = a.startsWith('--') && eq > 0 ? a.slice(eq + 1) : undefined;
    const takeValue = (): string => {
      if (inline !== undefined) return inline;
      const v = argv[i + 1];
      if (v === undefined || (v.startsWith('--') && v.length > 2)) throw new ConfigError(`${name} needs a value; see --help`);
      i++;
      return v;
    };
    if (name === '--config') {
      out.configFile = takeValue();
      continue;
    }
    const f = FIELDS.find((x) => x.flag === name);
    if (!f) {
      throw new ConfigError(a.startsWith('-')
        ? `unknown flag ${name}; see xmasq-agent --help`
        : `unexpected argument "${a}": the commands are run and cleanup; see xmasq-agent --help`);
    }
    if (f.kind === 'bool') {
      if (inline !== undefined && !['true', 'false'].includes(inline)) throw new ConfigError(`${name}=${inline}: use ${name} or ${name}=false`);
      out.flags[f.key] = inline === undefined ? true : inline === 'true';
    } else {
      out.flags[f.key] = takeValue();
    }
  }
  if (help) out.command = 'help';
  else if (version) out.command = 'version';
  return out;
}

function fail(f: FieldDef, value: unknown, fix: string): never {
  throw new ConfigError(`${f.flag} (${f.key}) = ${JSON.stringify(value)}: ${fix}`);
}

function inRange(f: FieldDef, raw: unknown, n: number, unit: string): number {
  const r = f.range!;
  if (n < r.min || n > r.max) fail(f, raw, `must be from ${r.min} to ${r.max}${unit ? ` ${unit}` : ''}: ${r.why}`);
  return n;
}

function coerce(f: FieldDef, raw: unknown, base: string, fromFile: boolean): AgentConfig[keyof AgentConfig] {
  switch (f.kind) {
    case 'bool':
      if (typeof raw === 'boolean') return raw;
      return fail(f, raw, 'must be true or false');
    case 'choice': {
      const choices = f.choices!;
      if (typeof raw === 'string' && choices.includes(raw)) return raw as AgentConfig[keyof AgentConfig];
      return fail(f, raw, `must be ${choices.slice(0, -1).join(', ')} or ${choices[choices.length - 1]}`);
    }
    case 'onoff':
      if (raw === true || raw === 'on') return true;
      if (raw === false || raw === 'off') return false;
      return fail(f, raw, `must be on or off${fromFile ? ' (or true/false)' : ''}`);
    case 'seconds': {
      const n = typeof raw === 'number' ? raw : typeof raw === 'string' && raw.trim() !== '' ? Number(raw) : NaN;
      if (!Number.isFinite(n) || n <= 0) return fail(f, raw, `must be a number of seconds > 0, e.g. ${f.flag} ${f.def}`);
      return inRange(f, raw, n, 'seconds');
    }
    case 'count': {
      const n = typeof raw === 'number' ? raw : typeof raw === 'string' && /^\s*\d+\s*$/.test(raw) ? Number(raw) : NaN;
      if (!Number.isSafeInteger(n)) return fail(f, raw, `must be a whole number, e.g. ${f.flag} ${f.def}`);
      return inRange(f, raw, n, '');
    }
    case 'path': {
      if (typeof raw !== 'string' || raw === '') return fail(f, raw, `must be a non-empty path${fromFile ? ' string' : ''}`);
      return isAbsolute(raw) ? resolve(raw) : resolve(base, raw);
    }
    case 'string':
      if (typeof raw !== 'string' || raw === '') return fail(f, raw, 'must be a non-empty string');
      return raw;
    case 'iplist': {
      const items = typeof raw === 'string' ? raw.split(',').map((x) => x.trim()).filter((x) => x !== '') : Array.isArray(raw) && fromFile ? raw : undefined;
      if (items === undefined) return fail(f, raw, `must be IPv4 addresses${fromFile ? ' (an array of strings, or one string with commas)' : ' separated by commas'}, e.g. ${f.flag} 172.31.250.2,172.31.250.3`);
      for (const ip of items) if (!isIpv4Text(ip)) fail(f, raw, `${JSON.stringify(ip)} is not an IPv4 address like 172.31.250.2`);
      return [...new Set(items as string[])];
    }
    case 'port': {
      if (raw === 'none') return 0;
      const n = typeof raw === 'number' ? raw : typeof raw === 'string' && /^\s*\d+\s*$/.test(raw) ? Number(raw) : NaN;
      if (!Number.isInteger(n) || n < 1 || n > 65535) return fail(f, raw, `must be a UDP port from 1 to 65535, or none, e.g. ${f.flag} 8472`);
      return n;
    }
    case 'cidr': {
      if (raw === 'none') return raw;
      const m = typeof raw === 'string' ? /^(\d+\.\d+\.\d+\.\d+)\/(\d{1,2})$/.exec(raw.trim()) : null;
      if (!m || !isIpv4Text(m[1]) || Number(m[2]) < 1 || Number(m[2]) > 32) return fail(f, raw, `must be an IPv4 prefix like 10.96.0.0/12, or none`);
      if (parseCidr(raw as string).net !== m[1]) return fail(f, raw, `has host bits set: the range is ${parseCidr(raw as string).net}/${m[2]}`);
      return (raw as string).trim();
    }
  }
}

/** An IPv4 prefix a.b.c.d/n as the network and mask the datapath's config holds (dotted). */
export function parseCidr(text: string): { net: string; mask: string } {
  const [ip, len] = text.trim().split('/');
  const bits = Number(len);
  const mask = bits === 0 ? 0 : (0xffffffff << (32 - bits)) >>> 0;
  const addr = ip.split('.').reduce((a, o) => ((a << 8) | Number(o)) >>> 0, 0);
  const dotted = (x: number) => [24, 16, 8, 0].map((sh) => (x >>> sh) & 0xff).join('.');
  return { net: dotted((addr & mask) >>> 0), mask: dotted(mask) };
}

/** Merges defaults < file < flags and checks every field that can be checked without the kernel. */
export function loadConfig(args: ParsedArgs): AgentConfig {
  const cfg = Object.fromEntries(FIELDS.map((f) => [f.key, f.def])) as unknown as Record<keyof AgentConfig, unknown>;
  if (args.configFile) {
    const file = resolve(args.configFile);
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (e) {
      throw new ConfigError(`--config ${JSON.stringify(args.configFile)}: cannot read it (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}); check the path`);
    }
    let obj: unknown;
    try {
      obj = JSON.parse(text);
    } catch (e) {
      throw new ConfigError(`--config ${file}: not valid JSON (${(e as Error).message}); fix the file`);
    }
    if (!obj || typeof obj !== 'object' || Array.isArray(obj)) throw new ConfigError(`--config ${file}: must hold a JSON object like {"nic":"eth0"}`);
    for (const [k, v] of Object.entries(obj)) {
      const f = FIELDS.find((x) => x.key === k);
      if (!f) throw new ConfigError(`--config ${file}: unknown field "${k}"; the fields are ${FIELDS.map((x) => x.key).join(', ')}`);
      if (v === null && f.key === 'nic') {
        cfg.nic = undefined;
        continue;
      }
      cfg[f.key] = coerce(f, v, dirname(file), true);
    }
  }
  for (const [k, v] of Object.entries(args.flags)) {
    const f = FIELDS.find((x) => x.key === k)!;
    cfg[f.key] = coerce(f, v, process.cwd(), false);
  }
  const c = cfg as unknown as AgentConfig;
  validate(c);
  return c;
}

const field = (key: keyof AgentConfig) => FIELDS.find((f) => f.key === key)!;

function validate(c: AgentConfig): void {
  if (c.nic !== undefined) {
    if (!/^[^\s/:]{1,15}$/.test(c.nic) || c.nic === '.' || c.nic === '..') fail(field('nic'), c.nic, 'is not a valid interface name (1-15 characters, no spaces, / or :)');
    if (c.nic === 'lo') fail(field('nic'), c.nic, 'the loopback device carries no overlay traffic; set --nic to the underlay device');
  }
  if (c.metricsListen !== 'off') parseListen(c.metricsListen);
  // A deleted pod's keys stay taken (tombstones) for --ingress-idle, and a peer
  // may masquerade under them until it retires the unanswered pair: up to its
  // --egress-idle plus a scan. Hosts are expected to run the same settings.
  if (c.ingressIdleSeconds < c.egressIdleSeconds + c.scanIntervalSeconds) {
    fail(field('ingressIdleSeconds'), c.ingressIdleSeconds, `must be at least --egress-idle + --scan-interval (${c.egressIdleSeconds} + ${c.scanIntervalSeconds} s): a key must stay taken until every peer has stopped using it, or a reused key delivers a peer's packets to the wrong pod`);
  }
  // sun_path is 108 bytes with its NUL.
  if (Buffer.byteLength(c.socket) > 107) fail(field('socket'), c.socket, 'is longer than a unix socket path may be (107 bytes); choose a shorter path');
  if (existsSync(c.socket) && !statSync(c.socket).isSocket()) fail(field('socket'), c.socket, 'exists and is not a socket; remove it or choose another path');
  if (existsSync(c.stateDir) && !statSync(c.stateDir).isDirectory()) fail(field('stateDir'), c.stateDir, 'exists and is not a directory');
  if (existsSync(c.pinDir) && !statSync(c.pinDir).isDirectory()) fail(field('pinDir'), c.pinDir, 'exists and is not a directory');
  if (c.pinDir === '/sys/fs/bpf' || c.pinDir === '/') fail(field('pinDir'), c.pinDir, 'must be a directory of its own (e.g. /sys/fs/bpf/xmasq): cleanup removes everything xmasq pinned in it');
}

/** Checks an object path when the mode that needs it is chosen. */
export function checkObject(key: 'object' | 'rpeerObject', path: string): void {
  try {
    accessSync(path, constants.R_OK);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    fail(field(key), path, code === 'ENOENT' ? "no such file: build it with 'make -C bpf' or point the flag at it" : `cannot read it (${code})`);
  }
}

function isIpv4Text(s: unknown): s is string {
  return typeof s === 'string' && /^\d{1,3}(\.\d{1,3}){3}$/.test(s) && s.split('.').every((p) => Number(p) <= 255 && String(Number(p)) === p);
}

export function parseListen(s: string): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(s);
  const port = m ? Number(m[3]) : NaN;
  if (!m || !(port >= 1 && port <= 65535)) fail(field('metricsListen'), s, 'must be HOST:PORT (e.g. 127.0.0.1:9477, [::1]:9477) or off');
  return { host: m[1] ?? m[2], port };
}
