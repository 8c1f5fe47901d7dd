/**
 * `npm run lab -- up|down|status` (lab/main.ts): the lab of lab.ts from the command line, and
 * optionally one xmasq-agent per host that outlives the command, the way
 * lab/e2e.test.ts runs them, so that a person can poke at XMasq by hand.
 *
 * Agents' files: /run/xmasq-lab-agents/<lab>/<host>/{agent.sock, agent.pid,
 * agent.log, pods.json, policy.json}. Their pins go to
 * /sys/fs/bpf/xmasq-lab-<lab>-<host>: a pin must live on bpffs, which /run is not.
 */
import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { unpinAll } from '../dataplane/agent/datapath.ts';
import { AgentClient, type AgentStatus, type PodRecord } from '../dataplane/agent/protocol.ts';
import { LabAgents } from './agents.ts';
import { ROOT } from '../testing/root.ts';
import { Kube, SERVICE_CIDR, type PolicyRule, type ServiceSpec } from './k8s.ts';
import { DEFAULT_LAB_NAME, Lab, type LabPod } from './lab.ts';

export const AGENTS_ROOT = '/run/xmasq-lab-agents';
const AGENT = `${ROOT}dataplane/agent/main.ts`;
const CNI_DIR = `${ROOT}dataplane/cni`;

export type Progress = (line: string) => void;

export interface UpOptions {
  name?: string;
  hosts?: number;
  pods?: number;
  offload?: boolean;
  withAgents?: boolean;
  /** Extra xmasq-agent flags, e.g. ['--egress-idle', '5']. */
  agentArgs?: string[];
  /** LabOptions.k8s: the hosts are Kubernetes nodes (Services and policies through lab/k8s.ts). */
  k8s?: boolean;
}

export function agentsDir(name: string): string {
  return join(AGENTS_ROOT, name);
}

/** The layout LabAgents knows (sockets, pins, cleanup), for agents we start detached ourselves. */
function layout(lab: Lab): LabAgents {
  return new LabAgents(lab, agentsDir(lab.name), `xmasq-lab-${lab.name}`);
}

const pinDirOf = (name: string, host: string) => `/sys/fs/bpf/xmasq-lab-${name}-${host}`;
const pidFile = (name: string, host: string) => join(agentsDir(name), host, 'agent.pid');
const logFile = (name: string, host: string) => join(agentsDir(name), host, 'agent.log');
const socketOf = (name: string, host: string) => join(agentsDir(name), host, 'agent.sock');

/**
 * The pid in the host's pid file, if that process is still our agent. The
 * command line must name the agent and this very socket, so a pid the kernel
 * has since given to something else is never signalled.
 */
export function agentPid(name: string, host: string): number | undefined {
  let pid: number;
  try {
    pid = Number(readFileSync(pidFile(name, host), 'utf8').trim());
  } catch {
    return undefined;
  }
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  try {
    const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    return argv.includes(AGENT) && argv.includes(socketOf(name, host)) ? pid : undefined;
  } catch {
    return undefined;
  }
}

function tail(file: string, lines = 15): string {
  try {
    return readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '(no log)';
  }
}

/**
 * Starts the host's agent in its netns, detached (own session, output to its
 * log file) so it outlives this command, and waits until it answers.
 */
