/**
 * The datapath's maps as the model sees them, with the kernel's semantics
 * (HashTable), and what a program run reports.
 */
import { bytesToIpv4, bytesToMac, ipv4ToBytes, macToBytes, type Field, type Struct } from '../../dataplane/layout.ts';
import { NO_OVERLAY, NO_SERVICES,
  MAPS, COUNTER_NAMES, NodeFlag, ctAdmission, ctPendingValue, ctTuple, egressKey, ingressKey, nodeInfo, nodeIp, path, podInfo, podIp, policyKey, policyRule,
  type CounterName, type Config, type CtAdmission, type CtTupleKey, type EgressKey, type IngressKey, type NodeInfo, type Path, type PodInfo,
  type PolicyKey, type PolicyMasks, type PolicyRule, type RedirectKindName,
} from '../../dataplane/maps.ts';
import { writeMac } from './packet.ts';
import type { ModelConntrack } from './conntrack.ts';

export const EEXIST = -17;
export const E2BIG = -7;
export const ENOENT = -2;

/*
 * The model holds addresses and MACs as numbers, as the C holds their bytes:
 * an IPv4 address is its four bytes read as a little-endian u32 (readIpv4), a
 * MAC its six bytes as a 48-bit number, first byte highest. maps.ts types the
 * same structs with text (the layout's values); a table converts between the
 * two at its boundary, through the layout's own bytes.
 */

/**
 * The kernel's u64 ns clock as the model holds it (Env.now, last_seen): a
 * bigint, or a number where the caller knows it stays an exact integer, below
 * 2^53 ns (104 days). The simulator reads the clock for nearly every packet
 * and would make a BigInt each time; the model only stores the value, and
 * its bytes and its layout value (a bigint) are the same either way.
 */
export type Stamp = bigint | number;

/** C: struct path, as the model holds it. */
export interface ModelPath {
  last_seen: Stamp;
  local_mac: number;
  remote_mac: number;
  local_ip: number;
  remote_ip: number;
  ifindex: number;
  local_key: number;
  remote_key: number;
  remote_ready: number;
}
export interface ModelPodInfo { ifindex: number; mac: number; host_netns_id: number; host_netns_ino: number }
export interface ModelNodeInfo { flags: number }
export interface ModelEgressKey { local_pod: number; remote_pod: number }
export interface ModelIngressKey { remote_host: number; key: number }
export interface ModelCtTupleKey { saddr: number; daddr: number; sport: number; dport: number; protocol: number }
/** ct_admitted's value: when admitted, and the flow as the host sends it on. */
export interface ModelCtAdmission { checked: Stamp; saddr: number; daddr: number; sport: number; dport: number }
export interface ModelPolicyKey { src_ip: number; dst_ip: number; src_port: number; dst_port: number; protocol: number; dir: number }

/**
 * A struct's values as the model holds them, to and from the C bytes: each
 * field at the layout's offset, ipv4 and mac fields as the numbers above.
 */
class ModelCodec<M> {
  private readonly fields: readonly Field[];
  /** The bytes no field covers (pads, alignment holes): zero, as in the kernel's copy. */
  private readonly holes: readonly number[];
  /**
   * Writes every field of a value at its offset. toBytes runs for every entry
   * of every scan the agent makes; a loop over the fields reading v[name]
   * was a megamorphic keyed load per field, and Buffer's writers validate
   * their arguments through several calls. So the function is made once per
   * struct from the layout: a load by the field's literal name and a call
   * of the writer for its type, per field (writeFields below).
   */
  private readonly write: (b: Buffer, v: unknown, c: ModelCodec<unknown>) => void;

  constructor(readonly struct: Struct<never>) {
    this.fields = struct.fields.filter((f) => !(typeof f.type === 'object' && 'pad' in f.type));
    for (const f of this.fields) this.byName.set(f.name, f);
    const covered = new Uint8Array(struct.size);
    for (const f of this.fields) covered.fill(1, f.offset, f.offset + f.size);
    this.holes = [...covered.keys()].filter((i) => !covered[i]);
    this.write = writeFields(struct.name, this.fields);
  }

  /** The C bytes of a value; a field out of its type's range throws, as Buffer's writers do. */
  toBytes(m: M): Buffer {
    return this.writeBytes(Buffer.allocUnsafe(this.struct.size), m);
  }

  /** toBytes into b (the struct's size), every byte of it written; returns b. */
  writeBytes(b: Buffer, m: M): Buffer {
    this.write(b, m, this as ModelCodec<unknown>);
    const holes = this.holes;
    for (let i = 0; i < holes.length; i++) b[holes[i]] = 0;
    return b;
  }

  outOfRange(i: number, x: unknown): never {
    throw new RangeError(`struct ${this.struct.name}: field ${this.fields[i].name} = ${String(x)} is out of range for ${JSON.stringify(this.fields[i].type)}`);
  }

