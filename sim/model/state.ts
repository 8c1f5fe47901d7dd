/**
 * The datapath's maps as the model sees them, with the kernel's semantics:
 * a hash table refuses a new key when full (E2BIG) or when BPF_NOEXIST finds
 * the key taken (EEXIST); lookup returns the live value, so writing to it is
 * writing to the map, as with a map value pointer in C.
 */
import {
  MAPS, COUNTER_NAMES, egressKey, ingressKey, podIp, policyKey,
  type CounterName, type Config, type EgressKey, type IngressKey, type Path, type PodInfo,
  type PolicyKey, type PolicyMasks, type PolicyRule, type RedirectKindName,
} from '../../dataplane/maps.ts';
import { ipWord } from './packet.ts';

export const EEXIST = -17;
export const E2BIG = -7;
export const ENOENT = -2;

/**
 * A table's keys: their C bytes both ways, and a name for a key that is equal
 * for two keys exactly when their bytes are, built from the fields without
 * encoding them (a lookup is the model's most frequent operation): text, a
 * number where the key's bits fit in one, or two parts (a key of two
 * addresses), which name an entry in a map of maps, so that no text is built
 * per lookup. Addresses are dotted quads as bytesToIpv4 writes them; update()
 * refuses any other spelling, so a key found by its name is the key the
 * kernel finds by its bytes.
 */
type KeyName = string | number;

interface KeyCodec<K> {
  encode(k: K): Buffer;
  decode(b: Buffer): K;
  /** The name, or its first part when there is a second. */
  name(k: K): KeyName;
  second?(k: K): KeyName;
}

function keysOf<K>(struct: { encode(k: K): Buffer; decode(b: Buffer): K }, name: (k: K) => KeyName, second?: (k: K) => KeyName): KeyCodec<K> {
  return { encode: (k) => struct.encode(k), decode: (b) => struct.decode(b), name, second };
}

/** The maps hold flat structs of numbers, bigints and strings: a spread copies one whole. */
function copyOf<T>(x: T): T {
  return typeof x === 'object' ? { ...x } : x;
}

interface Entry<K, V> {
  key: K;
  value: V;
}

export class HashTable<K, V> {
  /** Entries by name, or by the name's first part and then its second. */
  private readonly m = new Map<KeyName, Entry<K, V>>();
  private readonly m2 = new Map<KeyName, Map<KeyName, Entry<K, V>>>();
  private readonly twoParts: boolean;
  private count = 0;

  constructor(private readonly keyCodec: KeyCodec<K>, readonly maxEntries: number) {
    this.twoParts = keyCodec.second !== undefined;
  }

  private second(key: K): KeyName {
    return this.keyCodec.second!(key);
  }

  private find(key: K): Entry<K, V> | undefined {
    const first = this.keyCodec.name(key);
    return this.twoParts ? this.m2.get(first)?.get(this.second(key)) : this.m.get(first);
  }

  private put(key: K, e: Entry<K, V>): void {
    const first = this.keyCodec.name(key);
    if (!this.twoParts) {
      this.m.set(first, e);
      return;
    }
    let inner = this.m2.get(first);
    if (inner === undefined) this.m2.set(first, (inner = new Map()));
    inner.set(this.second(key), e);
  }

  get size(): number {
    return this.count;
  }

  lookup(key: K): V | undefined {
    return this.find(key)?.value;
  }

  /**
   * bpf_map_update_elem: 0, or a negative errno as the kernel returns it. The
   * map keeps copies, as the kernel copies key and value in: a caller changing
   * its objects afterwards does not change the map.
   */
  update(key: K, value: V, flag: 'any' | 'noexist' | 'exist' = 'any'): number {
    const old = this.find(key);
    if (old && flag === 'noexist') return EEXIST;
    if (!old && flag === 'exist') return ENOENT;
    if (!old && this.count >= this.maxEntries) return E2BIG;
    if (old) {
      old.value = copyOf(value);
      return 0;
    }
    this.checkSpelling(key);
    this.put(key, { key: copyOf(key), value: copyOf(value) });
    this.count++;
    return 0;
  }

