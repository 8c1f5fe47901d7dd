/**
 * Boots a kernel under QEMU (TCG: this machine has no KVM) with the host's root shared
 * read-only over 9p and vm-tests/guest/init.sh as PID 1, which runs the guest suites
 * and leaves their vitest JSON report on a second, writable 9p share (or, with
 * `bench`, runs vm-tests/guest/rpeer-bench.ts and leaves its bench.json there).
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
// The guest sees the clone (ROOT) at the same path.
import { ROOT } from '../testing/root.ts';

export const GUEST_INIT = join(ROOT, 'vm-tests/guest/init.sh');
export const QEMU = 'qemu-system-x86_64';

/** The jest-compatible report of vitest's json reporter (the parts we read). */
export interface VitestReport {
  numTotalTests: number;
  numFailedTests: number;
  testResults: Array<{
    name: string;
    status: string;
    message: string;
    assertionResults: Array<{ fullName: string; status: string; failureMessages: string[] }>;
  }>;
}

export interface GuestRun {
  /** The share the guest wrote to: console.log, status, uname, exit-code, report.json, dmesg.txt. */
  resultsDir: string;
  /** The last step init.sh reached: booted, running, done, or a reason it stopped. Undefined: it never started. */
  status?: string;
  /** uname -r in the guest. */
  uname?: string;
  /** vitest's exit code in the guest. */
  guestExitCode?: number;
  report?: VitestReport;
  /** The serial console (kernel messages, init.sh and vitest output). */
  console: string;
  qemuExit: number | null;
  timedOut: boolean;
}

export interface GuestOptions {
  bzImage: string;
  /** Only the guest test files whose path contains this. */
  filter?: string;
  cpus?: number;
  memoryMb?: number;
  /** QEMU is killed after this long (default 40 minutes). */
  timeoutMs?: number;
  /** Each console line as it arrives. */
  log?: (line: string) => void;
  /** QEMU's nice level (default 0): a benchmark's guest crawls when the host is busy. */
  nice?: number;
  /** Run the benchmark (vm-tests/guest/rpeer-bench.ts) instead of the suites. */
  bench?: { rounds: number; seconds: number };
}

export function qemuArgs(o: GuestOptions, resultsDir: string): string[] {
  const append = [
    'console=ttyS0', 'loglevel=4', 'panic=-1',
    'root=hostroot', 'rootfstype=9p', 'rootflags=trans=virtio,version=9p2000.L,cache=loose,msize=262144', 'ro',
    `init=${GUEST_INIT}`,
    // Parameters without a dot that the kernel does not know become init's environment.
    `XMASQ_ROOT=${ROOT}`,
    ...(o.filter ? [`XMASQ_FILTER=${o.filter}`] : []),
    ...(o.bench ? ['XMASQ_RUN=bench', `XMASQ_BENCH_ROUNDS=${o.bench.rounds}`, `XMASQ_BENCH_SECONDS=${o.bench.seconds}`] : []),
  ];
  for (const p of append) if (/\s/.test(p)) throw new Error(`kernel parameter "${p}" contains white space (is the clone's path ${ROOT} unusual?)`);
  return [
    '-accel', 'tcg,thread=multi', '-cpu', 'max', '-smp', String(o.cpus ?? 2), '-m', String(o.memoryMb ?? 3072),
    '-nodefaults', '-no-user-config', '-display', 'none', '-nic', 'none', '-no-reboot',
    '-serial', 'stdio', '-monitor', 'none',
    '-kernel', o.bzImage, '-append', append.join(' '),
    // The host's / read-only (the guest's root); multidevs=remap keeps inode numbers of
    // different host file systems from colliding in the guest.
    '-virtfs', 'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap',
    '-virtfs', `local,path=${resultsDir},mount_tag=results,security_model=none`,
  ];
}

function readIf(path: string): string | undefined {
  return existsSync(path) ? readFileSync(path, 'utf8').trim() : undefined;
}

/** Boots the VM, streams its console, and collects what the guest left in the results share. */
export async function runGuestSuites(o: GuestOptions): Promise<GuestRun> {
  if (!existsSync(o.bzImage)) throw new Error(`no kernel at ${o.bzImage}: build it with 'tsx kernel-patch/main.ts build'`);
  const resultsDir = mkdtempSync('/tmp/xmasq-vm-');
  const args = qemuArgs(o, resultsDir);
  const log = o.log ?? (() => {});
  const timeoutMs = o.timeoutMs ?? 40 * 60_000;
  let consoleText = '';
  let timedOut = false;
  const qemuExit = await new Promise<number | null>((resolve, reject) => {
    const [cmd, argv] = o.nice ? ['nice', ['-n', String(o.nice), QEMU, ...args]] : [QEMU, args];
    const child = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'], cwd: dirname(o.bzImage) });
    let partial = '';
    const take = (b: Buffer) => {
      const text = b.toString().replace(/\r/g, '');
      consoleText += text;
      const lines = (partial + text).split('\n');
      partial = lines.pop() ?? '';
      for (const l of lines) log(l);
    };
    child.stdout!.on('data', take);
    child.stderr!.on('data', take);
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(new Error((e as NodeJS.ErrnoException).code === 'ENOENT' ? `${QEMU} is not installed: apt-get install qemu-system-x86 (or run scripts/setup.sh)` : `cannot start ${QEMU}: ${e.message}`));
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      if (partial) log(partial);
      resolve(code);
    });
  });
  writeFileSync(join(resultsDir, 'console.log'), consoleText);
  const reportText = readIf(join(resultsDir, 'report.json'));
  const exitText = readIf(join(resultsDir, 'exit-code'));
  return {
    resultsDir,
    status: readIf(join(resultsDir, 'status')),
    uname: readIf(join(resultsDir, 'uname')),
    guestExitCode: exitText === undefined ? undefined : Number(exitText),
    report: reportText ? (JSON.parse(reportText) as VitestReport) : undefined,
    console: consoleText,
    qemuExit,
    timedOut,
  };
}
