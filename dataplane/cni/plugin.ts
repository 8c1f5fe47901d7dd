/**
 * The logic of the `xmasq` CNI plugin (xmasq-cni.ts is the executable around it).
 *
 * The plugin is chained last, after the plugin that wires the pod (bridge for Flannel,
 * calico, antrea, ptp…). It changes nothing in the result: on ADD it tells the host's
 * xmasq-agent about the pod (IPv4, MAC, host-side veth) so the agent can attach masq; on
 * DEL — which runs before the IPAM plugin's DEL, chains being deleted in reverse — it asks
 * the agent to purge every cache entry of the pod's IP before IPAM can give that IP to
 * another pod.
 *
 * CNI versions: 0.3.0, 0.3.1, 0.4.0, 1.0.0 and 1.1.0 (SPEC.md of containernetworking/cni).
 * The result printed on ADD is the prevResult passed through in the version of the config
 * (`ips[].version` present before 1.0.0, absent from 1.0.0 on); errors are
 * {cniVersion, code, msg, details} on stdout with exit status 1.
 *
 * Network config fields of our own (all optional):
 *   "agentSocket":    the agent's unix socket (default /run/xmasq/agent.sock)
 *   "required":       false (default): every agent problem — socket absent, nobody listening,
 *                     no answer within agentTimeoutMs, an error or garbage as the answer —
 *                     and a pod we cannot identify are logged on stderr and the pod comes up
 *                     on the overlay alone. true: ADD (and CHECK, and DEL unless the agent is
 *                     simply not there) fail with a CNI error.
 *   "agentTimeoutMs": how long one exchange with the agent may take, connect included
 *                     (default 5000), so a hung agent cannot hold up pod creation.
 *
 * Error codes: the spec's 1 (version), 4 (environment), 5 (stdin), 6 (decoding), 7 (config),
 * 11 (agent unreachable or silent: try again later), 50 (STATUS: agent unavailable), and our
 * own 100 (the agent refused), 101 (the agent's answer is not the protocol), 102 (the pod
 * cannot be identified: no IPv4 host veth or MAC), 103 (CHECK: the agent has no masq for
 * the pod), 104 (the installation is incomplete: the `xmasq` wrapper found no bundle or
 * no node), 999 (a bug in this plugin).
 */
import { execFileSync } from 'node:child_process';
import { AgentClient, AgentError, AgentNotRunningError, DEFAULT_SOCKET, type Reply, type Request } from '../agent/protocol.ts';

export const SUPPORTED_VERSIONS = ['0.3.0', '0.3.1', '0.4.0', '1.0.0', '1.1.0'] as const;
const LATEST = '1.1.0';
export const DEFAULT_AGENT_TIMEOUT_MS = 5000;

export const Code = {
  incompatibleVersion: 1,
  badEnv: 4,
  io: 5,
  decode: 6,
  badConfig: 7,
  tryAgainLater: 11,
  notAvailable: 50,
  agentRefused: 100,
  agentGarbage: 101,
  podUnknown: 102,
  notAttached: 103,
  /** Written by the `xmasq` shell wrapper, which cannot start this code. */
  notInstalled: 104,
  internal: 999,
} as const;

export class CniFailure extends Error {
  constructor(readonly code: number, msg: string, readonly details = '') {
    super(msg);
    this.name = 'CniFailure';
  }
}

export interface CniIo {
  env: Record<string, string | undefined>;
  /** All of stdin, or undefined when it could not be read (then: code 5). */
  stdin: string | undefined;
  /** Unstructured log lines (stderr, as the spec allows). */
  log: (line: string) => void;
}

export interface CniOutcome {
  /** What goes on stdout (empty for DEL, CHECK, GC, STATUS). */
  stdout: string;
  exitCode: number;
}

type Json = Record<string, unknown>;
const isObject = (x: unknown): x is Json => typeof x === 'object' && x !== null && !Array.isArray(x);

function versionParts(v: string): [number, number, number] | undefined {
  const m = /^(\d+)\.(\d+)\.(\d+)$/.exec(v);
  return m ? [Number(m[1]), Number(m[2]), Number(m[3])] : undefined;
}

