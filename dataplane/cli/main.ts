/**
 * xmasq: the operator's view of a running xmasq-agent, over its socket.
 * Exit status: 0 done, 1 the agent refused or failed, 2 bad usage, 3 no agent.
 * Built into dist/xmasq.mjs (npm run build), which runs with plain node. The lab and the
 * demo are tools of the source checkout with entry points of their own (npm run lab, npm
 * run demo): the product imports none of their code.
 */
import { dumpEgress, dumpIngress } from '../agent/caches.ts';
import { openPinned } from '../agent/datapath.ts';
import { monotonicCoarseNs } from '../agent/native.ts';
import { PROTOCOLS, describeRule } from '../agent/policy.ts';
import {
  AgentClient, AgentError, AgentNotRunningError, DEFAULT_SOCKET, type AgentStatus, type EgressDumpEntry, type IngressDumpEntry,
  type PodRecord, type PolicyRuleRecord, type PolicyRuleSpec,
} from '../agent/protocol.ts';
import { packageVersion } from '../package.ts';

class UsageError extends Error {}

const GLOBAL = `global options (anywhere on the line):
  --socket PATH   the agent's socket (default ${DEFAULT_SOCKET})
  --json          print the agent's reply as JSON instead of a table
  --help          help for the command
  --version       the version of xmasq`;

const HELP: Record<string, string> = {
  main: `usage: xmasq <command> [options]

commands:
  status                          mode, NIC, pods, cache sizes, counters, attached programs
  pods                            the pods the agent serves
  cache dump [--egress|--ingress] the flow caches, decoded
  policy add|del|list             deny rules

${GLOBAL}`,
  status: `usage: xmasq status [--json]

The agent's mode and NIC, its pods, the fill of both flow caches, the policy,
expiry settings and the datapath counters (summed over CPUs), how its programs
sit on their TC hooks (tcx links or cls_bpf filters, --attach), and every program
it attached, with its kind.

${GLOBAL}`,
  pods: `usage: xmasq pods [--json]

The pods the agent serves: IP, MAC, host-side veth, and whether masq is attached
(MASQ: tcx or cls_bpf, how it sits on its hook).

${GLOBAL}`,
  cache: `usage: xmasq cache dump [--egress|--ingress] [--pin-dir DIR] [--json]

Both caches unless one is named. Egress: (local pod, remote pod) -> the host
path masq rewrites to. Ingress: (remote host, our key) -> the pod restore
delivers to. IDLE is the time since the datapath last used the entry.

  --pin-dir DIR   read the maps pinned in DIR directly, without an agent
                  (e.g. /sys/fs/bpf/xmasq while the agent is stopped)

${GLOBAL}`,
  policy: `usage: xmasq policy add --dir egress|ingress [--src BLOCK] [--src-except BLOCK,…] [--dst BLOCK]
                         [--dst-except BLOCK,…] [--sport PORT[-END]] [--dport PORT[-END]]
                         [--proto tcp|udp|icmp|N] [--id N]
       xmasq policy del ID
       xmasq policy list [--json]

Deny rules, shaped as Kubernetes NetworkPolicy rules are. Fields left out match
anything. egress: packets leaving a local pod; ingress: packets entering one.
BLOCK is an address (10.244.1.5) or a CIDR block (10.244.0.0/16); --src-except
and --dst-except leave blocks inside it out (ipBlock's except). A port range
(8000-8080) is port/endPort. A new rule applies to new and masqueraded flows
alike; a flow it denies loses its packets from the next one on. Any rule set
costs a packet at most four trie lookups (README "Policy").

${GLOBAL}`,
};

interface Args {
  positional: string[];
  opts: Map<string, string | true>;
}

const VALUE_OPTS = new Set(['--socket', '--pin-dir', '--dir', '--src', '--dst', '--sport', '--dport', '--proto', '--id']);
const BOOL_OPTS = new Set(['--json', '--help', '-h', '--version', '--egress', '--ingress']);

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
    `attach    ${s.attach} (${s.attachReason})`,
    `keys      ${s.wideKeys ? 'wide (14-bit, in the TCP urgent pointer, UDP length or ICMP echo code)' : 'narrow only (6-bit, DSCP): --wide-keys off'}`,
    `nic       ${s.nic} (ifindex ${s.nicIfindex})`,
    `pins      ${s.pinDir} (${s.pinsReused ? 'reused from an earlier agent' : 'created by this agent'})`,
    `object    ${s.object}`,
    `nodes     ${s.nodes ? `${s.nodes.peers.length} peer(s) (from ${s.nodes.overlayDevices.join(', ') || 'no overlay device'}${s.nodes.peers.length ? `: ${s.nodes.peers.slice(0, 8).join(', ')}${s.nodes.peers.length > 8 ? ', …' : ''}` : ''}); this host ${s.nodes.self.join(', ') || 'unknown'}` : 'not reported by this agent'}`,
    `clock     ${!s.clock ? 'not reported by this agent' : s.clock.hz ? `HZ ${s.clock.hz} (a jiffy ${s.clock.tickNs} ns): the programs read jiffies${s.clock.reason ? `; ${s.clock.reason}` : ''}` : `uncalibrated (${s.clock.reason}): the programs call the coarse clock's helper`}`,
    `pods      ${s.pods}`,
    `caches    egress ${s.caches.egress.entries}/${s.caches.egress.capacity}, ingress ${s.caches.ingress.entries}/${s.caches.ingress.capacity}`,
    `policy    ${s.policy.rules} rule(s), ${s.policy.entries} policy_table entries`,
    `expiry    egress idle > ${s.expiry.egressIdleSeconds}s, ingress idle > ${s.expiry.ingressIdleSeconds}s, every ${s.expiry.scanIntervalSeconds}s; expired so far: ${s.expiry.expired.egress} egress, ${s.expiry.expired.ingress} ingress`,
    'counters',
    ...counters.map(([k, v]) => `  ${k.padEnd(cw)}  ${v}`),
    'attached',
    ...s.attachments.map((a) => `  ${a.program.padEnd(10)} ${a.dev} (ifindex ${a.ifindex}) ${a.where}${a.netns ? ` in ${a.netns}` : ''}, ${a.kind === 'tcx' ? `tcx link ${a.linkId}` : 'cls_bpf filter'}, prog id ${a.progId}`),
  ].join('\n');
}

