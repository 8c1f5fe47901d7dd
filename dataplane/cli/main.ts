/**
 * xmasq: the operator's view of a running xmasq-agent, over its socket.
 * Exit status: 0 done, 1 the agent refused or failed, 2 bad usage, 3 no agent.
 * Built into dist/xmasq.mjs (npm run build), which runs with plain node; `lab` and
 * `demo` are tools of the source checkout and run only from the sources (npm run xmasq).
 */
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { dumpEgress, dumpIngress } from '../agent/caches.ts';
import { openPinned } from '../agent/datapath.ts';
import { monotonicCoarseNs } from '../agent/native.ts';
import { PROTOCOLS } from '../agent/policy.ts';
import {
  AgentClient, AgentError, AgentNotRunningError, DEFAULT_SOCKET, type AgentStatus, type EgressDumpEntry, type IngressDumpEntry,
  type PodRecord, type PolicyRuleRecord, type PolicyRuleSpec,
} from '../agent/protocol.ts';
import { packageRoot, packageVersion } from '../package.ts';

class UsageError extends Error {}

const GLOBAL = `global options (anywhere on the line):
  --socket PATH   the agent's socket (default ${DEFAULT_SOCKET})
  --json          print the agent's reply as JSON instead of a table
  --help          help for the command
  --version       the version of xmasq`;

const HELP: Record<string, string> = {
  main: `usage: xmasq <command> [options]

commands:
  status                          mode, NIC, pods, cache sizes, counters, filters
  pods                            the pods the agent serves
  cache dump [--egress|--ingress] the flow caches, decoded
  policy add|del|list             deny rules
  lab up|down|status              a lab of namespaced hosts to try XMasq in (root)
  demo [options]                  is it faster? host, overlay and XMasq measured in a lab
                                  (root; xmasq demo --help)

${GLOBAL}`,
  status: `usage: xmasq status [--json]

The agent's mode and NIC, its pods, the fill of both flow caches, the policy,
expiry settings and the datapath counters (summed over CPUs), and every TC
filter it attached.

${GLOBAL}`,
  pods: `usage: xmasq pods [--json]

The pods the agent serves: IP, MAC, host-side veth, and whether masq is attached.

${GLOBAL}`,
  cache: `usage: xmasq cache dump [--egress|--ingress] [--pin-dir DIR] [--json]

Both caches unless one is named. Egress: (local pod, remote pod) -> the host
path masq rewrites to. Ingress: (remote host, our key) -> the pod restore
delivers to. IDLE is the time since the datapath last used the entry.

  --pin-dir DIR   read the maps pinned in DIR directly, without an agent
                  (e.g. /sys/fs/bpf/xmasq while the agent is stopped)

${GLOBAL}`,
  policy: `usage: xmasq policy add --dir egress|ingress [--src IP] [--dst IP] [--sport PORT] [--dport PORT] [--proto tcp|udp|icmp|N] [--id N]
       xmasq policy del ID
       xmasq policy list [--json]

Deny rules. Fields left out match anything. egress: packets leaving a local pod;
ingress: packets entering one. A new rule applies to new and masqueraded flows
alike; a flow it denies loses its packets from the next one on.

${GLOBAL}`,
  lab: `usage: xmasq lab up [--name N] [--hosts N] [--pods N] [--no-offload] [--with-agents] [--k8s]
       xmasq lab down [--name N]
       xmasq lab status [--name N] [--json]

N hosts as network namespaces joined by a wire, with a Flannel-style VXLAN
overlay and pods from the real CNI plugins (see lab/README.md). Needs root;
everything it creates lives in its own namespaces. Progress goes to stderr.
xmasq lab <command> --help for each command.`,
  'lab up': `usage: xmasq lab up [--name N] [--hosts N] [--pods N] [--no-offload] [--with-agents] [--k8s] [--json]

Creates the lab: hosts <N>-h1.., a wire, the overlay, and --pods pods per host
(<N>-h1-p1..) through the CNI chain bridge + host-local.

  --name N        the lab's name, the prefix of its namespaces (default xmq)
  --hosts N       hosts, 1..254 (default 2)
  --pods N        pods per host (default 2)
  --no-offload    checksum offload off on the wire and pod veths, so a capture
                  shows the checksums a receiver checks
  --with-agents   one xmasq-agent per host, left running in the background
                  (socket, pid file, log and state under
                  /run/xmasq-lab-agents/<name>/<host>, pins under
                  /sys/fs/bpf/xmasq-lab-<name>-<host>, /metrics on
                  127.0.0.1:9477 inside each host's netns); pods are created
                  after them, through the chain with the xmasq plugin last
  --k8s           the hosts are Kubernetes nodes: kube-proxy's iptables-mode
                  chains (KUBE-SERVICES, KUBE-MARK-MASQ, KUBE-POSTROUTING,
                  KUBE-FORWARD with its INVALID drop) and a policy engine's
                  LAB-POLICY chain on every host; declare Services and
                  policies with lab/k8s.ts (see lab/README.md)
  --json          print the lab's status as JSON when it is up

Talk to a host's agent with: xmasq --socket /run/xmasq-lab-agents/<name>/h1/agent.sock status`,
  'lab down': `usage: xmasq lab down [--name N]

Stops the lab's agents (SIGTERM: they detach their filters), runs
xmasq-agent cleanup for each (pins, state), then deletes every pod (CNI DEL)
and namespace of the lab. Safe to repeat, and on a half-built lab.

  --name N        the lab's name (default xmq)`,
  'lab status': `usage: xmasq lab status [--name N] [--json]

The lab's hosts and pods, whether their namespaces exist, and for a lab with
agents: each agent's pid, mode, pods and counters, and whether each pod's masq
is attached. Exit status 1 when the lab is not up.

  --name N        the lab's name (default xmq)
  --json          as JSON`,
};