  fromBytes(b: Buffer): M {
    const v: Record<string, unknown> = {};
    for (const f of this.fields) {
      switch (f.type) {
        case 'ipv4': v[f.name] = b.readUInt32LE(f.offset); break;
        case 'mac': v[f.name] = b.readUIntBE(f.offset, 6); break;
        case 'u8': v[f.name] = b.readUInt8(f.offset); break;
        case 'u16': v[f.name] = b.readUInt16LE(f.offset); break;
        case 'u32': v[f.name] = b.readUInt32LE(f.offset); break;
        case 's32': v[f.name] = b.readInt32LE(f.offset); break;
        case 'u64': v[f.name] = b.readBigUInt64LE(f.offset); break;
        case 'be16': v[f.name] = b.readUInt16BE(f.offset); break;
        default: throw new Error(`struct ${this.struct.name}: field ${f.name} has no model form`);
      }
    }
    return v as M;
  }

  /** The layout's value (text addresses and MACs); encode validates it. */
  fromLayout(x: unknown): M {
    return this.fromBytes(this.struct.encode(x as never));
  }

  /** The layout's value, as decode would give it from toBytes (each field converted alone). */
  toLayout(m: M): unknown {
    const v: Record<string, unknown> = {};
    const mr = m as Record<string, unknown>;
    for (const f of this.fields) v[f.name] = layoutField(f, mr[f.name]);
    return v;
  }

  /**
   * The layout's value, live: reading a field reads the model's, writing one
   * writes it (converted, a bad address or MAC refused), as writing through a
   * map value pointer writes the map. Its own keys are the struct's fields.
   */
  view(m: M): unknown {
    return new Proxy(m as object, this.viewHandler);
  }

  private readonly byName = new Map<string | symbol, Field>();

  private readonly viewHandler: ProxyHandler<object> = {
    get: (m, name) => {
      const f = this.byName.get(name);
      const x = (m as Record<string | symbol, unknown>)[name];
      return f === undefined ? x : layoutField(f, x);
    },
    set: (m, name, x) => {
      const f = this.byName.get(name);
      if (f === undefined) return false;
      (m as Record<string, unknown>)[f.name] = modelField(f, x);
      return true;
    },
    getOwnPropertyDescriptor: (m, name) => {
      const f = this.byName.get(name);
      if (f === undefined) return Reflect.getOwnPropertyDescriptor(m, name);
      return { value: layoutField(f, (m as Record<string, unknown>)[f.name]), writable: true, enumerable: true, configurable: true };
    },
  };
}

/** A writer of one field: its bytes at b[at], or the codec's range error for field i. */
type FieldWriter = (b: Buffer, at: number, x: never, c: ModelCodec<unknown>, i: number) => void;

/**
 * The function that writes a struct's fields (ModelCodec.write): made with
 * new Function from the layout alone (field names, quoted by JSON.stringify,
 * offsets and types), so that each field's load has its name in the code.
 */
function writeFields(struct: string, fields: readonly Field[]): (b: Buffer, v: unknown, c: ModelCodec<unknown>) => void {
  const writers: Record<string, FieldWriter> = { ipv4: putU32, u32: putU32, s32: putS32, mac: putMac, u8: putU8, u16: putU16, be16: putBe16, u64: putU64 };
  const lines = fields.map((f, i) => {
    if (typeof f.type !== 'string' || !(f.type in writers)) throw new Error(`struct ${struct}: field ${f.name} has no model form`);
    return `w.${f.type}(b, ${f.offset}, v[${JSON.stringify(f.name)}], c, ${i});`;
  });
  return new Function('w', `return function write(b, v, c) {\n${lines.join('\n')}\n};`)(writers);
}

function putU8(b: Buffer, at: number, x: number, c: ModelCodec<unknown>, i: number): void {
  if ((x & 0xff) !== x) c.outOfRange(i, x);
  b[at] = x;
}

function putU16(b: Buffer, at: number, x: number, c: ModelCodec<unknown>, i: number): void {
  if ((x & 0xffff) !== x) c.outOfRange(i, x);
  b[at] = x;
  b[at + 1] = x >>> 8;
}

function putBe16(b: Buffer, at: number, x: number, c: ModelCodec<unknown>, i: number): void {
  if ((x & 0xffff) !== x) c.outOfRange(i, x);
  b[at] = x >>> 8;
  b[at + 1] = x;
}

function putU32(b: Buffer, at: number, x: number, c: ModelCodec<unknown>, i: number): void {
  if ((x >>> 0) !== x) c.outOfRange(i, x);
  b[at] = x;
  b[at + 1] = x >>> 8;
  b[at + 2] = x >>> 16;
  b[at + 3] = x >>> 24;
}

function putS32(b: Buffer, at: number, x: number, c: ModelCodec<unknown>, i: number): void {
  if ((x | 0) !== x) c.outOfRange(i, x);
  putU32(b, at, x >>> 0, c, i);
}

