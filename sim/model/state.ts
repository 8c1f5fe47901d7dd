/**
 * A BPF hash table as the model holds it, with the kernel's semantics
 * (HashTable), the struct codecs at its boundary, and what a program run
 * reports. The maps themselves are in maps.ts, as in bpf/maps.h.
 */
import { bytesToIpv4, bytesToMac, ipv4ToBytes, macToBytes, type Field, type Struct } from '../../dataplane/layout.ts';
import { COUNTER_NAMES, type CounterName, type RedirectKindName } from '../../dataplane/maps.ts';
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

/** C: struct path, as the model holds it. */
export interface ModelPath {
  /** A u64 of the kernel's ns clock, as Env.now gives it. */
  last_seen: bigint;
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
export interface ModelCtAdmission { checked: bigint; saddr: number; daddr: number; sport: number; dport: number }

/**
 * A struct's values as the model holds them, to and from the C bytes: each
 * field at the layout's offset, ipv4 and mac fields as the numbers above.
 */
export class ModelCodec<M> {
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

function putU64(b: Buffer, at: number, x: bigint, c: ModelCodec<unknown>, i: number): void {
  if (typeof x !== 'bigint' || x < 0n || x > 0xffffffffffffffffn) c.outOfRange(i, x);
  u64View.setBigUint64(0, x, true);
  for (let j = 0; j < 8; j++) b[at + j] = u64Bytes[j];
}

const scratch = Buffer.alloc(8);

/** One field of the model's value as the layout gives it. */
function layoutField(f: Field, x: unknown): unknown {
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

/** The maps hold flat structs of numbers and bigints: a spread copies one whole. */
function copyOf<T>(x: T): T {
  return typeof x === 'object' ? { ...x } : x;
}

/** A key's forms at a table's boundary: maps.ts's value and the kernel's bytes. */
export interface KeyCodec<K, MK> {
  toBytes(k: MK): Buffer;
  fromBytes(b: Buffer): MK;
  fromLayout(k: K): MK;
  toLayout(k: MK): K;
}

export class Entry<MK, MV> {
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
 * map value pointer in C; update copies key and value in. Two keys are the
 * same key exactly when their bytes are, as in the kernel: entries are
 * filed by the key's bytes, in the order they came.
 *
 * The programs use lookupElem, updateElem, deleteElem (bpf_map_lookup_elem…)
 * on the model's key objects. Everyone else (the agent, the differential run,
 * tests) uses lookup, update, delete, entries on the values maps.ts types, or
 * the kernel's bytes (lookupBytes…, entriesBytes): the boundary. The cluster
 * simulator files entries its own faster ways (sim/cluster/tables.ts) by
 * overriding find, put, remove, all and empty; the rest is this class's.
 */
export class HashTable<K, V, MK = unknown, MV = unknown> {
  protected count = 0;
  private readonly byKey = new Map<string, Entry<MK, MV>>();

  constructor(
    readonly keys: KeyCodec<K, MK>,
    readonly values: ModelCodec<MV>,
    readonly maxEntries: number,
  ) {}

  /** The key's bytes as a string: equal exactly when the bytes are. */
  private keyName(key: MK): string {
    return this.keys.toBytes(key).toString('latin1');
  }

  protected find(key: MK): Entry<MK, MV> | undefined {
    return this.byKey.get(this.keyName(key));
  }

  /** Files a new entry, whose key the table does not hold. */
  protected put(e: Entry<MK, MV>): void {
    this.byKey.set(this.keyName(e.key), e);
  }

  protected remove(key: MK): boolean {
    return this.byKey.delete(this.keyName(key));
  }

  /** Every entry, in the table's order. */
  protected all(): Array<Entry<MK, MV>> {
    return [...this.byKey.values()];
  }

  /** An empty table of the same kind and size. */
  protected empty(): HashTable<K, V, MK, MV> {
    return new HashTable(this.keys, this.values, this.maxEntries);
  }

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

/** A struct key's codec, the key being the struct itself. */
export function structKeys<K, MK>(struct: Struct<never>): KeyCodec<K, MK> {
  const c = new ModelCodec<MK>(struct);
  return { toBytes: (k) => c.toBytes(k), fromBytes: (b) => c.fromBytes(b), fromLayout: (k) => c.fromLayout(k), toLayout: (k) => c.toLayout(k) as K };
}

/**
 * An address key (pod_info's struct pod_ip, nodes' struct node_ip), which
 * maps.ts gives as its one field, the address text; the model as its word.
 */
export function ipKeys(struct: Struct<never>): KeyCodec<string, number> {
  const c = new ModelCodec<{ ip: number }>(struct);
  return {
    toBytes: (ip) => c.toBytes({ ip }), fromBytes: (b) => c.fromBytes(b).ip,
    fromLayout: (ip) => c.fromLayout({ ip }).ip, toLayout: (ip) => (c.toLayout({ ip }) as { ip: string }).ip,
  };
}

/** What a program run did besides its verdict: counters bumped and the redirect asked for. */
export interface RunEffects {
  counters: Record<CounterName, number>;
  redirect: { ifindex: number; kind: RedirectKindName };
}

const ZERO_COUNTERS = Object.fromEntries(COUNTER_NAMES.map((n) => [n, 0])) as Record<CounterName, number>;
/** No redirect. Programs set fx.redirect to a new one, never change it in place; frozen, a change would throw. */
export const NO_REDIRECT: RunEffects['redirect'] = Object.freeze({ ifindex: 0, kind: 'NONE' });

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
  /** bpf_ktime_get_ns(): the kernel's u64 ns clock. */
  now: bigint;
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
  /**
   * skb->ifindex: the device the program runs on (masq: the pod's host-side
   * veth, whose pod it holds the packet's source to). 0 or absent: 1, lo,
   * where BPF_PROG_TEST_RUN runs a packet whose ctx names no device.
   */
  ifindex?: number;
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
