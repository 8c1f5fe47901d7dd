/**
 * Typed bindings to the system libbpf (libbpf.so.1, written against 1.1.2)
 * through koffi. Every libbpf failure becomes a LibbpfError naming the
 * operation, the object/map/program, the errno and a hint; failed loads carry
 * the verifier log.
 *
 * Only x86-64 Linux is supported: the va_list trick in the print callback and
 * the struct layouts below are checked for that ABI only.
 */
import { closeSync, openSync, readFileSync, unlinkSync } from 'node:fs';
import koffi, { type LibraryHandle } from 'koffi';

// ---------------------------------------------------------------------------
// Struct layouts. Each mirrors libbpf 1.1.2's /usr/include/bpf/*.h or
// /usr/include/linux/bpf.h member for member; STRUCT_SIZES holds the sizeof()
// the C compiler gives, and native() refuses to run if koffi disagrees.
// libbpf.test.ts compiles a C program to hold these numbers against the headers.
// ---------------------------------------------------------------------------

/** sizeof() of each struct in the installed headers (x86-64). */
export const STRUCT_SIZES = {
  bpf_object_open_opts: 80,
  bpf_test_run_opts: 80,
  bpf_map_batch_opts: 24,
  bpf_tc_hook: 24,
  bpf_tc_opts: 32,
  bpf_map_info: 88,
} as const;

const BpfObjectOpenOpts = koffi.struct('xmasq_bpf_object_open_opts', {
  sz: 'size_t',
  object_name: 'const char *',
  relaxed_maps: 'bool',
  pin_root_path: 'const char *',
  // `__u32 :32` where attach_prog_fd used to be; kconfig still starts at 40.
  removed_attach_prog_fd: 'uint32_t',
  kconfig: 'const char *',
  btf_custom_path: 'const char *',
  kernel_log_buf: 'void *',
  kernel_log_size: 'size_t',
  kernel_log_level: 'uint32_t',
  // `size_t :0` only rounds the size up to 8, which the size_t members already force.
});

const BpfTestRunOpts = koffi.struct('xmasq_bpf_test_run_opts', {
  sz: 'size_t',
  data_in: 'void *',
  data_out: 'void *',
  data_size_in: 'uint32_t',
  data_size_out: 'uint32_t',
  ctx_in: 'void *',
  ctx_out: 'void *',
  ctx_size_in: 'uint32_t',
  ctx_size_out: 'uint32_t',
  retval: 'uint32_t',
  repeat: 'int',
  duration: 'uint32_t',
  flags: 'uint32_t',
  cpu: 'uint32_t',
  batch_size: 'uint32_t',
});

const BpfMapBatchOpts = koffi.struct('xmasq_bpf_map_batch_opts', {
  sz: 'size_t',
  elem_flags: 'uint64_t',
  flags: 'uint64_t',
});

const BpfTcHook = koffi.struct('xmasq_bpf_tc_hook', {
  sz: 'size_t',
  ifindex: 'int',
  attach_point: 'int', // enum bpf_tc_attach_point
  parent: 'uint32_t',
});

const BpfTcOpts = koffi.struct('xmasq_bpf_tc_opts', {
  sz: 'size_t',
  prog_fd: 'int',
  flags: 'uint32_t',
  prog_id: 'uint32_t',
  handle: 'uint32_t',
  priority: 'uint32_t',
});

const BpfMapInfo = koffi.struct('xmasq_bpf_map_info', {
  type: 'uint32_t',
  id: 'uint32_t',
  key_size: 'uint32_t',
  value_size: 'uint32_t',
  max_entries: 'uint32_t',
  map_flags: 'uint32_t',
  name: koffi.array('char', 16, 'String'), // BPF_OBJ_NAME_LEN
  ifindex: 'uint32_t',
  btf_vmlinux_value_type_id: 'uint32_t',
  netns_dev: 'uint64_t',
  netns_ino: 'uint64_t',
  btf_id: 'uint32_t',
  btf_key_type_id: 'uint32_t',
  btf_value_type_id: 'uint32_t',
  pad: 'uint32_t', // `__u32 :32` so map_extra lands on 80
  map_extra: 'uint64_t',
});

const KOFFI_STRUCTS = {
  bpf_object_open_opts: BpfObjectOpenOpts,
  bpf_test_run_opts: BpfTestRunOpts,
  bpf_map_batch_opts: BpfMapBatchOpts,
  bpf_tc_hook: BpfTcHook,
  bpf_tc_opts: BpfTcOpts,
  bpf_map_info: BpfMapInfo,
} as const;

/** Member offsets as koffi lays them out, for the header check in the tests. */
export function koffiLayout(struct: keyof typeof KOFFI_STRUCTS): { size: number; offsets: Record<string, number> } {
  const t = KOFFI_STRUCTS[struct];
  const offsets: Record<string, number> = {};
  for (const name of Object.keys(t.members ?? {})) offsets[name] = koffi.offsetof(t, name);
  return { size: koffi.sizeof(t), offsets };
}

// ---------------------------------------------------------------------------
// Native functions, bound on first use so that importing this module never
// fails on a machine without libbpf; only using it does, with a clear message.
// ---------------------------------------------------------------------------

type Ptr = bigint; // koffi 3 hands pointers around as BigInt, NULL as null

