/**
 * libbpf through koffi: objects, programs, maps and BPF_PROG_TEST_RUN.
 * libbpf 1.x returns -errno from its low-level calls and NULL (with errno
 * set) from the ones that return pointers; both become Errors that name the
 * operation, the object and the errno.
 */
import koffi from 'koffi';

const lib = koffi.load('libbpf.so.1');
const libc = koffi.load('libc.so.6');

const TestRunOpts = koffi.struct('xmasq_bpf_test_run_opts', {
  sz: 'size_t',
  data_in: 'void *',
  data_out: 'void *',
  data_size_in: 'uint32',
  data_size_out: 'uint32',
  ctx_in: 'void *',
  ctx_out: 'void *',
  ctx_size_in: 'uint32',
  ctx_size_out: 'uint32',
  retval: 'uint32',
  repeat: 'int',
  duration: 'uint32',
  flags: 'uint32',
  cpu: 'uint32',
  batch_size: 'uint32',
});

const fn = {
  errno: libc.func('int *__errno_location()'),
  objectOpenFile: lib.func('void *bpf_object__open_file(const char *path, void *opts)'),
  objectLoad: lib.func('int bpf_object__load(void *obj)'),
  objectClose: lib.func('void bpf_object__close(void *obj)'),
  findProgram: lib.func('void *bpf_object__find_program_by_name(void *obj, const char *name)'),
  programFd: lib.func('int bpf_program__fd(void *prog)'),
  programName: lib.func('const char *bpf_program__name(void *prog)'),
  nextProgram: lib.func('void *bpf_object__next_program(void *obj, void *prog)'),
  findMap: lib.func('void *bpf_object__find_map_by_name(void *obj, const char *name)'),
  nextMap: lib.func('void *bpf_object__next_map(void *obj, void *map)'),
  mapName: lib.func('const char *bpf_map__name(void *map)'),
  mapFd: lib.func('int bpf_map__fd(void *map)'),
  mapType: lib.func('int bpf_map__type(void *map)'),
  mapKeySize: lib.func('uint32 bpf_map__key_size(void *map)'),
  mapValueSize: lib.func('uint32 bpf_map__value_size(void *map)'),
  mapMaxEntries: lib.func('uint32 bpf_map__max_entries(void *map)'),
  lookup: lib.func('int bpf_map_lookup_elem(int fd, void *key, void *value)'),
  update: lib.func('int bpf_map_update_elem(int fd, void *key, void *value, uint64 flags)'),
  delete: lib.func('int bpf_map_delete_elem(int fd, void *key)'),
  nextKey: lib.func('int bpf_map_get_next_key(int fd, void *key, void *next_key)'),
  testRun: lib.func('int bpf_prog_test_run_opts(int fd, _Inout_ xmasq_bpf_test_run_opts *opts)'),
  numCpus: lib.func('int libbpf_num_possible_cpus()'),
};

const ERRNO: Record<number, string> = {
  1: 'EPERM', 2: 'ENOENT', 7: 'E2BIG', 9: 'EBADF', 12: 'ENOMEM', 13: 'EACCES', 14: 'EFAULT',
  16: 'EBUSY', 17: 'EEXIST', 22: 'EINVAL', 28: 'ENOSPC', 95: 'EOPNOTSUPP', 524: 'ENOTSUPP',
};
const HINT: Record<number, string> = {
  1: 'are you root with CAP_BPF and CAP_NET_ADMIN?',
  13: 'the verifier rejected it; its log is above on stderr',
};

export function errnoName(e: number): string {
  return ERRNO[e] ?? `errno ${e}`;
}

function fail(what: string, rc: number): never {
  const e = -rc;
  throw new Error(`${what} failed: ${errnoName(e)}${HINT[e] ? ` (${HINT[e]})` : ''}`);
}

function lastErrno(): number {
  return koffi.decode(fn.errno(), 'int') as number;
}

// BPF map types with one value per possible CPU (libbpf's enum bpf_map_type).
const PERCPU_TYPES = new Set([5 /* PERCPU_HASH */, 6 /* PERCPU_ARRAY */, 10 /* LRU_PERCPU_HASH */]);
const ARRAY_TYPES = new Set([2 /* ARRAY */, 6 /* PERCPU_ARRAY */]);

