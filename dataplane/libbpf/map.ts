/** Maps of a loaded object or opened from their pins: lookups, updates, batches, pins. */
import { closeSync, readFileSync, unlinkSync } from 'node:fs';
import koffi from 'koffi';
import { E, ENOTSUPP, LibbpfError, check } from './errors.ts';
import { BpfMapInfo, native, STRUCT_SIZES, type Ptr } from './native.ts';
import type { MapOps, MapSnapshot } from '../map-ops.ts';
import type { BpfObject } from './object.ts';

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

export class BpfMap implements MapOps {
  private fdClosed = false;
  private lastPin: string | undefined;
  /** readAll()'s buffers, kept for the next call: a scan of a full cache allocates nothing. */
  private snapshotBuffers: { keys: Buffer; values: Buffer; capacity: number } | undefined;

  private constructor(
    private readonly src: MapSource | FdSource,
    readonly name: string,
    readonly type: number,
    readonly keySize: number,
    /** The size of one value (one CPU's value for PERCPU maps), as declared. */
    readonly valueSize: number,
    readonly maxEntries: number,
    /** BPF_F_* flags the map was created with (an object's map: as declared). */
    readonly mapFlags: number,
  ) {}

  /** @internal */
  static fromObject(obj: BpfObject, name: string, ptr: Ptr): BpfMap {
    const n = native();
    return new BpfMap({ kind: 'object', obj, ptr }, name, n.bpf_map__type(ptr), n.bpf_map__key_size(ptr),
      n.bpf_map__value_size(ptr), n.bpf_map__max_entries(ptr), n.bpf_map__map_flags(ptr));
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
      const info = koffi.decode(buf, BpfMapInfo) as { type: number; key_size: number; value_size: number; max_entries: number; map_flags: number; name: string };
      return new BpfMap({ kind: 'fd', fd, path }, info.name, info.type, info.key_size, info.value_size, info.max_entries, info.map_flags);
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

  /**
   * lookup() into the caller's buffer (fullValueSize bytes): true if the key
   * was there. For loops that re-read many entries without a Buffer each.
   */
  lookupInto(key: Buffer, value: Buffer): boolean {
    this.checkKey(key, 'lookup');
    if (!Buffer.isBuffer(value) || value.length < this.fullValueSize) throw new Error(`lookup of ${this.label}: the value buffer must hold ${this.fullValueSize} bytes`);
    const rc = native().bpf_map_lookup_elem(this.fd, key, value);
    if (rc === -E.ENOENT) return false;
    if (rc < 0) throw new LibbpfError(`lookup in ${this.label}`, -rc, undefined);
    return true;
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

  /**
   * The first count keys and values packed one after another in keys and
   * values (BPF_MAP_UPDATE_BATCH, flags 'any'): one syscall for what would be
   * count updates.
   */
  updateBatch(keys: Buffer, values: Buffer, count: number): void {
    if (keys.length < count * this.keySize || values.length < count * this.fullValueSize) {
      throw new Error(`update batch of ${this.label}: ${count} entries need ${count * this.keySize} key and ${count * this.fullValueSize} value bytes, got ${keys.length} and ${values.length}`);
    }
    const n = [count];
    const rc = native().bpf_map_update_batch(this.fd, keys, values, n, { sz: STRUCT_SIZES.bpf_map_batch_opts, elem_flags: 0, flags: 0 });
    if (rc < 0) throw new LibbpfError(`update batch of ${this.label} (${n[0]} of ${count} written)`, -rc, undefined);
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
   * Every entry through BPF_MAP_LOOKUP_BATCH, into two buffers the map keeps
   * and reuses: one syscall for a hash map that fits them (max_entries at
   * first), and no object per entry. The snapshot is valid until the next
   * readAll() of this map object: read it, copy what must outlive that.
   */
  readAll(): MapSnapshot {
    const n = native();
    const fd = this.fd;
    const ks = this.keySize, vs = this.fullValueSize;
    let buf = this.snapshotBuffers;
    if (!buf) {
      const capacity = Math.max(1, this.maxEntries);
      buf = { keys: Buffer.alloc(ks * capacity), values: Buffer.alloc(vs * capacity), capacity };
    }
    // Entries deleted and added while we read can make more than max_entries.
    const grow = (b: NonNullable<typeof buf>) => {
      const capacity = b.capacity * 2;
      const keys = Buffer.alloc(ks * capacity), values = Buffer.alloc(vs * capacity);
      b.keys.copy(keys);
      b.values.copy(values);
      return { keys, values, capacity };
    };
    // The batch cursor is a bucket index for hash maps and a key for arrays.
    const outBatch = Buffer.alloc(Math.max(ks, 8));
    const inBatch = Buffer.alloc(outBatch.length);
    let started = false;
    let count = 0;
    const bopts = { sz: STRUCT_SIZES.bpf_map_batch_opts, elem_flags: 0, flags: 0 };
    for (;;) {
      if (count === buf.capacity) buf = grow(buf);
      const got = [buf.capacity - count];
      const rc = n.bpf_map_lookup_batch(fd, started ? inBatch : null, outBatch, buf.keys.subarray(count * ks), buf.values.subarray(count * vs), got, bopts);
      if (rc < 0 && rc !== -E.ENOENT) {
        if ((rc === -ENOTSUPP || rc === -E.EOPNOTSUPP) && !started) {
          const all = this.entries();
          while (buf.capacity < all.length) buf = grow(buf);
          all.forEach(([k, v], i) => { k.copy(buf!.keys, i * ks); v.copy(buf!.values, i * vs); });
          count = all.length;
          break;
        }
        // One hash bucket holds more entries than the space left.
        if (rc === -E.ENOSPC && got[0] === 0) {
          buf = grow(buf);
          continue;
        }
        throw new LibbpfError(`batch lookup in ${this.label}`, -rc, undefined);
      }
      count += got[0];
      // ENOENT is how the kernel says the last batch reached the end.
      if (rc === -E.ENOENT) break;
      outBatch.copy(inBatch);
      started = true;
    }
    this.snapshotBuffers = buf;
    return { count, keys: buf.keys, values: buf.values, keySize: ks, valueSize: vs };
  }

  /**
   * Deletes the keys through BPF_MAP_DELETE_BATCH (one loop per key where the
   * map type lacks it); returns how many were present and deleted.
   */
  deleteBatch(keys: Buffer[]): number {
    for (const k of keys) this.checkKey(k, 'batch delete');
    if (keys.length === 0) return 0;
    return this.deleteKeys(Buffer.concat(keys), keys.length);
  }

  /** deleteBatch() of count keys packed one after another in keys. */
  deleteKeys(keys: Buffer, count: number): number {
    if (!Buffer.isBuffer(keys) || !Number.isInteger(count) || count < 0 || keys.length < count * this.keySize) {
      throw new Error(`batch delete from ${this.label}: keys must be a Buffer of at least ${count} × ${this.keySize} bytes`);
    }
    if (count === 0) return 0;
    const n = native();
    const fd = this.fd;
    const all = keys;
    const bopts = { sz: STRUCT_SIZES.bpf_map_batch_opts, elem_flags: 0, flags: 0 };
    let deleted = 0;
    let at = 0;
    while (at < count) {
      const left = [count - at];
      const rc = n.bpf_map_delete_batch(fd, all.subarray(at * this.keySize), left, bopts);
      if (rc === 0) return deleted + left[0];
      if (rc === -ENOTSUPP || rc === -E.EOPNOTSUPP) {
        for (let i = at; i < count; i++) if (this.delete(all.subarray(i * this.keySize, (i + 1) * this.keySize))) deleted++;
        return deleted;
      }
      // The kernel stops at the first absent key and reports how many it
      // deleted before it; skip that key and go on.
      if (rc === -E.ENOENT) {
        deleted += left[0];
        at += left[0] + 1;
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

function roundUp8(n: number): number {
  return (n + 7) & ~7;
}
