/**
 * The cluster simulator's tables: the model's HashTable (sim/model/state.ts),
 * the same semantics and boundary, with entries filed for speed. The
 * simulator runs millions of program lookups between which it touches much
 * other memory, and the agent's scans (dataplane/agent/caches.ts, through
 * ModelMapView) read whole tables every simulated second; the model's plain
 * table makes the key's bytes for every lookup. simState (datapath.ts) puts
 * these in place of the model's, taking over each table's codecs and size.
 *
 * Their scan order (entriesBytes) is the one the study's numbers were made
 * with: pod_info and nodes as the keys came; the caches by first key part as
 * they came, under each the narrow keys ascending, then the others as they came.
 */
import type { KeyCodec, ModelCodec } from '../model/codec.ts';
import { EEXIST, Entry, HashTable } from '../model/state.ts';

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

/** A table whose key is one u32 word (pod_info: an address): entries by the word. */
export class WordTable<K, V, MV> extends HashTable<K, V, number, MV> {
  private readonly m = new Map<number, Entry<number, MV>>();

  /** bpf_map_lookup_elem on the key word: the live value, without making the key's bytes. */
  override lookupElem(w: number): MV | undefined {
    const e = this.m.get(w);
    return e === undefined ? undefined : e.value;
  }

  protected override find(key: number): Entry<number, MV> | undefined {
    return this.m.get(key);
  }

  protected override put(e: Entry<number, MV>): void {
    this.m.set(e.key, e);
  }

  protected override remove(key: number): boolean {
    return this.m.delete(key);
  }

  protected override all(): Array<Entry<number, MV>> {
    return [...this.m.values()];
  }

  protected override empty(): WordTable<K, V, MV> {
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

  /** bpf_map_lookup_elem through the index: the live value. */
  override lookupElem(key: MK): MV | undefined {
    return this.index.get(this.parts.first(key), this.parts.second(key));
  }

  /** The same on the key's two numbers (tests). */
  lookupPair(first: number, second: number): MV | undefined {
    return this.index.get(first, second);
  }

  /** A taken key refused through the index: init's key draws are mostly such inserts. */
  override updateElem(key: MK, value: MV, flag: 'any' | 'noexist' | 'exist' = 'any'): number {
    if (flag === 'noexist' && this.index.get(this.parts.first(key), this.parts.second(key)) !== undefined) return EEXIST;
    return super.updateElem(key, value, flag);
  }

  protected override find(key: MK): Entry<MK, MV> | undefined {
    return this.m.get(this.parts.first(key))?.get(this.parts.second(key));
  }

  protected override put(e: Entry<MK, MV>): void {
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

  protected override remove(key: MK): boolean {
    const first = this.parts.first(key), second = this.parts.second(key);
    const inner = this.m.get(first);
    if (inner === undefined || !inner.delete(second)) return false;
    if (inner.size === 0) this.m.delete(first);
    this.index.delete(first, second);
    return true;
  }

  protected override all(): Array<Entry<MK, MV>> {
    const out: Array<Entry<MK, MV>> = [];
    for (const inner of this.m.values()) for (const e of inner.values()) out.push(e);
    return out;
  }

  protected override empty(): PairTable<K, V, MK, MV> {
    return new PairTable(this.parts, this.keys, this.values, this.maxEntries);
  }
}

/**
 * A table whose key does not fit numbers (ct_pending, ct_admitted: a
 * 5-tuple): entries by a text name that is equal for two keys exactly when
 * their bytes are.
 */
export class NamedTable<K, V, MK, MV> extends HashTable<K, V, MK, MV> {
  private readonly m = new Map<string, Entry<MK, MV>>();

  constructor(private readonly name: (k: MK) => string, keys: KeyCodec<K, MK>, values: ModelCodec<MV>, maxEntries: number) {
    super(keys, values, maxEntries);
  }

  protected override find(key: MK): Entry<MK, MV> | undefined {
    return this.m.get(this.name(key));
  }

  protected override put(e: Entry<MK, MV>): void {
    this.m.set(this.name(e.key), e);
  }

  protected override remove(key: MK): boolean {
    return this.m.delete(this.name(key));
  }

  protected override all(): Array<Entry<MK, MV>> {
    return [...this.m.values()];
  }

  protected override empty(): NamedTable<K, V, MK, MV> {
    return new NamedTable(this.name, this.keys, this.values, this.maxEntries);
  }
}
