/**
 * What the demo (demo/) and the rpeer kernel's bench (vm-tests/guest/rpeer-bench.ts)
 * share to measure: the machine a run is on, the median of rounds, the measuring tools
 * as processes (a server waited for until it says it listens, a client with a deadline,
 * every one killed at teardown), and sockperf's figures.
 */
import type { ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { cpus, release } from 'node:os';

export interface Machine { cpu: string; cores: number; kernel: string }

/** The CPU's model name as /proc/cpuinfo gives it (os.cpus()'s elsewhere), its cores and the kernel. */
export function machine(): Machine {
  let cpu = cpus()[0]?.model?.trim() ?? '';
  try {
    cpu = /^model name\s*:\s*(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1]?.trim() || cpu;
  } catch {
    // Not Linux's procfs: os.cpus() is the best there is.
  }
  return { cpu: cpu || 'unknown', cores: cpus().length, kernel: release() };
}

export function median(xs: readonly number[]): number {
  if (!xs.length) throw new Error('median of nothing');
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Where a tool runs: a lab host's or pod's network namespace. */
export interface Where { netns: string }

export interface ToolOptions {
  /** Starts cmd in where's namespace with stdout and stderr piped (Lab.spawn). */
  spawn: (where: Where, cmd: string, args: string[]) => ChildProcess;
  /** How long a server may take to say it listens. */
  listenTimeoutMs: number;
  /** How often its output is looked at meanwhile. */
  pollMs: number;
  /** The error a failure is thrown as (the demo's own class, which its entry point prints without a stack). */
  error?: (message: string) => Error;
  /** Called while waiting and after each client: throws to stop the run (the demo's Ctrl-C). */
  check?: () => void;
}

export interface ToolServer {
  /**
   * Waits for the server to exit: a one-shot server (iperf3 -1, rr) exits by itself
   * once its client is done; `term` sends SIGTERM first (sockperf serves until killed);
   * SIGKILL after killAfterMs either way.
   */
  stop(killAfterMs: number, term?: boolean): Promise<void>;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The tools' processes of one run; killAll() at its teardown. */
export class ToolProcesses {
  private readonly children = new Set<ChildProcess>();

  constructor(private readonly o: ToolOptions) {}

  /** A process whose stdout and stderr are collected together, tracked until it exits. */
  spawn(where: Where, cmd: string, args: string[]): { child: ChildProcess; out: () => string; exited: Promise<number | null> } {
    const child = this.o.spawn(where, cmd, args);
    this.children.add(child);
    let out = '';
    child.stdout!.on('data', (d) => { out += d; });
    child.stderr!.on('data', (d) => { out += d; });
    const exited = new Promise<number | null>((r) => child.once('close', (code) => {
      this.children.delete(child);
      r(code);
    }));
    return { child, out: () => out, exited };
  }

  /** Starts a server and waits until its output matches `ready` (it listens). */
  async server(where: Where, cmd: string, args: string[], ready: RegExp): Promise<ToolServer> {
    const s = this.spawn(where, cmd, args);
    const fail = this.o.error ?? ((m: string) => new Error(m));
    const deadline = Date.now() + this.o.listenTimeoutMs;
    while (!ready.test(s.out())) {
      if (s.child.exitCode !== null || s.child.signalCode !== null) throw fail(`${cmd} ${args.join(' ')} exited before listening: ${s.out().trim()}`);
      if (Date.now() > deadline) {
        s.child.kill('SIGKILL');
        throw fail(`${cmd} ${args.join(' ')} did not listen within ${this.o.listenTimeoutMs / 1000} s: ${s.out().trim()}`);
      }
      this.o.check?.();
      await sleep(this.o.pollMs);
    }
    return {
      stop: async (killAfterMs, term = false) => {
        if (term) s.child.kill('SIGTERM');
        const t = setTimeout(() => s.child.kill('SIGKILL'), killAfterMs);
        await s.exited;
        clearTimeout(t);
      },
    };
  }

  /** Runs a client to its end, killed after timeoutMs. */
  async client(where: Where, cmd: string, args: string[], timeoutMs: number): Promise<{ code: number | null; out: string }> {
    const c = this.spawn(where, cmd, args);
    const t = setTimeout(() => c.child.kill('SIGKILL'), timeoutMs);
    const code = await c.exited;
    clearTimeout(t);
    this.o.check?.();
    return { code, out: c.out() };
  }

  /** SIGKILLs every tool still running; `wait` until they have exited. */
  async killAll(wait = false): Promise<void> {
    const left = [...this.children];
    for (const c of left) c.kill('SIGKILL');
    if (wait) await Promise.all(left.map((c) => new Promise((r) => (c.exitCode !== null || c.signalCode !== null ? r(null) : c.once('exit', r)))));
  }
}

/**
 * The figures of a `sockperf ping-pong` run from its output: the rate from the "[Valid
 * Duration]" line (messages received over its run time), p50 and p99 from the percentile
 * lines (µs, half round trip), and the messages of the whole run.
 */
export function parseSockperf(out: string, code: number | null, what: string, error = (m: string) => new Error(m)): { tps: number; p50: number; p99: number; total: number } {
  // sockperf colours some lines even into a pipe.
  const text = out.replace(/\x1b\[[0-9;]*m/g, '');
  const valid = /\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=\d+; ReceivedMessages=(\d+)/.exec(text);
  const pct = (p: string) => Number(new RegExp(`percentile ${p} =\\s*([\\d.]+)`).exec(text)?.[1]);
  const tps = valid ? Number(valid[2]) / Number(valid[1]) : NaN, p50 = pct('50\\.000'), p99 = pct('99\\.000');
  // The whole run, warm-up included: what a profile of the client's lifetime saw.
  const total = Number(/\[Total Run\] RunTime=[\d.]+ sec;.*ReceivedMessages=(\d+)/.exec(text)?.[1]);
  if (code !== 0 || !(tps > 0) || !(p50 > 0) || !(p99 > 0)) {
    throw error(`${what} exited ${code} without its figures: ${text.trim().split('\n').slice(-12).join('\n')}`);
  }
  return { tps, p50, p99, total };
}
