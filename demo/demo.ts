/**
 * `npm run demo`: is XMasq faster? Brings up a two-host lab, measures four paths between two
 * pods on different hosts (or between the hosts themselves), and tears everything down
 * again, whatever happens.
 *
 * The four paths share one lab, so they differ only in what the packets go through:
 *   host     h1 netns -> h2 netns over the wire, underlay IPs: the ceiling
 *   route    pod a -> pod b routed without encapsulation (host-gw style): for the duration of
 *            the measurement each host's route to the other's pod CIDR is replaced by
 *            `ip route replace 10.244.<j>.0/24 via <other underlay IP> dev nic0`, then put
 *            back to flannel's `10.244.<j>.0/24 via 10.244.<j>.0 dev flannel.1 onlink`
 *   overlay  pod a -> pod b over flannel's VXLAN, agents stopped (so no filter is attached)
 *   xmasq    pod a -> pod b with both agents running, the pair warmed onto the fast path
 * Agents run only during the xmasq path: SIGTERM detaches every filter and keeps the pins,
 * and the next start re-attaches to the pods it knows.
 *
 * Rounds interleave the paths (host route overlay xmasq host route …) so that a slow minute
 * of the VM spreads over all of them instead of sinking one.
 */
import { execFileSync } from 'node:child_process';
import { accessSync, constants, existsSync, mkdirSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync } from 'node:fs';
import { cpus, release, setPriority } from 'node:os';
import { delimiter, join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { removeLinks } from '../dataplane/agent/datapath.ts';
import { AgentClient } from '../dataplane/agent/protocol.ts';
import { LabAgents } from '../lab/agents.ts';
import { ROOT } from '../testing/root.ts';
import { ToolProcesses, machine, parseSockperf } from '../testing/measure.ts';
import { run } from '../testing/command.ts';
import { Lab, STATE_ROOT, type LabHost, type LabPod } from '../lab/lab.ts';
import { UDP_ECHO, UDP_ROUND_TRIPS, nodeIn, output, server } from '../lab/traffic.ts';
import { PERF_FREQ, renderProfile, type ProfileRun } from './profile.ts';
import { MODES, PATHS, overheadRemovedByMode, summarize, type DemoReport, type Mode, type PathName, type Sample } from './report.ts';

export interface DemoOptions {
  rounds: number;
  durationS: number;
  modes: readonly Mode[];
  /**
   * Nice level of the measured programs (default -20). On a 2-core machine a single busy
   * process elsewhere takes a third of the pinned core and skews every path by a different
   * amount; at -20 it gets about 1% of it. 0 runs them like any other process.
   */
  nice?: number;
  /** Progress lines (stderr in the CLI). */
  progress?: Progress;
  /** Aborting kills the running measurement and tears the lab down. */
  signal?: AbortSignal;
  /** The datapath object the agents load (their --object), to compare builds; default the agent's. */
  agentObject?: string;
  /** The agents' --attach (default theirs: auto). */
  attach?: 'auto' | 'tcx' | 'cls_bpf';
  /**
   * A directory for a CPU profile of every pinned sockperf measurement (perf record on CPU 0,
   * see profile.ts); the run's hop-by-hop table comes back in DemoRun.profile.
   */
  profile?: string;
}

export interface Progress {
  begin(line: string): void;
  end(result: string): void;
  note(line: string): void;
}

/** Evidence that each path carried what its name says, per measurement. */
export interface PathCheck {
  round: number;
  path: PathName;
  mode: Mode;
  what: string;
  /** xmasq: packets h1's agent masqueraded during the measurement; route and overlay: packets sent through flannel.1 on h1. */
  counter: 'masqueraded' | 'vxlan_tx';
  delta: number;
}

export interface DemoRun {
  report: DemoReport;
  /** Things that make the numbers less trustworthy (other load on the machine). */
  warnings: string[];
  samples: Record<PathName, Partial<Record<Mode, Sample[]>>>;
  checks: PathCheck[];
  /** With DemoOptions.profile: CPU per transaction by hop and path, as a markdown table. */
  profile?: string;
}

const IPERF_PORT = 5201;
const RR_PORT = 5301;
const SOCKPERF_PORT = 5351;
/** sockperf's smallest message: its own header (sequence number, flags) takes 14 bytes. */
const SOCKPERF_MSG = 14;
/** The UDP echo that warms the pair onto the fast path. */
const WARM_PORT = 5401;
/** How long a server stopped after its measurement may take to exit before it is killed. */
const STOP_MS = 3000;
const LAB_PREFIX = 'xdemo';
/** Cores busy before the demo starts above which its numbers are flagged. */
const FOREIGN_LOAD_LIMIT = 0.15;
export const DEFAULT_NICE = -20;

export class DemoError extends Error {
  override name = 'DemoError';
}

const TOOL_PACKAGES: Record<string, string> = {
  iperf3: 'iperf3',
  sockperf: 'sockperf',
  taskset: 'util-linux',
  nice: 'coreutils',
  nsenter: 'util-linux',
  ip: 'iproute2',
  ping: 'iputils-ping',
};

function which(tool: string): string | undefined {
  for (const dir of (process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(delimiter)) {
    try {
      accessSync(join(dir, tool), constants.X_OK);
      return join(dir, tool);
    } catch {
      // next PATH entry
    }
  }
  return undefined;
}

/** Every missing prerequisite in one message, so one apt-get fixes them all. */
export function checkPrerequisites(profile = false): { cc: string } {
  const missing = [...Object.keys(TOOL_PACKAGES), ...(profile ? ['perf'] : [])].filter((t) => !which(t));
  const cc = ['gcc', 'cc', 'clang', 'clang-16'].map(which).find(Boolean);
  const pkgs = [...new Set(missing.map((t) => TOOL_PACKAGES[t] ?? (t === 'perf' ? 'linux-perf' : t)))];
  if (!cc) pkgs.push('gcc');
  const problems: string[] = [];
  if (pkgs.length) {
    problems.push(`missing ${[...missing, ...(cc ? [] : ['a C compiler (for demo/rr.c)'])].join(', ')}: apt-get install ${pkgs.join(' ')}`);
  }
  if (process.getuid?.() !== 0) problems.push('the demo needs root (network namespaces, BPF): run it as root');
  if (!existsSync(`${ROOT}bpf/build/xmasq.bpf.o`)) problems.push('bpf/build/xmasq.bpf.o is missing: run npm run build:bpf first');
  if (problems.length) throw new DemoError(problems.join('\n'));
  return { cc: cc! };
}

/** Busy and all CPU time of the whole machine, in clock ticks (/proc/stat is not per netns). */
function machineTicks(): { busy: number; total: number } {
  const line = readFileSync('/proc/stat', 'utf8').split('\n')[0];
  // user nice system idle iowait irq softirq steal (guest is already inside user)
  const [user, nice, system, idle, iowait, irq, softirq, steal] = line.trim().split(/\s+/).slice(1).map(Number);
  const busy = user + nice + system + irq + softirq;
  return { busy, total: busy + idle + iowait + (steal ?? 0) };
}

/** utime + stime of a process or thread, in clock ticks; 0 once it is gone. */
function procTicks(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name, which may itself hold spaces and parentheses.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(f[11]) + Number(f[12]);
  } catch {
    return 0;
  }
}

function processes(): { pid: number; comm: string }[] {
  const out: { pid: number; comm: string }[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      out.push({ pid: Number(d), comm: readFileSync(`/proc/${d}/comm`, 'utf8').trim() });
    } catch {
      // exited meanwhile
    }
  }
  return out;
}