let cpus: number | undefined;
export function possibleCpus(): number {
  if (cpus === undefined) {
    const n = fn.numCpus() as number;
    if (n <= 0) fail('libbpf_num_possible_cpus', n);
    cpus = n;
  }
  return cpus;
}

export type UpdateFlag = 'any' | 'noexist' | 'exist';
const FLAG = { any: 0, noexist: 1, exist: 2 } as const;

export class BpfMap {
  readonly isPercpu: boolean;
  readonly isArray: boolean;
  /** Bytes lookup returns: per-CPU maps give every CPU's value, each padded to 8 bytes. */
  readonly lookupSize: number;

  constructor(
    readonly name: string,
    readonly fd: number,
    readonly type: number,
    readonly keySize: number,
    readonly valueSize: number,
    readonly maxEntries: number,
  ) {
    this.isPercpu = PERCPU_TYPES.has(type);
    this.isArray = ARRAY_TYPES.has(type);
    this.lookupSize = this.isPercpu ? Math.ceil(valueSize / 8) * 8 * possibleCpus() : valueSize;
  }

  private checkKey(key: Buffer): void {
    if (key.length !== this.keySize) throw new Error(`map ${this.name}: key is ${key.length} bytes, the map wants ${this.keySize}`);
  }

  lookup(key: Buffer): Buffer | undefined {
    this.checkKey(key);
    const out = Buffer.alloc(this.lookupSize);
    const rc = fn.lookup(this.fd, key, out) as number;
    if (rc === -2) return undefined;
    if (rc < 0) fail(`lookup in map ${this.name}`, rc);
    return out;
  }

  update(key: Buffer, value: Buffer, flag: UpdateFlag = 'any'): void {
    this.checkKey(key);
    const want = this.isPercpu ? this.lookupSize : this.valueSize;
    if (value.length !== want && !(this.isPercpu && value.length === this.valueSize)) {
      throw new Error(`map ${this.name}: value is ${value.length} bytes, the map wants ${want}`);
    }
    let v = value;
    if (this.isPercpu && value.length === this.valueSize) {
      // One value for every CPU.
      const stride = Math.ceil(this.valueSize / 8) * 8;
      v = Buffer.alloc(this.lookupSize);
      for (let off = 0; off < v.length; off += stride) value.copy(v, off);
    }
    const rc = fn.update(this.fd, key, v, FLAG[flag]) as number;
    if (rc < 0) fail(`update of map ${this.name} (${flag})`, rc);
  }

  /** false when the key was not there. */
  delete(key: Buffer): boolean {
    this.checkKey(key);
    const rc = fn.delete(this.fd, key) as number;
    if (rc === -2) return false;
    if (rc < 0) fail(`delete from map ${this.name}`, rc);
    return true;
  }

  keys(): Buffer[] {
    const out: Buffer[] = [];
    let prev: Buffer | null = null;
    for (;;) {
      const next = Buffer.alloc(this.keySize);
      const rc = fn.nextKey(this.fd, prev, next) as number;
      if (rc === -2) return out;
      if (rc < 0) fail(`iteration of map ${this.name}`, rc);
      out.push(next);
      prev = next;
    }
  }

  entries(): Array<[Buffer, Buffer]> {
    const out: Array<[Buffer, Buffer]> = [];
    for (const k of this.keys()) {
      const v = this.lookup(k);
      // A key deleted between get_next_key and lookup is simply gone.
      if (v) out.push([k, v]);
    }
    return out;
  }

  /** Deletes every key; array maps, whose keys cannot be deleted, are zeroed. */
  clear(): void {
    if (this.isArray) {
      const zero = Buffer.alloc(this.isPercpu ? this.lookupSize : this.valueSize);
      for (let i = 0; i < this.maxEntries; i++) {
        const k = Buffer.alloc(4);
        k.writeUInt32LE(i);
        this.update(k, zero);
      }
      return;
    }
    for (const k of this.keys()) this.delete(k);
  }
}

export interface TestRunResult {
  retval: number;
  data: Buffer;
  ctx?: Buffer;
  durationNs: number;
}

export class BpfProgram {
  constructor(readonly name: string, readonly fd: number) {}