interface Native {
  bpf_object__open_file(path: string, opts: object): Ptr | null;
  bpf_object__load(obj: Ptr): number;
  bpf_object__close(obj: Ptr): void;
  bpf_object__next_program(obj: Ptr, prev: Ptr | null): Ptr | null;
  bpf_object__next_map(obj: Ptr, prev: Ptr | null): Ptr | null;
  bpf_program__name(prog: Ptr): string;
  bpf_program__fd(prog: Ptr): number;
  bpf_program__set_autoload(prog: Ptr, on: boolean): number;
  bpf_map__name(map: Ptr): string;
  bpf_map__fd(map: Ptr): number;
  bpf_map__type(map: Ptr): number;
  bpf_map__key_size(map: Ptr): number;
  bpf_map__value_size(map: Ptr): number;
  bpf_map__max_entries(map: Ptr): number;
  bpf_map__pin(map: Ptr, path: string): number;
  bpf_map__unpin(map: Ptr, path: string | null): number;
  bpf_map__set_pin_path(map: Ptr, path: string | null): number;
  bpf_map__is_pinned(map: Ptr): boolean;
  bpf_map_lookup_elem(fd: number, key: Buffer, value: Buffer): number;
  bpf_map_update_elem(fd: number, key: Buffer, value: Buffer, flags: number): number;
  bpf_map_delete_elem(fd: number, key: Buffer): number;
  bpf_map_get_next_key(fd: number, key: Buffer | null, next: Buffer): number;
  bpf_map_lookup_batch(fd: number, inBatch: Buffer | null, outBatch: Buffer, keys: Buffer, values: Buffer, count: number[], opts: object): number;
  bpf_map_delete_batch(fd: number, keys: Buffer, count: number[], opts: object): number;
  bpf_obj_get(path: string): number;
  bpf_obj_pin(fd: number, path: string): number;
  bpf_obj_get_info_by_fd(fd: number, info: Buffer, len: number[]): number;
  bpf_prog_test_run_opts(fd: number, opts: Record<string, unknown>): number;
  bpf_tc_hook_create(hook: object): number;
  bpf_tc_hook_destroy(hook: object): number;
  bpf_tc_attach(hook: object, opts: Record<string, unknown>): number;
  bpf_tc_detach(hook: object, opts: object): number;
  bpf_tc_query(hook: object, opts: Record<string, unknown>): number;
  libbpf_num_possible_cpus(): number;
  libbpf_strerror(err: number, buf: Buffer, size: number): number;
  vsnprintf(buf: Buffer | null, n: number, fmt: Ptr, ap: Ptr | Buffer): number;
  setns(fd: number, nstype: number): number;
}

let nativeCache: Native | undefined;

function native(): Native {
  if (nativeCache) return nativeCache;
  if (process.platform !== 'linux' || process.arch !== 'x64') {
    throw new Error(`dataplane/libbpf.ts supports x86-64 Linux only (this is ${process.platform}/${process.arch})`);
  }
  for (const [name, t] of Object.entries(KOFFI_STRUCTS)) {
    const want = STRUCT_SIZES[name as keyof typeof STRUCT_SIZES];
    if (koffi.sizeof(t) !== want) throw new Error(`koffi lays out struct ${name} in ${koffi.sizeof(t)} bytes, the C headers say ${want}`);
  }
  let lib: LibraryHandle;
  try {
    lib = koffi.load('libbpf.so.1');
  } catch (e) {
    throw new Error(`cannot load libbpf.so.1 (${(e as Error).message}); install it with 'apt-get install libbpf1'`);
  }
  const libc = koffi.load('libc.so.6');
  const n = {
    bpf_object__open_file: lib.func('void *bpf_object__open_file(const char *path, const xmasq_bpf_object_open_opts *opts)'),
    bpf_object__load: lib.func('int bpf_object__load(void *obj)'),
    bpf_object__close: lib.func('void bpf_object__close(void *obj)'),
    bpf_object__next_program: lib.func('void *bpf_object__next_program(void *obj, void *prev)'),
    bpf_object__next_map: lib.func('void *bpf_object__next_map(void *obj, void *prev)'),
    bpf_program__name: lib.func('const char *bpf_program__name(void *prog)'),
    bpf_program__fd: lib.func('int bpf_program__fd(void *prog)'),
    bpf_program__set_autoload: lib.func('int bpf_program__set_autoload(void *prog, bool autoload)'),
    bpf_map__name: lib.func('const char *bpf_map__name(void *map)'),
    bpf_map__fd: lib.func('int bpf_map__fd(void *map)'),
    bpf_map__type: lib.func('int bpf_map__type(void *map)'),
    bpf_map__key_size: lib.func('uint32_t bpf_map__key_size(void *map)'),
    bpf_map__value_size: lib.func('uint32_t bpf_map__value_size(void *map)'),
    bpf_map__max_entries: lib.func('uint32_t bpf_map__max_entries(void *map)'),
    bpf_map__pin: lib.func('int bpf_map__pin(void *map, const char *path)'),
    bpf_map__unpin: lib.func('int bpf_map__unpin(void *map, const char *path)'),
    bpf_map__set_pin_path: lib.func('int bpf_map__set_pin_path(void *map, const char *path)'),
    bpf_map__is_pinned: lib.func('bool bpf_map__is_pinned(void *map)'),
    bpf_map_lookup_elem: lib.func('int bpf_map_lookup_elem(int fd, void *key, void *value)'),
    bpf_map_update_elem: lib.func('int bpf_map_update_elem(int fd, void *key, void *value, uint64_t flags)'),
    bpf_map_delete_elem: lib.func('int bpf_map_delete_elem(int fd, void *key)'),
    bpf_map_get_next_key: lib.func('int bpf_map_get_next_key(int fd, void *key, void *next_key)'),
    bpf_map_lookup_batch: lib.func('int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys, void *values, _Inout_ uint32_t *count, const xmasq_bpf_map_batch_opts *opts)'),
    bpf_map_delete_batch: lib.func('int bpf_map_delete_batch(int fd, void *keys, _Inout_ uint32_t *count, const xmasq_bpf_map_batch_opts *opts)'),
    bpf_obj_get: lib.func('int bpf_obj_get(const char *path)'),
    bpf_obj_pin: lib.func('int bpf_obj_pin(int fd, const char *path)'),
    bpf_obj_get_info_by_fd: lib.func('int bpf_obj_get_info_by_fd(int fd, void *info, _Inout_ uint32_t *info_len)'),
    bpf_prog_test_run_opts: lib.func('int bpf_prog_test_run_opts(int fd, _Inout_ xmasq_bpf_test_run_opts *opts)'),
    bpf_tc_hook_create: lib.func('int bpf_tc_hook_create(xmasq_bpf_tc_hook *hook)'),
    bpf_tc_hook_destroy: lib.func('int bpf_tc_hook_destroy(xmasq_bpf_tc_hook *hook)'),
    bpf_tc_attach: lib.func('int bpf_tc_attach(const xmasq_bpf_tc_hook *hook, _Inout_ xmasq_bpf_tc_opts *opts)'),
    bpf_tc_detach: lib.func('int bpf_tc_detach(const xmasq_bpf_tc_hook *hook, const xmasq_bpf_tc_opts *opts)'),
    bpf_tc_query: lib.func('int bpf_tc_query(const xmasq_bpf_tc_hook *hook, _Inout_ xmasq_bpf_tc_opts *opts)'),
    libbpf_num_possible_cpus: lib.func('int libbpf_num_possible_cpus(void)'),
    libbpf_strerror: lib.func('int libbpf_strerror(int err, void *buf, size_t size)'),
    libbpf_set_print: lib.func('void *libbpf_set_print(void *fn)'),
    vsnprintf: libc.func('int vsnprintf(void *buf, size_t n, void *fmt, void *ap)'),
    setns: libc.func('int setns(int fd, int nstype)'),
  };
  nativeCache = n as unknown as Native;
  installPrintCallback(n.libbpf_set_print, nativeCache);
  return nativeCache;
}