/** The model's 48-bit MAC number, first byte highest (readMac's form). */
function putMac(b: Buffer, at: number, x: number, c: ModelCodec<unknown>, i: number): void {
  if (!(x >= 0 && x <= 0xffffffffffff && Math.floor(x) === x)) c.outOfRange(i, x);
  writeMac(b, at, x);
}

/** A u64 bigint through DataView's own conversion: BigInt arithmetic would allocate. */
const u64Bytes = new Uint8Array(8);
const u64View = new DataView(u64Bytes.buffer);

function putU64(b: Buffer, at: number, x: Stamp, c: ModelCodec<unknown>, i: number): void {
  if (typeof x === 'number') {
    if (!(x >= 0 && x <= Number.MAX_SAFE_INTEGER && Math.floor(x) === x)) c.outOfRange(i, x);
    // Its two u32 words, low first. Not x % 2^32: on a number past int32 that is a call to fmod.
    const hi = Math.floor(x / 0x100000000);
    putU32(b, at, x - hi * 0x100000000, c, i);
    putU32(b, at + 4, hi, c, i);
    return;
  }
  if (typeof x !== 'bigint' || x < 0n || x > 0xffffffffffffffffn) c.outOfRange(i, x);
  u64View.setBigUint64(0, x, true);
  for (let j = 0; j < 8; j++) b[at + j] = u64Bytes[j];
}

const scratch = Buffer.alloc(8);

/** One field of the model's value as the layout gives it. */
function layoutField(f: Field, x: unknown): unknown {
  if (f.type === 'u64' && typeof x === 'number') return BigInt(x);
  if (f.type === 'ipv4') {
    scratch.writeUInt32LE(x as number, 0);
    return bytesToIpv4(scratch, 0);
  }
  if (f.type === 'mac') {
    scratch.writeUIntBE(x as number, 0, 6);
    return bytesToMac(scratch, 0);
  }
  return x;
}

/** One field of a layout value as the model holds it. */
function modelField(f: Field, x: unknown): unknown {
  if (f.type === 'ipv4') {
    ipv4ToBytes(x as string, scratch, 0);
    return scratch.readUInt32LE(0);
  }
  if (f.type === 'mac') {
    macToBytes(x as string, scratch, 0);
    return scratch.readUIntBE(0, 6);
  }
  return x;
}

/** A map from non-negative integers to entries. */
interface Inner<E> {
  readonly size: number;
  get(k: number): E | undefined;
  set(k: number, e: E): unknown;
  delete(k: number): boolean;
  values(): Iterable<E>;
}

/**
 * A map from non-negative integers to entries, walked in the order the scans
 * see (PairTable): those below INDEXED (the narrow keys, 1..63) in an array,
 * by key; larger ones (wide keys) in a Map, as they came (a sparse array
 * would be slow to walk).
 */
const INDEXED = 64;

class IndexMap<E> implements Inner<E> {
  private readonly a: Array<E | undefined> = new Array(INDEXED).fill(undefined);
  private readonly big = new Map<number, E>();
  size = 0;

  get(k: number): E | undefined {
    return k < INDEXED ? this.a[k] : this.big.get(k);
  }

  set(k: number, e: E): void {
    if (k >= INDEXED) {
      if (!this.big.has(k)) this.size++;
      this.big.set(k, e);
      return;
    }
    if (this.a[k] === undefined) this.size++;
    this.a[k] = e;
  }

  delete(k: number): boolean {
    if (k >= INDEXED) {
      const gone = this.big.delete(k);
      if (gone) this.size--;
      return gone;
    }
    if (this.a[k] === undefined) return false;
    this.a[k] = undefined;
    this.size--;
    return true;
  }

  values(): E[] {
    const out: E[] = [];
    for (let k = 0; k < INDEXED; k++) if (this.a[k] !== undefined) out.push(this.a[k]!);
    for (const e of this.big.values()) out.push(e);
    return out;
  }
}

/** The maps hold flat structs of numbers and bigints: a spread copies one whole. */
function copyOf<T>(x: T): T {
  return typeof x === 'object' ? { ...x } : x;
}

/** A key's forms at a table's boundary: maps.ts's value and the kernel's bytes. */
interface KeyCodec<K, MK> {
  toBytes(k: MK): Buffer;
  fromBytes(b: Buffer): MK;
  fromLayout(k: K): MK;
  toLayout(k: MK): K;
}

class Entry<MK, MV> {
  /** The key's bytes, made by the first scan that reads them: a key never changes. */
  keyBytes: Buffer | undefined = undefined;
  /** The value's bytes as the last scan wrote them (entriesBytes): this entry's own, never a clone's. */
  valueBytes: Buffer | undefined = undefined;

  constructor(readonly key: MK, public value: MV) {}
}