interface Args {
  positional: string[];
  opts: Map<string, string | true>;
}

const VALUE_OPTS = new Set(['--socket', '--pin-dir', '--dir', '--src', '--dst', '--sport', '--dport', '--proto', '--id', '--name', '--hosts', '--pods']);
const BOOL_OPTS = new Set(['--json', '--help', '-h', '--version', '--egress', '--ingress', '--no-offload', '--with-agents', '--k8s']);

function parse(argv: string[]): Args {
  const positional: string[] = [];
  const opts = new Map<string, string | true>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const eq = a.indexOf('=');
    const name = a.startsWith('--') && eq > 0 ? a.slice(0, eq) : a;
    if (VALUE_OPTS.has(name)) {
      const v = eq > 0 ? a.slice(eq + 1) : argv[++i];
      if (v === undefined) throw new UsageError(`${name} needs a value`);
      opts.set(name, v);
    } else if (BOOL_OPTS.has(a)) {
      opts.set(a === '-h' ? '--help' : a, true);
    } else if (a.startsWith('-') && a !== '-') {
      throw new UsageError(`unknown option ${a}`);
    } else {
      positional.push(a);
    }
  }
  return { positional, opts };
}

function table(head: string[], rows: string[][]): string {
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (r: string[]) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(w[i]))).join('  ').trimEnd();
  return [line(head), ...rows.map(line)].join('\n');
}

const protoName = (p?: number) => (p === undefined ? '*' : Object.entries(PROTOCOLS).find(([, n]) => n === p)?.[0] ?? String(p));
const idle = (s: number) => (s < 100 ? `${s.toFixed(1)}s` : `${Math.round(s)}s`);

function printStatus(s: AgentStatus): string {
  const counters = Object.entries(s.counters);
  const cw = Math.max(...counters.map(([k]) => k.length));
  return [
    `agent     pid ${s.pid}, up since ${s.startedAt}, protocol ${s.version}`,
    `mode      ${s.mode} (${s.modeReason})`,
    `keys      ${s.wideKeys ? 'wide (14-bit, in the TCP urgent pointer, UDP length or ICMP echo code)' : 'narrow only (6-bit, DSCP): --wide-keys off'}`,
    `nic       ${s.nic} (ifindex ${s.nicIfindex})`,
    `pins      ${s.pinDir} (${s.pinsReused ? 'reused from an earlier agent' : 'created by this agent'})`,
    `object    ${s.object}`,
    `nodes     ${s.nodes ? `${s.nodes.peers.length} peer(s) (from ${s.nodes.overlayDevices.join(', ') || 'no overlay device'}${s.nodes.peers.length ? `: ${s.nodes.peers.slice(0, 8).join(', ')}${s.nodes.peers.length > 8 ? ', …' : ''}` : ''}); this host ${s.nodes.self.join(', ') || 'unknown'}` : 'not reported by this agent'}`,
    `pods      ${s.pods}`,
    `caches    egress ${s.caches.egress.entries}/${s.caches.egress.capacity}, ingress ${s.caches.ingress.entries}/${s.caches.ingress.capacity}`,
    `policy    ${s.policy.rules} rule(s), ${s.policy.masks.length} mask(s)${s.policy.masks.length ? `: ${s.policy.masks.map((m) => `0x${m.toString(16).padStart(2, '0')}`).join(' ')}` : ''}`,
    `expiry    egress idle > ${s.expiry.egressIdleSeconds}s, ingress idle > ${s.expiry.ingressIdleSeconds}s, every ${s.expiry.scanIntervalSeconds}s; expired so far: ${s.expiry.expired.egress} egress, ${s.expiry.expired.ingress} ingress`,
    'counters',
    ...counters.map(([k, v]) => `  ${k.padEnd(cw)}  ${v}`),
    'filters',
    ...s.attachments.map((a) => `  ${a.program.padEnd(10)} ${a.dev} (ifindex ${a.ifindex}) ${a.where}${a.netns ? ` in ${a.netns}` : ''}, prog id ${a.progId}`),
  ].join('\n');
}

