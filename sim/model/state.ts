/**
 * The datapath's maps as the model sees them, with the kernel's semantics
 * (HashTable), and what a program run reports.
 */
import { bytesToIpv4, bytesToMac, ipv4ToBytes, macToBytes, type Field, type Struct } from '../../dataplane/layout.ts';
import {
  MAPS, COUNTER_NAMES, egressKey, ingressKey, path, podInfo, podIp, policyKey, policyRule,
  type CounterName, type Config, type EgressKey, type IngressKey, type Path, type PodInfo,
  type PolicyKey, type PolicyMasks, type PolicyRule, type RedirectKindName,
} from '../../dataplane/maps.ts';

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
export interface ModelPodInfo { ifindex: number; mac: number }
export interface ModelEgressKey { local_pod: number; remote_pod: number }
export interface ModelIngressKey { remote_host: number; key: number }
export interface ModelPolicyKey { src_ip: number; dst_ip: number; src_port: number; dst_port: number; protocol: number; dir: number }

/**
 * A struct's values as the model holds them, to and from the C bytes: each
 * field at the layout's offset, ipv4 and mac fields as the numbers above.
 */
class ModelCodec<M> {
  private readonly fields: readonly Field[];

  constructor(readonly struct: Struct<never>) {
    this.fields = struct.fields.filter((f) => !(typeof f.type === 'object' && 'pad' in f.type));
    for (const f of this.fields) this.byName.set(f.name, f);
  }