// ---------------------------------------------------------------------------
// libbpf's log. libbpf formats nothing itself: it hands us printf's format and
// a va_list, so we format with libc's vsnprintf. A va_list can be consumed
// once; on x86-64 it is a 24-byte struct whose copy is exactly what va_copy
// makes, so we measure with a copy and then format with the original.
// ---------------------------------------------------------------------------

export type LibbpfLogLevel = 'warn' | 'info' | 'debug';
const LEVELS: LibbpfLogLevel[] = ['warn', 'info', 'debug'];

let logger: ((level: LibbpfLogLevel, line: string) => void) | undefined;
/** Every libbpf message, also debug ones and those of calls that succeed, for whoever wants them. */
export function setLibbpfLogger(fn: ((level: LibbpfLogLevel, line: string) => void) | undefined): void {
  logger = fn;
}

// The warn/info messages of the libbpf call in progress; libbpf runs on our
// thread, so whatever arrives between clearing and reading belongs to that call.
let recent: string[] = [];
let recentBytes = 0;
const RECENT_MAX_BYTES = 64 << 20; // the verifier log alone may reach libbpf's 16 MiB buffer

function installPrintCallback(setPrint: (fn: unknown) => unknown, n: Native): void {
  const proto = koffi.proto('int xmasq_libbpf_print_fn(int level, void *fmt, void *ap)');
  // Registered for the life of the process: libbpf keeps the pointer globally.
  const cb = koffi.register((level: number, fmt: Ptr, ap: Ptr): number => {
    try {
      const apCopy = Buffer.from(new Uint8Array(koffi.view(ap, 24)));
      const len = n.vsnprintf(null, 0, fmt, apCopy);
      if (len < 0) return 0;
      const buf = Buffer.alloc(len + 1);
      n.vsnprintf(buf, len + 1, fmt, ap);
      const line = buf.toString('utf8', 0, len);
      const lvl = LEVELS[level] ?? 'debug';
      if (lvl !== 'debug' && recentBytes < RECENT_MAX_BYTES) {
        recent.push(line);
        recentBytes += line.length;
      }
      logger?.(lvl, line);
    } catch {
      // An exception must not unwind through libbpf's C frames.
    }
    return 0;
  }, koffi.pointer(proto));
  setPrint(cb);
}