let ksoftirqds: number[] | undefined;
/** Softirq work the kernel deferred to ksoftirqd is not charged to the iperf3 processes. */
function ksoftirqdTicks(): number {
  ksoftirqds ??= processes().filter((p) => /^ksoftirqd\/\d+$/.test(p.comm)).map((p) => p.pid);
  return ksoftirqds.reduce((n, pid) => n + procTicks(pid), 0);
}

let irqTime: boolean | undefined;
/**
 * CONFIG_IRQ_TIME_ACCOUNTING: with it, softirq time is taken out of the task it interrupted
 * (and shows only in /proc/stat); without it (the kernel's default, and this lab's 6.18),
 * a tick that lands in softirq is charged to the running task as system time. Unknown
 * config: the default.
 */
function irqTimeAccounted(): boolean {
  if (irqTime === undefined) {
    let config = '';
    try {
      config = gunzipSync(readFileSync('/proc/config.gz')).toString();
    } catch {
      try {
        config = readFileSync(`/boot/config-${release()}`, 'utf8');
      } catch {
        // unknown
      }
    }
    irqTime = /^CONFIG_IRQ_TIME_ACCOUNTING=y$/m.test(config);
  }
  return irqTime;
}

/** irq + softirq time of the whole machine, in clock ticks. */
function irqTicks(): number {
  const f = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  return f[5] + f[6];
}

let clockTicks: number | undefined;
/** USER_HZ, the unit of /proc/stat: 100 on every mainstream build, but asked rather than assumed. */
function clockTicksPerSecond(): number {
  if (clockTicks === undefined) {
    try {
      clockTicks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim()) || 100;
    } catch {
      clockTicks = 100;
    }
  }
  return clockTicks;
}

/**
 * Whatever else runs on the machine takes CPU from the measurement (on 2 cores, a single
 * busy process is half the machine): one second of /proc/stat, and the processes that used
 * the most of it, so the report can say why its numbers may be low.
 */
