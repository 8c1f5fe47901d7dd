#!/usr/bin/env -S npx tsx
/**
 * `npm run demo`: is it faster? One command that measures host, route, overlay and XMasq in
 * a lab and says so. See demo/demo.ts for what each path is.
 */
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { recordBase } from '../testing/records.ts';
import { ROOT } from '../testing/root.ts';
import { packageVersion } from '../dataplane/package.ts';
import { DEFAULT_NICE, isAbort, runDemo, type DemoRun, type Progress } from './demo.ts';
import { MODES, renderMachine, renderMarkdown, renderSvg, renderTable, type Mode } from './report.ts';

export const USAGE = `usage: npm run demo -- [options]        (as root)

Brings up a two-host lab (network namespaces, flannel-style VXLAN, pods from the real CNI
plugins), measures four paths between a pod on h1 and a pod on h2, prints a table, writes
the results, and tears the lab down (also on Ctrl-C and on errors).

  host     h1 -> h2 host network namespaces over the wire (underlay IPs)
  route    pod -> pod routed without encapsulation (host-gw routes, put in for the
           measurement and replaced by flannel's afterwards)
  overlay  pod -> pod over VXLAN, no XMasq agent running
  xmasq    pod -> pod with the XMasq agents running, the pair on the fast path

Each path: iperf3 throughput with 1 and 4 streams, CPU per Gbit/s, sockperf TCP ping-pong
(Debian's sockperf: transactions/s, p50 and p99 latency as half round trips) and, as a
cross-check, the demo's own 1-byte TCP request/response client (demo/rr.c, like netperf
TCP_RR: transactions/s, p50 and p99 round trips). Pinned = client and server on CPU 0
(taskset -c 0); unpinned = wherever the scheduler puts them. The measured programs run at
nice -20 (see --nice). Rounds interleave the paths; the table shows medians and min–max,
and the share of the overlay's overhead that xmasq removes,
(xmasq - overlay) / (host - overlay), for the RR rate, p50 and throughput.

options:
  --rounds N       rounds of all paths (default 3; 1 with --quick)
  --duration S     seconds per measurement (default 5; 1 with --quick)
  --quick          a short run for tests and smoke checks; writes no file unless asked
  --pinned-only    skip the unpinned measurements
  --agent-object FILE  the datapath object the agents load (default bpf/build/xmasq.bpf.o),
                   to compare two builds' xmasq path against the same host and overlay
  --attach KIND    how the agents put their programs on the hooks: auto (default: tcx
                   links where the kernel has them), tcx or cls_bpf, to compare the two
  --nice N         nice level of iperf3, sockperf and rr (default -20: other load on the machine
                   takes as little from them as possible; 0 to run them normally)
  --profile DIR    profile every pinned sockperf and 1-stream iperf3 measurement (perf
                   record -C 0, needs linux-perf) into DIR, and write DIR/profile.md: CPU
                   per transaction and per megabyte by hop and path (changes the numbers
                   a little: use it apart from a record)
  --json FILE      write the results as JSON
  --svg FILE       write a bar chart of the pinned throughput, RR rates and overhead removed
  --md FILE        write the table as markdown, with the machine and the method
  --help           this text
  --version        the checkout's version

Without --json/--svg/--md (and without --quick) the results go to
bench/results/demo-<date>.json, .svg and .md (demo-<date>-2, -3 … when the day
has a record already).

Needs: root, iperf3, sockperf, gcc (for demo/rr.c), taskset, and the BPF objects
(npm run build:bpf). Goals (pinned medians, reported, not enforced): xmasq throughput
>= 0.97x host; sockperf RR rate >= 0.95x host; sockperf p50 <= host + 0.5 us (half round
trip); >= 75% of the overlay's RR overhead removed.`;

export interface CliOptions {
  rounds: number;
  durationS: number;
  quick: boolean;
  modes: Mode[];
  nice: number;
  json?: string;
  svg?: string;
  md?: string;
  agentObject?: string;
  attach?: 'auto' | 'tcx' | 'cls_bpf';
  profile?: string;
  help: boolean;
  version: boolean;
}

export class UsageError extends Error {}

