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

export const EEXIST = -17;
export const E2BIG = -7;
export const ENOENT = -2;

type KeyCodec<K> = { encode(k: K): Buffer };

export class HashTable<K, V> {
  private readonly m = new Map<string, { key: K; value: V }>();

  constructor(private readonly keyCodec: KeyCodec<K>, readonly maxEntries: number) {}

  private id(key: K): string {
    return this.keyCodec.encode(key).toString('hex');
  }

  get size(): number {
    return this.m.size;
  }

  lookup(key: K): V | undefined {
    return this.m.get(this.id(key))?.value;
  }

  /** bpf_map_update_elem: 0, or a negative errno as the kernel returns it. */
  update(key: K, value: V, flag: 'any' | 'noexist' | 'exist' = 'any'): number {
    const id = this.id(key);
    const old = this.m.get(id);
    if (old && flag === 'noexist') return EEXIST;
    if (!old && flag === 'exist') return ENOENT;
    if (!old && this.m.size >= this.maxEntries) return E2BIG;
    this.m.set(id, { key: structuredClone(key), value: structuredClone(value) });
    return 0;
  }

  delete(key: K): boolean {
    return this.m.delete(this.id(key));
  }

  entries(): Array<[K, V]> {
    return [...this.m.values()].map((e) => [e.key, e.value]);
  }

  clone(): HashTable<K, V> {
    const c = new HashTable<K, V>(this.keyCodec, this.maxEntries);
    for (const [id, e] of this.m) c.m.set(id, structuredClone(e));
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
    pod_info: new HashTable<string, PodInfo>({ encode: (ip) => podIp.encode({ ip }) }, sizes.pods),
    egress_cache: new HashTable<EgressKey, Path>(egressKey, sizes.paths),
    ingress_cache: new HashTable<IngressKey, Path>(ingressKey, sizes.paths),
    config: { nic_ifindex: 0, flags: 0 },
    policy_rules: new HashTable<PolicyKey, PolicyRule>(policyKey, sizes.rules),
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

export function newEffects(): RunEffects {
  const counters = Object.fromEntries(COUNTER_NAMES.map((n) => [n, 0])) as Record<CounterName, number>;
  return { counters, redirect: { ifindex: 0, kind: 'NONE' } };
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