/** v >= w, both known-good versions. */
export function versionAtLeast(v: string, w: string): boolean {
  const a = versionParts(v)!;
  const b = versionParts(w)!;
  for (let i = 0; i < 3; i++) if (a[i] !== b[i]) return a[i] > b[i];
  return true;
}

const isSupported = (v: unknown): v is string => typeof v === 'string' && (SUPPORTED_VERSIONS as readonly string[]).includes(v);

interface NetConf {
  cniVersion: string;
  name: string;
  agentSocket: string;
  required: boolean;
  agentTimeoutMs: number;
  prevResult: Json | undefined;
}

/** The config on stdin, checked field by field so a wrong type is a code 7, never a crash later. */
function parseConf(raw: unknown): NetConf {
  if (!isObject(raw)) throw new CniFailure(Code.decode, 'the network config on stdin is not a JSON object', `got ${raw === null ? 'null' : Array.isArray(raw) ? 'an array' : typeof raw}`);
  // libcni reads a config without cniVersion as 0.1.0, which has no prevResult: refuse it as a version.
  const v = raw.cniVersion ?? '0.1.0';
  if (typeof v !== 'string') throw new CniFailure(Code.badConfig, 'cniVersion must be a string', `got ${JSON.stringify(v)}`);
  if (!isSupported(v)) throw new CniFailure(Code.incompatibleVersion, `incompatible CNI version ${JSON.stringify(v)}`, `xmasq supports ${SUPPORTED_VERSIONS.join(', ')}`);
  if (typeof raw.name !== 'string' || raw.name === '') throw new CniFailure(Code.badConfig, 'missing network name', 'the config needs a non-empty string "name"');
  const sock = raw.agentSocket ?? DEFAULT_SOCKET;
  if (typeof sock !== 'string' || sock === '' || sock.includes('\0')) throw new CniFailure(Code.badConfig, 'agentSocket must be a non-empty path', `got ${JSON.stringify(raw.agentSocket)}`);
  const req = raw.required ?? false;
  if (typeof req !== 'boolean') throw new CniFailure(Code.badConfig, 'required must be true or false', `got ${JSON.stringify(raw.required)}`);
  const t = raw.agentTimeoutMs ?? DEFAULT_AGENT_TIMEOUT_MS;
  if (typeof t !== 'number' || !Number.isInteger(t) || t < 1 || t > 600_000) {
    throw new CniFailure(Code.badConfig, 'agentTimeoutMs must be an integer from 1 to 600000', `got ${JSON.stringify(raw.agentTimeoutMs)}`);
  }
  const prev = raw.prevResult;
  if (prev !== undefined && prev !== null && !isObject(prev)) throw new CniFailure(Code.badConfig, 'prevResult must be a JSON object', `got ${Array.isArray(prev) ? 'an array' : typeof prev}`);
  return { cniVersion: v, name: raw.name, agentSocket: sock, required: req, agentTimeoutMs: t, prevResult: prev ?? undefined };
}

/**
 * prevResult in the config's version: before 1.0.0 every IP carries `version`, from 1.0.0
 * on none does. Runtimes hand it over already in that version; this only mends a previous
 * plugin that printed the other layout, so the runtime can parse what we print.
 */
export function passThrough(prev: Json, version: string): Json {
  const out: Json = { ...prev, cniVersion: version };
  if (Array.isArray(prev.ips)) {
    const modern = versionAtLeast(version, '1.0.0');
    out.ips = prev.ips.map((ip: unknown) => {
      if (!isObject(ip)) return ip;
      if (modern) {
        const { version: _dropped, ...rest } = ip;
        return rest;
      }
      if (ip.version === undefined && typeof ip.address === 'string') return { ...ip, version: ip.address.includes(':') ? '6' : '4' };
      return ip;
    });
  }
  return out;
}

// ---- the pod, from prevResult and from the container side ----

const IFNAME = /^[^\s/:]{1,15}$/;
const validIfname = (n: string) => IFNAME.test(n) && n !== '.' && n !== '..';
const CONTAINER_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;

function ipv4Of(address: unknown): string | undefined {
  if (typeof address !== 'string') return undefined;
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(\/\d{1,2})?$/.exec(address);
  if (!m || [1, 2, 3, 4].some((i) => Number(m[i]) > 255)) return undefined;
  return `${Number(m[1])}.${Number(m[2])}.${Number(m[3])}.${Number(m[4])}`;
}