export function parseArgs(argv: readonly string[]): CliOptions {
  const o: Partial<CliOptions> & { modes: Mode[]; quick: boolean; help: boolean; version: boolean; nice: number } = { modes: [...MODES], quick: false, help: false, version: false, nice: DEFAULT_NICE };
  let rounds: number | undefined, duration: number | undefined;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const [flag, inline] = a.startsWith('--') && a.includes('=') ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)] : [a, undefined];
    const value = () => {
      const v = inline ?? argv[++i];
      if (v === undefined || v === '') throw new UsageError(`${flag} needs a value`);
      return v;
    };
    const number = (min: number, integer: boolean, max = Infinity) => {
      const raw = value();
      const n = Number(raw);
      if (!Number.isFinite(n) || n < min || n > max || (integer && !Number.isInteger(n))) {
        throw new UsageError(`${flag} wants ${integer ? 'an integer' : 'a number'} ${max < Infinity ? `in ${min}..${max}` : `≥ ${min}`}, got ${JSON.stringify(raw)}`);
      }
      return n;
    };
    switch (flag) {
      case '--help': case '-h': o.help = true; break;
      case '--version': o.version = true; break;
      case '--quick': o.quick = true; break;
      case '--pinned-only': o.modes = ['pinned']; break;
      case '--rounds': rounds = number(1, true); break;
      case '--duration': duration = number(1, false); break;
      case '--nice': o.nice = number(-20, true, 19); break;
      case '--json': o.json = value(); break;
      case '--svg': o.svg = value(); break;
      case '--md': o.md = value(); break;
      case '--profile': o.profile = value(); break;
      case '--attach': {
        const k = value();
        if (!['auto', 'tcx', 'cls_bpf'].includes(k)) throw new UsageError(`--attach ${JSON.stringify(k)}: one of auto, tcx, cls_bpf`);
        o.attach = k as 'auto' | 'tcx' | 'cls_bpf';
        break;
      }
      case '--agent-object': {
        const f = value();
        if (!existsSync(f)) throw new UsageError(`--agent-object ${f}: no such file (build objects with 'make -C bpf')`);
        o.agentObject = f;
        break;
      }
      default: throw new UsageError(`unknown argument ${JSON.stringify(a)}`);
    }
  }
  return { ...o, rounds: rounds ?? (o.quick ? 1 : 3), durationS: duration ?? (o.quick ? 1 : 5) } as CliOptions;
}

/** On a terminal a measurement's line is finished by its result; in a log, one line per measurement. */
function stderrProgress(): Progress {
  const tty = process.stderr.isTTY;
  let pending = '';
  return {
    begin(line) {
      pending = line;
      if (tty) process.stderr.write(line);
    },
    end(result) {
      process.stderr.write(tty ? ` ${result}\n` : `${pending} ${result}\n`);
      pending = '';
    },
    note(line) {
      if (tty && pending) process.stderr.write('\n');
      pending = '';
      process.stderr.write(`${line}\n`);
    },
  };
}

/** How the numbers were made, for the markdown file: enough to reproduce or doubt them. */
export function methodNotes(r: DemoRun, nice: number = DEFAULT_NICE): string {
  const fast = r.checks.filter((c) => c.path === 'xmasq');
  const route = r.checks.filter((c) => c.path === 'route');
  const overlay = r.checks.filter((c) => c.path === 'overlay');
  const range = (xs: number[]) => {
    if (!xs.length) return '–';
    const [lo, hi] = [Math.min(...xs), Math.max(...xs)];
    return lo === hi ? String(lo) : `${lo}–${hi}`;
  };
  const warn = r.warnings.length ? `## Warnings\n\n${r.warnings.map((w) => `- ${w}`).join('\n')}\n\n` : '';
  return `${warn}## How it was measured

\`npm run demo\` (demo/main.ts): one lab of two hosts (network namespaces joined by a veth
wire, 1500-byte MTU, checksum offload on), flannel-style VXLAN (VNI 1, port 8472), pod a on
h1 and pod b on h2 from the CNI chain bridge + host-local + xmasq (pod MTU 1450).

- **host**: iperf3/rr from h1's netns to h2's underlay IP.
- **route**: pod a to pod b, with each host's route to the other pod CIDR replaced for the
  measurement by \`ip route replace 10.244.<j>.0/24 via 172.31.250.<j> dev nic0\` (host-gw),
  then put back to flannel's \`via 10.244.<j>.0 dev flannel.1 onlink\`. Pods keep their
  1450-byte MTU. Packets through h1's flannel.1 per measurement: ${range(route.map((c) => c.delta))}.
- **overlay**: pod a to pod b over VXLAN with no agent running (no filter attached).
  Packets through h1's flannel.1 per measurement: ${range(overlay.map((c) => c.delta))}.
- **xmasq**: both agents started (they re-attach to the pods they know), the pair warmed
  with UDP round trips until both hosts masquerade (the hosts' conntrack admits TCP and UDP
  flows; each measured TCP connection crosses the stack until the agent has made its entry
  liberal, ~10 ms), then measured; agents stopped and the restore they leave at the NIC
  taken off afterwards. h1's \`masqueraded\` counter grew by ${range(fast.map((c) => c.delta))} packets per measurement.

Throughput: \`iperf3 -c <ip> -t ${r.report.duration_s} [-P 4] -J\`, received bits/s.

CPU per Gbit/s, 1 stream: CPU time of the iperf3 client and server (their own getrusage
figures, which include the softirq work done in their context — the whole
veth/VXLAN/XMasq path — on a kernel without IRQ_TIME_ACCOUNTING; with it the machine's
irq+softirq time is added) plus the ksoftirqd threads' time, ÷ gigabits received, as % of
one core per Gbit/s; other processes on the machine do not count.

Request/response, sockperf: \`sockperf server --tcp -i <ip> -p 5351\` and \`sockperf
ping-pong --tcp -i <ip> -p 5351 -m 14 -t ${r.report.duration_s}\` (sockperf's smallest message,
one in flight); the rate is the messages of its valid duration (after its own warm-up) over
that duration; p50 and p99 are its percentiles, which are half round trips.

Request/response, cross-check: demo/rr.c, 1 byte each way on one TCP connection (TCP_NODELAY,
blocking, one transaction in flight, the first 0.05–0.2 s not counted), latency = one
round trip, 0.1 µs buckets.

Pinned: client and server both under \`taskset -c 0\` (softirq work follows them onto
CPU 0, veths deliver on the sending CPU); unpinned: no affinity. iperf3, sockperf and rr ran at
nice ${nice}${nice < 0 ? ', so that other load on the machine takes as little as possible from them' : ''}.
Rounds run host, route, overlay, xmasq in turn.

Overlay overhead removed: (xmasq − overlay) / (host − overlay) of the medians, per mode: 100%
is host speed, 0% the overlay's. It carries over from this lab, whose overlay is unusually
cheap (a veth wire keeps every offload), where "× overlay" does not.
`;
}

