/**
 * The xmasq-agent socket protocol, and a client for it.
 *
 * Transport: a unix stream socket (default /run/xmasq/agent.sock, mode 0600,
 * so only root talks to it). Each request is one JSON object on one line;
 * the agent answers each with one JSON object on one line, in order. A
 * connection may carry any number of requests. An optional `seq` in a request
 * is echoed in its reply.
 *
 * Replies are `{"ok":true, ...}` or `{"ok":false,"error":"..."}`; the error
 * says what was wrong and how to fix it.
 *
 *   {"op":"add","pod":{"ip":"10.244.1.5","mac":"0a:58:0a:f4:01:05","hostVethIfindex":7,"netns":"/run/netns/p1"}}
 *      -> {"ok":true,"pod":{...},"replaced":false,"purged":{"egress":0,"ingress":0}}
 *      Idempotent: the same pod again only re-attaches. An IP already held
 *      by a different pod (other MAC or veth) is taken over: the old pod is
 *      detached and its cache entries purged first. In veth mode `netns` is
 *      optional; in rpeer mode it is required (masq goes on the pod's eth0,
 *      or `ifname`, inside it).
 *   {"op":"del","ip":"10.244.1.5"}
 *      -> {"ok":true,"known":true,"detached":true,"purged":{"egress":3,"ingress":2}}
 *      Also fine for an unknown IP (CNI DEL must be idempotent): its cache
 *      entries are purged all the same.
 *   {"op":"list"}                       -> {"ok":true,"pods":[...]}
 *   {"op":"status"}                     -> {"ok":true,"status":{...}}
 *   {"op":"policy-add","rule":{"dir":"egress","dst":"10.244.2.0/24","dport":80,"dportEnd":90,"proto":"tcp"}}
 *      -> {"ok":true,"rule":{"id":1,...},"entries":3}
 *   {"op":"policy-del","id":1}          -> {"ok":true,"rule":{...},"entries":0}
 *   {"op":"policy-list"}                -> {"ok":true,"rules":[...],"entries":0}
 *   {"op":"cache-dump","cache":"egress"|"ingress"|"both"}
 *      -> {"ok":true,"now":"<ns>","egress":[{"key":{...},"value":{...},"idleSeconds":1.2}],"ingress":[...]}
 *
 * 64-bit clock values (last_seen, now) travel as decimal strings.
 */
import { createConnection, type Socket } from 'node:net';

export const DEFAULT_SOCKET = '/run/xmasq/agent.sock';
export const PROTOCOL_VERSION = 1;

export type Mode = 'veth' | 'rpeer';
/** How a program sits on its TC hook: a tcx link (Linux 6.6+) or a cls_bpf filter on a clsact qdisc. */
export type AttachKind = 'tcx' | 'cls_bpf';
export type Direction = 'egress' | 'ingress';

export interface PodSpec {
  /** The pod's IPv4 address. */
  ip: string;
  /** The MAC of the pod's own eth0. */
  mac: string;
  /** Ifindex of the pod's veth end in the host's (the agent's) network namespace. */
  hostVethIfindex: number;
  /** Path of the pod's network namespace, e.g. /run/netns/x or /proc/<pid>/ns/net. Required in rpeer mode. */
  netns?: string;
  /** The pod-side interface, in rpeer mode. Default eth0. */
  ifname?: string;
}

export interface PodRecord extends PodSpec {
  /** Name of the host-side veth when the pod was added. */
  hostVeth: string;
  addedAt: string;
  /** Whether masq is attached for this pod now. */
  attached: boolean;
  /** How masq sits on its hook, once attached. */
  attachKind?: AttachKind;
  /**
   * Served because the agent found it on the host (pod discovery), not
   * because an `add` gave it; absent for added pods. Discovery keeps a
   * discovered pod only while its veth still holds it.
   */
  discovered?: boolean;
}

