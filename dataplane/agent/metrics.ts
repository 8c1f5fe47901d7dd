/**
 * /metrics (Prometheus text format 0.0.4) and /healthz over node:http. Besides the
 * agent's own xmasq_* families: the standard process_* families every Prometheus
 * client library exports (CPU, memory, start time, file descriptors, from /proc) and
 * xmasq_build_info. Label values are lower case (counter="masqueraded"); only names
 * the system gives (a NIC's) are passed as they are.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { packageVersion } from '../package.ts';
import { parseListen } from './config.ts';

export interface MetricsSnapshot {
  mode: string;
  nic: string;
  counters: Record<string, number>;
  caches: Record<'egress' | 'ingress', { entries: number; capacity: number }>;
  pods: number;
  podsAttached: number;
  /** The datapath's node set: this host's addresses and the peers'. */
  nodes: { self: number; peers: number };
  policyRules: number;
  policyTableEntries: number;
  /** The HZ the programs' clock is calibrated to; 0: uncalibrated. */
  clockHz: number;
  expired: { egress: number; ingress: number };
  lastScanSeconds: number;
  scans: number;
  scanFailures: number;
  /** The unix socket: connections open now, and requests or connections refused by a bound, by reason. */
  socket: { connections: number; refused: Record<string, number> };
  startTimeSeconds: number;
  requests: Record<string, number>;
}

/** What the process_* families report, read when /metrics is asked for. */
export interface ProcessSample {
  cpuUserSeconds: number;
  cpuSystemSeconds: number;
  residentBytes: number;
  virtualBytes: number;
  startTimeSeconds: number;
  openFds: number;
  maxFds: number;
}

/** The running process, from Node and /proc/self; a value /proc cannot give is NaN (its family then has no sample). */
export function processSample(): ProcessSample {
  const cpu = process.cpuUsage();
  let virtualBytes = NaN;
  try {
    // /proc/self/stat: field 23 is vsize; fields are counted after the ")" that ends the command name.
    const stat = readFileSync('/proc/self/stat', 'utf8');
    virtualBytes = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[20]);
  } catch {
    // not Linux, or /proc not mounted
  }
  let openFds = NaN;
  try {
    openFds = readdirSync('/proc/self/fd').length - 1; // less the directory the listing itself opened
  } catch {
    // as above
  }
  let maxFds = NaN;
  try {
    maxFds = Number(/^Max open files\s+(\d+)/m.exec(readFileSync('/proc/self/limits', 'utf8'))?.[1] ?? NaN);
  } catch {
    // as above
  }
  return {
    cpuUserSeconds: cpu.user / 1e6,
    cpuSystemSeconds: cpu.system / 1e6,
    residentBytes: process.memoryUsage.rss(),
    virtualBytes,
    startTimeSeconds: Math.round(Date.now() - process.uptime() * 1000) / 1000,
    openFds,
    maxFds,
  };
}

/** xmasq_build_info's labels. */
export interface BuildInfo {
  version: string;
  nodejs: string;
}

export const buildInfo = (): BuildInfo => ({ version: packageVersion(), nodejs: process.version });

const esc = (v: string) => v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');