function withLibbpfLog<T>(fn: () => T): { result: T; log: string } {
  recent = [];
  recentBytes = 0;
  const result = fn();
  const log = recent.join('');
  recent = [];
  recentBytes = 0;
  return { result, log };
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

const ENOTSUPP = 524; // kernel-internal "not supported", leaks out of the bpf() syscall
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

const E = koffi.os.errno;
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
function check(what: string, call: () => number, hints: Record<number, string> = {}): number {
  const { result, log } = withLibbpfLog(call);
  if (result < 0) throw new LibbpfError(what, -result, hints[-result], log);
  return result;
}

// ---------------------------------------------------------------------------
// Objects, programs, maps
// ---------------------------------------------------------------------------

/** enum bpf_map_type values this project meets. */
export const MapType = {
  HASH: 1, ARRAY: 2, PROG_ARRAY: 3, PERF_EVENT_ARRAY: 4, PERCPU_HASH: 5, PERCPU_ARRAY: 6,
  LRU_HASH: 9, LRU_PERCPU_HASH: 10, LPM_TRIE: 11, DEVMAP: 14, PERCPU_CGROUP_STORAGE: 21, DEVMAP_HASH: 25, RINGBUF: 27,
} as const;

const PERCPU_TYPES = new Set<number>([MapType.PERCPU_HASH, MapType.PERCPU_ARRAY, MapType.LRU_PERCPU_HASH, MapType.PERCPU_CGROUP_STORAGE]);
// Arrays preallocate every slot: their elements can be overwritten but never deleted.
const ZEROED_NOT_DELETED = new Set<number>([MapType.ARRAY, MapType.PERCPU_ARRAY]);

const UPDATE_FLAGS = { any: 0, noexist: 1, exist: 2 } as const; // BPF_ANY, BPF_NOEXIST, BPF_EXIST

let possibleCpusCache: number | undefined;
/** libbpf_num_possible_cpus(): how many per-CPU slots a PERCPU map value has. */
export function possibleCpus(): number {
  if (possibleCpusCache === undefined) {
    possibleCpusCache = check('counting possible CPUs', () => native().libbpf_num_possible_cpus());
  }
  return possibleCpusCache;
}

/** What most likely went wrong in a failed bpf_object__load, judged from libbpf's log. */
function loadHint(errno: number, log: string, failedProgram: string | undefined): string | undefined {
  if (log.includes("couldn't reuse pinned map")) {
    return 'a map pinned at the pin path differs in type, key/value size, max_entries or flags: unpin it, or fix the declaration';
  }
  if (log.includes('-- BEGIN PROG LOAD LOG --') || errno === 4000 + 7) {
    return `the verifier rejected program '${failedProgram ?? '?'}'; the tail of its log follows`;
  }
  if (errno === E.EPERM) return 'are you root with CAP_BPF?';
  return failedProgram ? `program '${failedProgram}' failed to load` : undefined;
}

export class BpfObject {
  private ptr: Ptr | null;
  private loaded = false;
  private loadTried = false;

  private constructor(readonly path: string, ptr: Ptr) {
    this.ptr = ptr;
  }

  /**
   * bpf_object__open_file. pinRoot is where maps declared with
   * `__uint(pinning, LIBBPF_PIN_BY_NAME)` are pinned, and reused from, on load
   * (libbpf's default is /sys/fs/bpf).
   */
  static open(path: string, opts: { pinRoot?: string } = {}): BpfObject {
    const n = native();
    const o = {
      sz: STRUCT_SIZES.bpf_object_open_opts,
      object_name: null, relaxed_maps: false, pin_root_path: opts.pinRoot ?? null, removed_attach_prog_fd: 0,
      kconfig: null, btf_custom_path: null, kernel_log_buf: null, kernel_log_size: 0, kernel_log_level: 0,
    };
    const { result, log } = withLibbpfLog(() => {
      const p = n.bpf_object__open_file(path, o);
      // Read errno before any other native call can overwrite it.
      return { p, errno: p ? 0 : koffi.errno() };
    });
    if (!result.p) {
      throw new LibbpfError(`open of ${path}`, result.errno || E.EINVAL, {
        [E.ENOENT]: 'no such file: build the object first',
        [4000 + 1]: 'not a BPF ELF object (compile with clang -target bpf -g)',
        [E.EINVAL]: 'libbpf could not parse the object (see its log)',
      }[result.errno], log);
    }
    return new BpfObject(path, result.p);
  }

  private handle(): Ptr {
    if (this.ptr === null) throw new Error(`BPF object ${this.path} is closed`);
    return this.ptr;
  }

  /** Whether load() succeeded. */
  get isLoaded(): boolean {
    return this.loaded;
  }

  private programPtrs(): Array<[string, Ptr]> {
    const n = native();
    const out: Array<[string, Ptr]> = [];
    for (let p = n.bpf_object__next_program(this.handle(), null); p; p = n.bpf_object__next_program(this.handle(), p)) {
      out.push([n.bpf_program__name(p), p]);
    }
    return out;
  }

  private mapPtrs(): Array<[string, Ptr]> {
    const n = native();
    const out: Array<[string, Ptr]> = [];
    for (let m = n.bpf_object__next_map(this.handle(), null); m; m = n.bpf_object__next_map(this.handle(), m)) {
      out.push([n.bpf_map__name(m), m]);
    }
    return out;
  }

  programs(): string[] {
    return this.programPtrs().map(([name]) => name);
  }

  /** Includes libbpf's internal maps (.bss, .data, .rodata) when the object has globals. */
  maps(): string[] {
    return this.mapPtrs().map(([name]) => name);
  }

  private findProgram(name: string): Ptr {
    const all = this.programPtrs();
    const hit = all.find(([n]) => n === name);
    if (!hit) throw new Error(`no program '${name}' in ${this.path}; it has: ${all.map(([n]) => n).join(', ') || '(none)'}`);
    return hit[1];
  }

  /** Must come before load(); a program not loaded has no fd. */
  setAutoload(program: string, on: boolean): void {
    const p = this.findProgram(program);
    if (this.loadTried) throw new Error(`setting autoload of program '${program}' in ${this.path}: load() was already called; call setAutoload before it`);
    check(`setting autoload of program '${program}' in ${this.path}`, () => native().bpf_program__set_autoload(p, on));
  }

  /** bpf_object__load: creates the maps and runs every autoloaded program through the verifier. */
  load(): void {
    const h = this.handle();
    // libbpf marks the object loaded even when loading fails, and refuses a second try.
    if (this.loadTried) throw new Error(`BPF object ${this.path}: load() was already called${this.loaded ? '' : ' and failed'}; open the file again to retry`);
    this.loadTried = true;
    const { result, log } = withLibbpfLog(() => native().bpf_object__load(h));
    if (result < 0) {
      const errno = -result;
      const failed = /prog '([^']+)': (?:BPF program load failed|failed to load)/.exec(log)?.[1];
      const hint = loadHint(errno, log, failed);
      throw new LibbpfError(`load of ${this.path}`, errno, hint, log);
    }
    this.loaded = true;
  }

  program(name: string): BpfProgram {
    return new BpfProgram(this, name, this.findProgram(name));
  }

  map(name: string): BpfMap {
    const all = this.mapPtrs();
    const hit = all.find(([n]) => n === name);
    if (!hit) throw new Error(`no map '${name}' in ${this.path}; it has: ${all.map(([n]) => n).join(', ') || '(none)'}`);
    return BpfMap.fromObject(this, name, hit[1]);
  }

  /** bpf_object__close; closes every map and program fd the object owns. Idempotent. */
  close(): void {
    if (this.ptr === null) return;
    native().bpf_object__close(this.ptr);
    this.ptr = null;
  }

  /** @internal BpfMap uses this to refuse settings that only load() reads. */
  assertNotLoaded(what: string): void {
    this.assertOpen(what);
    if (this.loadTried) throw new Error(`${what} must come before load()`);
  }

  /** @internal BpfMap/BpfProgram use this to refuse work on a closed object. */
  assertOpen(what: string): void {
    if (this.ptr === null) throw new Error(`${what} cannot be used: the object was closed`);
  }
}

interface MapSource {
  kind: 'object';
  obj: BpfObject;
  ptr: Ptr;
}
interface FdSource {
  kind: 'fd';
  fd: number;
  path: string;
}

export class BpfMap {
  private fdClosed = false;
  private lastPin: string | undefined;

  private constructor(
    private readonly src: MapSource | FdSource,
    readonly name: string,
    readonly type: number,
    readonly keySize: number,
    /** The size of one value (one CPU's value for PERCPU maps), as declared. */
    readonly valueSize: number,
    readonly maxEntries: number,
  ) {}

  /** @internal */
  static fromObject(obj: BpfObject, name: string, ptr: Ptr): BpfMap {
    const n = native();
    return new BpfMap({ kind: 'object', obj, ptr }, name, n.bpf_map__type(ptr), n.bpf_map__key_size(ptr),
      n.bpf_map__value_size(ptr), n.bpf_map__max_entries(ptr));
  }

  /** Opens a pinned map (bpf_obj_get) and reads its shape from the kernel. Call close() when done. */
  static fromPinned(path: string): BpfMap {
    const n = native();
    const fd = check(`opening pinned map ${path}`, () => n.bpf_obj_get(path), {
      [E.ENOENT]: 'nothing is pinned there',
      [E.EPERM]: 'are you root with CAP_BPF?',
    });
    try {
      // bpf_obj_get_info_by_fd fills whatever info matches the fd, so make
      // sure it is a map before reading a program's info as a map's.
      const fdinfo = readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
      if (!/^map_type:/m.test(fdinfo)) throw new Error(`${path} is pinned, but not a map (fdinfo: ${fdinfo.split('\n').slice(0, 6).join('; ')})`);
      const buf = Buffer.alloc(STRUCT_SIZES.bpf_map_info);
      const len = [buf.length];
      check(`reading info of pinned map ${path}`, () => n.bpf_obj_get_info_by_fd(fd, buf, len));
      const info = koffi.decode(buf, BpfMapInfo) as { type: number; key_size: number; value_size: number; max_entries: number; name: string };
      return new BpfMap({ kind: 'fd', fd, path }, info.name, info.type, info.key_size, info.value_size, info.max_entries);
    } catch (e) {
      closeSync(fd);
      throw e;
    }
  }