export interface PolicyRuleSpec {
  /** Default: the lowest free id (>= 1). */
  id?: number;
  dir: Direction;
  /** An IPv4 address or CIDR block (10.244.0.0/16); absent, 0.0.0.0 or 0.0.0.0/0 = any. */
  src?: string;
  dst?: string;
  /** Blocks inside src/dst (or inside any) the rule leaves out, as Kubernetes' ipBlock.except. */
  srcExcept?: string[];
  dstExcept?: string[];
  /** 0 or absent = any; with sportEnd/dportEnd the first port of a range (Kubernetes' port/endPort). */
  sport?: number;
  sportEnd?: number;
  dport?: number;
  dportEnd?: number;
  /** A protocol number or tcp/udp/icmp; 0 or absent = any. */
  proto?: number | 'tcp' | 'udp' | 'icmp';
}

/** A rule as stored and listed: its id given, fields that are "any" absent, a /32 block as its address, the protocol as its number. */
export type PolicyRuleRecord = Omit<PolicyRuleSpec, 'id' | 'proto'> & { id: number; proto?: number };

/** A path (dataplane/maps.ts `path`) with its 64-bit clock as a decimal string. */
export interface PathJson {
  last_seen: string;
  local_mac: string;
  remote_mac: string;
  local_ip: string;
  remote_ip: string;
  ifindex: number;
  local_key: number;
  remote_key: number;
  remote_ready: number;
}

export interface EgressDumpEntry {
  key: { local_pod: string; remote_pod: string };
  value: PathJson;
  idleSeconds: number;
}

export interface IngressDumpEntry {
  key: { remote_host: string; key: number };
  value: PathJson;
  idleSeconds: number;
}

export interface Attachment {
  /** 'init', 'restore', 'masq' or 'masq_rpeer'. */
  program: string;
  dev: string;
  ifindex: number;
  where: Direction;
  /** The pod's netns when attached inside it (rpeer mode). */
  netns?: string;
  progId: number;
  kind: AttachKind;
  /** tcx: the link's id (bpftool link show), and where it is pinned. */
  linkId?: number;
  pin?: string;
}

export interface AgentStatus {
  version: number;
  pid: number;
  mode: Mode;
  modeReason: string;
  /** How the programs sit on their TC hooks (--attach), and why. */
  attach: AttachKind;
  attachReason: string;
  /** Whether init draws wide keys (--wide-keys). */
  wideKeys: boolean;
  nic: string;
  nicIfindex: number;
  pinDir: string;
  object: string;
  socket: string;
  stateDir: string;
  metricsListen: string;
  startedAt: string;
  /** Whether the maps were found pinned (a restart) rather than created. */
  pinsReused: boolean;
  pods: number;
  caches: Record<'egress' | 'ingress', { entries: number; capacity: number }>;
  /** Rules, and the policy_table slots (entries) they compile to. */
  policy: { rules: number; entries: number };
  /** Datapath counters summed over CPUs, by lower-case name (masqueraded, restored, ...). */
  counters: Record<string, number>;
  expiry: {
    egressIdleSeconds: number;
    ingressIdleSeconds: number;
    scanIntervalSeconds: number;
    expired: { egress: number; ingress: number };
    lastScanAt?: string;
  };
  attachments: Attachment[];
  /** The node set the datapath trusts (README "Threat model"). */
  nodes: { overlayDevices: string[]; self: string[]; peers: string[] };
  /** Pod discovery (--discover-pods): what its last round found and left alone. */
  discovery: DiscoveryStatus;
  /** The programs' clock (the clock map, clock.ts); absent from agents before it. */
  clock?: ClockStatus;
}

/**
 * The clock map as the agent calibrated it: the kernel's HZ and a jiffy's
 * length, or none (tick_ns 0: the programs call bpf_ktime_get_coarse_ns, a
 * helper call a packet) and why.
 */
export interface ClockStatus {
  hz?: number;
  tickNs?: number;
  /** Why there is no tick, or why the last re-base failed (the programs keep the last base). */
  reason?: string;
}

export interface DiscoveryStatus {
  enabled: boolean;
  intervalSeconds: number;
  rounds: number;
  lastRoundAt?: string;
  /** Pods served because discovery found them. */
  discoveredPods: number;
  /** Host veths the last round found no pod to serve on, and why. */
  notServed: Array<{ hostVeth: string; hostVethIfindex: number; why: string }>;
  /** Why rounds fail, and since when; absent while they work. */
  failing?: { since: string; error: string };
}

type WithSeq<T> = T & { seq?: number | string };

