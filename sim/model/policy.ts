/**
 * Twin of bpf/policy.h. From the direction's root node, each field of the
 * packet in turn is matched by longest prefix in policy_trie, giving the
 * verdict or the node for the next field.
 */
import { POLICY_ALLOW, POLICY_DENY, PolicyDir } from '../../dataplane/maps.ts';
import type { Hdrs } from './packet.ts';
import type { DatapathState } from './maps.ts';
import { TC_ACT_SHOT, type RunEffects } from './state.ts';

/** C: policy_root_node. */
function policyRootNode(s: DatapathState, dir: number): number {
  return dir === PolicyDir.INGRESS ? s.policy_root.ingress : s.policy_root.egress;
}

/**
 * C: policy_walk, a global BPF function (for the verifier) taking scalars.
 * The C packs the fields as the key's bytes from network-order ports; here
 * ports are host order (packet.ts: Hdrs), so each field is the key's
 * big-endian value: src, dst, proto << 16 | dport, sport.
 */
function policyWalk(s: DatapathState, node: number, src: number, dst: number, sport: number, dport: number, proto: number): boolean {
  // C: policy_step per field, in order; a miss is ALLOW.
  node = policyStep(s, node, src);
  if (node !== POLICY_ALLOW && node !== POLICY_DENY) node = policyStep(s, node, dst);
  if (node !== POLICY_ALLOW && node !== POLICY_DENY) node = policyStep(s, node, ((proto << 16) | dport) >>> 0);
  if (node !== POLICY_ALLOW && node !== POLICY_DENY) node = policyStep(s, node, sport);
  // The agent ends every walk by the last field; a node past it counts as a miss.
  return node === POLICY_DENY;
}

/** C: policy_step: the next node, or the verdict. */
function policyStep(s: DatapathState, node: number, field: number): number {
  return s.policy_trie.lookup(node, field) ?? POLICY_ALLOW;
}

/** The model keeps addresses as the C's u32 of network-order bytes (little-endian); the key wants their value. */
const addrValue = (a: number) => (((a & 0xff) << 24) | ((a & 0xff00) << 8) | ((a >>> 8) & 0xff00) | (a >>> 24)) >>> 0;

/** C: policy_denied: without rules in this direction, no walk at all. */
export function policyDenied(s: DatapathState, src: number, dst: number, h: Hdrs, dir: number): boolean {
  const root = policyRootNode(s, dir);
  if (root === POLICY_ALLOW) return false;
  return policyWalk(s, root, addrValue(src), addrValue(dst), h.sport, h.dport, h.proto);
}

export function policyDrop(fx: RunEffects): number {
  fx.counters.POLICY_DROP++;
  return TC_ACT_SHOT;
}