  private get label(): string {
    return this.src.kind === 'object' ? `map '${this.name}' of ${this.src.obj.path}` : `map '${this.name}' (${this.src.path})`;
  }

  get fd(): number {
    if (this.src.kind === 'fd') {
      if (this.fdClosed) throw new Error(`${this.label} is closed`);
      return this.src.fd;
    }
    this.src.obj.assertOpen(this.label);
    const fd = native().bpf_map__fd(this.src.ptr);
    if (fd < 0) throw new Error(`${this.label} has no fd yet: call load() on the object first`);
    return fd;
  }

  get isPerCpu(): boolean {
    return PERCPU_TYPES.has(this.type);
  }

  /** The size of a whole value as user space reads and writes it: per-CPU values are 8-aligned, one per possible CPU. */
  get fullValueSize(): number {
    return this.isPerCpu ? roundUp8(this.valueSize) * possibleCpus() : this.valueSize;
  }

  private checkKey(key: Buffer, what: string): void {
    // The kernel reads keySize bytes from the pointer whatever the Buffer's length.
    if (!Buffer.isBuffer(key) || key.length !== this.keySize) {
      throw new Error(`${what} of ${this.label}: key must be a Buffer of ${this.keySize} bytes, got ${Buffer.isBuffer(key) ? key.length : typeof key}`);
    }
  }

  /** A per-CPU map accepts one CPU's value (copied to every CPU) or the whole per-CPU array. */
  private fullValue(value: Buffer, what: string): Buffer {
    if (!Buffer.isBuffer(value)) throw new Error(`${what} of ${this.label}: value must be a Buffer`);
    if (value.length === this.fullValueSize) return value;
    if (this.isPerCpu && value.length === this.valueSize) {
      const stride = roundUp8(this.valueSize);
      const out = Buffer.alloc(this.fullValueSize);
      for (let off = 0; off < out.length; off += stride) value.copy(out, off);
      return out;
    }
    const want = this.isPerCpu
      ? `${this.valueSize} (one CPU's) or ${this.fullValueSize} (${possibleCpus()} CPUs x ${roundUp8(this.valueSize)})`
      : `${this.valueSize}`;
    throw new Error(`${what} of ${this.label}: value must be ${want} bytes, got ${value.length}`);
  }

  /** The value, or undefined if absent. PERCPU maps give every possible CPU's value, each padded to 8 bytes. */
  lookup(key: Buffer): Buffer | undefined {
    this.checkKey(key, 'lookup');
    const value = Buffer.alloc(this.fullValueSize);
    const rc = native().bpf_map_lookup_elem(this.fd, key, value);
    if (rc === -E.ENOENT) return undefined;
    if (rc < 0) throw new LibbpfError(`lookup in ${this.label}`, -rc, undefined);
    return value;
  }

  /** lookup() of a PERCPU map split into one Buffer of valueSize bytes per possible CPU. */
  lookupPerCpu(key: Buffer): Buffer[] | undefined {
    if (!this.isPerCpu) throw new Error(`lookupPerCpu of ${this.label}: map type ${this.type} is not per-CPU`);
    const all = this.lookup(key);
    if (!all) return undefined;
    const stride = roundUp8(this.valueSize);
    const out: Buffer[] = [];
    for (let off = 0; off < all.length; off += stride) out.push(all.subarray(off, off + this.valueSize));
    return out;
  }

  update(key: Buffer, value: Buffer, flags: 'any' | 'noexist' | 'exist' = 'any'): void {
    this.checkKey(key, 'update');
    const v = this.fullValue(value, 'update');
    const f = UPDATE_FLAGS[flags];
    if (f === undefined) throw new Error(`update of ${this.label}: flags must be 'any', 'noexist' or 'exist', got ${String(flags)}`);
    const rc = native().bpf_map_update_elem(this.fd, key, v, f);
    if (rc < 0) {
      throw new LibbpfError(`update (${flags}) of ${this.label}`, -rc, {
        [E.EEXIST]: ZEROED_NOT_DELETED.has(this.type)
          ? "array elements always exist: 'noexist' can never succeed"
          : `the key ${key.toString('hex')} is already present and flags were 'noexist'`,
        [E.ENOENT]: `the key ${key.toString('hex')} is absent and flags were 'exist'`,
        [E.E2BIG]: ZEROED_NOT_DELETED.has(this.type)
          ? `index out of range: the array has ${this.maxEntries} entries`
          : `the map is full (max_entries ${this.maxEntries})`,
      }[-rc]);
    }
  }

  /** true if the key was there, false if it was absent. */
  delete(key: Buffer): boolean {
    this.checkKey(key, 'delete');
    const rc = native().bpf_map_delete_elem(this.fd, key);
    if (rc === -E.ENOENT) return false;
    if (rc < 0) {
      throw new LibbpfError(`delete from ${this.label}`, -rc,
        ZEROED_NOT_DELETED.has(this.type) && rc === -E.EINVAL ? 'array elements cannot be deleted: write zeros (clear())' : undefined);
    }
    return true;
  }

  /** Every key, in the kernel's iteration order (bpf_map_get_next_key). */
  keys(): Buffer[] {
    const n = native();
    const fd = this.fd;
    const out: Buffer[] = [];
    const seen = new Set<string>();
    let prev: Buffer | null = null;
    // A hash map that changes under us restarts from its first bucket; the set
    // stops us from walking forever and from listing a key twice.
    for (;;) {
      const next = Buffer.alloc(this.keySize);
      const rc = n.bpf_map_get_next_key(fd, prev, next);
      if (rc === -E.ENOENT) break;
      if (rc < 0) throw new LibbpfError(`iterating keys of ${this.label}`, -rc, undefined);
      const hex = next.toString('hex');
      if (seen.has(hex)) break;
      seen.add(hex);
      out.push(next);
      prev = next;
    }
    return out;
  }

  /** Every [key, value]; a key deleted between listing and lookup is skipped. */
  entries(): Array<[Buffer, Buffer]> {
    const out: Array<[Buffer, Buffer]> = [];
    for (const k of this.keys()) {
      const v = this.lookup(k);
      if (v) out.push([k, v]);
    }
    return out;
  }