  /** The key through its C bytes and back must have the same name (encode also throws on a bad field). */
  private checkSpelling(key: K): void {
    const canonical = this.keyCodec.decode(this.keyCodec.encode(key));
    const c = this.keyCodec;
    if (c.name(canonical) !== c.name(key) || (this.twoParts && this.second(canonical) !== this.second(key))) {
      throw new Error(`map key ${JSON.stringify(key)} is not spelt as its bytes decode (${JSON.stringify(canonical)}); write addresses as plain dotted quads`);
    }
  }

  delete(key: K): boolean {
    const first = this.keyCodec.name(key);
    let gone: boolean;
    if (!this.twoParts) gone = this.m.delete(first);
    else {
      const inner = this.m2.get(first);
      gone = inner !== undefined && inner.delete(this.second(key));
      if (gone && inner!.size === 0) this.m2.delete(first);
    }
    if (gone) this.count--;
    return gone;
  }

  private all(): Iterable<Entry<K, V>> {
    if (!this.twoParts) return this.m.values();
    return [...this.m2.values()].flatMap((inner) => [...inner.values()]);
  }

  entries(): Array<[K, V]> {
    return [...this.all()].map((e) => [e.key, e.value]);
  }

  clone(): HashTable<K, V> {
    const c = new HashTable<K, V>(this.keyCodec, this.maxEntries);
    for (const e of this.all()) c.put(e.key, { key: copyOf(e.key), value: copyOf(e.value) });
    c.count = this.count;
    return c;
  }
}

/** Everything the programs read or write, plus what they report. */
export interface DatapathState {
  pod_info: HashTable<string, PodInfo>;
  egress_cache: HashTable<EgressKey, Path>;
  ingress_cache: HashTable<IngressKey, Path>;
  config: Config;
  policy_rules: HashTable<PolicyKey, PolicyRule>;
  policy_masks: PolicyMasks;
}

/** C: egress_lookup_or_create. Undefined when the table is full. */
export function egressLookupOrCreate(s: DatapathState, ek: EgressKey): Path | undefined {
  const e = s.egress_cache.lookup(ek);
  if (e) return e;
  s.egress_cache.update(ek, emptyPath(), 'noexist');
  return s.egress_cache.lookup(ek);
}

export function emptyPath(): Path {
  return {
    last_seen: 0n, local_mac: '00:00:00:00:00:00', remote_mac: '00:00:00:00:00:00',
    local_ip: '0.0.0.0', remote_ip: '0.0.0.0', ifindex: 0, local_key: 0, remote_key: 0, remote_ready: 0,
  };
}

export interface Sizes { pods: number; paths: number; rules: number }

export function emptyState(sizes: Sizes): DatapathState {
  return {
    pod_info: new HashTable<string, PodInfo>({ encode: (ip) => podIp.encode({ ip }), decode: (b) => podIp.decode(b).ip, name: (ip) => ip }, sizes.pods),
    egress_cache: new HashTable<EgressKey, Path>(keysOf(egressKey, (k) => k.local_pod, (k) => k.remote_pod), sizes.paths),
    // 48 bits: init draws up to KEY_TRIES keys per packet, and a number is cheaper to hash than text.
    ingress_cache: new HashTable<IngressKey, Path>(keysOf(ingressKey, (k) => ipWord(k.remote_host) * 0x10000 + k.key), sizes.paths),
    config: { nic_ifindex: 0, flags: 0 },
    policy_rules: new HashTable<PolicyKey, PolicyRule>(
      keysOf(policyKey, (k) => `${k.src_ip} ${k.dst_ip} ${k.src_port} ${k.dst_port} ${k.protocol} ${k.dir}`), sizes.rules),
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
