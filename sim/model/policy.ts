/**
 * Twin of bpf/policy.h. Every rule denies; a packet is denied if any mask in
 * use, applied to its 5-tuple, finds a rule.
 */
import { POLICY_MAX_MASKS, PolicyField } from '../../dataplane/maps.ts';
import type { Hdrs } from './packet.ts';
import type { DatapathState } from './maps.ts';
import { TC_ACT_SHOT, type ModelPolicyKey, type RunEffects } from './state.ts';

/** The C's stack local key, reused per lookup (packet.ts: Hdrs); a lookup only reads it. */
const k: ModelPolicyKey = { src_ip: 0, dst_ip: 0, src_port: 0, dst_port: 0, protocol: 0, dir: 0 };

/**
 * C: policy_denied, which checks for masks in use inline and only then calls
 * the mask loop, a global BPF function (policy_denied_tuple) for the verifier.
 */
export function policyDenied(s: DatapathState, src: number, dst: number, h: Hdrs, dir: number): boolean {
  const pm = s.policy_masks;
  if (pm.count === 0) return false;
  const n = pm.count;
  // C: the loop is bounded by POLICY_MAX_MASKS for the verifier, and stops at count.
  for (let i = 0; i < POLICY_MAX_MASKS; i++) {
    if (i >= n) break;
    const m = pm.mask[i];
    k.src_ip = m & PolicyField.SRC_IP ? src : 0;
    k.dst_ip = m & PolicyField.DST_IP ? dst : 0;
    k.src_port = m & PolicyField.SRC_PORT ? h.sport : 0;
    k.dst_port = m & PolicyField.DST_PORT ? h.dport : 0;
    k.protocol = m & PolicyField.PROTOCOL ? h.proto : 0;
    k.dir = dir;
    if (s.policy_rules.lookupElem(k)) return true;
  }
  return false;
}

export function policyDrop(fx: RunEffects): number {
  fx.counters.POLICY_DROP++;
  return TC_ACT_SHOT;
}