export async function foreignLoad(): Promise<{ busyCores: number; top: { pid: number; cores: number; cmd: string }[] }> {
  const procs = processes().filter((p) => p.pid !== process.pid);
  const m0 = machineTicks(), p0 = procs.map((p) => procTicks(p.pid));
  const t0 = Date.now();
  await sleep(1000);
  const m1 = machineTicks(), p1 = procs.map((p) => procTicks(p.pid));
  const seconds = (Date.now() - t0) / 1000, hz = clockTicksPerSecond();
  const top = procs
    .map((p, i) => ({ pid: p.pid, cores: (p1[i] - p0[i]) / hz / seconds, comm: p.comm }))
    .filter((p) => p.cores >= 0.05)
    .sort((x, y) => y.cores - x.cores)
    .slice(0, 3)
    .map((p) => {
      let cmd = p.comm;
      try {
        const args = readFileSync(`/proc/${p.pid}/cmdline`, 'utf8').split('\0').filter(Boolean);
        // For an interpreter, its script says more than its loader options.
        const script = args.findIndex((a, i) => i > 0 && /\.(ts|js|mjs|cjs|py|sh)$/.test(a) && !a.includes('node_modules'));
        const shown = script > 0 ? [args[0].split('/').pop()!, '…', ...args.slice(script)] : args;
        cmd = shown.join(' ').slice(0, 200) || p.comm;
      } catch {
        // exited meanwhile
      }
      return { pid: p.pid, cores: p.cores, cmd };
    });
  return { busyCores: ((m1.busy - m0.busy) / Math.max(1, m1.total - m0.total)) * cpus().length, top };
}

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
};

/** The inode of each network namespace of `lab` still mounted under /run/netns. */
function labNetnsInodes(lab: string): Set<number> {
  const out = new Set<number>();
  let names: string[] = [];
  try {
    names = readdirSync('/run/netns');
  } catch {
    return out;
  }
  for (const n of names.filter((x) => x.startsWith(`${lab}-`))) {
    try {
      out.add(statSync(`/run/netns/${n}`).ino);
    } catch {
      // deleted meanwhile
    }
  }
  return out;
}

/**
 * Labs of earlier runs whose process is gone (killed with SIGKILL, a crashed VM session):
 * nothing else would ever remove them. What that run started outlives it too: its agents
 * (with a broken stderr pipe) and its iperf3/rr servers. They are found by the network
 * namespace they run in, which only that run's lab had, or for an agent whose lab is
 * already gone, by its --pin-dir. Anything of a live demo is left alone.
 */
export async function removeStaleLabs(note: (s: string) => void): Promise<void> {
  const owner = (name: string) => {
    const m = new RegExp(`^${LAB_PREFIX}(\\d+)$`).exec(name);
    return m && Number(m[1]) !== process.pid && !alive(Number(m[1])) ? Number(m[1]) : undefined;
  };
  let names: string[] = [];
  try {
    names = readdirSync(STATE_ROOT).filter((n) => owner(n) !== undefined);
  } catch {
    // no lab at all
  }
  const netns = new Map<number, string>();
  for (const name of names) for (const ino of labNetnsInodes(name)) netns.set(ino, name);
  const orphans: { pid: number; lab: string; cmd: string }[] = [];
  for (const { pid, comm } of processes()) {
    if (pid === process.pid) continue;
    let lab: string | undefined;
    try {
      const ino = Number(/\[(\d+)\]/.exec(readlinkSync(`/proc/${pid}/ns/net`))?.[1]);
      lab = netns.get(ino);
      if (!lab) {
        const args = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
        const i = args.indexOf('--pin-dir');
        const m = i >= 0 ? new RegExp(`^/sys/fs/bpf/(${LAB_PREFIX}\\d+)-h\\d+$`).exec(args[i + 1] ?? '') : null;
        if (m && owner(m[1]) !== undefined && args.some((x) => x.endsWith('dataplane/agent/main.ts'))) lab = m[1];
      }
    } catch {
      continue; // exited meanwhile
    }
    if (lab) orphans.push({ pid, lab, cmd: comm });
  }
  for (const o of orphans) {
    note(`killing ${o.cmd} (pid ${o.pid}) left behind by an earlier demo in lab ${o.lab}`);
    try {
      process.kill(o.pid, 'SIGKILL');
    } catch {
      // gone meanwhile
    }
  }
  for (const name of new Set([...names, ...orphans.map((o) => o.lab)])) {
    if (names.includes(name)) {
      note(`removing lab ${name} left behind by an earlier demo (its process is gone)`);
      await Lab.down(name).catch((e: Error) => note(`  could not: ${e.message}`));
    }
    for (const h of ['h1', 'h2']) rmSync(`/sys/fs/bpf/${name}-${h}`, { recursive: true, force: true });
    rmSync(`/run/xmasq-demo-${name}`, { recursive: true, force: true });
  }
}

