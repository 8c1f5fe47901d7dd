/**
 * The rpeer kernel in numbers, run INSIDE the VM (vm-tests/guest/init.sh with
 * XMASQ_RUN=bench; `npm run bench:vm` boots it and writes the report). Not a test: it
 * checks only that each path carried what its name says.
 *
 * One two-host lab, four paths between the same two endpoints:
 *   host          h1 netns -> h2 netns over the wire, underlay IPs: the ceiling
 *   overlay       pod a -> pod b over flannel's VXLAN, no agent, no filter attached
 *   xmasq-veth    the same pods with both agents in veth mode (the stock kernel's way:
 *                 masq at the pod's host-side veth ingress, bpf_redirect to the NIC)
 *   xmasq-rpeer   both agents in rpeer mode (masq_rpeer at the pod's eth0 egress,
 *                 bpf_redirect_rpeer straight to the NIC: no veth hop)
 * each measured with sockperf ping-pong over TCP (round trips per second, p50 of
 * sockperf's latency, which is half a round trip) and iperf3 (one TCP stream).
 *
 * Rounds interleave the paths, every other round in reverse order (host overlay veth
 * rpeer, rpeer veth overlay host, …), so that a steady drift of the emulated machine
 * weighs on every path alike. Under QEMU's TCG only ratios within one run mean anything.
 *
 * Each mode's agents have pins and state of their own (the two objects' maps are not
 * shared): the veth agents hear of the pods from the CNI plugin, the rpeer agents find
 * them by discovery. A stopped agent leaves restore at the NIC; it is taken off so that
 * the host and overlay paths run with no program attached at all.
 */
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { AgentClient } from '../../dataplane/agent/protocol.ts';
import { LabAgents } from '../../lab/agents.ts';
import { Lab, type LabPod } from '../../lab/lab.ts';
import { ToolProcesses, machine, parseSockperf } from '../../testing/measure.ts';
import { ROOT } from '../../testing/root.ts';

export const BENCH_PATHS = ['host', 'overlay', 'xmasq-veth', 'xmasq-rpeer'] as const;
export type BenchPath = (typeof BENCH_PATHS)[number];

export interface BenchSample {
  round: number;
  path: BenchPath;
  /** sockperf ping-pong, TCP, 64-byte messages: round trips per second over its valid duration. */
  sockperf_rr_tps: number;
  /** sockperf's p50 latency: half a round trip, µs. */
  sockperf_p50_us: number;
  /** iperf3, one TCP stream, Gbit/s received. */
  iperf3_gbps: number;
  /**
   * During the two measurements: packets h1's VXLAN device sent, and (xmasq paths) packets
   * h1's agent masqueraded. Each new TCP connection crosses the overlay until the host's
   * conntrack admits it, which under emulation takes a good part of a second.
   */
  evidence?: { vxlan_tx: number; masqueraded?: number };
}

export interface GuestBenchResult {
  kernel: string;
  cpus: number;
  cpu: string;
  date: string;
  rounds: number;
  duration_s: number;
  paths: BenchPath[];
  samples: BenchSample[];
  /** The agents' mode as their status reported it, per xmasq path. */
  modes: Partial<Record<BenchPath, string>>;
}

const SOCKPERF_PORT = 11111;
const WARM_PORT = 11112;
const IPERF_PORT = 5201;