function write(file: string, text: string): void {
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, text);
}

export async function main(argv: readonly string[]): Promise<number> {
  let opts: CliOptions;
  try {
    opts = parseArgs(argv);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    process.stderr.write(`demo: ${e.message}\n\n${USAGE}\n`);
    return 2;
  }
  if (opts.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  if (opts.version) {
    process.stdout.write(`${packageVersion()}\n`);
    return 0;
  }
  const progress = stderrProgress();
  const ac = new AbortController();
  const onSignal = (sig: NodeJS.Signals) => {
    if (ac.signal.aborted) {
      progress.note(`${sig}: still tearing the lab down, please wait`);
      return;
    }
    progress.note(`${sig}: stopping the measurement and tearing the lab down`);
    ac.abort();
  };
  for (const s of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(s, onSignal);

  let result: DemoRun;
  try {
    result = await runDemo({ rounds: opts.rounds, durationS: opts.durationS, modes: opts.modes, nice: opts.nice, progress, signal: ac.signal, agentObject: opts.agentObject, attach: opts.attach, profile: opts.profile });
  } catch (e) {
    if (isAbort(e) || ac.signal.aborted) {
      process.stderr.write('demo: interrupted; the lab is down\n');
      return 130;
    }
    // The lab's own errors (an agent that does not start) say what failed; a stack would not help a user.
    process.stderr.write(`demo: ${(e as Error).message ?? String(e)}\n`);
    return 1;
  }
  const { report } = result;
  process.stdout.write(`\nXMasq demo: ${renderMachine(report)}\n\n${renderTable(report)}\n`);

  const day = report.date.slice(0, 10);
  const base = opts.json || opts.svg || opts.md || opts.quick ? undefined : recordBase(`${ROOT}bench/results`, `demo-${day}`, ['json', 'svg', 'md']);
  const files = base === undefined
    ? { json: opts.json, svg: opts.svg, md: opts.md }
    : { json: `${base}.json`, svg: `${base}.svg`, md: `${base}.md` };
  if (files.json) write(files.json, JSON.stringify(report, null, 2) + '\n');
  if (files.svg) write(files.svg, renderSvg(report));
  const profile = result.profile ? `## Where the CPU time goes (pinned)\n\n${result.profile}` : '';
  if (files.md) write(files.md, renderMarkdown(report, methodNotes(result, opts.nice) + (profile ? `\n${profile}` : '')));
  const profileMd = opts.profile && result.profile ? `${opts.profile}/profile.md` : undefined;
  if (profileMd) write(profileMd, `# XMasq demo profile, ${report.date}\n\nMachine: ${renderMachine(report)}.\n\n${profile}`);
  for (const f of [files.json, files.svg, files.md, profileMd]) if (f) process.stderr.write(`wrote ${f}\n`);
  return 0;
}

// Imported by the tests for parseArgs; run only as the entry point.
if (import.meta.url === `file://${process.argv[1]}`) {
  main(process.argv.slice(2)).then((code) => process.exit(code), (e: Error) => {
    process.stderr.write(`demo: ${e.stack ?? e.message}\n`);
    process.exit(1);
  });
}
