/**
 * Deny rules: validated, turned into policy_rules keys, and the list of masks
 * in use kept beside them in policy_masks (see bpf/policy.h).
 */
import { POLICY_MAX_MASKS, PolicyDir, policyKey, policyMasks, policyRule, ruleMask, arrayIndex, type PolicyKey } from '../maps.ts';
import type { MapOps } from '../map-ops.ts';
import type { PolicyRuleRecord } from './protocol.ts';

export const PROTOCOLS: Record<string, number> = { icmp: 1, tcp: 6, udp: 17 };
const ANY_IP = '0.0.0.0';
const ZERO = arrayIndex.encode({ index: 0 });

function isIpv4(s: unknown): s is string {
  return typeof s === 'string' && /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.test(s) && s.split('.').every((p) => Number(p) <= 255 && String(Number(p)) === p);
}

/** A rule as the agent stores it: absent fields and 0 both mean any, normalised to absent. */
export function normaliseRule(spec: unknown, defaultId: () => number): PolicyRuleRecord {
  if (!spec || typeof spec !== 'object' || Array.isArray(spec)) throw new Error('rule must be an object like {"dir":"egress","dst":"10.244.2.7","dport":80,"proto":"tcp"}');
  const s = spec as Record<string, unknown>;
  const known = ['id', 'dir', 'src', 'dst', 'sport', 'dport', 'proto', 'mask'];
  for (const k of Object.keys(s)) if (!known.includes(k)) throw new Error(`rule field "${k}" is unknown; the fields are id, dir, src, dst, sport, dport, proto`);
  if (s.dir !== 'egress' && s.dir !== 'ingress') throw new Error(`rule.dir = ${JSON.stringify(s.dir)}: must be "egress" (leaving a local pod) or "ingress" (entering one)`);
  const r: PolicyRuleRecord = { id: 0, dir: s.dir, mask: 0 };
  for (const f of ['src', 'dst'] as const) {
    const v = s[f];
    if (v === undefined || v === null || v === '' || v === ANY_IP) continue;
    if (!isIpv4(v)) throw new Error(`rule.${f} = ${JSON.stringify(v)}: must be one IPv4 address like 10.244.1.5 (prefixes are not supported), or absent for any`);
    r[f] = v;
  }
  for (const f of ['sport', 'dport'] as const) {
    const v = s[f];
    if (v === undefined || v === null || v === 0) continue;
    if (!Number.isInteger(v) || (v as number) < 1 || (v as number) > 65535) throw new Error(`rule.${f} = ${JSON.stringify(v)}: must be a port 1-65535, or absent/0 for any`);
    r[f] = v as number;
  }
  if (s.proto !== undefined && s.proto !== null && s.proto !== 0) {
    const p = typeof s.proto === 'string' ? (PROTOCOLS[s.proto.toLowerCase()] ?? (/^\d+$/.test(s.proto) ? Number(s.proto) : NaN)) : s.proto;
    if (!Number.isInteger(p) || (p as number) < 1 || (p as number) > 255) throw new Error(`rule.proto = ${JSON.stringify(s.proto)}: must be tcp, udp, icmp or a protocol number 1-255, or absent for any`);
    r.proto = p as number;
  }
  if ((r.sport || r.dport) && r.proto !== undefined && r.proto !== 6 && r.proto !== 17) {
    throw new Error(`rule names a port with proto ${r.proto}: the datapath sees ports only for tcp (6) and udp (17), so this rule could never match`);
  }
  if (s.id === undefined || s.id === null) r.id = defaultId();
  else if (Number.isInteger(s.id) && (s.id as number) >= 1 && (s.id as number) <= 0xffffffff) r.id = s.id as number;
  else throw new Error(`rule.id = ${JSON.stringify(s.id)}: must be an integer 1-4294967295, or absent to pick one`);
  r.mask = ruleMask(toKey(r));
  return r;
}

export function toKey(r: Pick<PolicyRuleRecord, 'dir' | 'src' | 'dst' | 'sport' | 'dport' | 'proto'>): PolicyKey {
  return {
    src_ip: r.src ?? ANY_IP,
    dst_ip: r.dst ?? ANY_IP,
    src_port: r.sport ?? 0,
    dst_port: r.dport ?? 0,
    protocol: r.proto ?? 0,
    dir: r.dir === 'egress' ? PolicyDir.EGRESS : PolicyDir.INGRESS,
  };
}

export function fromKey(k: PolicyKey, id: number): PolicyRuleRecord {
  const r: PolicyRuleRecord = { id, dir: k.dir === PolicyDir.EGRESS ? 'egress' : 'ingress', mask: ruleMask(k) };
  if (k.src_ip !== ANY_IP) r.src = k.src_ip;
  if (k.dst_ip !== ANY_IP) r.dst = k.dst_ip;
  if (k.src_port) r.sport = k.src_port;
  if (k.dst_port) r.dport = k.dst_port;
  if (k.protocol) r.proto = k.protocol;
  return r;
}