  /**
   * Every [key, value] through BPF_MAP_LOOKUP_BATCH, a few syscalls instead of
   * two per entry; falls back to entries() where the map type lacks batching.
   * The buffers are views of memory each call allocates for itself: the
   * caller's to keep or change, as copies would be.
   */
  lookupBatch(opts: { batchSize?: number } = {}): Array<[Buffer, Buffer]> {
    const n = native();
    const fd = this.fd;
    const full = this.fullValueSize;
    let size = Math.max(1, Math.min(opts.batchSize ?? 256, this.maxEntries || 1));
    // The batch cursor is a bucket index for hash maps and a key for arrays.
    const outBatch = Buffer.alloc(Math.max(this.keySize, 8));
    let inBatch: Buffer | null = null;
    const out: Array<[Buffer, Buffer]> = [];
    const bopts = { sz: STRUCT_SIZES.bpf_map_batch_opts, elem_flags: 0, flags: 0 };
    for (;;) {
      const keys = Buffer.alloc(this.keySize * size);
      const values = Buffer.alloc(full * size);
      const count = [size];
      const rc = n.bpf_map_lookup_batch(fd, inBatch, outBatch, keys, values, count, bopts);
      if (rc < 0 && rc !== -E.ENOENT) {
        if ((rc === -ENOTSUPP || rc === -E.EOPNOTSUPP) && inBatch === null) return this.entries();
        // One hash bucket holds more entries than fit in the batch.
        if (rc === -E.ENOSPC && count[0] === 0) {
          size *= 2;
          continue;
        }
        throw new LibbpfError(`batch lookup in ${this.label}`, -rc, undefined);
      }
      // Views of this batch's own buffers, which nothing else writes: a snapshot without a copy per entry.
      for (let i = 0; i < count[0]; i++) {
        out.push([keys.subarray(i * this.keySize, (i + 1) * this.keySize), values.subarray(i * full, (i + 1) * full)]);
      }
      // ENOENT is how the kernel says the last batch reached the end.
      if (rc === -E.ENOENT) return out;
      inBatch = Buffer.from(outBatch);
    }
  }

  /**
   * Deletes the keys through BPF_MAP_DELETE_BATCH (one loop per key where the
   * map type lacks it); returns how many were present and deleted.
   */
  deleteBatch(keys: Buffer[]): number {
    for (const k of keys) this.checkKey(k, 'batch delete');
    if (keys.length === 0) return 0;
    const n = native();
    const fd = this.fd;
    const all = Buffer.concat(keys);
    const bopts = { sz: STRUCT_SIZES.bpf_map_batch_opts, elem_flags: 0, flags: 0 };
    let deleted = 0;
    let at = 0;
    while (at < keys.length) {
      const count = [keys.length - at];
      const rc = n.bpf_map_delete_batch(fd, all.subarray(at * this.keySize), count, bopts);
      if (rc === 0) return deleted + count[0];
      if (rc === -ENOTSUPP || rc === -E.EOPNOTSUPP) {
        for (const k of keys.slice(at)) if (this.delete(k)) deleted++;
        return deleted;
      }
      // The kernel stops at the first absent key and reports how many it
      // deleted before it; skip that key and go on.
      if (rc === -E.ENOENT) {
        deleted += count[0];
        at += count[0] + 1;
        continue;
      }
      throw new LibbpfError(`batch delete from ${this.label}`, -rc, undefined);
    }
    return deleted;
  }

  /** Empties the map: deletes every key, or writes zeros into every element of an array. */
  clear(): void {
    if (ZEROED_NOT_DELETED.has(this.type)) {
      const zero = Buffer.alloc(this.fullValueSize);
      const key = Buffer.alloc(this.keySize);
      for (let i = 0; i < this.maxEntries; i++) {
        key.writeUInt32LE(i, 0);
        this.update(key, zero);
      }
      return;
    }
    this.deleteBatch(this.keys());
  }

  /**
   * Before load(): bpf_map__set_pin_path. load() then reuses the map pinned
   * at path, refusing one whose type, key/value size, max_entries or flags
   * differ, or creates the map and pins it there.
   */
  setPinPath(path: string): void {
    if (this.src.kind !== 'object') throw new Error(`setPinPath of ${this.label}: only maps of an object not yet loaded have a pin path`);
    this.src.obj.assertNotLoaded(`setting the pin path of ${this.label}`);
    const ptr = this.src.ptr;
    check(`setting the pin path of ${this.label} to ${path}`, () => native().bpf_map__set_pin_path(ptr, path));
  }

  /** Whether libbpf pinned this object map, or reused a pinned one, on load (or pin()). */
  get isPinned(): boolean {
    if (this.src.kind !== 'object') return true; // fromPinned: it was found pinned
    this.src.obj.assertOpen(this.label);
    return native().bpf_map__is_pinned(this.src.ptr);
  }

  /** Pins the map at path on a BPF file system (bpf_map__pin for object maps, bpf_obj_pin otherwise). */
  pin(path: string): void {
    const hints = {
      [E.EEXIST]: `something is already pinned at ${path}: unpin it first`,
      [E.ENOENT]: 'the parent directory does not exist on the BPF file system',
    };
    if (this.src.kind === 'object') {
      const ptr = this.src.ptr;
      void this.fd; // refuses before load or after close, with a clear message
      check(`pinning ${this.label} at ${path}`, () => native().bpf_map__pin(ptr, path), hints);
    } else {
      const fd = this.fd;
      check(`pinning ${this.label} at ${path}`, () => native().bpf_obj_pin(fd, path), hints);
    }
    this.lastPin = path;
  }

  /** Removes the pin at path (default: where pin() put it). The map lives on while fds or programs hold it. */
  unpin(path?: string): void {
    const p = path ?? this.lastPin;
    if (this.src.kind === 'object') {
      this.src.obj.assertOpen(this.label);
      const ptr = this.src.ptr;
      // NULL makes libbpf use the map's own pin path (setPinPath, pinRoot).
      check(`unpinning ${this.label}${p ? ` from ${p}` : ''}`, () => native().bpf_map__unpin(ptr, p ?? null), {
        [E.EINVAL]: 'the map has no pin path: pass the path',
      });
    } else {
      if (!p) throw new Error(`unpin of ${this.label}: no path given and pin() was not called`);
      try {
        unlinkSync(p);
      } catch (e) {
        throw new Error(`unpinning ${this.label} from ${p} failed: ${(e as Error).message}`);
      }
    }
    if (p === this.lastPin) this.lastPin = undefined;
  }

  /** Closes the fd of a map from fromPinned(); a map of an object is closed with its object. */
  close(): void {
    if (this.src.kind === 'fd' && !this.fdClosed) {
      closeSync(this.src.fd);
      this.fdClosed = true;
    }
  }
}