class Bench {
  private lab!: Lab;
  private readonly agents: Partial<Record<'veth' | 'rpeer', LabAgents>> = {};
  private running: 'veth' | 'rpeer' | undefined;
  private a!: LabPod;
  private b!: LabPod;
  // Under TCG a server can take tens of seconds to start listening.
  private readonly tools = new ToolProcesses({
    spawn: (where, cmd, args) => this.lab.spawn(where, cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] }), listenTimeoutMs: 60_000, pollMs: 50,
  });
  private readonly name = `xb${process.pid % 100000}`;
  private readonly runDir = `/run/xmasq-bench-${this.name}`;

  constructor(private readonly o: { rounds: number; seconds: number; paths: BenchPath[]; startTimeoutMs: number; log: (s: string) => void }) {}

  async run(): Promise<GuestBenchResult> {
    try {
      await this.setUp();
      return await this.measure();
    } finally {
      await this.tearDown();
    }
  }

  private async setUp(): Promise<void> {
    this.o.log(`lab ${this.name}: 2 hosts, flannel-style VXLAN, conntrack tracking (kube-proxy's INVALID drop)`);
    this.lab = await Lab.up({
      name: this.name, hosts: 2, podsPerHost: 0,
      cniPath: ['/usr/lib/cni', `${ROOT}dataplane/cni`],
      // An agent in an emulated guest on a busy host can take longer than the plugin's default 5 s to answer.
      cniPlugins: [{ type: 'xmasq', agentSocket: `${this.runDir}/veth/{host}/agent.sock`, required: true, agentTimeoutMs: 60_000 }],
    });
    const agentArgs = (mode: string) => ['--mode', mode, '--scan-interval', '1'];
    // The bundle (bench:vm builds it): tsx would transform the agent's sources at each of the run's dozen starts.
    this.agents.veth = new LabAgents(this.lab, `${this.runDir}/veth`, `${this.name}v`, agentArgs('veth'), this.o.startTimeoutMs, true);
    this.agents.rpeer = new LabAgents(this.lab, `${this.runDir}/rpeer`, `${this.name}r`, agentArgs('rpeer'), this.o.startTimeoutMs, true);
    await this.startAgents('veth');
    this.a = await this.lab.addPod('h1', 'a');
    this.b = await this.lab.addPod('h2', 'b');
    await this.stopAgents();
    this.o.log(`pods: a ${this.a.ip} on h1, b ${this.b.ip} on h2; hosts ${this.lab.host('h1').ip}, ${this.lab.host('h2').ip}`);
  }

  private async tearDown(): Promise<void> {
    await this.tools.killAll();
    for (const a of Object.values(this.agents)) await a?.teardown().catch((e: Error) => this.o.log(`stopping agents: ${e.message}`));
    await this.lab?.down().catch((e: Error) => this.o.log(`lab down: ${e.message}`));
  }

  private async startAgents(mode: 'veth' | 'rpeer'): Promise<void> {
    const started = Date.now();
    for (const h of ['h1', 'h2']) await this.agents[mode]!.start(h);
    this.running = mode;
    this.o.log(`agents in ${mode} mode started in ${((Date.now() - started) / 1000).toFixed(0)} s`);
  }

  /** Stops the running agents and takes off the restore they leave at the NIC. */
  private async stopAgents(): Promise<void> {
    const mode = this.running;
    if (!mode) return;
    for (const h of ['h1', 'h2']) {
      const code = await this.agents[mode]!.stop(h);
      if (code !== 0 && code !== null) throw new Error(`xmasq-agent (${mode}) on ${h} exited ${code} while stopping:\n${this.agents[mode]!.log(h)}`);
      const host = this.lab.host(h);
      await this.mustExec(host, 'tc', ['filter', 'del', 'dev', host.nic, 'ingress']);
    }
    this.running = undefined;
  }

  private async mustExec(where: { netns: string }, cmd: string, args: string[]): Promise<string> {
    const r = await this.lab.exec(where, cmd, args, { timeoutMs: 60_000 });
    if (r.code !== 0) throw new Error(`'${cmd} ${args.join(' ')}' in ${where.netns} exited ${r.code}: ${(r.stderr || r.stdout).trim()}`);
    return r.stdout;
  }

  private async status(host: string) {
    return (await AgentClient.request(this.agents[this.running!]!.socket(host), { op: 'status' })).status;
  }

  private async vxlanTx(): Promise<number> {
    const h = this.lab.host('h1');
    const [l] = JSON.parse(await this.mustExec(h, 'ip', ['-s', '-j', 'link', 'show', 'dev', h.vxlan])) as { stats64: { tx: { packets: number } } }[];
    return l.stats64.tx.packets;
  }

  // ---- the tools -------------------------------------------------------------------------

  /** A client runs for the measurement's duration; it is killed if it takes two minutes more. */
  private client(where: { netns: string }, cmd: string, args: string[]): Promise<{ code: number | null; out: string }> {
    return this.tools.client(where, cmd, args, (this.o.seconds + 120) * 1000);
  }

  private endpoints(path: BenchPath): { client: { netns: string }; server: { netns: string }; target: string } {
    return path === 'host'
      ? { client: this.lab.host('h1'), server: this.lab.host('h2'), target: this.lab.host('h2').ip }
      : { client: this.a, server: this.b, target: this.b.ip };
  }

  /** sockperf ping-pong over TCP; its latency figures are half round trips. */
  private async sockperf(path: BenchPath): Promise<{ tps: number; p50: number }> {
    const { client, server, target } = this.endpoints(path);
    const srv = await this.tools.server(server, 'sockperf', ['sr', '--tcp', '-i', '0.0.0.0', '-p', String(SOCKPERF_PORT)], /using \S+ to block/);
    try {
      const r = await this.client(client, 'sockperf', ['pp', '--tcp', '-i', target, '-p', String(SOCKPERF_PORT), '-t', String(this.o.seconds), '-m', '64']);
      return parseSockperf(r.out, r.code, `sockperf ${path} to ${target}`);
    } finally {
      await srv.stop(0);
    }
  }

  private async iperf(path: BenchPath): Promise<number> {
    const { client, server, target } = this.endpoints(path);
    const srv = await this.tools.server(server, 'iperf3', ['-s', '-1', '-p', String(IPERF_PORT), '--forceflush'], /listening/i);
    const r = await this.client(client, 'iperf3', ['-c', target, '-p', String(IPERF_PORT), '-t', String(this.o.seconds), '-J']);
    await srv.stop(5000);
    return parseIperf3(r.out, r.code, `${path} to ${target}`);
  }

  /**
   * sockperf's UDP ping-pong between the pods until h1 and h2 both masquerade: the pair's
   * first packets cross the overlay so that init learns it and the keys are exchanged. TCP
   * connections of the pair then take the fast path once conntrack has them established.
   */
  private async warm(): Promise<void> {
    const m0 = [(await this.status('h1')).counters.masqueraded ?? 0, (await this.status('h2')).counters.masqueraded ?? 0];
    const srv = await this.tools.server(this.b, 'sockperf', ['sr', '-i', '0.0.0.0', '-p', String(WARM_PORT)], /using \S+ to block/);
    try {
      for (let i = 0; i < 10; i++) {
        await this.client(this.a, 'sockperf', ['pp', '-i', this.b.ip, '-p', String(WARM_PORT), '-t', '1', '--mps', '50']);
        const m = [(await this.status('h1')).counters.masqueraded ?? 0, (await this.status('h2')).counters.masqueraded ?? 0];
        if (m[0] > m0[0] && m[1] > m0[1]) return;
      }
    } finally {
      await srv.stop(0);
    }
    throw new Error(`${this.running}: the a-b pair never reached the fast path (masqueraded counters did not grow after 10 s of UDP ping-pong)`);
  }

  private async enter(path: BenchPath, modes: GuestBenchResult['modes']): Promise<void> {
    if (path === 'host' || path === 'overlay') return;
    const mode = path === 'xmasq-veth' ? 'veth' : 'rpeer';
    await this.startAgents(mode);
    for (const h of ['h1', 'h2']) {
      const s = await this.status(h);
      if (s.mode !== mode) throw new Error(`${path}: the agent on ${h} runs in ${s.mode} mode (${s.modeReason})`);
      const pods = (await AgentClient.request(this.agents[mode]!.socket(h), { op: 'list' })).pods;
      if (!(pods.length === 1 && pods[0].attached)) throw new Error(`${path}: the agent on ${h} does not have its pod attached: ${JSON.stringify(pods)}`);
      modes[path] = s.mode;
    }
    await this.warm();
  }

  private async measure(): Promise<GuestBenchResult> {
    const samples: BenchSample[] = [];
    const modes: GuestBenchResult['modes'] = {};
    for (let round = 1; round <= this.o.rounds; round++) {
      const order = round % 2 ? this.o.paths : [...this.o.paths].reverse();
      for (const path of order) {
        await this.enter(path, modes);
        const masq = async () => (path.startsWith('xmasq') ? (await this.status('h1')).counters.masqueraded ?? 0 : undefined);
        const before = path === 'host' ? undefined : { vxlan_tx: await this.vxlanTx(), masqueraded: await masq() };
        const rr = await this.sockperf(path);
        const gbps = await this.iperf(path);
        const sample: BenchSample = { round, path, sockperf_rr_tps: rr.tps, sockperf_p50_us: rr.p50, iperf3_gbps: gbps };
        if (before) {
          const m = await masq();
          const e: NonNullable<BenchSample['evidence']> = { vxlan_tx: (await this.vxlanTx()) - before.vxlan_tx };
          if (m !== undefined) e.masqueraded = m - before.masqueraded!;
          sample.evidence = e;
          if (path === 'overlay' && e.vxlan_tx < 100) throw new Error(`round ${round}, overlay: only ${e.vxlan_tx} packets went through h1's VXLAN device`);
          if (path !== 'overlay' && !(e.masqueraded! > 0)) throw new Error(`round ${round}, ${path}: h1's agent masqueraded nothing: the traffic did not take the fast path`);
        }
        samples.push(sample);
        this.o.log(`round ${round}/${this.o.rounds} ${path}: sockperf ${Math.round(rr.tps)} rt/s, p50 ${rr.p50.toFixed(1)} µs; iperf3 ${gbps.toFixed(3)} Gbit/s`
          + (sample.evidence ? ` [h1 vxlan tx +${sample.evidence.vxlan_tx}${sample.evidence.masqueraded !== undefined ? `, masqueraded +${sample.evidence.masqueraded}` : ''}]` : ''));
        await this.stopAgents();
      }
    }
    const m = machine();
    return {
      kernel: m.kernel, cpus: m.cores, cpu: m.cpu, date: new Date().toISOString(),
      rounds: this.o.rounds, duration_s: this.o.seconds, paths: this.o.paths, samples, modes,
    };
  }
}

