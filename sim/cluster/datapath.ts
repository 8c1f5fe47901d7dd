/**
 * The datapath the simulated hosts run, as a swappable key scheme: the study
 * and the benchmark take one by name. '6-bit' is the datapath of sim/model
 * (keys 1..63 per host pair, drawn at random); 'overlay' runs no XMasq at
 * all (every program passes), the baseline the fast path is measured against.
 * A scheme with more keys adds itself here with its own model functions.
 */
import { MAX_ENTRIES } from '../../dataplane/maps.ts';
import { emptyState, init, masq, newEffects, restore, TC_ACT_OK, type DatapathState, type Env, type RunResult } from '../model/index.ts';

export interface KeyScheme {
  name: string;
  /** One line for reports. */
  describe: string;
  newState(): DatapathState;
  init(pkt: Buffer, s: DatapathState, env: Env): RunResult;
  restore(pkt: Buffer, s: DatapathState, env: Env): RunResult;
  masq(pkt: Buffer, s: DatapathState, env: Env): RunResult;
}

const sixBit: KeyScheme = {
  name: '6-bit',
  describe: 'sim/model: a random key in 1..63 per (remote host, pair), 9 draws, DSCP on the wire',
  newState: () => emptyState(MAX_ENTRIES.production),
  init,
  restore,
  masq: (pkt, s, env) => masq(pkt, s, env, 'EGRESS'),
};

/** Every program passes every packet untouched, as if XMasq were not attached. */
function passAll(pkt: Buffer): RunResult {
  return { verdict: TC_ACT_OK, packet: pkt, effects: PASS_EFFECTS };
}
const PASS_EFFECTS = newEffects();

const overlayOnly: KeyScheme = {
  name: 'overlay',
  describe: 'no XMasq: every packet crosses the VXLAN overlay',
  newState: () => emptyState(MAX_ENTRIES.production),
  init: passAll,
  restore: passAll,
  masq: passAll,
};

export const KEY_SCHEMES: Record<string, KeyScheme> = { [sixBit.name]: sixBit, [overlayOnly.name]: overlayOnly };

export function keyScheme(name: string): KeyScheme {
  const s = KEY_SCHEMES[name];
  if (!s) throw new Error(`unknown key scheme "${name}"; the schemes are ${Object.keys(KEY_SCHEMES).join(', ')}`);
  return s;
}
