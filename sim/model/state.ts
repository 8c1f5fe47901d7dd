/**
 * A BPF hash table as the model holds it, with the kernel's semantics
 * (HashTable), the structs its entries are as the model holds them, and what
 * a program run reports. The maps themselves are in maps.ts, as in
 * bpf/maps.h; the conversions at a table's boundary in codec.ts.
 */
import { COUNTER_NAMES, type CounterName, type RedirectKindName } from '../../dataplane/maps.ts';
import type { KeyCodec, ModelCodec } from './codec.ts';
import type { ModelConntrack } from './conntrack.ts';

export const EEXIST = -17;
export const E2BIG = -7;
export const ENOENT = -2;

/*
 * The model holds addresses and MACs as numbers, as the C holds their bytes:
 * an IPv4 address is its four bytes read as a little-endian u32 (readIpv4), a
 * MAC its six bytes as a 48-bit number, first byte highest. maps.ts types the
 * same structs with text (the layout's values); a table converts between the
 * two at its boundary, through the layout's own bytes (codec.ts).
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
/** A slot of ct_recent (one CPU's first-level admission cache): a flow and its admission. */
export interface ModelCtRecent { flow: ModelCtTupleKey; admitted: ModelCtAdmission }

/** The maps hold flat structs of numbers and bigints: a spread copies one whole. */
function copyOf<T>(x: T): T {
  return typeof x === 'object' ? { ...x } : x;
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

/** The inputs the kernel chooses: the clocks and the random draws. */
export interface Env {
  /** bpf_ktime_get_coarse_ns(): the coarse clock, what the programs read while the clock map is not calibrated (maps.ts xmasqNow). */
  now: bigint;
  /** bpf_jiffies64(): what the programs read through a calibrated clock map. Absent: a run where none is (the cluster simulator). */
  jiffies?: bigint;
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