export type Request = WithSeq<
  | { op: 'add'; pod: PodSpec }
  | { op: 'del'; ip: string }
  | { op: 'list' }
  | { op: 'status' }
  | { op: 'policy-add'; rule: PolicyRuleSpec }
  | { op: 'policy-del'; id: number }
  | { op: 'policy-list' }
  | { op: 'cache-dump'; cache?: 'egress' | 'ingress' | 'both' }
>;
export type Op = Request['op'];

export interface Purged { egress: number; ingress: number }

export interface ReplyMap {
  add: { pod: PodRecord; replaced: boolean; purged: Purged };
  del: { known: boolean; detached: boolean; purged: Purged };
  list: { pods: PodRecord[] };
  status: { status: AgentStatus };
  'policy-add': { rule: PolicyRuleRecord; entries: number };
  'policy-del': { rule: PolicyRuleRecord; entries: number };
  'policy-list': { rules: PolicyRuleRecord[]; entries: number };
  'cache-dump': { now: string; egress?: EgressDumpEntry[]; ingress?: IngressDumpEntry[] };
}

export type OkReply<O extends Op> = { ok: true; seq?: number | string } & ReplyMap[O];
export interface ErrorReply { ok: false; error: string; seq?: number | string }
export type Reply<O extends Op = Op> = OkReply<O> | ErrorReply;

export const OPS: readonly Op[] = ['add', 'del', 'list', 'status', 'policy-add', 'policy-del', 'policy-list', 'cache-dump'];

/** Nothing listens at the socket path. */
export class AgentNotRunningError extends Error {
  /** code: the connect error (ENOENT: no socket file; ECONNREFUSED: nobody listening). */
  constructor(readonly socketPath: string, readonly code: string) {
    super(`no agent at ${socketPath}: start xmasq-agent, or pass --socket`);
    this.name = 'AgentNotRunningError';
  }
}

/** The agent answered {"ok":false}. */
export class AgentError extends Error {
  constructor(readonly op: Op, message: string) {
    super(message);
    this.name = 'AgentError';
  }
}

const MAX_REPLY_BYTES = 64 << 20; // a full cache dump is ~20 MB of JSON

export class AgentClient {
  private buf = '';
  private closed = false;
  /**
   * An error line the agent sent unasked: why it closes the connection (it
   * refuses connections past --socket-max-conns before reading anything, and
   * says so to an idle one). Requests this connection could not carry fail with it.
   */
  private farewell: string | undefined;
  /** Why the connection ended, once it has: what later requests fail with. */
  private ended: ((op: Op) => Error) | undefined;
  private readonly pending: Array<{ op: Op; resolve: (r: Reply) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }> = [];

