/**
 * The datapath the simulated hosts run, as a swappable key scheme: the study
 * and the benchmark take one by name. '6-bit' is the datapath of sim/model
 * with narrow keys only (1..63 per host pair, drawn at random); 'wide' the
 * same programs with the agent's --wide-keys on (config flag WIDE_KEYS: every
 * pair gets a 14-bit key); 'overlay' runs no XMasq at all (every program
 * passes), the baseline the fast path is measured against.
 */
import { ConfigFlag, MAX_ENTRIES } from '../../dataplane/maps.ts';
import { emptyState, initInPlace, masqInPlace, restoreInPlace, TC_CONTINUE, type DatapathState, type Env, type RunEffects } from '../model/index.ts';
import type { ModelCtTupleKey } from '../model/state.ts';
import { NamedTable, PairTable, WordTable } from './tables.ts';

/**
 * The model's maps (s, empty) in the simulator's tables (tables.ts), each
 * taking over the model table's codecs and size. ct_pending is named by a short string
 * of char codes rather than by the decimal text of its five numbers: its
 * per-packet updates (every packet of a TCP flow waiting for the agent's
 * drain) cost a third as much.
 */
export function simTables(s: DatapathState): DatapathState {
  const ctTupleName = (k: ModelCtTupleKey) => `${k.saddr} ${k.daddr} ${k.sport} ${k.dport} ${k.protocol}`;
  return {
    ...s,
    pod_info: new WordTable(s.pod_info.keys, s.pod_info.values, s.pod_info.maxEntries),
    nodes: new WordTable(s.nodes.keys, s.nodes.values, s.nodes.maxEntries),
    egress_cache: new PairTable({ first: (k) => k.local_pod, second: (k) => k.remote_pod, secondIsIndex: false },
      s.egress_cache.keys, s.egress_cache.values, s.egress_cache.maxEntries),
    // The remote host, then the key as an array index: init draws up to KEY_TRIES keys a packet.
    ingress_cache: new PairTable({ first: (k) => k.remote_host, second: (k) => k.key, secondIsIndex: true },
      s.ingress_cache.keys, s.ingress_cache.values, s.ingress_cache.maxEntries),
    ct_pending: new NamedTable((k) => String.fromCharCode(k.saddr & 0xffff, k.saddr >>> 16, k.daddr & 0xffff, k.daddr >>> 16, k.sport, k.dport, k.protocol),
      s.ct_pending.keys, s.ct_pending.values, s.ct_pending.maxEntries),
    ct_admitted: new NamedTable(ctTupleName, s.ct_admitted.keys, s.ct_admitted.values, s.ct_admitted.maxEntries),
  };
}

function simState(): DatapathState {
  return simTables(emptyState(MAX_ENTRIES.production));
}

/** A scheme's programs run on the simulator's frame in place, adding to the host's counters (masqInPlace). */
export interface KeyScheme {
  name: string;
  /** One line for reports. */
  describe: string;
  newState(): DatapathState;
  init(pkt: Buffer, s: DatapathState, env: Env, fx: RunEffects): number;
  restore(pkt: Buffer, s: DatapathState, env: Env, fx: RunEffects): number;
  masq(pkt: Buffer, s: DatapathState, env: Env, fx: RunEffects): number;
}

const sixBit: KeyScheme = {
  name: '6-bit',
  describe: 'sim/model: a random key in 1..63 per (remote host, pair), 9 draws, DSCP on the wire',
  newState: simState,
  init: initInPlace,
  restore: restoreInPlace,
  masq: (pkt, s, env, fx) => masqInPlace(pkt, s, env, fx, 'EGRESS'),
};

const wide: KeyScheme = {
  ...sixBit,
  name: 'wide',
  describe: 'sim/model with config flag WIDE_KEYS: every pair draws a key in 64..16383 (on the wire: the TCP urgent pointer, the UDP length, the ICMP echo code with DSCP)',
  newState: () => {
    const s = simState();
    s.config.flags = ConfigFlag.WIDE_KEYS;
    return s;
  },
};

/** Every program passes every packet untouched and counts nothing, as if XMasq were not attached. */
function passAll(): number {
  return TC_CONTINUE;
}

const overlayOnly: KeyScheme = {
  name: 'overlay',
  describe: 'no XMasq: every packet crosses the VXLAN overlay',
  newState: simState,
  init: passAll,
  restore: passAll,
  masq: passAll,
};

export const KEY_SCHEMES: Record<string, KeyScheme> = { [sixBit.name]: sixBit, [wide.name]: wide, [overlayOnly.name]: overlayOnly };

export function keyScheme(name: string): KeyScheme {
  const s = KEY_SCHEMES[name];
  if (!s) throw new Error(`unknown key scheme "${name}"; the schemes are ${Object.keys(KEY_SCHEMES).join(', ')}`);
  return s;
}