async function startAgent(lab: Lab, host: string, extra: string[]): Promise<number> {
  const dir = join(agentsDir(lab.name), host);
  mkdirSync(dir, { recursive: true });
  const log = openSync(logFile(lab.name, host), 'a');
  const h = lab.host(host);
  // nsenter joins only the netns, so it execs the agent in place: the pid is the agent's.
  // node --import tsx rather than the tsx CLI, which forwards only some signals to its child.
  const child = spawn('nsenter', [`--net=/run/netns/${h.netns}`, process.execPath, '--import', 'tsx', AGENT,
    '--nic', h.nic, '--pin-dir', pinDirOf(lab.name, host), '--socket', socketOf(lab.name, host), '--state-dir', dir,
    '--metrics-listen', '127.0.0.1:9477', ...extra],
  { cwd: ROOT, detached: true, stdio: ['ignore', log, log] });
  closeSync(log);
  let exitCode: number | null = null;
  child.once('exit', (code, sig) => { exitCode = code ?? (sig ? 128 : 1); });
  child.unref();
  writeFileSync(pidFile(lab.name, host), `${child.pid}\n`);
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (exitCode !== null) throw new Error(`xmasq-agent on ${host} exited ${exitCode}; ${logFile(lab.name, host)}:\n${tail(logFile(lab.name, host))}`);
    try {
      await AgentClient.request(socketOf(lab.name, host), { op: 'status' }, { timeoutMs: 1000 });
      return child.pid!;
    } catch {
      if (Date.now() > deadline) throw new Error(`xmasq-agent on ${host} did not answer within 30 s; ${logFile(lab.name, host)}:\n${tail(logFile(lab.name, host))}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

async function waitGone(pid: number, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    try {
      process.kill(pid, 0);
    } catch {
      return true;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return false;
}

/** SIGTERM (the agent detaches its filters), SIGKILL if it does not go within 15 s. */
async function stopAgent(name: string, host: string, progress: Progress): Promise<void> {
  const pid = agentPid(name, host);
  if (pid === undefined) return;
  process.kill(pid, 'SIGTERM');
  if (await waitGone(pid, 15_000)) {
    progress(`stopped the agent of ${host} (pid ${pid})`);
    return;
  }
  process.kill(pid, 'SIGKILL');
  await waitGone(pid, 5000);
  progress(`killed the agent of ${host} (pid ${pid}): it did not stop within 15 s of SIGTERM`);
}

/** Hosts with an agent directory, whether or not the lab still knows them. */
function agentHosts(name: string): string[] {
  try {
    return readdirSync(agentsDir(name), { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name);
  } catch {
    return [];
  }
}

export async function labUp(opts: UpOptions, progress: Progress): Promise<Lab> {
  const name = opts.name ?? DEFAULT_LAB_NAME;
  const hosts = opts.hosts ?? 2;
  const pods = opts.pods ?? 2;
  const t0 = Date.now();
  const withAgents = !!opts.withAgents;
  if (withAgents) {
    const running = agentHosts(name).filter((h) => agentPid(name, h) !== undefined);
    if (running.length) throw new Error(`agents of a lab "${name}" still run (${running.join(', ')}); take it down first: npm run lab -- down --name ${name}`);
    rmSync(agentsDir(name), { recursive: true, force: true });
  }
  progress(`creating lab ${name}: ${hosts} host(s), ${pods} pod(s) each${withAgents ? ', with agents' : ''}${opts.k8s ? ', Kubernetes nodes' : ''}, checksum offload ${opts.offload === false ? 'off' : 'on'}`);
  // With agents, pods come after them: the xmasq plugin in the chain tells each pod to its host's agent.
  const lab = await Lab.up({
    name, hosts, podsPerHost: withAgents ? 0 : pods, checksumOffload: opts.offload !== false, k8s: !!opts.k8s,
    ...(withAgents ? {
      cniPath: ['/usr/lib/cni', CNI_DIR],
      cniPlugins: [{ type: 'xmasq', agentSocket: `${agentsDir(name)}/{host}/agent.sock`, required: true }],
    } : {}),
  });
  progress(`hosts up: ${lab.hosts.map((h) => `${h.name} ${h.ip}`).join(', ')}`);
  if (!withAgents) {
    for (const p of lab.pods) progress(`pod ${p.name}: ${p.ip} on ${p.host}`);
    progress(`lab ${name} is up in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    return lab;
  }
  try {
    await Promise.all(lab.hosts.map(async (h) => {
      // Kubernetes nodes: the agents know the Service range, so masq carries Service requests.
      const pid = await startAgent(lab, h.name, [...(opts.k8s ? ['--service-cidr', SERVICE_CIDR] : []), ...(opts.agentArgs ?? [])]);
      progress(`agent of ${h.name} runs: pid ${pid}, socket ${socketOf(name, h.name)}, log ${logFile(name, h.name)}`);
    }));
    // One host's pods one after the other: concurrent bridge ADDs race to create cni0.
    await Promise.all(lab.hosts.map(async (h) => {
      for (let j = 1; j <= pods; j++) {
        const p = await lab.addPod(h.name, `${h.name}-p${j}`);
        progress(`pod ${p.name}: ${p.ip} on ${h.name}`);
      }
    }));
  } catch (e) {
    progress(`failed: ${(e as Error).message.split('\n')[0]}; taking the lab down again`);
    await labDown(name, () => {});
    throw e;
  }
  progress(`lab ${name} is up in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  return lab;
}

/**
 * Stops the agents (pid files), has `xmasq-agent cleanup` detach and unpin
 * what they left, then takes the lab down. Every step tolerates what an
 * earlier, interrupted down already removed.
 */
export async function labDown(name: string = DEFAULT_LAB_NAME, progress: Progress = () => {}): Promise<{ warnings: string[] }> {
  const lab = await Lab.load(name);
  const hosts = agentHosts(name);
  const warnings: string[] = [];
  if (!lab && hosts.length === 0) {
    progress(`lab ${name} is not up: nothing to do`);
    return { warnings };
  }
  await Promise.all(hosts.map((host) => stopAgent(name, host, progress)));
  await Promise.all(hosts.map(async (host) => {
    if (lab?.hosts.some((h) => h.name === host) && existsSync(`/run/netns/${lab.host(host).netns}`)) {
      const r = await layout(lab).cleanup(host);
      if (r.code !== 0) warnings.push(`xmasq-agent cleanup on ${host} exited ${r.code}: ${r.out.trim()}`);
    }
    // Without its netns (a lab half gone) the filters went with the devices; only the pins remain.
    try {
      unpinAll(pinDirOf(name, host));
    } catch (e) {
      warnings.push(`unpinning ${pinDirOf(name, host)}: ${(e as Error).message}`);
    }
  }));
  if (hosts.length) progress(`agents of ${hosts.join(', ')} cleaned up`);
  if (lab) {
    const r = await lab.down();
    warnings.push(...r.warnings);
    progress(`lab ${name} is down`);
  }
  rmSync(agentsDir(name), { recursive: true, force: true });
  for (const w of warnings) progress(`warning: ${w}`);
  return { warnings };
}

export interface AgentView {
  pid?: number;
  running: boolean;
  socket: string;
  log: string;
  pinDir: string;
  /** From the agent itself, when it answers. */
  status?: Pick<AgentStatus, 'mode' | 'nic' | 'pods' | 'caches' | 'counters' | 'expiry'>;
  pods?: PodRecord[];
  error?: string;
}

export interface LabView {
  name: string;
  up: boolean;
  stateFile?: string;
  checksumOffload?: boolean;
  /** A lab of Kubernetes nodes: what lab/k8s.ts declared on it. */
  k8s?: { masqueradeAll: boolean; services: ServiceSpec[]; policies: PolicyRule[] };
  hosts: Array<{ name: string; netns: string; ip: string; nic: string; netnsExists: boolean; agent?: AgentView }>;
  pods: Array<Pick<LabPod, 'name' | 'host' | 'netns' | 'ip' | 'mac' | 'hostVeth'> & { netnsExists: boolean; masq?: 'attached' | 'detached' | 'unknown to the agent' }>;
}

export async function labStatus(name: string = DEFAULT_LAB_NAME): Promise<LabView> {
  const lab = await Lab.load(name);
  if (!lab) return { name, up: false, hosts: [], pods: [] };
  const s = lab.status();
  const withAgents = existsSync(agentsDir(name));
  const agents = new Map<string, AgentView>();
  if (withAgents) {
    await Promise.all(s.hosts.map(async (h) => {
      const pid = agentPid(name, h.name);
      const view: AgentView = { running: pid !== undefined, socket: socketOf(name, h.name), log: logFile(name, h.name), pinDir: pinDirOf(name, h.name), ...(pid ? { pid } : {}) };
      try {
        const c = await AgentClient.connect(view.socket, { timeoutMs: 5000 });
        try {
          const st = (await c.status()).status;
          view.status = { mode: st.mode, nic: st.nic, pods: st.pods, caches: st.caches, counters: st.counters, expiry: st.expiry };
          view.pods = (await c.listPods()).pods;
        } finally {
          c.close();
        }
      } catch (e) {
        view.error = (e as Error).message;
      }
      agents.set(h.name, view);
    }));
  }
  return {
    name,
    up: true,
    stateFile: s.stateFile,
    checksumOffload: s.checksumOffload,
    ...(s.k8s ? { k8s: (({ masqueradeAll, services, policies }) => ({ masqueradeAll, services, policies }))(Kube.read(lab) ?? { masqueradeAll: false, services: [], policies: [] }) } : {}),
    hosts: s.hosts.map((h) => ({ name: h.name, netns: h.netns, ip: h.ip, nic: h.nic, netnsExists: h.netnsExists, ...(agents.has(h.name) ? { agent: agents.get(h.name) } : {}) })),
    pods: [...s.pods].sort((x, y) => lab.host(x.host).index - lab.host(y.host).index || x.name.localeCompare(y.name)).map((p) => {
      const known = agents.get(p.host)?.pods;
      const rec = known?.find((r) => r.ip === p.ip);
      return {
        name: p.name, host: p.host, netns: p.netns, ip: p.ip, mac: p.mac, hostVeth: p.hostVeth, netnsExists: p.netnsExists,
        ...(known ? { masq: rec ? (rec.attached ? 'attached' as const : 'detached' as const) : 'unknown to the agent' as const } : {}),
      };
    }),
  };
}

function table(head: string[], rows: string[][]): string {
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  return [head, ...rows].map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(w[i]))).join('  ').trimEnd()).join('\n');
}

export function printLabStatus(v: LabView): string {
  if (!v.up) return `lab ${v.name} is not up`;
  const agentCell = (a?: AgentView) => {
    if (!a) return '-';
    if (!a.running) return 'not running';
    if (!a.status) return `pid ${a.pid}, not answering (${a.error ?? '?'})`;
    return `pid ${a.pid}, ${a.status.mode}, ${a.status.pods} pod(s), masqueraded ${a.status.counters.masqueraded ?? 0}, restored ${a.status.counters.restored ?? 0}`;
  };
  const hostRows = v.hosts.map((h) => [h.name, h.netns, h.ip, h.netnsExists ? 'yes' : 'MISSING', agentCell(h.agent)]);
  const podRows = v.pods.map((p) => [p.name, p.host, p.netns, p.ip, p.mac, p.hostVeth, p.netnsExists ? 'yes' : 'MISSING', p.masq ?? '-']);
  const logs = v.hosts.filter((h) => h.agent).map((h) => `  ${h.name}: socket ${h.agent!.socket}, log ${h.agent!.log}`);
  return [
    `lab ${v.name} (${v.stateFile}; checksum offload ${v.checksumOffload ? 'on' : 'off'})`,
    '',
    table(['HOST', 'NETNS', 'IP', 'NETNS OK', 'AGENT'], hostRows),
    '',
    v.pods.length ? table(['POD', 'HOST', 'NETNS', 'IP', 'MAC', 'HOST VETH', 'NETNS OK', 'MASQ'], podRows) : 'no pods',
    ...(v.k8s ? ['', `Kubernetes nodes (kube-proxy iptables mode${v.k8s.masqueradeAll ? ', --masquerade-all' : ''}):`,
      ...v.k8s.services.flatMap((svc) => svc.ports.map((p) => `  service ${svc.namespace ?? 'default'}/${svc.name} ${svc.clusterIP}:${p.port}/${p.protocol}${p.nodePort ? ` nodePort ${p.nodePort}` : ''} -> ${svc.endpoints.map((e) => `${e}:${p.targetPort ?? p.port}`).join(', ') || 'no endpoints'}`)),
      ...v.k8s.policies.map((r) => `  policy ${r.id}: ${r.pod.name} ${r.direction} ${r.action} ${r.protocol ?? 'any'}${r.port ? `/${r.port}` : ''} ${r.direction === 'ingress' ? 'from' : 'to'} ${r.peer ?? 'anyone'}`)] : []),
    ...(logs.length ? ['', 'agents:', ...logs] : []),
  ].join('\n');
}