/** Gbit/s received from iperf3 -J. */
export function parseIperf3(out: string, code: number | null, what: string): number {
  let j: { error?: string; end?: { sum_received?: { bits_per_second: number } } };
  try {
    j = JSON.parse(out.slice(out.indexOf('{')));
  } catch {
    throw new Error(`iperf3 ${what} exited ${code} without a JSON report: ${out.trim().slice(0, 800)}`);
  }
  const bps = j.end?.sum_received?.bits_per_second;
  if (code !== 0 || j.error || !bps) throw new Error(`iperf3 ${what} failed: ${j.error ?? out.trim().slice(0, 800)}`);
  return bps / 1e9;
}

const USAGE = `usage: node --import tsx vm-tests/guest/rpeer-bench.ts --out FILE [--rounds N] [--seconds S] [--paths a,b]

Runs inside the rpeer VM (npm run bench:vm boots it); as root. --paths defaults to
${BENCH_PATHS.join(',')} (xmasq-rpeer needs the rpeer kernel).`;

async function main(): Promise<number> {
  const { values: v } = parseArgs({
    options: { out: { type: 'string' }, rounds: { type: 'string' }, seconds: { type: 'string' }, paths: { type: 'string' }, help: { type: 'boolean', short: 'h' } },
    strict: true,
  });
  if (v.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  if (!v.out) throw new Error(`--out is required\n${USAGE}`);
  const rounds = Number(v.rounds ?? 3), seconds = Number(v.seconds ?? 5);
  if (!Number.isInteger(rounds) || rounds < 1) throw new Error(`--rounds must be a positive integer, got ${v.rounds}`);
  if (!Number.isInteger(seconds) || seconds < 2) throw new Error(`--seconds must be an integer >= 2, got ${v.seconds}`);
  const paths = (v.paths ?? BENCH_PATHS.join(',')).split(',') as BenchPath[];
  for (const p of paths) if (!BENCH_PATHS.includes(p)) throw new Error(`unknown path "${p}": the paths are ${BENCH_PATHS.join(', ')}`);
  if (process.getuid?.() !== 0) throw new Error('rpeer-bench needs root (network namespaces, BPF)');
  const log = (s: string) => process.stderr.write(`rpeer-bench: ${s}\n`);
  const result = await new Bench({ rounds, seconds, paths, startTimeoutMs: 300_000, log }).run();
  writeFileSync(v.out, `${JSON.stringify(result, null, 2)}\n`);
  log(`wrote ${v.out}`);
  return 0;
}

main().then((code) => process.exit(code), (e: Error) => {
  process.stderr.write(`rpeer-bench: ${e.message}\n`);
  process.exit(1);
});