interface LinkInfo {
  ifname: string;
  ifindex: number;
  address?: string;
  /** The peer's ifindex (in the peer's netns) for a veth. */
  link_index?: number;
  linkinfo?: { info_kind?: string };
  addr_info?: Array<{ family?: string; local?: string }>;
}

function ipJson(args: string[], netns?: string): LinkInfo[] {
  // nsenter rather than `ip -n`: CNI_NETNS is any path (/proc/<pid>/ns/net, /var/run/netns/cni-…),
  // not only a name under /run/netns. A hung netlink call must not hang the plugin: timeout.
  const [cmd, argv] = netns ? ['nsenter', [`--net=${netns}`, '--', 'ip', '-j', ...args]] : ['ip', ['-j', ...args]];
  const out = execFileSync(cmd, argv, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 5000 });
  const parsed: unknown = JSON.parse(out.trim() || '[]');
  return Array.isArray(parsed) ? (parsed as LinkInfo[]) : [];
}

/** ifname in the container's netns, or undefined when the netns or the link is not there. */
function containerLink(netns: string, ifname: string, withAddrs = false): LinkInfo | undefined {
  if (!netns || !validIfname(ifname)) return undefined;
  try {
    return ipJson(withAddrs ? ['addr', 'show', 'dev', ifname] : ['-d', 'link', 'show', 'dev', ifname], netns)[0];
  } catch {
    return undefined;
  }
}

function hostLinks(): LinkInfo[] {
  try {
    return ipJson(['-d', 'link', 'show']);
  } catch {
    return [];
  }
}

export interface Pod {
  ip: string;
  mac: string;
  hostVeth: string;
  hostVethIfindex: number;
  /** Where the host veth was found, for the log. */
  via: 'prevResult' | 'the container side';
}

function podIpv4(prev: Json, podIdx: number): string | undefined {
  // 0.3.0's text names the list `ip`; every plugin prints `ips`. Accept both.
  const list = Array.isArray(prev.ips) ? prev.ips : Array.isArray(prev.ip) ? prev.ip : [];
  const entries = list.filter(isObject);
  const onPod = entries.find((e) => e.interface === podIdx && ipv4Of(e.address));
  return ipv4Of((onPod ?? entries.find((e) => ipv4Of(e.address)))?.address);
}

/**
 * The pod as the agent wants it. Shapes seen in real chains:
 *   bridge (Flannel's delegate): [bridge, host veth, eth0 with sandbox], ips[].interface = 2
 *   ptp: [host veth, eth0 with sandbox]
 *   antrea: [host veth, eth0 with sandbox]
 *   calico (k8s, v3.2x+): only [cali… with the *container's* MAC and sandbox = CNI_NETNS], no ips[].interface
 *   calico (older, and its non-k8s path): only [cali…] without MAC, or with sandbox = the endpoint name ("eth0")
 * So neither `sandbox` nor `mac` tells host from container reliably. The host veth is the
 * prevResult interface that is a veth in our netns and, when the container side can be
 * read, the peer of the pod's eth0; failing that, the peer of eth0 found from the container
 * side. The MAC is read from eth0 itself when possible (a chained plugin may have changed it).
 * Undefined when prevResult has no IPv4 for the pod: xmasq accelerates IPv4 only.
 */