/**
 * A BPF hash table, with the kernel's semantics: it refuses a new key when
 * full (E2BIG) or when BPF_NOEXIST finds the key taken (EEXIST); lookup
 * returns the live value, so writing to it is writing to the map, as with a
 * map value pointer in C; update copies key and value in.
 *
 * The programs work on the model's numbers. Their per-packet lookups are
 * the key kind's own (WordTable.lookupWord, PairTable.lookupPair), which take
 * the key's numbers as arguments: no key object per lookup, and a call site
 * of its own per kind of key. Otherwise (policy_rules, inserts) they use
 * lookupElem, updateElem, deleteElem (bpf_map_lookup_elem…) on the model's
 * key objects. Everyone else (the agent, the differential run, tests) uses
 * lookup, update, delete, entries on the values maps.ts types, or the
 * kernel's bytes (lookupBytes…): the boundary.
 */
export abstract class HashTable<K, V, MK = unknown, MV = unknown> {
  protected count = 0;

  constructor(
    protected readonly keys: KeyCodec<K, MK>,
    protected readonly values: ModelCodec<MV>,
    readonly maxEntries: number,
  ) {}

  protected abstract find(key: MK): Entry<MK, MV> | undefined;
  /** Files a new entry, whose key the table does not hold. */
  protected abstract put(e: Entry<MK, MV>): void;
  protected abstract remove(key: MK): boolean;
  /** Every entry, in the table's order. */
  protected abstract all(): Array<Entry<MK, MV>>;
  /** An empty table of the same kind and size. */
  protected abstract empty(): HashTable<K, V, MK, MV>;

  /** An update of an entry the table holds: the new value in its place. */
  protected replace(e: Entry<MK, MV>, value: MV): void {
    e.value = value;
  }

  get size(): number {
    return this.count;
  }

  // ---- the programs' side: the model's numbers ----

  /** bpf_map_lookup_elem: the live value. */
  lookupElem(key: MK): MV | undefined {
    return this.find(key)?.value;
  }

  /** bpf_map_update_elem: 0, or a negative errno as the kernel returns it. */
  updateElem(key: MK, value: MV, flag: 'any' | 'noexist' | 'exist' = 'any'): number {
    const old = this.find(key);
    if (old && flag === 'noexist') return EEXIST;
    if (!old && flag === 'exist') return ENOENT;
    if (!old && this.count >= this.maxEntries) return E2BIG;
    if (old) {
      this.replace(old, copyOf(value));
      return 0;
    }
    this.put(new Entry(copyOf(key), copyOf(value)));
    this.count++;
    return 0;
  }

  deleteElem(key: MK): boolean {
    const gone = this.remove(key);
    if (gone) this.count--;
    return gone;
  }

  // ---- the boundary: maps.ts values (text addresses and MACs) ----

  /** The live value, as maps.ts types it: writing a field writes the map. */
  lookup(key: K): V | undefined {
    const v = this.lookupElem(this.keys.fromLayout(key));
    return v === undefined ? undefined : (this.values.view(v) as V);
  }

  /** The layout validates key and value (a bad address or field throws). */
  update(key: K, value: V, flag: 'any' | 'noexist' | 'exist' = 'any'): number {
    return this.updateElem(this.keys.fromLayout(key), this.values.fromLayout(value), flag);
  }

  delete(key: K): boolean {
    return this.deleteElem(this.keys.fromLayout(key));
  }

  /** Copies of every entry, as maps.ts types them. */
  entries(): Array<[K, V]> {
    return this.all().map((e) => [this.keys.toLayout(e.key), this.values.toLayout(e.value) as V]);
  }

  // ---- the boundary: the kernel's bytes (the agent reads maps this way) ----

  lookupBytes(key: Buffer): Buffer | undefined {
    const v = this.lookupElem(this.keys.fromBytes(key));
    return v === undefined ? undefined : this.values.toBytes(v);
  }

  updateBytes(key: Buffer, value: Buffer, flag: 'any' | 'noexist' | 'exist' = 'any'): number {
    return this.updateElem(this.keys.fromBytes(key), this.values.fromBytes(value), flag);
  }

  deleteBytes(key: Buffer): boolean {
    return this.deleteElem(this.keys.fromBytes(key));
  }

  /**
   * Every entry as the kernel's bytes, as of this call (a batch lookup). The
   * agent scans whole tables every second, so no buffer is made per entry per
   * scan: an entry's key bytes are made once (a key never changes), and its
   * value is written, at each call, into a buffer the entry keeps. So the
   * buffers are the caller's to read until the next entriesBytes of this
   * table, which rewrites the values: never write them (copy one to change
   * it), never keep them past that. Other calls (lookupBytes, updateBytes,
   * deleteBytes) leave them as they are.
   */
  entriesBytes(): Array<[Buffer, Buffer]> {
    const all = this.all();
    const out = new Array<[Buffer, Buffer]>(all.length);
    for (let i = 0; i < all.length; i++) {
      const e = all[i];
      // allocUnsafe: from Node's pool, so the buffers made by one scan lie side by side; writeBytes fills every byte.
      const v = e.valueBytes ??= Buffer.allocUnsafe(this.values.struct.size);
      out[i] = [e.keyBytes ??= this.keys.toBytes(e.key), this.values.writeBytes(v, e.value)];
    }
    return out;
  }

