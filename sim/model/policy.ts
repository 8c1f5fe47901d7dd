/**
 * Twin of bpf/policy.h. From the direction's start, the packet's key (src,
 * dst, protocol, dport, sport: 13 bytes) is read one byte a step, each step a
 * slot of policy_table, giving the verdict or the next byte and table.
 */
import { POLICY_ALLOW, POLICY_DENY, POLICY_KEY_BYTES, POLICY_POS_SHIFT, POLICY_TABLE_MASK, POLICY_TABLE_SLOTS, PolicyDir } from '../../dataplane/maps.ts';
import type { Hdrs } from './packet.ts';
import type { DatapathState } from './maps.ts';
import { TC_ACT_SHOT, type RunEffects } from './state.ts';

/** C: policy_start_of. */
function policyStartOf(s: DatapathState, dir: number): number {
  return dir === PolicyDir.INGRESS ? s.policy_start.ingress : s.policy_start.egress;
}

/**
 * C: policy_walk, a global BPF function (for the verifier) taking scalars.
 * The C holds the key in two words, bytes 0-7 and 8-12 (then zero bits), and
 * takes byte p from the first when p < 8, else from the second at p & 7; here
 * the two words are the key's 16 bytes, read the same way. Ports are host
 * order here (packet.ts: Hdrs), addresses their big-endian value.
 */
function policyWalk(s: DatapathState, next: number, src: number, dst: number, sport: number, dport: number, proto: number): boolean {
  const key = [src >>> 24, (src >>> 16) & 255, (src >>> 8) & 255, src & 255, dst >>> 24, (dst >>> 16) & 255, (dst >>> 8) & 255, dst & 255,
    proto, dport >>> 8, dport & 255, sport >>> 8, sport & 255, 0, 0, 0];
  for (let i = 0; i < POLICY_KEY_BYTES; i++) {
    if (next === POLICY_ALLOW || next === POLICY_DENY) break;
    const pos = next >>> POLICY_POS_SHIFT;
    const byte = pos < 8 ? key[pos] : key[8 + (pos & 7)];
    // C: bpf_map_lookup_elem on the array; NULL past its end is ALLOW
    next = s.policy_table.lookup((next & POLICY_TABLE_MASK) * POLICY_TABLE_SLOTS + byte) ?? POLICY_ALLOW;
  }
  // The agent ends every walk by the key's last byte; a walk going on past it counts as a miss.
  return next === POLICY_DENY;
}

/** The model keeps addresses as the C's u32 of network-order bytes (little-endian); the key wants their value. */
const addrValue = (a: number) => (((a & 0xff) << 24) | ((a & 0xff00) << 8) | ((a >>> 8) & 0xff00) | (a >>> 24)) >>> 0;

/** C: policy_denied: without rules in this direction, no walk at all. */
export function policyDenied(s: DatapathState, src: number, dst: number, h: Hdrs, dir: number): boolean {
  const start = policyStartOf(s, dir);
  if (start === POLICY_ALLOW) return false;
  return policyWalk(s, start, addrValue(src), addrValue(dst), h.sport, h.dport, h.proto);
}

export function policyDrop(fx: RunEffects): number {
  fx.counters.POLICY_DROP++;
  return TC_ACT_SHOT;
}