export function identifyPod(prev: Json, ifname: string, netns: string): Pod | undefined {
  const ifaces = Array.isArray(prev.interfaces) ? prev.interfaces : [];
  const podIdx = ifaces.findIndex((i) => isObject(i) && i.name === ifname && typeof i.sandbox === 'string' && i.sandbox !== '');
  const ip = podIpv4(prev, podIdx);
  if (!ip) return undefined;
  const inside = containerLink(netns, ifname);
  const peer = typeof inside?.link_index === 'number' ? inside.link_index : undefined;
  const links = hostLinks();
  const isVeth = (l: LinkInfo) => l.linkinfo?.info_kind === 'veth';
  // The pod's own peer, when we know it: its host end points back at eth0.
  const isPeer = (l: LinkInfo) => peer === undefined || (l.ifindex === peer && (inside === undefined || l.link_index === undefined || l.link_index === inside.ifindex));

  let found: LinkInfo | undefined;
  let via: Pod['via'] = 'prevResult';
  for (let i = ifaces.length - 1; i >= 0 && !found; i--) {
    const f = ifaces[i];
    if (i === podIdx || !isObject(f) || typeof f.name !== 'string' || !validIfname(f.name)) continue;
    const l = links.find((x) => x.ifname === f.name);
    if (l && isVeth(l) && isPeer(l)) found = l;
  }
  if (!found && peer !== undefined) {
    found = links.find((l) => l.ifindex === peer && isVeth(l) && isPeer(l));
    via = 'the container side';
  }
  if (!found) {
    const names = ifaces.filter(isObject).map((f) => String(f.name)).join(', ') || 'none';
    throw new CniFailure(Code.podUnknown, `cannot find the host-side veth of pod ${ip}`,
      `no interface of prevResult (${names}) is a veth in this network namespace${inside ? '' : `, and ${ifname} in ${netns || '(no CNI_NETNS)'} cannot be read`}${inside && peer === undefined ? `, and ${ifname} has no veth peer` : ''}`);
  }
  const podIface = podIdx >= 0 ? (ifaces[podIdx] as Json) : undefined;
  const mac = inside?.address ?? (typeof podIface?.mac === 'string' ? podIface.mac : undefined);
  if (!mac || !/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i.test(mac)) {
    throw new CniFailure(Code.podUnknown, `cannot find the MAC of pod ${ip}`, `${ifname} in ${netns || '(no CNI_NETNS)'} cannot be read and prevResult gives no MAC for it`);
  }
  return { ip, mac: mac.toLowerCase(), hostVeth: found.ifname, hostVethIfindex: found.ifindex, via };
}

/** The pod's IPv4 when DEL has no prevResult (0.3.x runtimes never send one): read it from eth0. */
function ipv4FromNetns(netns: string, ifname: string): string | undefined {
  const l = containerLink(netns, ifname, true);
  return l?.addr_info?.map((a) => (a.family === 'inet' ? ipv4Of(a.local) : undefined)).find((x) => x);
}

// ---- the agent ----

/** Why talking to the agent failed, for the error code and for DEL's "already gone" rule. */
export class AgentTrouble extends Error {
  constructor(readonly kind: 'absent' | 'unreachable' | 'timeout' | 'refused' | 'garbage', message: string) {
    super(message);
    this.name = 'AgentTrouble';
  }
  get code(): number {
    return this.kind === 'refused' ? Code.agentRefused : this.kind === 'garbage' ? Code.agentGarbage : Code.tryAgainLater;
  }
}

/**
 * One request, bounded by one deadline that covers connect as well as the answer: the
 * client's own timeout starts only once connected, and a connect to an agent whose backlog
 * is full can wait. The reply is checked here rather than trusted: a garbage answer must
 * become an AgentTrouble, never a TypeError.
 */
export async function askAgent(socket: string, req: Request, timeoutMs: number): Promise<Json> {
  let client: AgentClient | undefined;
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new AgentTrouble('timeout', `the agent at ${socket} did not answer '${req.op}' within ${timeoutMs} ms`)), timeoutMs);
  });
  const exchange = (async (): Promise<Reply> => {
    client = await AgentClient.connect(socket, { timeoutMs });
    return client.raw(req);
  })();
  exchange.catch(() => {}); // the deadline may win; its loser must not become an unhandled rejection
  let reply: unknown;
  try {
    reply = await Promise.race([exchange, deadline]);
  } catch (e) {
    if (e instanceof AgentTrouble) throw e;
    if (e instanceof AgentNotRunningError) throw new AgentTrouble('absent', `no agent listens at ${socket} (${e.code})`);
    // Why the agent closed the connection, which it said before closing (a refusal past --socket-max-conns): a refusal like any.
    if (e instanceof AgentError) throw new AgentTrouble('refused', `the agent refused '${req.op}': ${e.message}`);
    const msg = (e as Error)?.message ?? String(e);
    if (/did not answer/.test(msg)) throw new AgentTrouble('timeout', msg);
    // A socket we may not open, or a connect that failed otherwise: there may be an agent
    // behind it, so unlike 'absent' this does not let a required DEL pass.
    if (!client) throw new AgentTrouble('unreachable', msg);
    throw new AgentTrouble('garbage', msg);
  } finally {
    clearTimeout(timer);
    client?.close();
  }
  if (!isObject(reply) || typeof reply.ok !== 'boolean') throw new AgentTrouble('garbage', `the agent at ${socket} answered '${req.op}' with something that is not the protocol: ${JSON.stringify(reply)?.slice(0, 200)}`);
  if (!reply.ok) {
    if (typeof reply.error !== 'string') throw new AgentTrouble('garbage', `the agent at ${socket} refused '${req.op}' without saying why`);
    throw new AgentTrouble('refused', `the agent refused '${req.op}': ${reply.error}`);
  }
  return reply;
}