  clone(): this {
    // empty() is of this very class; TypeScript cannot type an abstract factory as `this`.
    const c = this.empty() as this;
    for (const e of this.all()) {
      const copy = new Entry(copyOf(e.key), copyOf(e.value));
      copy.keyBytes = e.keyBytes;
      c.put(copy);
    }
    c.count = this.count;
    return c;
  }
}

/** A table whose key is one u32 word (pod_info: an address): entries by the word. */
export class WordTable<K, V, MV> extends HashTable<K, V, number, MV> {
  private readonly m = new Map<number, Entry<number, MV>>();

  /** bpf_map_lookup_elem on the key word: the live value. */
  lookupWord(w: number): MV | undefined {
    const e = this.m.get(w);
    return e === undefined ? undefined : e.value;
  }

  protected find(key: number): Entry<number, MV> | undefined {
    return this.m.get(key);
  }

  protected put(e: Entry<number, MV>): void {
    this.m.set(e.key, e);
  }

  protected remove(key: number): boolean {
    return this.m.delete(key);
  }

  protected all(): Array<Entry<number, MV>> {
    return [...this.m.values()];
  }

  protected empty(): WordTable<K, V, MV> {
    return new WordTable(this.keys, this.values, this.maxEntries);
  }
}

/** How a PairTable's key object splits into its two numbers. */
interface KeyParts<MK> {
  first(k: MK): number;
  second(k: MK): number;
  /** The second part is a u16 key: entries under a first part are then an IndexMap. */
  secondIsIndex: boolean;
}

/**
 * The values of a PairTable by their two key numbers, in an open-addressing
 * hash table (linear probing) of flat arrays: a lookup is a hash and a few
 * loads from slots side by side. The simulator runs millions of lookups
 * between which it touches much other memory; a lookup through two Maps and
 * an entry object was a chain of some eight dependent loads, each a likely
 * cache miss, and most of a lookup's time.
 */
class PairIndex<MV> {
  /** Slot i's key numbers at 2i and 2i + 1 (one cache line), as int32 (`| 0`: the same 32 bits; V8 keeps them unboxed). */
  private keys = new Int32Array(2 * PAIR_INDEX_MIN);
  /** undefined: a free slot, which ends a probe; null: a deleted one, which does not. */
  private values: Array<MV | null | undefined> = new Array(PAIR_INDEX_MIN).fill(undefined);
  private mask = PAIR_INDEX_MIN - 1;
  private live = 0;
  private deleted = 0;

  get(first: number, second: number): MV | undefined {
    const i = this.find(first, second);
    return i < 0 ? undefined : (this.values[i] as MV);
  }

  /** A key the index does not hold. */
  add(first: number, second: number, value: MV): void {
    // At most half the slots in use or deleted: probes stay short.
    if ((this.live + this.deleted + 1) * 2 > this.values.length) this.resize();
    const a = first | 0, b = second | 0, mask = this.mask;
    let i = pairHash(a, b) & mask;
    while (this.values[i] !== undefined && this.values[i] !== null) i = (i + 1) & mask;
    if (this.values[i] === null) this.deleted--;
    this.keys[2 * i] = a;
    this.keys[2 * i + 1] = b;
    this.values[i] = value;
    this.live++;
  }

  /** A new value for a key the index holds. */
  set(first: number, second: number, value: MV): void {
    this.values[this.slot(first, second)] = value;
  }

  /** A key the index holds. */
  delete(first: number, second: number): void {
    this.values[this.slot(first, second)] = null;
    this.live--;
    this.deleted++;
  }

  /** The slot of a key the index holds. */
  private slot(first: number, second: number): number {
    const i = this.find(first, second);
    if (i < 0) throw new Error(`model table index: key (${first}, ${second}) is missing, the index is out of step with its table`);
    return i;
  }

  /** The slot holding the key, or -1: the probe ends at a free slot and steps over deleted ones. */
  private find(first: number, second: number): number {
    const a = first | 0, b = second | 0, mask = this.mask, keys = this.keys;
    for (let i = pairHash(a, b) & mask; ; i = (i + 1) & mask) {
      const v = this.values[i];
      if (v === undefined) return -1;
      if (keys[2 * i] === a && keys[2 * i + 1] === b && v !== null) return i;
    }
  }

  /** Rehashed into the size that leaves the live keys a quarter of the slots, dropping deleted ones. */
  private resize(): void {
    let n = PAIR_INDEX_MIN;
    while (n < (this.live + 1) * 4) n *= 2;
    const { keys, values } = this;
    this.keys = new Int32Array(2 * n);
    this.values = new Array(n).fill(undefined);
    this.mask = n - 1;
    this.live = 0;
    this.deleted = 0;
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (v !== undefined && v !== null) this.add(keys[2 * i], keys[2 * i + 1], v);
    }
  }
}

const PAIR_INDEX_MIN = 16;