export function renderMetrics(s: MetricsSnapshot, proc: ProcessSample = processSample(), build: BuildInfo = buildInfo()): string {
  const out: string[] = [];
  const metric = (name: string, type: 'counter' | 'gauge', help: string, samples: Array<[Record<string, string>, number]>) => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const [labels, v] of samples) {
      const l = Object.entries(labels).map(([k, x]) => `${k}="${esc(x)}"`).join(',');
      out.push(`${name}${l ? `{${l}}` : ''} ${Number.isFinite(v) ? v : 0}`);
    }
  };
  metric('xmasq_packets_total', 'counter', 'Packets by datapath outcome, summed over CPUs (bpf counters map).',
    Object.entries(s.counters).map(([c, v]) => [{ counter: c }, v]));
  metric('xmasq_cache_entries', 'gauge', 'Entries in each flow cache.',
    (['egress', 'ingress'] as const).map((c) => [{ cache: c }, s.caches[c].entries]));
  metric('xmasq_cache_capacity', 'gauge', 'max_entries of each flow cache.',
    (['egress', 'ingress'] as const).map((c) => [{ cache: c }, s.caches[c].capacity]));
  metric('xmasq_cache_expired_total', 'counter', 'Entries the agent deleted for being idle, since it started.',
    (['egress', 'ingress'] as const).map((c) => [{ cache: c }, s.expired[c]]));
  metric('xmasq_pods', 'gauge', 'Pods the agent serves.', [[{}, s.pods]]);
  metric('xmasq_pods_attached', 'gauge', 'Pods whose masq filter is attached.', [[{}, s.podsAttached]]);
  metric('xmasq_nodes', 'gauge', 'Addresses in the datapath\'s node set: this host\'s own (self) and the overlay\'s other nodes (peer).',
    (['self', 'peer'] as const).map((k) => [{ kind: k }, k === 'self' ? s.nodes.self : s.nodes.peers]));
  metric('xmasq_policy_rules', 'gauge', 'Installed deny rules.', [[{}, s.policyRules]]);
  metric('xmasq_policy_table_entries', 'gauge', 'Slots of policy_table the rules compile to (a verdict costs at most 13 array lookups in it).', [[{}, s.policyTableEntries]]);
  metric('xmasq_clock_hz', 'gauge', 'The kernel\'s HZ, as the agent calibrated the programs\' clock to it; 0: uncalibrated, the full paths call the coarse clock\'s helper.', [[{}, s.clockHz]]);
  metric('xmasq_mode', 'gauge', 'Where masq runs: 1 for the active mode.',
    (['veth', 'rpeer'] as const).map((m) => [{ mode: m }, m === s.mode ? 1 : 0]));
  metric('xmasq_info', 'gauge', 'The agent\'s NIC and mode.', [[{ nic: s.nic, mode: s.mode }, 1]]);
  metric('xmasq_expiry_scan_duration_seconds', 'gauge', 'Duration of the last idle-entry scan.', [[{}, s.lastScanSeconds]]);
  metric('xmasq_expiry_scans_total', 'counter', 'Idle-entry scans run.', [[{}, s.scans]]);
  metric('xmasq_expiry_scan_failures_total', 'counter', 'Idle-entry scans that failed (/healthz is 503 while the last one did).', [[{}, s.scanFailures]]);
  metric('xmasq_agent_socket_connections', 'gauge', 'Connections open on the agent socket.', [[{}, s.socket.connections]]);
  metric('xmasq_agent_socket_refused_total', 'counter', 'Requests or connections the agent socket refused or closed, by the bound they hit.',
    Object.entries(s.socket.refused).map(([reason, v]) => [{ reason }, v]));
  metric('xmasq_agent_requests_total', 'counter', 'Socket requests by op.',
    Object.entries(s.requests).map(([op, v]) => [{ op }, v]));
  metric('xmasq_agent_start_time_seconds', 'gauge', 'Unix time the agent started.', [[{}, s.startTimeSeconds]]);
  const known = (v: number): Array<[Record<string, string>, number]> => (Number.isNaN(v) ? [] : [[{}, v]]);
  metric('xmasq_build_info', 'gauge', 'The agent\'s version and the Node.js running it: always 1.', [[{ version: build.version, nodejs: build.nodejs }, 1]]);
  metric('process_cpu_user_seconds_total', 'counter', 'User CPU time spent in seconds.', [[{}, proc.cpuUserSeconds]]);
  metric('process_cpu_system_seconds_total', 'counter', 'System CPU time spent in seconds.', [[{}, proc.cpuSystemSeconds]]);
  metric('process_cpu_seconds_total', 'counter', 'Total user and system CPU time spent in seconds.', [[{}, proc.cpuUserSeconds + proc.cpuSystemSeconds]]);
  metric('process_resident_memory_bytes', 'gauge', 'Resident memory size in bytes.', known(proc.residentBytes));
  metric('process_virtual_memory_bytes', 'gauge', 'Virtual memory size in bytes.', known(proc.virtualBytes));
  metric('process_start_time_seconds', 'gauge', 'Start time of the process since unix epoch in seconds.', [[{}, proc.startTimeSeconds]]);
  metric('process_open_fds', 'gauge', 'Number of open file descriptors.', known(proc.openFds));
  metric('process_max_fds', 'gauge', 'Maximum number of open file descriptors.', known(proc.maxFds));
  return `${out.join('\n')}\n`;
}

export interface HttpHandlers {
  metrics(): string;
  /** Problems that make the agent unhealthy; empty when healthy. */
  health(): string[];
  /** An error of the server past its start (a failed accept); it goes on serving. */
  error?(e: Error): void;
}

/** Listens on host:port; rejects with a message that says how to fix the address. */
export function startHttp(listen: string, h: HttpHandlers): Promise<Server> {
  const { host, port } = parseListen(listen);
  const server = createServer((req, res) => {
    const url = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD' }).end();
      return;
    }
    try {
      if (url === '/metrics') {
        res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' }).end(h.metrics());
      } else if (url === '/healthz') {
        const problems = h.health();
        res.writeHead(problems.length ? 503 : 200, { 'content-type': 'text/plain; charset=utf-8' })
          .end(problems.length ? `${problems.join('\n')}\n` : 'ok\n');
      } else {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('try /metrics or /healthz\n');
      }
    } catch (e) {
      res.writeHead(500, { 'content-type': 'text/plain' }).end(`${(e as Error).message}\n`);
    }
  });
  return new Promise((resolve, reject) => {
    server.once('error', (e: NodeJS.ErrnoException) => {
      const fix = e.code === 'EADDRINUSE' ? 'another process listens there; stop it or set --metrics-listen to a free port (or off)'
        : e.code === 'EADDRNOTAVAIL' ? `no interface of this network namespace has ${host} (is lo up? 'ip link set lo up'); set --metrics-listen (or off)`
          : e.code === 'EACCES' ? 'ports below 1024 need root; set --metrics-listen to another port'
            : 'set --metrics-listen to a valid HOST:PORT, or off';
      reject(new Error(`--metrics-listen ${listen}: cannot listen (${e.code ?? e.message}): ${fix}`));
    });
    server.listen(port, host, () => {
      // Past the listen, an 'error' (a failed accept: EMFILE) with nobody
      // listening would be an uncaught exception, which stops the agent.
      server.removeAllListeners('error');
      server.on('error', (e) => h.error?.(e));
      resolve(server);
    });
  });
}