// ---- the commands ----

interface Ctx {
  conf: NetConf;
  containerId: string;
  netns: string;
  ifname: string;
  log: (line: string) => void;
}

/** An agent problem or an unidentifiable pod: fatal only with "required": true. */
function failOpen(ctx: Ctx, e: CniFailure | AgentTrouble, what: string): void {
  if (ctx.conf.required) throw e instanceof CniFailure ? e : new CniFailure(e.code, `xmasq-agent: ${e.message}`, what);
  ctx.log(`xmasq: ${e.message}${e instanceof CniFailure && e.details ? ` (${e.details})` : ''}; ${what} ("required": false)`);
}

async function cmdAdd(ctx: Ctx): Promise<string> {
  const prev = ctx.conf.prevResult;
  if (!prev) throw new CniFailure(Code.badConfig, 'xmasq must be chained after the plugin that creates the pod interface', 'ADD got no prevResult');
  const out = JSON.stringify(passThrough(prev, ctx.conf.cniVersion));
  let pod: Pod | undefined;
  try {
    pod = identifyPod(prev, ctx.ifname, ctx.netns);
  } catch (e) {
    if (!(e instanceof CniFailure)) throw e;
    failOpen(ctx, e, 'the pod stays on the overlay');
    return out;
  }
  if (!pod) {
    ctx.log(`xmasq: prevResult has no IPv4 address for ${ctx.ifname}; nothing to accelerate (IPv4 only)`);
    return out;
  }
  try {
    await askAgent(ctx.conf.agentSocket, {
      op: 'add', pod: { ip: pod.ip, mac: pod.mac, hostVethIfindex: pod.hostVethIfindex, netns: ctx.netns, ifname: ctx.ifname },
    }, ctx.conf.agentTimeoutMs);
    ctx.log(`xmasq: pod ${pod.ip} (${pod.mac}) on ${pod.hostVeth}, ifindex ${pod.hostVethIfindex} (found from ${pod.via}), given to the agent`);
  } catch (e) {
    if (!(e instanceof AgentTrouble)) throw e;
    failOpen(ctx, e, `pod ${pod.ip} stays on the overlay`);
  }
  return out;
}

async function cmdDel(ctx: Ctx): Promise<void> {
  const { conf } = ctx;
  let ip: string | undefined;
  let from = 'prevResult';
  if (conf.prevResult) ip = podIpv4(conf.prevResult, (Array.isArray(conf.prevResult.interfaces) ? conf.prevResult.interfaces : [])
    .findIndex((i) => isObject(i) && i.name === ctx.ifname && typeof i.sandbox === 'string' && i.sandbox !== ''));
  if (!ip) {
    ip = ipv4FromNetns(ctx.netns, ctx.ifname);
    from = `${ctx.ifname} in ${ctx.netns}`;
  }
  if (!ip && ctx.netns) {
    // The netns is gone or was emptied already: the agent remembers the pod by its netns.
    try {
      const r = await askAgent(conf.agentSocket, { op: 'list' }, conf.agentTimeoutMs);
      const pods = Array.isArray(r.pods) ? r.pods.filter(isObject) : [];
      ip = ipv4Of(pods.find((p) => p.netns === ctx.netns && (p.ifname === undefined || p.ifname === ctx.ifname))?.ip);
      from = `the agent's pod in ${ctx.netns}`;
    } catch {
      // the same agent trouble is met (and judged) by the del below, if there is an IP
    }
  }
  if (!ip) {
    ctx.log(`xmasq: no IPv4 for ${ctx.containerId}/${ctx.ifname} (no prevResult, netns or agent record): nothing to forget`);
    return;
  }
  try {
    await askAgent(conf.agentSocket, { op: 'del', ip }, conf.agentTimeoutMs);
    ctx.log(`xmasq: pod ${ip} (from ${from}) forgotten by the agent`);
  } catch (e) {
    if (!(e instanceof AgentTrouble)) throw e;
    // No agent, no state to purge now (a starting agent drops pods whose veth or netns is
    // gone): DEL must then succeed, as the spec asks when there is nothing left to undo.
    if (e.kind === 'absent') {
      ctx.log(`xmasq: ${e.message}; nothing to forget for ${ip} now`);
      return;
    }
    // The agent is there but could not purge: with "required" the runtime retries DEL
    // before IPAM frees the IP, rather than hand it to a new pod with stale cache entries.
    failOpen(ctx, e, `the entries of ${ip} were not purged now; the agent expires them`);
  }
}