class Aborted extends Error {
  override name = 'AbortError';
  constructor() {
    super('interrupted');
  }
}

export function isAbort(e: unknown): boolean {
  return e instanceof Error && e.name === 'AbortError';
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

class Demo {
  private lab?: Lab;
  private agents?: LabAgents;
  private routed = false;
  private rr = '';
  private a!: LabPod;
  private b!: LabPod;
  private readonly name = `${LAB_PREFIX}${process.pid}`;
  private readonly runDir = `/run/xmasq-demo-${this.name}`;
  private readonly p: Progress;
  private readonly profiled: { path: PathName; tool: 'sockperf' | 'iperf3'; file: string; units: number }[] = [];

  constructor(private readonly opts: DemoOptions) {
    this.p = opts.progress ?? { begin() {}, end() {}, note() {} };
    opts.signal?.addEventListener('abort', () => void this.tools.killAll());
  }

  private readonly tools = new ToolProcesses({
    spawn: (where, cmd, args) => this.lab!.spawn(where, cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] }),
    listenTimeoutMs: 10_000, pollMs: 20, error: (m) => new DemoError(m), check: () => this.checkAbort(),
  });

  private checkAbort(): void {
    if (this.opts.signal?.aborted) throw new Aborted();
  }

  async run(): Promise<DemoRun> {
    const { cc } = checkPrerequisites(!!this.opts.profile);
    await removeStaleLabs((s) => this.p.note(s));
    const warnings: string[] = [];
    const load = async (when: string) => {
      const l = await foreignLoad();
      if (l.busyCores < FOREIGN_LOAD_LIMIT) return;
      const w = `the machine was not idle ${when}: ${l.busyCores.toFixed(2)} of ${cpus().length} cores busy` +
        (l.top.length ? ` (${l.top.map((p) => `pid ${p.pid} ${(p.cores * 100).toFixed(0)}%: ${p.cmd}`).join('; ')})` : '') +
        `; the measured programs ran at nice ${this.opts.nice ?? DEFAULT_NICE}, but expect noisier numbers than on a quiet machine (CPU per Gbit/s counts only the measured processes)`;
      warnings.push(w);
      this.p.note(`warning: ${w}`);
    };
    await load('before the demo');
    const started = new Date();
    let result: DemoRun;
    try {
      await this.setUp(cc);
      result = await this.measure(started, warnings);
    } finally {
      await this.tearDown();
    }
    if (this.opts.rounds * this.opts.durationS >= 3) await load('after the demo');
    return result;
  }

  private async setUp(cc: string): Promise<void> {
    this.checkAbort();
    // Inside the run directory, so that a later run removes it if this one is killed.
    mkdirSync(`${this.runDir}/bin`, { recursive: true });
    if (this.opts.profile) mkdirSync(this.opts.profile, { recursive: true });
    this.rr = `${this.runDir}/bin/rr`;
    const built = await run(cc, ['-O2', '-Wall', '-o', this.rr, `${ROOT}demo/rr.c`]);
    if (built.code !== 0) throw new DemoError(`compiling demo/rr.c with ${cc} failed:\n${built.stderr}`);
    this.checkAbort();

    this.p.note(`bringing up lab ${this.name}: 2 hosts, flannel-style VXLAN, pods by bridge + host-local + xmasq`);
    const runDir = this.runDir;
    this.lab = await Lab.up({
      name: this.name, hosts: 2, podsPerHost: 0,
      cniPath: ['/usr/lib/cni', `${ROOT}dataplane/cni`],
      cniPlugins: [{ type: 'xmasq', agentSocket: `${runDir}/{host}/agent.sock`, required: true }],
    });
    this.agents = new LabAgents(this.lab, runDir, this.name, [
      ...(this.opts.agentObject ? ['--object', this.opts.agentObject] : []),
      ...(this.opts.attach ? ['--attach', this.opts.attach] : []),
    ]);
    this.checkAbort();
    await this.startAgents();
    this.a = await this.lab.addPod('h1', 'a');
    this.b = await this.lab.addPod('h2', 'b');
    await this.stopAgents();
    this.p.note(`pods: a ${this.a.ip} on h1, b ${this.b.ip} on h2; hosts ${this.host(1).ip}, ${this.host(2).ip}`);
  }

  private host(i: 1 | 2): LabHost {
    return this.lab!.host(i);
  }

  private async tearDown(): Promise<void> {
    await this.tools.killAll(true);
    if (this.lab) this.p.note(`tearing down lab ${this.name}`);
    // Only matters when down fails below: the lab is then left as flannel programmed it.
    if (this.routed) await this.unroute().catch(() => {});
    await this.agents?.teardown().catch((e: Error) => this.p.note(`stopping agents: ${e.message}`));
    await this.lab?.down().catch((e: Error) => this.p.note(`lab down failed (run the demo again to retry): ${e.message}`));
    rmSync(this.runDir, { recursive: true, force: true });
  }

  /**
   * The agents run at the measured programs' nice level: a new TCP connection takes the fast
   * path only once its agent has made its conntrack entry liberal (a 10-ms timer), and on a
   * busy machine an agent at nice 0 was seen to do that 1.5 s late, so that a quarter of an
   * xmasq measurement crossed the overlay. The agent is part of what is measured either way.
   */
  private async startAgents(): Promise<void> {
    const nice = this.opts.nice ?? DEFAULT_NICE;
    for (const h of ['h1', 'h2']) {
      await this.agents!.start(h);
      const pid = this.agents!.pid(h);
      if (!nice || pid === undefined) continue;
      // Nice is per thread on Linux: every thread the agent has by now (its timers run on the main one).
      for (const tid of readdirSync(`/proc/${pid}/task`)) setPriority(Number(tid), nice);
    }
  }

  /**
   * Stops the agents, then takes off the restore a stopped agent leaves at the NIC on purpose
   * (so that peers' marked packets never reach the stack), so that the other paths run with no
   * program attached at all. The pins and pod records stay: the next xmasq path's agents
   * resume from them (`cleanup` would forget the pods).
   */
  private async stopAgents(): Promise<void> {
    for (const h of ['h1', 'h2'] as const) {
      const code = await this.agents!.stop(h);
      if (code !== 0 && code !== null) throw new DemoError(`xmasq-agent on ${h} exited ${code} while stopping`);
      const host = this.host(h === 'h1' ? 1 : 2);
      // A tcx link (the agents' default where the kernel has tcx) goes with its pin, a cls_bpf filter with tc.
      if (removeLinks(this.agents!.pinDir(h)) === 0) await this.mustExec(host, 'tc', ['filter', 'del', 'dev', host.nic, 'ingress']);
    }
  }

  // ---- the paths ----------------------------------------------------------------------

  private routeSpecs(): [LabHost, LabHost][] {
    return [[this.host(1), this.host(2)], [this.host(2), this.host(1)]];
  }

  /** host-gw: the other host's pod CIDR straight via its underlay IP, no VXLAN. */
  private async route(): Promise<void> {
    this.routed = true;
    for (const [h, o] of this.routeSpecs()) {
      await this.mustExec(h, 'ip', ['route', 'replace', o.podCidr, 'via', o.ip, 'dev', h.nic]);
    }
    const got = await this.mustExec(this.host(1), 'ip', ['route', 'get', this.b.ip]);
    if (!got.includes(`dev ${this.host(1).nic}`)) throw new DemoError(`route path: h1 still routes ${this.b.ip} as: ${got.trim()}`);
  }

  /** Back to exactly what flannel (lab.ts programOverlay) programs. */
  private async unroute(): Promise<void> {
    for (const [h, o] of this.routeSpecs()) {
      await this.mustExec(h, 'ip', ['route', 'replace', o.podCidr, 'via', o.vtepIp, 'dev', h.vxlan, 'onlink']);
    }
    this.routed = false;
  }

  private async mustExec(where: { netns: string }, cmd: string, args: string[]): Promise<string> {
    const r = await this.lab!.exec(where, cmd, args, { timeoutMs: 15_000 });
    if (r.code !== 0) throw new DemoError(`'${cmd} ${args.join(' ')}' in ${where.netns} exited ${r.code}: ${(r.stderr || r.stdout).trim()}`);
    return r.stdout;
  }

  private async vxlanTx(): Promise<number> {
    const h = this.host(1);
    const [l] = JSON.parse(await this.mustExec(h, 'ip', ['-s', '-j', 'link', 'show', 'dev', h.vxlan])) as { stats64: { tx: { packets: number } } }[];
    return l.stats64.tx.packets;
  }

  private async masqueraded(host: 'h1' | 'h2'): Promise<number> {
    return (await this.agents!.counters(host)).masqueraded ?? 0;
  }

  /**
   * UDP round trips until both directions are masqueraded: the first packets of the pair cross
   * the overlay so init can learn it and the keys are exchanged, and the hosts' conntrack sees
   * the flow answered (it admits TCP and UDP flows only, never pings). The cache is per pod
   * pair, so every later connection of a and b takes the fast path once conntrack has it
   * established (for TCP, ~100 ms after its handshake, when the agent made its entry liberal).
   */
  private async warm(): Promise<void> {
    const h1 = await this.masqueraded('h1'), h2 = await this.masqueraded('h2');
    const echo = await server(this.lab!, this.b, UDP_ECHO(WARM_PORT));
    try {
      for (let i = 0; i < 30; i++) {
        this.checkAbort();
        await output(nodeIn(this.lab!, this.a, UDP_ROUND_TRIPS(this.b.ip, WARM_PORT, 4, 20)), 5000);
        if ((await this.masqueraded('h1')) > h1 && (await this.masqueraded('h2')) > h2) return;
      }
    } finally {
      echo.kill();
    }
    throw new DemoError('xmasq path: the a-b pair never reached the fast path (masqueraded counters did not grow after 120 UDP round trips)');
  }

  private endpoints(path: PathName): { client: { netns: string }; server: { netns: string }; target: string } {
    return path === 'host'
      ? { client: this.host(1), server: this.host(2), target: this.host(2).ip }
      : { client: this.a, server: this.b, target: this.b.ip };
  }

  private async enter(path: PathName): Promise<void> {
    if (path === 'route') await this.route();
    if (path === 'xmasq') {
      await this.startAgents();
      const pods = await Promise.all(['h1', 'h2'].map(async (h) => (await AgentClient.request(this.agents!.socket(h), { op: 'list' })).pods));
      if (!pods.every((ps) => ps.length === 1 && ps[0].attached)) throw new DemoError(`xmasq path: the agents do not have their pod attached: ${JSON.stringify(pods)}`);
      await this.warm();
    }
  }

  private async leave(path: PathName): Promise<void> {
    if (path === 'route') await this.unroute();
    if (path === 'xmasq') await this.stopAgents();
  }

  /** Wraps one measurement with the counter that proves which way its packets went. */
  private async checked<T>(round: number, path: PathName, mode: Mode, what: string, checks: PathCheck[], f: () => Promise<T>): Promise<T> {
    if (path === 'host') return f();
    const counter = path === 'xmasq' ? 'masqueraded' : 'vxlan_tx';
    const read = () => (path === 'xmasq' ? this.masqueraded('h1') : this.vxlanTx());
    const before = await read();
    const out = await f();
    const delta = (await read()) - before;
    checks.push({ round, path, mode, what, counter, delta });
    if (path === 'xmasq' && delta <= 0) throw new DemoError(`xmasq path, ${mode} ${what}: h1's masqueraded counter did not grow: the traffic did not take the fast path`);
    if (path === 'overlay' && delta <= 0) throw new DemoError(`overlay path, ${mode} ${what}: nothing went through ${this.host(1).vxlan}`);
    // A handful could be a stray packet; a measurement's worth means the routes were not in effect.
    if (path === 'route' && delta > 10) throw new DemoError(`route path, ${mode} ${what}: ${delta} packets went through ${this.host(1).vxlan}: the routes were not in effect`);
    return out;
  }

  // ---- the tools -------------------------------------------------------------------------

  private pin(mode: Mode, cmd: string, args: string[]): [string, string[]] {
    const [c, a]: [string, string[]] = mode === 'pinned' ? ['taskset', ['-c', '0', cmd, ...args]] : [cmd, args];
    const nice = this.opts.nice ?? DEFAULT_NICE;
    return nice ? ['nice', ['-n', String(nice), c, ...a]] : [c, a];
  }

  /** A client runs for the measurement's duration; it is killed if it takes 30 s more. */
  private client(where: { netns: string }, cmd: string, args: string[]): Promise<{ code: number | null; out: string }> {
    return this.tools.client(where, cmd, args, (this.opts.durationS + 30) * 1000);
  }

  private async iperf(path: PathName, mode: Mode, streams: number, round: number): Promise<{ gbps: number; cpuPerGbps: number }> {
    const { client, server, target } = this.endpoints(path);
    const srv = await this.tools.server(server, ...this.pin(mode, 'iperf3', ['-s', '-1', '-p', String(IPERF_PORT), '--forceflush']), /listening/i);
    const k0 = ksoftirqdTicks() + (irqTimeAccounted() ? irqTicks() : 0);
    let [cmd, args] = this.pin(mode, 'iperf3', ['-c', target, '-p', String(IPERF_PORT), '-t', String(this.opts.durationS), '-P', String(streams), '-J']);
    const file = this.opts.profile && mode === 'pinned' && streams === 1 ? join(this.opts.profile, `${path}-round${round}-iperf3.perf.data`) : undefined;
    if (file) [cmd, args] = ['perf', ['record', '-q', '-e', 'cpu-clock', '-F', String(PERF_FREQ), '-C', '0', '-g', '-o', file, '--', cmd, ...args]];
    const r = await this.client(client, cmd, args);
    const k1 = ksoftirqdTicks() + (irqTimeAccounted() ? irqTicks() : 0);
    await srv.stop(STOP_MS);
    let j: {
      error?: string;
      end?: { sum_received?: { bits_per_second: number; bytes: number; seconds: number }; cpu_utilization_percent?: { host_total: number; remote_total: number } };
    };
    try {
      j = JSON.parse(r.out.slice(r.out.indexOf('{')));
    } catch {
      throw new DemoError(`iperf3 to ${target} (${path}) exited ${r.code} without a JSON report: ${r.out.trim().slice(0, 500)}`);
    }
    const sum = j.end?.sum_received;
    if (r.code !== 0 || j.error || !sum?.bits_per_second) throw new DemoError(`iperf3 to ${target} (${path}) failed: ${j.error ?? r.out.trim().slice(0, 500)}`);
    // Each iperf3 reports its own getrusage() over the test as a share of one core. On veths
    // the whole receive path runs as softirq in the sender's context, which a kernel without
    // IRQ_TIME_ACCOUNTING charges to the sender; with it, the machine's irq/softirq time is
    // added instead. Either way client + server + ksoftirqd (+ irq) is the path's cost,
    // without whatever else the machine is running.
    const cpu = j.end?.cpu_utilization_percent;
    const cores = cpu ? (cpu.host_total + cpu.remote_total) / 100 : NaN;
    const cpuSeconds = cores * sum.seconds + (k1 - k0) / clockTicksPerSecond();
    const gbits = (sum.bytes * 8) / 1e9;
    if (file) this.profiled.push({ path, tool: 'iperf3', file, units: sum.bytes / 1e6 });
    return { gbps: sum.bits_per_second / 1e9, cpuPerGbps: (cpuSeconds / gbits) * 100 };
  }

  private async rrTest(path: PathName, mode: Mode): Promise<{ tps: number; p50: number; p99: number }> {
    const { client, server, target } = this.endpoints(path);
    const srv = await this.tools.server(server, ...this.pin(mode, this.rr, ['-s', '-p', String(RR_PORT)]), /listening/);
    const r = await this.client(client, ...this.pin(mode, this.rr, ['-c', target, '-p', String(RR_PORT), '-t', String(this.opts.durationS)]));
    await srv.stop(STOP_MS);
    const m = /\{.*\}/.exec(r.out);
    if (r.code !== 0 || !m) throw new DemoError(`rr to ${target} (${path}) exited ${r.code}: ${r.out.trim()}`);
    const j = JSON.parse(m[0]) as { tps: number; p50_us: number; p99_us: number };
    return { tps: j.tps, p50: j.p50_us, p99: j.p99_us };
  }

  /**
   * sockperf ping-pong over TCP (Debian's sockperf, as users run it): one message in flight,
   * the server echoes it. sockperf reports latency as half the round trip, which is what
   * its users quote; the rate is its valid-duration message count over that duration (the
   * warm-up it does first is not counted).
   */
  private async sockperfTest(path: PathName, mode: Mode, round: number): Promise<{ tps: number; p50: number; p99: number }> {
    const { client, server, target } = this.endpoints(path);
    const port = String(SOCKPERF_PORT);
    // "to block on socket" is printed once the server sits in its receive loop, after listen().
    const srv = await this.tools.server(server, ...this.pin(mode, 'sockperf', ['server', '--tcp', '-i', target, '-p', port]), /to block on socket/);
    let [cmd, args] = this.pin(mode, 'sockperf', ['ping-pong', '--tcp', '-i', target, '-p', port, '-m', String(SOCKPERF_MSG), '-t', String(this.opts.durationS)]);
    const file = this.opts.profile && mode === 'pinned' ? join(this.opts.profile, `${path}-round${round}.perf.data`) : undefined;
    if (file) [cmd, args] = ['perf', ['record', '-q', '-e', 'cpu-clock', '-F', String(PERF_FREQ), '-C', '0', '-g', '-o', file, '--', cmd, ...args]];
    let r: { code: number | null; out: string };
    try {
      r = await this.client(client, cmd, args);
    } finally {
      // sockperf serves until killed.
      await srv.stop(STOP_MS, true);
    }
    const x = parseSockperf(r.out, r.code, `sockperf to ${target} (${path})`, (m) => new DemoError(m));
    if (file) this.profiled.push({ path, tool: 'sockperf', file, units: x.total });
    return x;
  }

  /** The hop-by-hop table of the profiled measurements (perf script reads each recording). */
  private async profileTable(): Promise<string | undefined> {
    if (!this.profiled.length) return undefined;
    const runs: (ProfileRun & { tool: string })[] = [];
    for (const p of this.profiled) {
      this.checkAbort();
      this.p.begin(`reading the profile ${p.file} …`);
      const r = await run('perf', ['script', '-i', p.file, '-F', 'comm,tid,ip,sym'], { timeoutMs: 300_000 });
      if (r.code !== 0) throw new DemoError(`perf script -i ${p.file} exited ${r.code}: ${r.stderr.trim().slice(0, 500)}`);
      this.p.end('done');
      runs.push({ path: p.path, tool: p.tool, script: r.stdout, units: p.units });
    }
    const rr = runs.filter((r) => r.tool === 'sockperf'), stream = runs.filter((r) => r.tool === 'iperf3');
    return [
      rr.length ? `Request/response (sockperf ping-pong):\n\n${renderProfile(rr, 'transaction')}` : '',
      stream.length ? `Throughput (iperf3, 1 stream; per megabyte received):\n\n${renderProfile(stream, 'MB')}` : '',
    ].filter(Boolean).join('\n');
  }

  // ---- the run -----------------------------------------------------------------------------

  private async measure(started: Date, warnings: string[]): Promise<DemoRun> {
    const { rounds, modes } = this.opts;
    const samples = Object.fromEntries(PATHS.map((p) => [p, {}])) as DemoRun['samples'];
    const checks: PathCheck[] = [];
    for (let round = 1; round <= rounds; round++) {
      for (const path of PATHS) {
        this.checkAbort();
        try {
          await this.enter(path);
          for (const mode of MODES.filter((m) => modes.includes(m))) {
            const step = async <T>(what: string, f: () => Promise<T>, show: (x: T) => string): Promise<T> => {
              this.p.begin(`round ${round}/${rounds}: ${path} ${mode} ${what} …`);
              const n = checks.length;
              const x = await this.checked(round, path, mode, what, checks, f);
              const c = checks.length > n ? checks[checks.length - 1] : undefined;
              this.p.end(show(x) + (c ? ` [${c.counter === 'masqueraded' ? 'h1 masqueraded' : `h1 ${this.host(1).vxlan} tx`} +${c.delta}]` : ''));
              return x;
            };
            const one = await step('iperf3 -P 1', () => this.iperf(path, mode, 1, round), (x) => `${x.gbps.toFixed(2)} Gbit/s, ${x.cpuPerGbps.toFixed(2)} % core per Gbit/s`);
            const four = await step('iperf3 -P 4', () => this.iperf(path, mode, 4, round), (x) => `${x.gbps.toFixed(2)} Gbit/s`);
            const sp = await step('sockperf ping-pong', () => this.sockperfTest(path, mode, round), (x) => `${Math.round(x.tps)} tps, p50 ${x.p50.toFixed(2)} µs, p99 ${x.p99.toFixed(2)} µs (half round trip)`);
            const rr = await step('TCP_RR 1 byte', () => this.rrTest(path, mode), (x) => `${Math.round(x.tps)} tps, p50 ${x.p50.toFixed(1)} µs, p99 ${x.p99.toFixed(1)} µs`);
            (samples[path][mode] ??= []).push({
              throughput_gbps: one.gbps, throughput4_gbps: four.gbps, cpu_per_gbps: one.cpuPerGbps,
              sockperf_rr_tps: sp.tps, sockperf_p50_us: sp.p50, sockperf_p99_us: sp.p99,
              rr_tps: rr.tps, rr_p50_us: rr.p50, rr_p99_us: rr.p99,
            });
          }
        } catch (e) {
          // Teardown follows; a failing clean-up here must not hide why we stopped.
          if (!this.opts.signal?.aborted) await this.leave(path).catch(() => {});
          throw e;
        }
        await this.leave(path);
      }
    }
    const paths = Object.fromEntries(PATHS.map((p) => [p, Object.fromEntries(Object.entries(samples[p]).map(([m, s]) => [m, summarize(s!)]))])) as DemoReport['paths'];
    const report: DemoReport = {
      machine: machine(),
      date: started.toISOString(),
      rounds,
      duration_s: this.opts.durationS,
      paths,
      overhead_removed: overheadRemovedByMode({ paths }),
    };
    return { report, samples, checks, warnings, profile: await this.profileTable() };
  }
}

export async function runDemo(opts: DemoOptions): Promise<DemoRun> {
  if (!Number.isInteger(opts.rounds) || opts.rounds < 1) throw new DemoError(`rounds must be a positive integer, got ${opts.rounds}`);
  if (!(opts.durationS >= 1)) throw new DemoError(`duration must be at least 1 s, got ${opts.durationS}`);
  if (!opts.modes.length) throw new DemoError('no mode to measure');
  if (opts.nice !== undefined && !(Number.isInteger(opts.nice) && opts.nice >= -20 && opts.nice <= 19)) throw new DemoError(`nice must be an integer in -20..19, got ${opts.nice}`);
  return new Demo(opts).run();
}