/** A hash of two int32s that spreads both over the low bits the index masks. */
function pairHash(a: number, b: number): number {
  let h = Math.imul(a, 0x9e3779b1) ^ b;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  return h ^ (h >>> 13);
}

/**
 * A table whose key is two numbers (egress_cache: two addresses;
 * ingress_cache: the remote host and a key). The programs look values up in
 * a PairIndex; the entries are also kept in a map of maps, by the first
 * number and then the second, which gives scans their order: first parts as
 * they came, under each the narrow keys ascending, then the others as they came.
 */
export class PairTable<K, V, MK, MV> extends HashTable<K, V, MK, MV> {
  private readonly m = new Map<number, Inner<Entry<MK, MV>>>();
  private readonly index = new PairIndex<MV>();

  constructor(private readonly parts: KeyParts<MK>, keys: KeyCodec<K, MK>, values: ModelCodec<MV>, maxEntries: number) {
    super(keys, values, maxEntries);
  }

  /** bpf_map_lookup_elem on the key's two numbers: the live value. */
  lookupPair(first: number, second: number): MV | undefined {
    return this.index.get(first, second);
  }

  /** A taken key refused through the index: init's key draws are mostly such inserts. */
  override updateElem(key: MK, value: MV, flag: 'any' | 'noexist' | 'exist' = 'any'): number {
    if (flag === 'noexist' && this.index.get(this.parts.first(key), this.parts.second(key)) !== undefined) return EEXIST;
    return super.updateElem(key, value, flag);
  }

  protected find(key: MK): Entry<MK, MV> | undefined {
    return this.m.get(this.parts.first(key))?.get(this.parts.second(key));
  }

  protected put(e: Entry<MK, MV>): void {
    const first = this.parts.first(e.key), second = this.parts.second(e.key);
    let inner = this.m.get(first);
    if (inner === undefined) this.m.set(first, (inner = this.parts.secondIsIndex ? new IndexMap() : new Map()));
    inner.set(second, e);
    this.index.add(first, second, e.value);
  }

  protected override replace(e: Entry<MK, MV>, value: MV): void {
    e.value = value;
    this.index.set(this.parts.first(e.key), this.parts.second(e.key), value);
  }

  protected remove(key: MK): boolean {
    const first = this.parts.first(key), second = this.parts.second(key);
    const inner = this.m.get(first);
    if (inner === undefined || !inner.delete(second)) return false;
    if (inner.size === 0) this.m.delete(first);
    this.index.delete(first, second);
    return true;
  }

  protected all(): Array<Entry<MK, MV>> {
    const out: Array<Entry<MK, MV>> = [];
    for (const inner of this.m.values()) for (const e of inner.values()) out.push(e);
    return out;
  }

  protected empty(): PairTable<K, V, MK, MV> {
    return new PairTable(this.parts, this.keys, this.values, this.maxEntries);
  }
}

/**
 * A table whose key does not fit numbers (policy_rules: a 5-tuple and a
 * direction): entries by a text name that is equal for two keys exactly when
 * their bytes are.
 */
export class NamedTable<K, V, MK, MV> extends HashTable<K, V, MK, MV> {
  private readonly m = new Map<string, Entry<MK, MV>>();

  constructor(private readonly name: (k: MK) => string, keys: KeyCodec<K, MK>, values: ModelCodec<MV>, maxEntries: number) {
    super(keys, values, maxEntries);
  }

  protected find(key: MK): Entry<MK, MV> | undefined {
    return this.m.get(this.name(key));
  }

  protected put(e: Entry<MK, MV>): void {
    this.m.set(this.name(e.key), e);
  }

  protected remove(key: MK): boolean {
    return this.m.delete(this.name(key));
  }

  protected all(): Array<Entry<MK, MV>> {
    return [...this.m.values()];
  }

  protected empty(): NamedTable<K, V, MK, MV> {
    return new NamedTable(this.name, this.keys, this.values, this.maxEntries);
  }
}

/** A struct key's codec, the key being the struct itself. */
function structKeys<K, MK>(struct: Struct<never>): KeyCodec<K, MK> {
  const c = new ModelCodec<MK>(struct);
  return { toBytes: (k) => c.toBytes(k), fromBytes: (b) => c.fromBytes(b), fromLayout: (k) => c.fromLayout(k), toLayout: (k) => c.toLayout(k) as K };
}

/**
 * An address key (pod_info's struct pod_ip, nodes' struct node_ip), which
 * maps.ts gives as its one field, the address text; the model as its word.
 */
function ipKeys(struct: Struct<never>): KeyCodec<string, number> {
  const c = new ModelCodec<{ ip: number }>(struct);
  return {
    toBytes: (ip) => c.toBytes({ ip }), fromBytes: (b) => c.fromBytes(b).ip,
    fromLayout: (ip) => c.fromLayout({ ip }).ip, toLayout: (ip) => (c.toLayout({ ip }) as { ip: string }).ip,
  };
}