async function cmdCheck(ctx: Ctx): Promise<void> {
  const { conf } = ctx;
  if (!versionAtLeast(conf.cniVersion, '0.4.0')) {
    throw new CniFailure(Code.incompatibleVersion, 'config version does not allow CHECK', `CHECK came in CNI ${conf.cniVersion}; it exists from 0.4.0`);
  }
  if (!conf.prevResult) throw new CniFailure(Code.badConfig, 'CHECK needs prevResult', 'the runtime must pass the result of the last ADD');
  let pod: Pod | undefined;
  try {
    pod = identifyPod(conf.prevResult, ctx.ifname, ctx.netns);
  } catch (e) {
    if (!(e instanceof CniFailure)) throw e;
    failOpen(ctx, e, 'the pod uses the overlay alone');
    return;
  }
  if (!pod) return;
  const want = pod;
  let problem: CniFailure | AgentTrouble | undefined;
  try {
    const r = await askAgent(conf.agentSocket, { op: 'list' }, conf.agentTimeoutMs);
    if (!Array.isArray(r.pods)) throw new AgentTrouble('garbage', `the agent's 'list' answer has no pods array`);
    const rec = r.pods.filter(isObject).find((p) => p.ip === want.ip);
    if (!rec) problem = new CniFailure(Code.notAttached, `the agent does not know pod ${want.ip}`);
    else if (rec.attached !== true) problem = new CniFailure(Code.notAttached, `the agent has no masq attached for pod ${want.ip}`);
    else if (rec.hostVethIfindex !== want.hostVethIfindex || String(rec.mac).toLowerCase() !== want.mac) {
      problem = new CniFailure(Code.notAttached, `the agent holds pod ${want.ip} on another interface`,
        `agent: ${String(rec.mac)} on ifindex ${String(rec.hostVethIfindex)}; pod: ${want.mac} on ${want.hostVeth} (ifindex ${want.hostVethIfindex})`);
    }
  } catch (e) {
    if (!(e instanceof AgentTrouble)) throw e;
    problem = e;
  }
  if (problem) failOpen(ctx, problem, 'the pod uses the overlay alone');
}

/** 1.1.0 STATUS: can we serve ADD? Without "required" always: ADD then never fails on the agent. */
async function cmdStatus(conf: NetConf, log: (l: string) => void): Promise<void> {
  if (!conf.required) return;
  try {
    await askAgent(conf.agentSocket, { op: 'status' }, conf.agentTimeoutMs);
  } catch (e) {
    if (!(e instanceof AgentTrouble)) throw e;
    log(`xmasq: ${e.message}`);
    throw new CniFailure(Code.notAvailable, 'xmasq-agent is not available, and "required" is set', e.message);
  }
}