  private constructor(private readonly sock: Socket, readonly socketPath: string, private readonly timeoutMs: number) {
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => this.onData(chunk));
    sock.on('error', (e: NodeJS.ErrnoException) => this.end((op) => {
      // The agent closed as we wrote (EPIPE) or with our request unread (ECONNRESET): say why, if it said.
      if (this.farewell !== undefined) return new AgentError(op, this.farewell);
      if (e.code === 'EPIPE' || e.code === 'ECONNRESET') return new Error(`the agent at ${socketPath} closed the connection before answering '${op}' (${e.message})`);
      return new Error(`agent connection ${socketPath}: ${e.message}`);
    }));
    sock.on('close', () => this.end((op) => (this.farewell !== undefined
      ? new AgentError(op, this.farewell)
      : new Error(`the agent at ${socketPath} closed the connection before answering '${op}'`))));
  }

  static connect(socketPath = DEFAULT_SOCKET, opts: { timeoutMs?: number } = {}): Promise<AgentClient> {
    return new Promise((resolve, reject) => {
      const sock = createConnection(socketPath);
      const onError = (e: NodeJS.ErrnoException) => {
        sock.destroy();
        if (e.code === 'ENOENT' || e.code === 'ECONNREFUSED' || e.code === 'ENOTSOCK') {
          reject(new AgentNotRunningError(socketPath, e.code));
        } else if (e.code === 'EACCES' || e.code === 'EPERM') {
          reject(new Error(`permission denied on ${socketPath}: the agent socket is root-only (mode 0600); run as root`));
        } else {
          reject(new Error(`cannot connect to the agent at ${socketPath}: ${e.message}`));
        }
      };
      sock.once('error', onError);
      sock.once('connect', () => {
        sock.off('error', onError);
        resolve(new AgentClient(sock, socketPath, opts.timeoutMs ?? 30_000));
      });
    });
  }

  /** One request on a fresh connection. */
  static async request<O extends Op>(socketPath: string, req: Extract<Request, { op: O }>, opts: { timeoutMs?: number } = {}): Promise<OkReply<O>> {
    const c = await AgentClient.connect(socketPath, opts);
    try {
      return await c.call(req);
    } finally {
      c.close();
    }
  }

  /** Sends req; resolves with the ok reply, rejects with AgentError on {"ok":false}. */
  call<O extends Op>(req: Extract<Request, { op: O }>): Promise<OkReply<O>> {
    return this.raw(req).then((r) => {
      if (!r.ok) throw new AgentError(req.op, (r as ErrorReply).error);
      return r as unknown as OkReply<O>;
    });
  }

  /** Sends req; resolves with whatever the agent answered. */
  raw(req: Request): Promise<Reply> {
    if (this.closed) return Promise.reject(new Error(`connection to ${this.socketPath} is closed`));
    if (this.ended) return Promise.reject(this.ended(req.op));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new Error(`the agent at ${this.socketPath} did not answer '${req.op}' within ${this.timeoutMs} ms`));
        // Replies are matched by order; after a lost one the stream is useless.
        this.close();
      }, this.timeoutMs);
      this.pending.push({ op: req.op, resolve, reject, timer });
      this.sock.write(`${JSON.stringify(req)}\n`);
    });
  }

  addPod(pod: PodSpec) { return this.call<'add'>({ op: 'add', pod }); }
  delPod(ip: string) { return this.call<'del'>({ op: 'del', ip }); }
  listPods() { return this.call<'list'>({ op: 'list' }); }
  status() { return this.call<'status'>({ op: 'status' }); }
  policyAdd(rule: PolicyRuleSpec) { return this.call<'policy-add'>({ op: 'policy-add', rule }); }
  policyDel(id: number) { return this.call<'policy-del'>({ op: 'policy-del', id }); }
  policyList() { return this.call<'policy-list'>({ op: 'policy-list' }); }
  cacheDump(cache: 'egress' | 'ingress' | 'both' = 'both') { return this.call<'cache-dump'>({ op: 'cache-dump', cache }); }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.sock.end();
    this.sock.destroy();
    this.failAll(() => new Error(`connection to ${this.socketPath} closed`));
  }

  private onData(chunk: string): void {
    this.buf += chunk;
    if (this.buf.length > MAX_REPLY_BYTES) {
      this.failAll(() => new Error(`the agent at ${this.socketPath} sent a reply over ${MAX_REPLY_BYTES} bytes`));
      this.close();
      return;
    }
    for (let nl = this.buf.indexOf('\n'); nl >= 0; nl = this.buf.indexOf('\n')) {
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + 1);
      const p = this.pending.shift();
      if (!p) {
        this.farewell ??= unaskedError(line);
        continue;
      }
      clearTimeout(p.timer);
      try {
        p.resolve(JSON.parse(line) as Reply);
      } catch {
        p.reject(new Error(`the agent at ${this.socketPath} sent a line that is not JSON: ${line.slice(0, 200)}`));
      }
    }
  }

  /** The connection is over: pending and later requests fail with why(op). */
  private end(why: (op: Op) => Error): void {
    this.ended ??= why;
    this.failAll(this.ended);
  }

  private failAll(why: (op: Op) => Error): void {
    for (const p of this.pending.splice(0)) {
      clearTimeout(p.timer);
      p.reject(why(p.op));
    }
  }
}

/** The error of a line the agent sent unasked ({"ok":false,"error":…}), or undefined for anything else. */
function unaskedError(line: string): string | undefined {
  try {
    const r = JSON.parse(line) as { ok?: unknown; error?: unknown };
    return r?.ok === false && typeof r.error === 'string' ? r.error : undefined;
  } catch {
    return undefined;
  }
}