  /** BPF_PROG_TEST_RUN: runs the program repeat times on data (the first run's input). */
  testRun(opts: { data: Buffer; ctx?: Buffer; repeat?: number; dataSizeOut?: number }): TestRunResult {
    const out = Buffer.alloc(opts.dataSizeOut ?? opts.data.length + 256);
    const ctxOut = opts.ctx ? Buffer.alloc(opts.ctx.length) : null;
    const o = {
      sz: koffi.sizeof(TestRunOpts),
      data_in: opts.data, data_out: out, data_size_in: opts.data.length, data_size_out: out.length,
      ctx_in: opts.ctx ?? null, ctx_out: ctxOut, ctx_size_in: opts.ctx?.length ?? 0, ctx_size_out: ctxOut?.length ?? 0,
      retval: 0, repeat: opts.repeat ?? 1, duration: 0, flags: 0, cpu: 0, batch_size: 0,
    };
    const rc = fn.testRun(this.fd, o) as number;
    if (rc < 0) fail(`test run of program ${this.name}`, rc);
    return {
      retval: o.retval,
      data: out.subarray(0, o.data_size_out),
      ctx: ctxOut ? ctxOut.subarray(0, o.ctx_size_out) : undefined,
      durationNs: o.duration,
    };
  }
}

export class BpfObject {
  private ptr: unknown;

  private constructor(readonly path: string, ptr: unknown) {
    this.ptr = ptr;
  }

  static open(path: string): BpfObject {
    const p = fn.objectOpenFile(path, null);
    if (!p) throw new Error(`open of ${path} failed: ${errnoName(lastErrno())} (is it a BPF object built by 'make -C bpf'?)`);
    return new BpfObject(path, p);
  }

  private get handle(): unknown {
    if (!this.ptr) throw new Error(`${this.path} is closed`);
    return this.ptr;
  }

  load(): void {
    const rc = fn.objectLoad(this.handle) as number;
    if (rc < 0) fail(`load of ${this.path}`, rc);
  }

  programs(): string[] {
    const out: string[] = [];
    for (let p = fn.nextProgram(this.handle, null); p; p = fn.nextProgram(this.handle, p)) out.push(fn.programName(p) as string);
    return out;
  }

  maps(): string[] {
    const out: string[] = [];
    for (let m = fn.nextMap(this.handle, null); m; m = fn.nextMap(this.handle, m)) out.push(fn.mapName(m) as string);
    return out;
  }

  program(name: string): BpfProgram {
    const p = fn.findProgram(this.handle, name);
    if (!p) throw new Error(`${this.path} has no program "${name}"; it has: ${this.programs().join(', ')}`);
    const fd = fn.programFd(p) as number;
    if (fd < 0) throw new Error(`program "${name}" of ${this.path} is not loaded; call load() first`);
    return new BpfProgram(name, fd);
  }

  map(name: string): BpfMap {
    const m = fn.findMap(this.handle, name);
    if (!m) throw new Error(`${this.path} has no map "${name}"; it has: ${this.maps().join(', ')}`);
    const fd = fn.mapFd(m) as number;
    if (fd < 0) throw new Error(`map "${name}" of ${this.path} is not created; call load() first`);
    return new BpfMap(name, fd, fn.mapType(m) as number, fn.mapKeySize(m) as number, fn.mapValueSize(m) as number, fn.mapMaxEntries(m) as number);
  }

  close(): void {
    if (this.ptr) fn.objectClose(this.ptr);
    this.ptr = undefined;
  }
}

/** sizeof(struct __sk_buff) in the uapi this project is built against. */
export const SK_BUFF_SIZE = 192;
// Offsets in struct __sk_buff (linux/bpf.h) of the fields BPF_PROG_TEST_RUN lets a caller set.
const SKB_MARK = 8;
const SKB_INGRESS_IFINDEX = 36;
const SKB_IFINDEX = 40;

/** A __sk_buff context for test runs; test_run refuses other non-zero fields. */
export function skbCtx(f: { ifindex?: number; ingressIfindex?: number; mark?: number } = {}): Buffer {
  const b = Buffer.alloc(SK_BUFF_SIZE);
  b.writeUInt32LE(f.mark ?? 0, SKB_MARK);
  b.writeUInt32LE(f.ingressIfindex ?? 0, SKB_INGRESS_IFINDEX);
  b.writeUInt32LE(f.ifindex ?? 0, SKB_IFINDEX);
  return b;
}