function envErrors(cmd: string, env: CniIo['env']): string[] {
  const need: Record<string, string[]> = {
    ADD: ['CNI_CONTAINERID', 'CNI_NETNS', 'CNI_IFNAME'],
    CHECK: ['CNI_CONTAINERID', 'CNI_NETNS', 'CNI_IFNAME'],
    DEL: ['CNI_CONTAINERID', 'CNI_IFNAME'],
  };
  const bad: string[] = [];
  for (const k of need[cmd] ?? []) if (!env[k]) bad.push(`${k} is missing`);
  const id = env.CNI_CONTAINERID;
  if (need[cmd] && id && !CONTAINER_ID.test(id)) bad.push(`CNI_CONTAINERID ${JSON.stringify(id)} has invalid characters`);
  const ifn = env.CNI_IFNAME;
  if (need[cmd] && ifn && !validIfname(ifn)) bad.push(`CNI_IFNAME ${JSON.stringify(ifn)} is not a valid interface name`);
  return bad;
}

const COMMANDS = ['ADD', 'DEL', 'CHECK', 'VERSION', 'STATUS', 'GC'];

/** The whole plugin run: never throws, whatever env and stdin hold. */
export async function runCni(io: CniIo): Promise<CniOutcome> {
  // The error speaks the config's version when it has a supported one, else the newest.
  let version: string = LATEST;
  try {
    const cmd = io.env.CNI_COMMAND;
    let raw: unknown;
    let parseError: Error | undefined;
    if (io.stdin !== undefined && io.stdin.trim() !== '') {
      try {
        raw = JSON.parse(io.stdin);
        if (isObject(raw) && isSupported(raw.cniVersion)) version = raw.cniVersion;
      } catch (e) {
        parseError = e as Error;
      }
    }
    if (cmd === 'VERSION') {
      // Spec (1.1.0): answer in the version asked on stdin; older runtimes send none.
      return { stdout: JSON.stringify({ cniVersion: version, supportedVersions: [...SUPPORTED_VERSIONS] }), exitCode: 0 };
    }
    if (!cmd) throw new CniFailure(Code.badEnv, 'CNI_COMMAND is missing', `want one of ${COMMANDS.join(', ')}`);
    if (!COMMANDS.includes(cmd)) throw new CniFailure(Code.badEnv, `unknown CNI_COMMAND ${JSON.stringify(cmd)}`, `want one of ${COMMANDS.join(', ')}`);
    const bad = envErrors(cmd, io.env);
    if (bad.length) throw new CniFailure(Code.badEnv, `invalid environment: ${bad.join('; ')}`);
    if (io.stdin === undefined) throw new CniFailure(Code.io, 'cannot read the network config from stdin');
    if (io.stdin.trim() === '') throw new CniFailure(Code.decode, 'the network config on stdin is empty');
    if (parseError) throw new CniFailure(Code.decode, 'the network config on stdin is not JSON', parseError.message);
    const conf = parseConf(raw);
    if ((cmd === 'STATUS' || cmd === 'GC') && !versionAtLeast(conf.cniVersion, '1.1.0')) {
      throw new CniFailure(Code.incompatibleVersion, `config version does not allow ${cmd}`, `${cmd} came in CNI ${conf.cniVersion}; it exists from 1.1.0`);
    }
    const ctx: Ctx = { conf, containerId: io.env.CNI_CONTAINERID ?? '', netns: io.env.CNI_NETNS ?? '', ifname: io.env.CNI_IFNAME ?? '', log: io.log };
    switch (cmd) {
      case 'ADD':
        return { stdout: await cmdAdd(ctx), exitCode: 0 };
      case 'DEL':
        await cmdDel(ctx);
        return { stdout: '', exitCode: 0 };
      case 'CHECK':
        await cmdCheck(ctx);
        return { stdout: '', exitCode: 0 };
      case 'STATUS':
        await cmdStatus(conf, io.log);
        return { stdout: '', exitCode: 0 };
      default:
        // GC: nothing of ours outlives a DEL but the agent's record, and the agent drops a
        // pod whose veth or netns is gone by itself; there are no attachments to compare.
        return { stdout: '', exitCode: 0 };
    }
  } catch (e) {
    const f = e instanceof CniFailure ? e : new CniFailure(Code.internal, `xmasq plugin bug: ${(e as Error)?.message ?? String(e)}`);
    // The message only: a runtime shows stderr to users, and a stack trace tells them nothing.
    if (!(e instanceof CniFailure)) io.log(`xmasq: ${f.message}`);
    return { stdout: JSON.stringify({ cniVersion: version, code: f.code, msg: f.message, details: f.details }), exitCode: 1 };
  }
}

