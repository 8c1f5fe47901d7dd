/**
 * Running the lab's helper programs (ip, bridge, ethtool, sysctl, CNI plugins), optionally
 * inside one of the lab's network namespaces.
 */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';

export interface RunResult {
  stdout: string;
  stderr: string;
  /** Exit status; 128 + signal number when killed, 127 when the program could not be started. */
  code: number;
}

export interface RunOptions {
  input?: string;
  env?: NodeJS.ProcessEnv;
  timeoutMs?: number;
}

const SIGNALS: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGKILL: 9, SIGTERM: 15 };

/** Never rejects: callers decide whether a non-zero exit is an error (down() tolerates many). */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    let settled = false;
    const finish = (r: RunResult) => {
      if (settled) return;
      settled = true;
      if (timer) clearTimeout(timer);
      resolve(r);
    };
    const child = spawn(cmd, args, { env: opts.env ?? process.env, stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let timedOut = false;
    const timer = opts.timeoutMs
      ? setTimeout(() => {
          timedOut = true;
          child.kill('SIGKILL');
        }, opts.timeoutMs)
      : undefined;
    child.stdout!.on('data', (b: Buffer) => out.push(b));
    child.stderr!.on('data', (b: Buffer) => err.push(b));
    child.on('error', (e) => finish({ stdout: '', stderr: `cannot run ${cmd}: ${e.message}`, code: 127 }));
    child.on('close', (code, signal) => {
      let stderr = Buffer.concat(err).toString();
      if (timedOut) stderr += `\n(killed after ${opts.timeoutMs} ms)`;
      finish({
        stdout: Buffer.concat(out).toString(),
        stderr,
        code: code ?? 128 + (signal ? SIGNALS[signal] ?? 0 : 0),
      });
    });
    // A program that exits without reading its stdin would otherwise crash us with EPIPE.
    child.stdin!.on('error', () => {});
    child.stdin!.end(opts.input ?? '');
  });
}

export class CommandError extends Error {
  constructor(
    readonly cmd: string,
    readonly args: readonly string[],
    readonly result: RunResult,
    what?: string,
  ) {
    const detail = (result.stderr.trim() || result.stdout.trim()).split('\n').slice(-6).join('\n  ');
    super(`${what ? what + ': ' : ''}'${[cmd, ...args].join(' ')}' exited ${result.code}${detail ? ':\n  ' + detail : ''}`);
    this.name = 'CommandError';
  }
}

export async function mustRun(cmd: string, args: readonly string[], opts: RunOptions & { what?: string } = {}): Promise<RunResult> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new CommandError(cmd, args, r, opts.what);
  return r;
}

export const NETNS_DIR = '/run/netns';

export function netnsPath(netns: string): string {
  return `${NETNS_DIR}/${netns}`;
}

/**
 * nsenter rather than `ip netns exec`: the latter also unshares the mount namespace and
 * remounts /sys, which costs time and would hide the caller's view of /sys (bpffs pins,
 * /sys/class/net of the host) from programs that expect it.
 */
export function inNetns(netns: string, cmd: string, args: readonly string[]): [string, string[]] {
  return ['nsenter', [`--net=${netnsPath(netns)}`, '--', cmd, ...args]];
}

export function runIn(netns: string, cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const [c, a] = inNetns(netns, cmd, args);
  return run(c, a, opts);
}

export function mustRunIn(netns: string, cmd: string, args: readonly string[], opts: RunOptions & { what?: string } = {}): Promise<RunResult> {
  const [c, a] = inNetns(netns, cmd, args);
  return mustRun(c, a, opts);
}

export function spawnIn(netns: string, cmd: string, args: readonly string[], opts: SpawnOptions = {}): ChildProcess {
  const [c, a] = inNetns(netns, cmd, args);
  return spawn(c, a, opts);
}

/** Whether a process exists (EPERM: it does, and belongs to someone else). */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}