const popcount = (m: number) => m.toString(2).replace(/0/g, '').length;

/** The distinct masks of rules; the order does not matter to the datapath (any match denies), so it is stable and readable. */
export function masksOf(rules: readonly PolicyRuleRecord[]): number[] {
  return [...new Set(rules.map((r) => r.mask))].sort((a, b) => popcount(b) - popcount(a) || b - a);
}

export function describeRule(r: PolicyRuleRecord): string {
  const proto = r.proto === undefined ? 'any' : Object.entries(PROTOCOLS).find(([, n]) => n === r.proto)?.[0] ?? String(r.proto);
  return `#${r.id} deny ${r.dir} ${r.src ?? '*'}:${r.sport ?? '*'} -> ${r.dst ?? '*'}:${r.dport ?? '*'} proto ${proto}`;
}

const sameMatch = (a: PolicyRuleRecord, b: PolicyRuleRecord) =>
  policyKey.encode(toKey(a)).equals(policyKey.encode(toKey(b)));

/**
 * The rules, mirrored into policy_rules and policy_masks. A rule is written
 * before its mask is listed and removed before its mask is dropped, so a
 * packet racing a change is judged by the old rules or by the new ones.
 */
export class PolicyTable {
  private rules: PolicyRuleRecord[];

  constructor(private readonly rulesMap: MapOps, private readonly masksMap: MapOps, initial: readonly PolicyRuleRecord[]) {
    this.rules = [...initial];
  }

  list(): PolicyRuleRecord[] {
    return [...this.rules].sort((a, b) => a.id - b.id);
  }

  masks(): number[] {
    return masksOf(this.rules);
  }

  /** Rules found in policy_rules (when the state file was lost). */
  static readMap(rulesMap: MapOps): PolicyRuleRecord[] {
    return rulesMap.lookupBatch().map(([k, v]) => fromKey(policyKey.decode(k), policyRule.decode(v).id));
  }

  /** Makes the maps hold exactly this.rules (at start, after a restart). */
  sync(): { removed: number; written: number } {
    const want = new Map(this.rules.map((r) => [policyKey.encode(toKey(r)).toString('hex'), r]));
    let removed = 0;
    for (const [k] of this.rulesMap.lookupBatch()) {
      if (want.has(k.toString('hex'))) continue;
      this.rulesMap.delete(k);
      removed++;
    }
    for (const r of this.rules) this.rulesMap.update(policyKey.encode(toKey(r)), policyRule.encode({ id: r.id }));
    this.writeMasks(this.masks());
    return { removed, written: this.rules.length };
  }

  nextId(): number {
    let id = 1;
    const used = new Set(this.rules.map((r) => r.id));
    while (used.has(id)) id++;
    return id;
  }

  add(spec: unknown): PolicyRuleRecord {
    const r = normaliseRule(spec, () => this.nextId());
    const dupId = this.rules.find((x) => x.id === r.id);
    if (dupId) throw new Error(`rule id ${r.id} is taken (${describeRule(dupId)}); pick another id or leave it out`);
    const dup = this.rules.find((x) => sameMatch(x, r));
    if (dup) throw new Error(`rule ${describeRule(dup)} already matches exactly this; delete it first to change its id`);
    if (this.rules.length >= this.rulesMap.maxEntries) throw new Error(`policy_rules is full (${this.rulesMap.maxEntries} rules); delete some first`);
    const masks = masksOf([...this.rules, r]);
    if (masks.length > POLICY_MAX_MASKS) {
      throw new Error(`this rule would make ${masks.length} distinct field masks; the datapath tries at most ${POLICY_MAX_MASKS} (every combination but one is in use): write it with the fields of an existing rule`);
    }
    this.rulesMap.update(policyKey.encode(toKey(r)), policyRule.encode({ id: r.id }), 'noexist');
    try {
      this.writeMasks(masks);
    } catch (e) {
      this.rulesMap.delete(policyKey.encode(toKey(r)));
      throw e;
    }
    this.rules.push(r);
    return r;
  }

  remove(id: number): PolicyRuleRecord {
    const r = this.rules.find((x) => x.id === id);
    if (!r) {
      const ids = this.rules.map((x) => x.id).sort((a, b) => a - b);
      throw new Error(`no rule with id ${id}; the ids are ${ids.length ? ids.join(', ') : '(none: no rules installed)'}`);
    }
    this.rulesMap.delete(policyKey.encode(toKey(r)));
    this.rules = this.rules.filter((x) => x !== r);
    this.writeMasks(this.masks());
    return r;
  }

  private writeMasks(masks: number[]): void {
    const mask = new Array<number>(POLICY_MAX_MASKS + 1).fill(0);
    masks.forEach((m, i) => (mask[i] = m));
    this.masksMap.update(ZERO, policyMasks.encode({ count: masks.length, mask }));
  }
}