function printPods(pods: PodRecord[]): string {
  if (pods.length === 0) return 'no pods';
  return table(['IP', 'MAC', 'HOST VETH', 'IFINDEX', 'NETNS', 'MASQ', 'ADDED'],
    pods.map((p) => [p.ip, p.mac, p.hostVeth, String(p.hostVethIfindex), p.netns ?? '-', p.attached ? (p.attachKind ?? 'attached') : 'detached', p.addedAt]));
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

function printRules(rules: PolicyRuleRecord[], entries: number): string {
  if (rules.length === 0) return 'no rules (everything is allowed)';
  const block = (b?: string, ex?: string[]) => `${b ?? '*'}${ex?.length ? ` except ${ex.join(',')}` : ''}`;
  const port = (p?: number, end?: number) => (p === undefined ? '*' : end === undefined ? String(p) : `${p}-${end}`);
  return `${table(['ID', 'DIR', 'SRC', 'SPORT', 'DST', 'DPORT', 'PROTO'],
    rules.map((r) => [String(r.id), r.dir, block(r.src, r.srcExcept), port(r.sport, r.sportEnd), block(r.dst, r.dstExcept), port(r.dport, r.dportEnd), protoName(r.proto)]))}
policy_table entries: ${entries}`;
}

const ruleLine = (r: PolicyRuleRecord) => describeRule(r);

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
  for (const [flag, key] of [['--src-except', 'srcExcept'], ['--dst-except', 'dstExcept']] as const) {
    const v = opts.get(flag);
    if (typeof v === 'string') rule[key] = v.split(',').filter((b) => b !== '');
  }
  for (const [flag, key, endKey] of [['--sport', 'sport', 'sportEnd'], ['--dport', 'dport', 'dportEnd']] as const) {
    const v = opts.get(flag);
    if (v === undefined) continue;
    const m = typeof v === 'string' ? /^(\d+)(?:-(\d+))?$/.exec(v) : null;
    if (!m) throw new UsageError(`${flag} wants a port or a range like 8000-8080, got ${String(v)}`);
    rule[key] = Number(m[1]);
    if (m[2] !== undefined) rule[endKey] = Number(m[2]);
  }
  const id = intOpt(opts, '--id');
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

async function main(argv: string[]): Promise<number> {
  if (argv.includes('--version')) {
    process.stdout.write(`${packageVersion()}\n`);
    return 0;
  }
  // Their options are not this CLI's, so before any parsing.
  if (argv[0] === 'lab' || argv[0] === 'demo') {
    throw new UsageError(`${argv[0]} is a tool of the source checkout, not a command of xmasq: run it from a checkout as npm run ${argv[0]} -- …`);
  }
  const a = parse(argv);
  const [cmd, sub, ...rest] = a.positional;
  const json = a.opts.has('--json');
  const socket = (a.opts.get('--socket') as string | undefined) ?? DEFAULT_SOCKET;
  const out = (human: string, raw: unknown) => process.stdout.write(`${json ? JSON.stringify(raw, null, 2) : human}\n`);

  if (!cmd || cmd === 'help') {
    process.stdout.write(`${HELP[sub ?? 'main'] ?? HELP.main}\n`);
    return cmd ? 0 : a.opts.has('--help') ? 0 : 2;
  }
  if (!HELP[cmd]) throw new UsageError(`unknown command "${cmd}"; the commands are status, pods, cache dump, policy add|del|list`);
  if (a.opts.has('--help')) {
    process.stdout.write(`${HELP[cmd]}\n`);
    return 0;
  }

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
        allowOnly(a, ['--dir', '--src', '--src-except', '--dst', '--dst-except', '--sport', '--dport', '--proto', '--id']);
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
        out(printRules(r.rules, r.entries), { rules: r.rules, entries: r.entries });
        return 0;
      }
      throw new UsageError('usage: xmasq policy add|del|list (see xmasq policy --help)');
    }
  }
  return 2;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: Error) => {
    process.stderr.write(`xmasq: ${e.message}\n`);
    process.exit(e instanceof UsageError ? 2 : e instanceof AgentNotRunningError ? 3 : e instanceof AgentError ? 1 : 1);
  },
);
