/**
 * Every libbpf failure as a LibbpfError naming the operation, the
 * object/map/program, the errno and a hint; failed loads carry the verifier log.
 */
import koffi from 'koffi';
import { native, withLibbpfLog } from './native.ts';

export const ENOTSUPP = 524; // kernel-internal "not supported", leaks out of the bpf() syscall
const LIBBPF_ERRNO_NAMES = ['LIBELF', 'FORMAT', 'KVERSION', 'ENDIAN', 'INTERNAL', 'RELOC', 'LOAD', 'VERIFY',
  'PROG2BIG', 'KVER', 'PROGTYPE', 'WRNGPID', 'INVSEQ', 'NLPARSE'];

const errnoNames = new Map<number, string>();
for (const [name, value] of Object.entries(koffi.os.errno)) if (!errnoNames.has(value)) errnoNames.set(value, name);
// Aliases share a number; prefer the names the kernel's documentation uses.
errnoNames.set(koffi.os.errno.EOPNOTSUPP, 'EOPNOTSUPP');
errnoNames.set(koffi.os.errno.EAGAIN, 'EAGAIN');
errnoNames.set(ENOTSUPP, 'ENOTSUPP');
LIBBPF_ERRNO_NAMES.forEach((n, i) => errnoNames.set(4000 + i, `LIBBPF_ERRNO__${n}`));

export function errnoName(errno: number): string {
  return errnoNames.get(Math.abs(errno)) ?? `errno ${Math.abs(errno)}`;
}

export const E = koffi.os.errno;
const GENERIC_HINTS: Record<number, string> = {
  [E.EPERM]: 'are you root with CAP_BPF?',
  [E.EACCES]: 'permission denied: the verifier refused, or the path is not writable',
  [E.EINVAL]: 'invalid argument: check key/value sizes, flags, and the map or program type',
  [E.ENOENT]: 'no such element, path or object',
  [E.EEXIST]: 'it already exists',
  [E.E2BIG]: 'too big, or the map is full (max_entries reached)',
  [E.ENOSPC]: 'out of space: a buffer was too small',
  [E.ENOMEM]: 'out of memory (or the memlock rlimit on kernels older than 5.11)',
  [E.EBADF]: 'bad file descriptor: the map or program was closed',
  [E.ENODEV]: 'no such network device in this network namespace',
  [E.EFAULT]: 'bad address passed to the kernel',
  [E.EBUSY]: 'busy: the object is already loaded or in use',
  [E.EOPNOTSUPP]: 'not supported by this kernel for this map or program type',
  [ENOTSUPP]: 'not supported by this kernel for this map or program type',
  [E.ENOTDIR]: 'a parent of the path is not a directory',
  [E.EXDEV]: 'the path is not on a BPF file system (mount -t bpf bpf /sys/fs/bpf)',
  [4000 + 7]: 'the verifier refused a program',
  [4000 + 1]: 'not a valid BPF ELF object',
};

export class LibbpfError extends Error {
  /** Positive errno (or libbpf's LIBBPF_ERRNO__* value). */
  readonly errno: number;
  /** Its name: 'EPERM', 'ENOTSUPP', 'LIBBPF_ERRNO__LOAD', ... */
  readonly code: string;
  /** libbpf's warnings for the failed call; for loads this holds the whole verifier log. */
  readonly log: string;

  constructor(what: string, errno: number, hint: string | undefined, log = '') {
    const e = Math.abs(errno);
    const code = errnoName(e);
    const parts = [`${what} failed: ${code} (${hint ?? GENERIC_HINTS[e] ?? describeErrno(e)})`];
    if (log) parts.push(formatLog(log));
    super(parts.join('\n'));
    this.name = 'LibbpfError';
    this.errno = e;
    this.code = code;
    this.log = log;
  }
}

function describeErrno(e: number): string {
  const buf = Buffer.alloc(256);
  native().libbpf_strerror(e, buf, buf.length);
  return buf.toString('utf8', 0, buf.indexOf(0) >= 0 ? buf.indexOf(0) : buf.length);
}

const VERIFIER_TAIL_LINES = 60;

/** The verifier log's tail first (the reason is at its end), then libbpf's own lines. */
function formatLog(log: string): string {
  // The marker line starts with libbpf's "libbpf: prog 'x': " prefix; drop it with the log.
  const m = /^[^\n]*-- BEGIN PROG LOAD LOG --\n([\s\S]*?)-- END PROG LOAD LOG --\n?/m.exec(log);
  const out: string[] = [];
  let rest = log;
  if (m) {
    const lines = m[1].replace(/\n$/, '').split('\n');
    const tail = lines.slice(-VERIFIER_TAIL_LINES);
    out.push(`verifier log${lines.length > tail.length ? ` (last ${tail.length} of ${lines.length} lines; all of it is in error.log)` : ''}:`);
    out.push(...tail.map((l) => `  ${l}`));
    rest = log.slice(0, m.index) + log.slice(m.index + m[0].length);
  }
  const own = rest.split('\n').filter((l) => l.trim() !== '');
  if (own.length) {
    out.push('libbpf said:');
    out.push(...own.slice(-20).map((l) => `  ${l}`));
  }
  return out.join('\n');
}

/** Runs a libbpf call returning 0 or -errno, throwing LibbpfError with its log on failure. */
export function check(what: string, call: () => number, hints: Record<number, string> = {}): number {
  const { result, log } = withLibbpfLog(call);
  if (result < 0) throw new LibbpfError(what, -result, hints[-result], log);
  return result;
}