/** Everything the programs read or write, plus what they report. */
export interface DatapathState {
  pod_info: WordTable<string, PodInfo, ModelPodInfo>;
  egress_cache: PairTable<EgressKey, Path, ModelEgressKey, ModelPath>;
  ingress_cache: PairTable<IngressKey, Path, ModelIngressKey, ModelPath>;
  config: Config;
  policy_rules: NamedTable<PolicyKey, PolicyRule, ModelPolicyKey, PolicyRule>;
  policy_masks: PolicyMasks;
  ct_pending: NamedTable<CtTupleKey, { queued: number }, ModelCtTupleKey, { queued: number }>;
  ct_admitted: NamedTable<CtTupleKey, CtAdmission, ModelCtTupleKey, ModelCtAdmission>;
  /** The overlay's nodes by underlay address; flag SELF marks this host's own (bpf/xmasq.h). */
  nodes: WordTable<string, NodeInfo, ModelNodeInfo>;
}

/** C: egress_lookup_or_create. Undefined when the table is full. */
export function egressLookupOrCreate(s: DatapathState, localPod: number, remotePod: number): ModelPath | undefined {
  const e = s.egress_cache.lookupPair(localPod, remotePod);
  if (e) return e;
  s.egress_cache.updateElem({ local_pod: localPod, remote_pod: remotePod }, zeroPath(), 'noexist');
  return s.egress_cache.lookupPair(localPod, remotePod);
}

/** C: is_peer_node (maps.h). Whether addr is a node of the overlay other than this host. */
export function isPeerNode(s: DatapathState, addr: number): boolean {
  const n = s.nodes.lookupWord(addr);
  return n !== undefined && (n.flags & NodeFlag.SELF) === 0;
}

/** C: is_self (maps.h). Whether addr is one of this host's own underlay addresses. */
export function isSelf(s: DatapathState, addr: number): boolean {
  const n = s.nodes.lookupWord(addr);
  return n !== undefined && (n.flags & NodeFlag.SELF) !== 0;
}

/** A zeroed struct path, as the model holds it. */
export function zeroPath(): ModelPath {
  return { last_seen: 0, local_mac: 0, remote_mac: 0, local_ip: 0, remote_ip: 0, ifindex: 0, local_key: 0, remote_key: 0, remote_ready: 0 };
}

/** A zeroed struct path, as maps.ts types it (for callers at the boundary). */
export function emptyPath(): Path {
  return path.zero();
}

export interface Sizes { pods: number; paths: number; rules: number; ctPending?: number; ctAdmitted?: number; nodes?: number }

const asStruct = (s: unknown) => s as Struct<never>;

export function emptyState(sizes: Sizes): DatapathState {
  const paths = new ModelCodec<ModelPath>(asStruct(path));
  return {
    pod_info: new WordTable<string, PodInfo, ModelPodInfo>(ipKeys(asStruct(podIp)), new ModelCodec<ModelPodInfo>(asStruct(podInfo)), sizes.pods),
    egress_cache: new PairTable<EgressKey, Path, ModelEgressKey, ModelPath>(
      { first: (k) => k.local_pod, second: (k) => k.remote_pod, secondIsIndex: false }, structKeys(asStruct(egressKey)), paths, sizes.paths),
    // The remote host, then the key as an array index: init draws up to KEY_TRIES keys a packet.
    ingress_cache: new PairTable<IngressKey, Path, ModelIngressKey, ModelPath>(
      { first: (k) => k.remote_host, second: (k) => k.key, secondIsIndex: true }, structKeys(asStruct(ingressKey)), paths, sizes.paths),
    config: { nic_ifindex: 0, flags: 0, ...NO_OVERLAY, ...NO_SERVICES, vxlan_port: 0, geneve_port: 0 },
    policy_rules: new NamedTable<PolicyKey, PolicyRule, ModelPolicyKey, PolicyRule>(
      (k) => `${k.src_ip} ${k.dst_ip} ${k.src_port} ${k.dst_port} ${k.protocol} ${k.dir}`,
      structKeys(asStruct(policyKey)), new ModelCodec<PolicyRule>(asStruct(policyRule)), sizes.rules),
    policy_masks: { count: 0, mask: new Array(32).fill(0) },
    ct_pending: new NamedTable<CtTupleKey, { queued: number }, ModelCtTupleKey, { queued: number }>(
      ctTupleName, structKeys(asStruct(ctTuple)), new ModelCodec<{ queued: number }>(asStruct(ctPendingValue)), sizes.ctPending ?? 16),
    ct_admitted: new NamedTable<CtTupleKey, CtAdmission, ModelCtTupleKey, ModelCtAdmission>(
      ctTupleName, structKeys(asStruct(ctTuple)), new ModelCodec<ModelCtAdmission>(asStruct(ctAdmission)), sizes.ctAdmitted ?? 16),
    nodes: new WordTable<string, NodeInfo, ModelNodeInfo>(ipKeys(asStruct(nodeIp)), new ModelCodec<ModelNodeInfo>(asStruct(nodeInfo)), sizes.nodes ?? 16),
  };
}

