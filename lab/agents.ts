/**
 * One xmasq-agent per lab host, each in its host's netns, with its socket,
 * pins and state under a run directory of the caller's choosing.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import { AgentClient } from '../dataplane/agent/protocol.ts';
import { BpfMap } from '../dataplane/libbpf.ts';
import { egressKey, path, type Path } from '../dataplane/maps.ts';
import { run } from '../testing/command.ts';
import { ROOT, TSX } from '../testing/root.ts';
import { Lab } from './lab.ts';

const AGENT = `${ROOT}dataplane/agent/main.ts`;
const AGENT_BUNDLE = `${ROOT}dist/xmasq-agent.mjs`;

export class LabAgents {
  private readonly procs = new Map<string, ChildProcess>();
  private readonly logs = new Map<string, string>();

  /**
   * runDir holds <host>/agent.sock and <host>/ state; pins go to /sys/fs/bpf/<pinPrefix>-<host>.
   * startTimeoutMs: how long start() waits for the agent to answer (longer under emulation, e.g. vm-tests/).
   * bundle: run dist/xmasq-agent.mjs (npm run build:js) instead of the sources through tsx, which
   * under emulation spends minutes transforming them at every start.
   */
  constructor(private readonly lab: Lab, readonly runDir: string, private readonly pinPrefix: string, private readonly extraArgs: string[] = [],
    private readonly startTimeoutMs = 20_000, private readonly bundle = false) {}

  socket(host: string): string {
    return `${this.runDir}/${host}/agent.sock`;
  }

  pinDir(host: string): string {
    return `/sys/fs/bpf/${this.pinPrefix}-${host}`;
  }

  /** The `agentSocket` to give the xmasq CNI plugin: the lab puts the host name in. */
  get cniSocketTemplate(): string {
    return `${this.runDir}/{host}/agent.sock`;
  }

  private args(host: string): string[] {
    const h = this.lab.host(host);
    return ['--nic', h.nic, '--pin-dir', this.pinDir(host), '--socket', this.socket(host), '--state-dir', `${this.runDir}/${host}`,
      ...this.lab.agentOverlayArgs()];
  }

  /** Starts the host's agent and waits until it answers on its socket. */
  async start(host: string, args: string[] = []): Promise<void> {
    mkdirSync(`${this.runDir}/${host}`, { recursive: true });
    // node --import tsx, not the tsx CLI: the CLI runs the script in a child and
    // forwards only some signals (not SIGUSR2, the handover).
    const child = spawn('nsenter', [`--net=/run/netns/${this.lab.host(host).netns}`, process.execPath, ...(this.bundle ? [AGENT_BUNDLE] : ['--import', 'tsx', AGENT]), ...this.args(host),
      '--metrics-listen', 'off', ...this.extraArgs, ...args], { stdio: ['ignore', 'ignore', 'pipe'], cwd: ROOT });
    this.logs.set(host, '');
    child.stderr!.on('data', (d) => this.logs.set(host, this.log(host) + d));
    this.procs.set(host, child);
    const deadline = Date.now() + this.startTimeoutMs;
    for (;;) {
      if (child.exitCode !== null) throw new Error(`xmasq-agent on ${host} exited ${child.exitCode}:\n${this.log(host)}`);
      try {
        // Under emulation on a busy machine one answer can take seconds.
        await AgentClient.request(this.socket(host), { op: 'status' }, { timeoutMs: this.startTimeoutMs > 60_000 ? 5000 : 500 });
        return;
      } catch {
        if (Date.now() > deadline) throw new Error(`xmasq-agent on ${host} did not answer within ${this.startTimeoutMs / 1000} s:\n${this.log(host)}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  /** The pid of the host's running agent, if one runs. */
  pid(host: string): number | undefined {
    return this.procs.get(host)?.pid;
  }

  /** What the host's last agent wrote on stderr so far. */
  log(host: string): string {
    return this.logs.get(host) ?? '';
  }

  /**
   * SIGTERM: the agent detaches masq and init, leaves restore at the NIC and keeps its pins;
   * SIGUSR2 hands over, filters left attached; SIGKILL: a crash, everything left as it was.
   */
  async stop(host: string, signal: 'SIGTERM' | 'SIGUSR2' | 'SIGKILL' = 'SIGTERM'): Promise<number | null> {
    const child = this.procs.get(host);
    this.procs.delete(host);
    if (!child || child.exitCode !== null) return child?.exitCode ?? null;
    const exited = new Promise<number | null>((r) => child.once('exit', r));
    child.kill(signal);
    return exited;
  }

  /** `xmasq-agent cleanup`: removes the pins and state of a stopped agent. */
  async cleanup(host: string): Promise<{ code: number; out: string }> {
    const r = await run('nsenter', [`--net=/run/netns/${this.lab.host(host).netns}`, TSX, AGENT, 'cleanup', ...this.args(host)]);
    return { code: r.code, out: r.stdout + r.stderr };
  }

  /** The egress entry (local pod -> remote pod) of a host, straight from its pinned map: cheap enough to poll every few ms. */
  egressEntry(host: string, local: string, remote: string): Path | undefined {
    const m = BpfMap.fromPinned(`${this.pinDir(host)}/egress_cache`);
    try {
      const v = m.lookup(egressKey.encode({ local_pod: local, remote_pod: remote }));
      return v && path.decode(v);
    } finally {
      m.close();
    }
  }

  async counters(host: string): Promise<Record<string, number>> {
    return (await AgentClient.request(this.socket(host), { op: 'status' })).status.counters;
  }

  /** Stops every agent, removes their pins and the run directory. */
  async teardown(): Promise<void> {
    for (const host of [...this.procs.keys()]) await this.stop(host);
    for (const h of this.lab.hosts) rmSync(this.pinDir(h.name), { recursive: true, force: true });
    rmSync(this.runDir, { recursive: true, force: true });
  }
}

export interface AgentLabOptions {
  name: string;
  /** Sockets and state: <runDir>/<host>/. */
  runDir: string;
  /** Extra xmasq-agent flags for every host. */
  agentArgs?: string[];
  checksumOffload?: boolean;
  /** LabOptions.conntrack. */
  conntrack?: boolean;
  /** LabOptions.k8s: the hosts are Kubernetes nodes (lab/k8s.ts). */
  k8s?: boolean;
  /** LabOptions.vxlanPort. */
  vxlanPort?: number;
  /** LabOptions.overlay. */
  overlay?: 'vxlan' | 'geneve';
  startTimeoutMs?: number;
  /**
   * The xmasq CNI plugin's agentTimeoutMs (its default: 5 s). A guest under TCG on a busy
   * host can take longer to answer an add than that; the plugin is required, so the pod fails.
   */
  cniAgentTimeoutMs?: number;
  /** Default true; false: pods come from bridge + host-local alone, and no agent hears of them but by discovery. */
  xmasqPlugin?: boolean;
  /** Default true; false: the agents are made but left for the suite to start. */
  startAgents?: boolean;
}

/**
 * The setup of the lab's end-to-end tests: two hosts whose pods come through
 * the CNI chain with our xmasq plugin last (required), and one agent per host
 * started before any pod (unless the options say otherwise). Half-built, it is
 * torn down before the error goes on.
 */
export async function upWithAgents(o: AgentLabOptions): Promise<{ lab: Lab; agents: LabAgents }> {
  const lab = await Lab.up({
    name: o.name, hosts: 2, podsPerHost: 0, checksumOffload: o.checksumOffload ?? false, conntrack: o.conntrack, k8s: o.k8s, vxlanPort: o.vxlanPort, overlay: o.overlay,
    cniPath: ['/usr/lib/cni', `${ROOT}dataplane/cni`],
    cniPlugins: o.xmasqPlugin === false ? [] : [{
      type: 'xmasq', agentSocket: `${o.runDir}/{host}/agent.sock`, required: true,
      ...(o.cniAgentTimeoutMs === undefined ? {} : { agentTimeoutMs: o.cniAgentTimeoutMs }),
    }],
  });
  const agents = new LabAgents(lab, o.runDir, o.name, o.agentArgs ?? ['--scan-interval', '0.5'], o.startTimeoutMs);
  if (o.startAgents === false) return { lab, agents };
  try {
    await agents.start('h1');
    await agents.start('h2');
  } catch (e) {
    await agents.teardown();
    await lab.down();
    throw e;
  }
  return { lab, agents };
}
