/**
 * The datapath the simulated hosts run, as a swappable key scheme: the study
 * and the benchmark take one by name. '6-bit' is the datapath of sim/model
 * with narrow keys only (1..63 per host pair, drawn at random); 'wide' the
 * same programs with the agent's --wide-keys on (config flag WIDE_KEYS: a TCP
 * pair gets a 16-bit key); 'overlay' runs no XMasq at all (every program
 * passes), the baseline the fast path is measured against.
 */
import { ConfigFlag, MAX_ENTRIES } from '../../dataplane/maps.ts';
import { copyPacket, emptyState, init, masq, newEffects, restore, TC_ACT_OK, type DatapathState, type Env, type RunResult } from '../model/index.ts';

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

const wide: KeyScheme = {
  ...sixBit,
  name: 'wide',
  describe: 'sim/model with config flag WIDE_KEYS: every pair draws a key in 64..16383 (on the wire: the TCP urgent pointer, the UDP length, the ICMP echo code with DSCP)',
  newState: () => {
    const s = emptyState(MAX_ENTRIES.production);
    s.config.flags = ConfigFlag.WIDE_KEYS;
    return s;
  },
};

/**
 * Every program passes every packet untouched, as if XMasq were not attached.
 * Its own copy, as the model's programs return: the simulator reuses the frames it passes in.
 */
function passAll(pkt: Buffer): RunResult {
  return { verdict: TC_ACT_OK, packet: copyPacket(pkt), effects: PASS_EFFECTS };
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

export const KEY_SCHEMES: Record<string, KeyScheme> = { [sixBit.name]: sixBit, [wide.name]: wide, [overlayOnly.name]: overlayOnly };

export function keyScheme(name: string): KeyScheme {
  const s = KEY_SCHEMES[name];
  if (!s) throw new Error(`unknown key scheme "${name}"; the schemes are ${Object.keys(KEY_SCHEMES).join(', ')}`);
  return s;
}