export interface TestRunResult {
  /** The program's return code (TC_ACT_*, XDP_*, ...). */
  retval: number;
  /** The packet after the program, data_size_out bytes long. */
  data: Buffer;
  /** The context after the program, when one was passed in. */
  ctx?: Buffer;
  /** Average run time per repetition, as measured by the kernel. */
  durationNs: number;
}

export class BpfProgram {
  /** @internal */
  constructor(private readonly obj: BpfObject, readonly name: string, private readonly ptr: Ptr) {}

  private get label(): string {
    return `program '${this.name}' of ${this.obj.path}`;
  }

  get fd(): number {
    this.obj.assertOpen(this.label);
    const fd = native().bpf_program__fd(this.ptr);
    if (fd < 0) throw new Error(`${this.label} has no fd: load the object first (and keep its autoload on)`);
    return fd;
  }

  /** The kernel's id of the loaded program, as tcQuery() reports it. */
  get id(): number {
    // bpf_prog_info starts with type and id; the kernel copies only as much
    // as we ask for, so 8 bytes spare us mirroring its 200-odd byte layout.
    const buf = Buffer.alloc(8);
    const fd = this.fd;
    check(`reading id of ${this.label}`, () => native().bpf_obj_get_info_by_fd(fd, buf, [buf.length]));
    return buf.readUInt32LE(4);
  }

  /**
   * BPF_PROG_TEST_RUN. data_out is sized data.length + 256 unless
   * dataSizeOut says otherwise, so programs may grow the packet; the returned
   * data is cut to the length the kernel reports.
   */
  testRun(opts: { data: Buffer; ctx?: Buffer; repeat?: number; dataSizeOut?: number }): TestRunResult {
    const fd = this.fd;
    const outSize = opts.dataSizeOut ?? opts.data.length + 256;
    const dataOut = Buffer.alloc(outSize);
    const ctxOut = opts.ctx ? Buffer.alloc(opts.ctx.length) : null;
    const o: Record<string, unknown> = {
      sz: STRUCT_SIZES.bpf_test_run_opts,
      data_in: opts.data, data_out: dataOut, data_size_in: opts.data.length, data_size_out: outSize,
      ctx_in: opts.ctx ?? null, ctx_out: ctxOut, ctx_size_in: opts.ctx?.length ?? 0, ctx_size_out: ctxOut?.length ?? 0,
      retval: 0, repeat: opts.repeat ?? 1, duration: 0, flags: 0, cpu: 0, batch_size: 0,
    };
    const rc = native().bpf_prog_test_run_opts(fd, o);
    if (rc < 0) {
      throw new LibbpfError(`test run of ${this.label}`, -rc, {
        [E.ENOSPC]: `the output is ${o.data_size_out} bytes, more than dataSizeOut (${outSize})`,
        [E.EINVAL]: `for skb programs the packet must hold at least an Ethernet header (14 bytes) and the ctx at most ${SK_BUFF_SIZE} bytes with only mark, priority, ingress_ifindex, ifindex, cb, tstamp, wire_len, gso_segs, gso_size, hwtstamp set`,
        [E.ENODEV]: 'ctx.ifindex names no interface in this network namespace (use 1, lo, or 0)',
      }[-rc]);
    }
    const result: TestRunResult = {
      // A TC verdict is an int: TC_ACT_UNSPEC comes back as -1, not 2^32 - 1.
      retval: (o.retval as number) | 0,
      data: dataOut.subarray(0, Math.min(o.data_size_out as number, outSize)),
      durationNs: o.duration as number,
    };
    if (ctxOut) result.ctx = ctxOut.subarray(0, Math.min(o.ctx_size_out as number, ctxOut.length));
    return result;
  }

  /** Pins the program at path on a BPF file system. */
  pin(path: string): void {
    const fd = this.fd;
    check(`pinning ${this.label} at ${path}`, () => native().bpf_obj_pin(fd, path), {
      [E.EEXIST]: `something is already pinned at ${path}: unpin it first`,
    });
  }

  unpin(path: string): void {
    try {
      unlinkSync(path);
    } catch (e) {
      throw new Error(`unpinning ${this.label} from ${path} failed: ${(e as Error).message}`);
    }
  }
}

function roundUp8(n: number): number {
  return (n + 7) & ~7;
}

// ---------------------------------------------------------------------------
// struct __sk_buff for BPF_PROG_TEST_RUN
// ---------------------------------------------------------------------------

/** sizeof(struct __sk_buff) in /usr/include/linux/bpf.h (and in the objects' BTF). */
export const SK_BUFF_SIZE = 192;
/** uapi offsets of the __sk_buff fields skbCtx() writes. */
export const SK_BUFF_OFFSETS = { mark: 8, priority: 32, ingress_ifindex: 36, ifindex: 40, cb: 48 } as const;

export interface SkbFields {
  ifindex?: number;
  ingressIfindex?: number;
  mark?: number;
  priority?: number;
}

/**
 * A zeroed __sk_buff with a few fields set, for testRun's ctx. The kernel
 * refuses (EINVAL) a ctx with anything but mark, priority, ingress_ifindex,
 * ifindex, cb[], tstamp, wire_len, gso_segs, gso_size or hwtstamp non-zero,
 * and an ifindex above 1 must exist in the caller's network namespace (ENODEV).
 */
export function skbCtx(f: SkbFields = {}): Buffer {
  const b = Buffer.alloc(SK_BUFF_SIZE);
  b.writeUInt32LE(f.mark ?? 0, SK_BUFF_OFFSETS.mark);
  b.writeUInt32LE(f.priority ?? 0, SK_BUFF_OFFSETS.priority);
  b.writeUInt32LE(f.ingressIfindex ?? 0, SK_BUFF_OFFSETS.ingress_ifindex);
  b.writeUInt32LE(f.ifindex ?? 0, SK_BUFF_OFFSETS.ifindex);
  return b;
}

/** The fields skbCtx() writes, read back from a testRun ctx. */
export function readSkbCtx(b: Buffer): Required<SkbFields> {
  return {
    mark: b.readUInt32LE(SK_BUFF_OFFSETS.mark),
    priority: b.readUInt32LE(SK_BUFF_OFFSETS.priority),
    ingressIfindex: b.readUInt32LE(SK_BUFF_OFFSETS.ingress_ifindex),
    ifindex: b.readUInt32LE(SK_BUFF_OFFSETS.ifindex),
  };
}