const ctTupleName = (k: ModelCtTupleKey) => `${k.saddr} ${k.daddr} ${k.sport} ${k.dport} ${k.protocol}`;

export function cloneState(s: DatapathState): DatapathState {
  return {
    pod_info: s.pod_info.clone(),
    egress_cache: s.egress_cache.clone(),
    ingress_cache: s.ingress_cache.clone(),
    config: { ...s.config },
    policy_rules: s.policy_rules.clone(),
    policy_masks: { count: s.policy_masks.count, mask: [...s.policy_masks.mask] },
    ct_pending: s.ct_pending.clone(),
    ct_admitted: s.ct_admitted.clone(),
    nodes: s.nodes.clone(),
  };
}

/** What a program run did besides its verdict: counters bumped and the redirect asked for. */
export interface RunEffects {
  counters: Record<CounterName, number>;
  redirect: { ifindex: number; kind: RedirectKindName };
}

const ZERO_COUNTERS = Object.fromEntries(COUNTER_NAMES.map((n) => [n, 0])) as Record<CounterName, number>;
/** No redirect. Programs replace fx.redirect, never change it in place; frozen, a change would throw. */
export const NO_REDIRECT: RunEffects['redirect'] = Object.freeze({ ifindex: 0, kind: 'NONE' });

/**
 * The redirect to (ifindex, kind), frozen like NO_REDIRECT and shared: a run
 * that redirects sets fx.redirect to one of these rather than to a new object
 * per packet. They are kept in a direct-mapped cache by ifindex; a miss (a
 * new ifindex, or another kind in its slot) makes a new one.
 */
export function redirectTo(ifindex: number, kind: RedirectKindName): RunEffects['redirect'] {
  const slot = ifindex & (REDIRECT_SLOTS - 1);
  const r = redirects[slot];
  if (r !== undefined && r.ifindex === ifindex && r.kind === kind) return r;
  return (redirects[slot] = Object.freeze({ ifindex, kind }));
}

const REDIRECT_SLOTS = 256;
const redirects: Array<RunEffects['redirect'] | undefined> = new Array(REDIRECT_SLOTS).fill(undefined);

export function newEffects(): RunEffects {
  return { counters: { ...ZERO_COUNTERS }, redirect: NO_REDIRECT };
}

/**
 * The program's own copy of the input, as BPF_PROG_TEST_RUN copies data_in: the
 * caller's buffer is never written. (allocUnsafe + set: Buffer.from is ~2× slower.)
 */
export function copyPacket(input: Buffer): Buffer {
  const pkt = Buffer.allocUnsafe(input.length);
  pkt.set(input);
  return pkt;
}

/** The inputs the kernel chooses: the clock and the random draws. */
export interface Env {
  now: Stamp;
  random(): number; // one bpf_get_prandom_u32()
  /**
   * skb->vlan_present: a VLAN tag the kernel took out of the frame. BPF_PROG_TEST_RUN
   * cannot set it, so the differential runs leave it false; lab/wire.test.ts covers it.
   */
  vlanPresent?: boolean;
  /**
   * skb->gso_size: non-zero for a GSO packet, which segmentation will split
   * (init sends no wide signal on one). BPF_PROG_TEST_RUN sets it from the ctx.
   */
  gsoSize?: number;
  /**
   * The host's conntrack table, which masq and restore consult (conntrack.ts).
   * Absent: the build without the check (XMASQ_NO_CONNTRACK, the rpeer
   * object), which admits every flow; the cluster simulator runs so.
   */
  conntrack?: ModelConntrack;
  /**
   * The inode number of the namespace whose table conntrack is (the host's):
   * what masq_rpeer, looking the host's up by id from the pod's namespace,
   * checks an entry against. Absent: unknown, so no entry found by id is.
   */
  netnsIno?: number;
  /**
   * skb->ingress_ifindex: the device a forwarded packet came in on; 0 (or
   * absent) for one this host sent, its tunnel device's encapsulation
   * included (init learns only from those). BPF_PROG_TEST_RUN sets it from the ctx.
   */
  ingressIfindex?: number;
}

export interface RunResult {
  verdict: number;
  packet: Buffer;
  effects: RunEffects;
}

/** C: XMASQ_CONTINUE (TC_ACT_UNSPEC): left to what comes next on the hook (bpf/verdict.h). */
export const TC_CONTINUE = -1;
export const TC_ACT_SHOT = 2;
export const TC_ACT_REDIRECT = 7;

// Keep the map list and the state in step: a new map in maps.ts must be modelled here.
export const MODELLED_MAPS = ['pod_info', 'egress_cache', 'ingress_cache', 'config', 'policy_rules',
  'policy_masks', 'ct_pending', 'ct_admitted', 'nodes', 'counters', 'redirect_trace'] as const satisfies readonly (keyof typeof MAPS)[];