function printPods(pods: PodRecord[]): string {
  if (pods.length === 0) return 'no pods';
  return table(['IP', 'MAC', 'HOST VETH', 'IFINDEX', 'NETNS', 'MASQ', 'ADDED'],
    pods.map((p) => [p.ip, p.mac, p.hostVeth, String(p.hostVethIfindex), p.netns ?? '-', p.attached ? 'attached' : 'detached', p.addedAt]));
}

function printEgress(e: EgressDumpEntry[]): string {
  if (e.length === 0) return 'egress cache: empty';
  return `egress cache (${e.length}):\n${table(
    ['LOCAL POD', 'REMOTE POD', 'HOST IP', 'PEER HOST IP', 'HOST MAC', 'NEXT-HOP MAC', 'OUR KEY', 'PEER KEY', 'READY', 'IDLE'],
    e.map(({ key, value: v, idleSeconds }) => [key.local_pod, key.remote_pod, v.local_ip, v.remote_ip, v.local_mac, v.remote_mac,
      String(v.local_key), String(v.remote_key), v.remote_ready ? 'yes' : 'no', idle(idleSeconds)]))}`;
}

function printIngress(e: IngressDumpEntry[]): string {
  if (e.length === 0) return 'ingress cache: empty';
  return `ingress cache (${e.length}):\n${table(
    ['PEER HOST', 'KEY', 'LOCAL POD', 'REMOTE POD', 'POD MAC', 'REMOTE MAC', 'VETH IFINDEX', 'IDLE'],
    e.map(({ key, value: v, idleSeconds }) => [key.remote_host, String(key.key), v.local_ip, v.remote_ip, v.local_mac, v.remote_mac,
      String(v.ifindex), idle(idleSeconds)]))}`;
}

function printRules(rules: PolicyRuleRecord[], masks: number[]): string {
  if (rules.length === 0) return 'no rules (everything is allowed)';
  return `${table(['ID', 'DIR', 'SRC', 'SPORT', 'DST', 'DPORT', 'PROTO'],
    rules.map((r) => [String(r.id), r.dir, r.src ?? '*', r.sport ? String(r.sport) : '*', r.dst ?? '*', r.dport ? String(r.dport) : '*', protoName(r.proto)]))}
masks in use: ${masks.map((m) => `0x${m.toString(16).padStart(2, '0')}`).join(' ')}`;
}

const ruleLine = (r: PolicyRuleRecord) =>
  `#${r.id} deny ${r.dir} ${r.src ?? '*'}:${r.sport ?? '*'} -> ${r.dst ?? '*'}:${r.dport ?? '*'} proto ${protoName(r.proto)}`;

function intOpt(opts: Args['opts'], name: string): number | undefined {
  const v = opts.get(name);
  if (v === undefined) return undefined;
  if (typeof v !== 'string' || !/^\d+$/.test(v)) throw new UsageError(`${name} wants a number, got ${String(v)}`);
  return Number(v);
}

function ruleFromOpts(opts: Args['opts']): PolicyRuleSpec {
  const dir = opts.get('--dir');
  if (dir !== 'egress' && dir !== 'ingress') throw new UsageError('policy add needs --dir egress (leaving a local pod) or --dir ingress (entering one)');
  const rule: PolicyRuleSpec = { dir };
  const src = opts.get('--src');
  const dst = opts.get('--dst');
  if (typeof src === 'string') rule.src = src;
  if (typeof dst === 'string') rule.dst = dst;
  const sport = intOpt(opts, '--sport');
  const dport = intOpt(opts, '--dport');
  const id = intOpt(opts, '--id');
  if (sport !== undefined) rule.sport = sport;
  if (dport !== undefined) rule.dport = dport;
  if (id !== undefined) rule.id = id;
  const proto = opts.get('--proto');
  if (typeof proto === 'string') rule.proto = /^\d+$/.test(proto) ? Number(proto) : (proto.toLowerCase() as PolicyRuleSpec['proto']);
  return rule;
}