// ---------------------------------------------------------------------------
// TC (clsact) attachment
// ---------------------------------------------------------------------------

export type TcHookPoint = 'ingress' | 'egress';
const TC_POINT = { ingress: 1, egress: 2 } as const; // BPF_TC_INGRESS, BPF_TC_EGRESS
const BPF_TC_F_REPLACE = 1;

function tcHook(ifindex: number, where: TcHookPoint, what: string): Record<string, number> {
  if (!Number.isInteger(ifindex) || ifindex <= 0) throw new Error(`${what}: ifindex must be a positive integer, got ${ifindex}`);
  const point = TC_POINT[where];
  if (!point) throw new Error(`${what}: where must be 'ingress' or 'egress', got ${String(where)}`);
  return { sz: STRUCT_SIZES.bpf_tc_hook, ifindex, attach_point: point, parent: 0 };
}

const TC_HINTS = {
  [E.EPERM]: 'are you root with CAP_NET_ADMIN and CAP_BPF?',
  [E.ENODEV]: 'no such interface in this network namespace',
  [E.EINVAL]: 'invalid hook or filter (is the program a SEC("tc") program?)',
};

/**
 * Attaches prog as a direct-action filter on the clsact qdisc of ifindex,
 * creating the qdisc if needed. Handle and priority default to 1; returns
 * what the kernel used, which tcDetach needs.
 */
export function tcAttach(ifindex: number, where: TcHookPoint, prog: BpfProgram,
  opts: { handle?: number; priority?: number; replace?: boolean } = {}): { handle: number; priority: number; progId: number } {
  const what = `tc attach of ${prog.name} to ifindex ${ifindex} ${where}`;
  const hook = tcHook(ifindex, where, what);
  const n = native();
  // One clsact qdisc serves both directions, so it exists already when the
  // other direction (or another program, or tc(8)) attached first: EEXIST
  // means the hook we need is there, not that something went wrong. (A plain
  // `ingress` qdisc in its place also gives EEXIST; then the attach below fails.)
  const { result: rc, log } = withLibbpfLog(() => n.bpf_tc_hook_create(hook));
  if (rc < 0 && rc !== -E.EEXIST) throw new LibbpfError(`creating the clsact qdisc for ${what}`, -rc, TC_HINTS[-rc], log);
  const o: Record<string, unknown> = {
    sz: STRUCT_SIZES.bpf_tc_opts, prog_fd: prog.fd, flags: opts.replace ? BPF_TC_F_REPLACE : 0, prog_id: 0,
    handle: opts.handle ?? 1, priority: opts.priority ?? 1,
  };
  check(what, () => n.bpf_tc_attach(hook, o), {
    ...TC_HINTS,
    [E.EEXIST]: `a filter already sits at handle ${o.handle} priority ${o.priority}: detach it or pass replace: true`,
  });
  return { handle: o.handle as number, priority: o.priority as number, progId: o.prog_id as number };
}

/** Removes the filter at handle/priority. */
export function tcDetach(ifindex: number, where: TcHookPoint, handle: number, priority: number): void {
  const what = `tc detach from ifindex ${ifindex} ${where} (handle ${handle}, priority ${priority})`;
  const hook = tcHook(ifindex, where, what);
  const o = { sz: STRUCT_SIZES.bpf_tc_opts, prog_fd: 0, flags: 0, prog_id: 0, handle, priority };
  check(what, () => native().bpf_tc_detach(hook, o), { ...TC_HINTS, [E.ENOENT]: 'no filter there (or no clsact qdisc)' });
}

/** The id of the program attached at handle/priority, or undefined if none is. */
export function tcQuery(ifindex: number, where: TcHookPoint, handle: number, priority: number): number | undefined {
  const what = `tc query of ifindex ${ifindex} ${where} (handle ${handle}, priority ${priority})`;
  const hook = tcHook(ifindex, where, what);
  const o: Record<string, unknown> = { sz: STRUCT_SIZES.bpf_tc_opts, prog_fd: 0, flags: 0, prog_id: 0, handle, priority };
  const { result: rc, log } = withLibbpfLog(() => native().bpf_tc_query(hook, o));
  // ENOENT: no filter there; EINVAL: no clsact qdisc at all on this device.
  if (rc === -E.ENOENT || rc === -E.EINVAL) return undefined;
  if (rc < 0) throw new LibbpfError(what, -rc, TC_HINTS[-rc], log);
  return o.prog_id as number;
}

/** Deletes the clsact qdisc of ifindex and with it every filter of both directions. */
export function tcDestroyHook(ifindex: number): void {
  const hook = tcHook(ifindex, 'ingress', `tc hook destroy on ifindex ${ifindex}`);
  hook.attach_point = TC_POINT.ingress | TC_POINT.egress;
  check(`destroying the clsact qdisc of ifindex ${ifindex}`, () => native().bpf_tc_hook_destroy(hook), {
    ...TC_HINTS, [E.ENOENT]: 'there is no clsact qdisc on this device',
  });
}

// ---------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------

const CLONE_NEWNET = 0x40000000;

/**
 * Runs fn with the calling thread in the network namespace at nsPath (e.g.
 * /run/netns/NAME), then moves it back. libbpf's netlink sockets and
 * test_run's ifindex lookups follow the thread's namespace. fn must be
 * synchronous: across an await other code would run in the wrong namespace.
 */
export function withNetns<T>(nsPath: string, fn: () => T): T {
  const n = native();
  // thread-self, not self: setns moves one thread, and this may be a worker.
  const home = openSync('/proc/thread-self/ns/net', 'r');
  let target: number | undefined;
  try {
    target = openSync(nsPath, 'r');
    if (n.setns(target, CLONE_NEWNET) !== 0) {
      throw new LibbpfError(`entering network namespace ${nsPath}`, koffi.errno(), 'is it a netns file, and are you root?');
    }
    try {
      const r = fn();
      if (r && typeof (r as { then?: unknown }).then === 'function') {
        throw new Error('withNetns: fn returned a promise; it must be synchronous');
      }
      return r;
    } finally {
      if (n.setns(home, CLONE_NEWNET) !== 0) {
        // Staying in the wrong namespace would silently send every later
        // netlink call and socket there; better to stop the process.
        const err = errnoName(koffi.errno());
        process.stderr.write(`fatal: cannot return to the original network namespace (${err})\n`);
        process.abort();
      }
    }
  } finally {
    if (target !== undefined) closeSync(target);
    closeSync(home);
  }
}