  toBytes(m: M): Buffer {
    const b = Buffer.alloc(this.struct.size);
    const v = m as Record<string, unknown>;
    for (const f of this.fields) {
      const x = v[f.name];
      switch (f.type) {
        case 'ipv4': b.writeUInt32LE(x as number, f.offset); break;
        case 'mac': b.writeUIntBE(x as number, f.offset, 6); break;
        case 'u8': b.writeUInt8(x as number, f.offset); break;
        case 'u16': b.writeUInt16LE(x as number, f.offset); break;
        case 'u32': b.writeUInt32LE(x as number, f.offset); break;
        case 'u64': b.writeBigUInt64LE(x as bigint, f.offset); break;
        case 'be16': b.writeUInt16BE(x as number, f.offset); break;
        default: throw new Error(`struct ${this.struct.name}: field ${f.name} has no model form`);
      }
    }
    return b;
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

/**
 * A table's keys: a name for a key that is equal for two keys exactly when
 * their bytes are, from its numeric fields (a lookup is the model's most
 * frequent operation): a number where the key's bits fit in one, two parts
 * (a map of maps) for two addresses, or text.
 */
type KeyName = string | number;

interface KeyNames<MK> {
  /** The name, or its first part when there is a second. */
  name(k: MK): KeyName;
  second?(k: MK): KeyName;
  /** The second part is a non-negative integer (a u16 key): entries under a first part are then an IndexMap. */
  secondIsIndex?: boolean;
}

/** The entries under one first part: a Map, or an IndexMap. */
interface Inner<E> {
  readonly size: number;
  get(k: KeyName): E | undefined;
  set(k: KeyName, e: E): unknown;
  delete(k: KeyName): boolean;
  values(): Iterable<E>;
}

/**
 * A map from non-negative integers to entries: those below INDEXED (the
 * narrow keys, 1..63) in an array, no hashing per lookup; larger ones (wide
 * keys) in a Map, as a sparse array would be slow to walk.
 */
const INDEXED = 64;

class IndexMap<E> implements Inner<E> {
  private readonly a: Array<E | undefined> = new Array(INDEXED).fill(undefined);
  private readonly big = new Map<KeyName, E>();
  size = 0;

  get(k: KeyName): E | undefined {
    return (k as number) < INDEXED ? this.a[k as number] : this.big.get(k);
  }

  set(k: KeyName, e: E): void {
    if ((k as number) >= INDEXED) {
      if (!this.big.has(k)) this.size++;
      this.big.set(k, e);
      return;
    }
    if (this.a[k as number] === undefined) this.size++;
    this.a[k as number] = e;
  }

  delete(k: KeyName): boolean {
    if ((k as number) >= INDEXED) {
      const gone = this.big.delete(k);
      if (gone) this.size--;
      return gone;
    }
    if (this.a[k as number] === undefined) return false;
    this.a[k as number] = undefined;
    this.size--;
    return true;
  }

  values(): E[] {
    const out = this.a.filter((e): e is E => e !== undefined);
    for (const e of this.big.values()) out.push(e);
    return out;
  }
}

/** The maps hold flat structs of numbers and bigints: a spread copies one whole. */
function copyOf<T>(x: T): T {
  return typeof x === 'object' ? { ...x } : x;
}

interface Entry<MK, MV> {
  key: MK;
  value: MV;
}

/**
 * A BPF hash table, with the kernel's semantics: it refuses a new key when
 * full (E2BIG) or when BPF_NOEXIST finds the key taken (EEXIST); lookup
 * returns the live value, so writing to it is writing to the map, as with a
 * map value pointer in C; update copies key and value in.
 *
 * The programs use lookupElem, updateElem (bpf_map_lookup_elem,
 * bpf_map_update_elem) on the model's numbers. Everyone else (the agent,
 * the differential run, tests) uses lookup, update, delete, entries on the
 * values maps.ts types, or the kernel's bytes (lookupBytes…): the boundary.
 */
export class HashTable<K, V, MK = unknown, MV = unknown> {
  /** Entries by name, or by the name's first part and then its second. */
  private readonly m = new Map<KeyName, Entry<MK, MV>>();
  private readonly m2 = new Map<KeyName, Inner<Entry<MK, MV>>>();
  private readonly twoParts: boolean;
  private count = 0;

  constructor(
    private readonly names: KeyNames<MK>,
    private readonly keys: { toBytes(k: MK): Buffer; fromBytes(b: Buffer): MK; fromLayout(k: K): MK; toLayout(k: MK): K },
    private readonly values: ModelCodec<MV>,
    readonly maxEntries: number,
  ) {
    this.twoParts = names.second !== undefined;
  }

  private second(key: MK): KeyName {
    return this.names.second!(key);
  }

  /** The inner map of the last first part looked up: init's key draws look up one remote host up to KEY_TRIES times. */
  private lastFirst: KeyName | undefined;
  private lastInner: Inner<Entry<MK, MV>> | undefined;

  private inner(first: KeyName): Inner<Entry<MK, MV>> | undefined {
    if (first !== this.lastFirst) {
      this.lastFirst = first;
      this.lastInner = this.m2.get(first);
    }
    return this.lastInner;
  }

  private find(key: MK): Entry<MK, MV> | undefined {
    const first = this.names.name(key);
    return this.twoParts ? this.inner(first)?.get(this.second(key)) : this.m.get(first);
  }

  private put(key: MK, e: Entry<MK, MV>): void {
    const first = this.names.name(key);
    if (!this.twoParts) {
      this.m.set(first, e);
      return;
    }
    let inner = this.inner(first);
    if (inner === undefined) {
      this.m2.set(first, (inner = this.names.secondIsIndex ? new IndexMap() : new Map()));
      this.lastInner = inner;
    }
    inner.set(this.second(key), e);
  }

  private all(): Iterable<Entry<MK, MV>> {
    if (!this.twoParts) return this.m.values();
    return [...this.m2.values()].flatMap((inner) => [...inner.values()]);
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
      old.value = copyOf(value);
      return 0;
    }
    this.put(key, { key: copyOf(key), value: copyOf(value) });
    this.count++;
    return 0;
  }

  deleteElem(key: MK): boolean {
    const first = this.names.name(key);
    let gone: boolean;
    if (!this.twoParts) gone = this.m.delete(first);
    else {
      const inner = this.inner(first);
      gone = inner !== undefined && inner.delete(this.second(key));
      if (gone && inner!.size === 0) {
        this.m2.delete(first);
        this.lastInner = undefined;
      }
    }
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
    return [...this.all()].map((e) => [this.keys.toLayout(e.key), this.values.toLayout(e.value) as V]);
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

  entriesBytes(): Array<[Buffer, Buffer]> {
    return [...this.all()].map((e) => [this.keys.toBytes(e.key), this.values.toBytes(e.value)]);
  }

  clone(): HashTable<K, V, MK, MV> {
    const c = new HashTable<K, V, MK, MV>(this.names, this.keys, this.values, this.maxEntries);
    for (const e of this.all()) c.put(e.key, { key: copyOf(e.key), value: copyOf(e.value) });
    c.count = this.count;
    return c;
  }
}

/** A struct key's codec, the key being the struct itself. */
function structKeys<K, MK>(struct: Struct<never>): { toBytes(k: MK): Buffer; fromBytes(b: Buffer): MK; fromLayout(k: K): MK; toLayout(k: MK): K } {
  const c = new ModelCodec<MK>(struct);
  return { toBytes: (k) => c.toBytes(k), fromBytes: (b) => c.fromBytes(b), fromLayout: (k) => c.fromLayout(k), toLayout: (k) => c.toLayout(k) as K };
}

/** pod_info's key: struct pod_ip, which maps.ts gives as its one field, the address text; the model as its word. */
function podIpKeys(): { toBytes(k: number): Buffer; fromBytes(b: Buffer): number; fromLayout(k: string): number; toLayout(k: number): string } {
  const c = new ModelCodec<{ ip: number }>(podIp as unknown as Struct<never>);
  return {
    toBytes: (ip) => c.toBytes({ ip }), fromBytes: (b) => c.fromBytes(b).ip,
    fromLayout: (ip) => c.fromLayout({ ip }).ip, toLayout: (ip) => (c.toLayout({ ip }) as { ip: string }).ip,
  };
}

/** Everything the programs read or write, plus what they report. */
export interface DatapathState {
  pod_info: HashTable<string, PodInfo, number, ModelPodInfo>;
  egress_cache: HashTable<EgressKey, Path, ModelEgressKey, ModelPath>;
  ingress_cache: HashTable<IngressKey, Path, ModelIngressKey, ModelPath>;
  config: Config;
  policy_rules: HashTable<PolicyKey, PolicyRule, ModelPolicyKey, PolicyRule>;
  policy_masks: PolicyMasks;
}

/** C: egress_lookup_or_create. Undefined when the table is full. */
export function egressLookupOrCreate(s: DatapathState, ek: ModelEgressKey): ModelPath | undefined {
  const e = s.egress_cache.lookupElem(ek);
  if (e) return e;
  s.egress_cache.updateElem(ek, zeroPath(), 'noexist');
  return s.egress_cache.lookupElem(ek);
}

/** A zeroed struct path, as the model holds it. */
export function zeroPath(): ModelPath {
  return { last_seen: 0n, local_mac: 0, remote_mac: 0, local_ip: 0, remote_ip: 0, ifindex: 0, local_key: 0, remote_key: 0, remote_ready: 0 };
}

/** A zeroed struct path, as maps.ts types it (for callers at the boundary). */
export function emptyPath(): Path {
  return path.zero();
}

export interface Sizes { pods: number; paths: number; rules: number }

const asStruct = (s: unknown) => s as Struct<never>;

export function emptyState(sizes: Sizes): DatapathState {
  const paths = new ModelCodec<ModelPath>(asStruct(path));
  return {
    pod_info: new HashTable({ name: (ip) => ip }, podIpKeys(), new ModelCodec<ModelPodInfo>(asStruct(podInfo)), sizes.pods),
    egress_cache: new HashTable<EgressKey, Path, ModelEgressKey, ModelPath>(
      { name: (k) => k.local_pod, second: (k) => k.remote_pod }, structKeys(asStruct(egressKey)), paths, sizes.paths),
    // The remote host, then the key as an array index: init draws up to KEY_TRIES keys a packet.
    ingress_cache: new HashTable<IngressKey, Path, ModelIngressKey, ModelPath>(
      { name: (k) => k.remote_host, second: (k) => k.key, secondIsIndex: true }, structKeys(asStruct(ingressKey)), paths, sizes.paths),
    config: { nic_ifindex: 0, flags: 0 },
    policy_rules: new HashTable<PolicyKey, PolicyRule, ModelPolicyKey, PolicyRule>(
      { name: (k) => `${k.src_ip} ${k.dst_ip} ${k.src_port} ${k.dst_port} ${k.protocol} ${k.dir}` },
      structKeys(asStruct(policyKey)), new ModelCodec<PolicyRule>(asStruct(policyRule)), sizes.rules),
    policy_masks: { count: 0, mask: new Array(32).fill(0) },
  };
}

export function cloneState(s: DatapathState): DatapathState {
  return {
    pod_info: s.pod_info.clone(),
    egress_cache: s.egress_cache.clone(),
    ingress_cache: s.ingress_cache.clone(),
    config: { ...s.config },
    policy_rules: s.policy_rules.clone(),
    policy_masks: { count: s.policy_masks.count, mask: [...s.policy_masks.mask] },
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
}

export interface RunResult {
  verdict: number;
  packet: Buffer;
  effects: RunEffects;
}

export const TC_ACT_OK = 0;
export const TC_ACT_SHOT = 2;
export const TC_ACT_REDIRECT = 7;

// Keep the map list and the state in step: a new map in maps.ts must be modelled here.
export const MODELLED_MAPS = ['pod_info', 'egress_cache', 'ingress_cache', 'config', 'policy_rules',
  'policy_masks', 'counters', 'redirect_trace'] as const satisfies readonly (keyof typeof MAPS)[];