function allowOnly(a: Args, allowed: string[]): void {
  for (const k of a.opts.keys()) {
    if (!['--socket', '--json', '--help', ...allowed].includes(k)) throw new UsageError(`${k} does not apply to this command`);
  }
}

async function withClient<T>(socket: string, fn: (c: AgentClient) => Promise<T>): Promise<T> {
  const c = await AgentClient.connect(socket);
  try {
    return await fn(c);
  } finally {
    c.close();
  }
}

/**
 * lab/ and demo/ are test tools of the source checkout: imported only for their commands,
 * and left out of the bundle (scripts/bundle.ts), where node cannot load their .ts.
 */
async function checkoutTool<T>(command: string, load: () => Promise<T>): Promise<T> {
  try {
    return await load();
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code !== 'ERR_UNKNOWN_FILE_EXTENSION' && code !== 'ERR_MODULE_NOT_FOUND') throw e;
    throw new UsageError(`xmasq ${command} is a tool of the source checkout, not of this build: run it from a checkout with its dev dependencies (npm ci), as npm run xmasq -- ${command} … (${(e as Error).message.split('\n')[0]})`);
  }
}

/**
 * `xmasq demo` takes the demo's own options, so it is handed over before
 * this CLI parses anything. It builds the BPF objects first (make does
 * nothing when they are current), so that it works from a fresh clone.
 */
async function demo(argv: string[]): Promise<number> {
  const { main: demoMain } = await checkoutTool('demo', () => import('../../demo/main.ts'));
  if (!argv.includes('--help') && !argv.includes('-h')) {
    const bpf = `${join(packageRoot(), 'bpf')}/`;
    try {
      execFileSync('make', ['-s', '--no-print-directory', '-C', bpf], { stdio: ['ignore', 'inherit', 'inherit'] });
    } catch {
      process.stderr.write(`xmasq demo: building the BPF objects in ${bpf} failed (see above); scripts/setup.sh installs what the build needs\n`);
      return 1;
    }
  }
  return demoMain(argv);
}

