/**
 * The FFI layer: libbpf.so.1 (written against 1.1.2) and two libc calls bound
 * through koffi, the libbpf structs they take, and libbpf's log.
 *
 * Only x86-64 Linux is supported: the va_list trick in the print callback and
 * the struct layouts below are checked for that ABI only.
 */
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
  bpf_prog_query_opts: 40,
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

export const BpfMapInfo = koffi.struct('xmasq_bpf_map_info', {
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

// Only sz and flags of bpf_link_create_opts: libbpf 1.1 passes flags to the
// kernel for any attach type and wants the rest zero for tcx, which it does
// not know. 16 bytes: sz, flags, padding; what libbpf does not read is zero.
const BpfLinkCreateOpts = koffi.struct('xmasq_bpf_link_create_opts', {
  sz: 'size_t',
  flags: 'uint32_t',
  pad: 'uint32_t',
});

const BpfProgQueryOpts = koffi.struct('xmasq_bpf_prog_query_opts', {
  sz: 'size_t',
  query_flags: 'uint32_t',
  attach_flags: 'uint32_t',
  prog_ids: 'void *',
  prog_cnt: 'uint32_t',
  prog_attach_flags: 'void *',
});

const KOFFI_STRUCTS = {
  bpf_object_open_opts: BpfObjectOpenOpts,
  bpf_test_run_opts: BpfTestRunOpts,
  bpf_map_batch_opts: BpfMapBatchOpts,
  bpf_tc_hook: BpfTcHook,
  bpf_tc_opts: BpfTcOpts,
  bpf_map_info: BpfMapInfo,
  bpf_prog_query_opts: BpfProgQueryOpts,
} as const;

/** Ours is the prefix of libbpf's struct up to flags (what libbpf reads for tcx), not the whole struct. */
export const LINK_CREATE_OPTS_SIZE = koffi.sizeof(BpfLinkCreateOpts);

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

export type Ptr = bigint; // koffi 3 hands pointers around as BigInt, NULL as null

interface Native {
  bpf_object__open_file(path: string, opts: object): Ptr | null;
  bpf_object__load(obj: Ptr): number;
  bpf_object__close(obj: Ptr): void;
  bpf_object__next_program(obj: Ptr, prev: Ptr | null): Ptr | null;
  bpf_object__next_map(obj: Ptr, prev: Ptr | null): Ptr | null;
  bpf_program__name(prog: Ptr): string;
  bpf_program__section_name(prog: Ptr): string;
  bpf_program__fd(prog: Ptr): number;
  bpf_program__set_autoload(prog: Ptr, on: boolean): number;
  bpf_map__name(map: Ptr): string;
  bpf_map__fd(map: Ptr): number;
  bpf_map__type(map: Ptr): number;
  bpf_map__key_size(map: Ptr): number;
  bpf_map__value_size(map: Ptr): number;
  bpf_map__max_entries(map: Ptr): number;
  bpf_map__map_flags(map: Ptr): number;
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
  bpf_map_update_batch(fd: number, keys: Buffer, values: Buffer, count: number[], opts: object): number;
  bpf_obj_get(path: string): number;
  bpf_obj_pin(fd: number, path: string): number;
  bpf_obj_get_info_by_fd(fd: number, info: Buffer, len: number[]): number;
  bpf_prog_test_run_opts(fd: number, opts: Record<string, unknown>): number;
  bpf_tc_hook_create(hook: object): number;
  bpf_tc_hook_destroy(hook: object): number;
  bpf_tc_attach(hook: object, opts: Record<string, unknown>): number;
  bpf_tc_detach(hook: object, opts: object): number;
  bpf_tc_query(hook: object, opts: Record<string, unknown>): number;
  bpf_link_create(progFd: number, target: number, attachType: number, opts: object): number;
  bpf_link_update(linkFd: number, progFd: number, opts: null): number;
  bpf_link_detach(linkFd: number): number;
  bpf_prog_query_opts(target: number, attachType: number, opts: Record<string, unknown>): number;
  libbpf_num_possible_cpus(): number;
  libbpf_strerror(err: number, buf: Buffer, size: number): number;
  vsnprintf(buf: Buffer | null, n: number, fmt: Ptr, ap: Ptr | Buffer): number;
  setns(fd: number, nstype: number): number;
}

let nativeCache: Native | undefined;

export function native(): Native {
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
    bpf_program__section_name: lib.func('const char *bpf_program__section_name(void *prog)'),
    bpf_program__fd: lib.func('int bpf_program__fd(void *prog)'),
    bpf_program__set_autoload: lib.func('int bpf_program__set_autoload(void *prog, bool autoload)'),
    bpf_map__name: lib.func('const char *bpf_map__name(void *map)'),
    bpf_map__fd: lib.func('int bpf_map__fd(void *map)'),
    bpf_map__type: lib.func('int bpf_map__type(void *map)'),
    bpf_map__key_size: lib.func('uint32_t bpf_map__key_size(void *map)'),
    bpf_map__value_size: lib.func('uint32_t bpf_map__value_size(void *map)'),
    bpf_map__max_entries: lib.func('uint32_t bpf_map__max_entries(void *map)'),
    bpf_map__map_flags: lib.func('uint32_t bpf_map__map_flags(void *map)'),
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
    bpf_map_update_batch: lib.func('int bpf_map_update_batch(int fd, void *keys, void *values, _Inout_ uint32_t *count, const xmasq_bpf_map_batch_opts *opts)'),
    bpf_obj_get: lib.func('int bpf_obj_get(const char *path)'),
    bpf_obj_pin: lib.func('int bpf_obj_pin(int fd, const char *path)'),
    bpf_obj_get_info_by_fd: lib.func('int bpf_obj_get_info_by_fd(int fd, void *info, _Inout_ uint32_t *info_len)'),
    bpf_prog_test_run_opts: lib.func('int bpf_prog_test_run_opts(int fd, _Inout_ xmasq_bpf_test_run_opts *opts)'),
    bpf_tc_hook_create: lib.func('int bpf_tc_hook_create(xmasq_bpf_tc_hook *hook)'),
    bpf_tc_hook_destroy: lib.func('int bpf_tc_hook_destroy(xmasq_bpf_tc_hook *hook)'),
    bpf_tc_attach: lib.func('int bpf_tc_attach(const xmasq_bpf_tc_hook *hook, _Inout_ xmasq_bpf_tc_opts *opts)'),
    bpf_tc_detach: lib.func('int bpf_tc_detach(const xmasq_bpf_tc_hook *hook, const xmasq_bpf_tc_opts *opts)'),
    bpf_tc_query: lib.func('int bpf_tc_query(const xmasq_bpf_tc_hook *hook, _Inout_ xmasq_bpf_tc_opts *opts)'),
    bpf_link_create: lib.func('int bpf_link_create(int prog_fd, int target_fd, uint32_t attach_type, const xmasq_bpf_link_create_opts *opts)'),
    bpf_link_update: lib.func('int bpf_link_update(int link_fd, int new_prog_fd, const void *opts)'),
    bpf_link_detach: lib.func('int bpf_link_detach(int link_fd)'),
    bpf_prog_query_opts: lib.func('int bpf_prog_query_opts(int target, uint32_t type, _Inout_ xmasq_bpf_prog_query_opts *opts)'),
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

export function withLibbpfLog<T>(fn: () => T): { result: T; log: string } {
  recent = [];
  recentBytes = 0;
  const result = fn();
  const log = recent.join('');
  recent = [];
  recentBytes = 0;
  return { result, log };
}