async function main(argv: string[]): Promise<number> {
  if (argv.includes('--version')) {
    process.stdout.write(`${packageVersion()}\n`);
    return 0;
  }
  if (argv[0] === 'demo') return demo(argv.slice(1));
  const a = parse(argv);
  const [cmd, sub, ...rest] = a.positional;
  const json = a.opts.has('--json');
  const socket = (a.opts.get('--socket') as string | undefined) ?? DEFAULT_SOCKET;
  const out = (human: string, raw: unknown) => process.stdout.write(`${json ? JSON.stringify(raw, null, 2) : human}\n`);

  if (!cmd || cmd === 'help') {
    process.stdout.write(`${HELP[sub ?? 'main'] ?? HELP.main}\n`);
    return cmd ? 0 : a.opts.has('--help') ? 0 : 2;
  }
  if (!HELP[cmd]) throw new UsageError(`unknown command "${cmd}"; the commands are status, pods, cache dump, policy add|del|list, lab up|down|status, demo`);
  if (a.opts.has('--help')) {
    process.stdout.write(`${(cmd === 'lab' && sub && HELP[`lab ${sub}`]) || HELP[cmd]}\n`);
    return 0;
  }
  if (cmd === 'lab') return lab(a, sub, rest, out);

  switch (cmd) {
    case 'status': {
      allowOnly(a, []);
      if (sub) throw new UsageError(`status takes no argument, got "${sub}"`);
      const r = await withClient(socket, (c) => c.status());
      out(printStatus(r.status), r.status);
      return 0;
    }
    case 'pods': {
      allowOnly(a, []);
      if (sub) throw new UsageError(`pods takes no argument, got "${sub}"`);
      const r = await withClient(socket, (c) => c.listPods());
      out(printPods(r.pods), r.pods);
      return 0;
    }
    case 'cache': {
      if (sub !== 'dump' || rest.length) throw new UsageError('usage: xmasq cache dump [--egress|--ingress] [--pin-dir DIR]');
      allowOnly(a, ['--egress', '--ingress', '--pin-dir']);
      const eg = a.opts.has('--egress');
      const ing = a.opts.has('--ingress');
      if (eg && ing) throw new UsageError('--egress and --ingress together are the default: give one, or neither for both');
      const which = eg ? 'egress' : ing ? 'ingress' : 'both';
      const pinDir = a.opts.get('--pin-dir') as string | undefined;
      let dump: { egress?: EgressDumpEntry[]; ingress?: IngressDumpEntry[] };
      if (pinDir) {
        const maps = openPinned(pinDir, ['egress_cache', 'ingress_cache']);
        try {
          const now = monotonicCoarseNs();
          dump = {
            ...(which !== 'ingress' ? { egress: dumpEgress(maps.egress_cache, now) } : {}),
            ...(which !== 'egress' ? { ingress: dumpIngress(maps.ingress_cache, now) } : {}),
          };
        } finally {
          for (const m of Object.values(maps)) m.close();
        }
      } else {
        dump = await withClient(socket, (c) => c.cacheDump(which));
      }
      const parts: string[] = [];
      if (dump.egress) parts.push(printEgress(dump.egress));
      if (dump.ingress) parts.push(printIngress(dump.ingress));
      out(parts.join('\n\n'), { egress: dump.egress, ingress: dump.ingress });
      return 0;
    }
    case 'policy': {
      if (sub === 'add') {
        allowOnly(a, ['--dir', '--src', '--dst', '--sport', '--dport', '--proto', '--id']);
        if (rest.length) throw new UsageError(`policy add takes options only, got "${rest[0]}"`);
        const rule = ruleFromOpts(a.opts); // usage errors before any connection
        const r = await withClient(socket, (c) => c.policyAdd(rule));
        out(`added ${ruleLine(r.rule)}`, r);
        return 0;
      }
      if (sub === 'del') {
        allowOnly(a, ['--id']);
        const idText = rest[0] ?? (a.opts.get('--id') as string | undefined);
        if (!idText || !/^\d+$/.test(idText) || rest.length > 1) throw new UsageError('usage: xmasq policy del ID (see xmasq policy list)');
        const r = await withClient(socket, (c) => c.policyDel(Number(idText)));
        out(`deleted ${ruleLine(r.rule)}`, r);
        return 0;
      }
      if (sub === 'list') {
        allowOnly(a, []);
        const r = await withClient(socket, (c) => c.policyList());
        out(printRules(r.rules, r.masks), { rules: r.rules, masks: r.masks });
        return 0;
      }
      throw new UsageError('usage: xmasq policy add|del|list (see xmasq policy --help)');
    }
  }
  return 2;
}

/** lab/cli.ts is loaded only here: the other commands never need the lab's code. */
async function lab(a: Args, sub: string | undefined, rest: string[], out: (human: string, raw: unknown) => void): Promise<number> {
  if (sub !== 'up' && sub !== 'down' && sub !== 'status') throw new UsageError('usage: xmasq lab up|down|status (see xmasq lab --help)');
  if (rest.length) throw new UsageError(`lab ${sub} takes options only, got "${rest[0]}"`);
  allowOnly(a, sub === 'up' ? ['--name', '--hosts', '--pods', '--no-offload', '--with-agents', '--k8s'] : ['--name']);
  if (a.opts.has('--socket')) throw new UsageError('--socket does not apply to lab commands');
  const name = a.opts.get('--name') as string | undefined;
  const { labUp, labDown, labStatus, printLabStatus } = await checkoutTool(`lab ${sub}`, () => import('../../lab/cli.ts'));
  const progress = (line: string) => process.stderr.write(`xmasq lab: ${line}\n`);
  if (sub === 'up') {
    const hosts = intOpt(a.opts, '--hosts');
    const pods = intOpt(a.opts, '--pods');
    await labUp({ name, hosts, pods, offload: !a.opts.has('--no-offload'), withAgents: a.opts.has('--with-agents'), k8s: a.opts.has('--k8s') }, progress);
    const v = await labStatus(name);
    out(printLabStatus(v), v);
    return 0;
  }
  if (sub === 'down') {
    if (a.opts.has('--json')) throw new UsageError('--json does not apply to lab down');
    await labDown(name, progress);
    return 0;
  }
  const v = await labStatus(name);
  out(printLabStatus(v), v);
  return v.up ? 0 : 1;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: Error) => {
    process.stderr.write(`xmasq: ${e.message}\n`);
    process.exit(e instanceof UsageError ? 2 : e instanceof AgentNotRunningError ? 3 : e instanceof AgentError ? 1 : 1);
  },
);
