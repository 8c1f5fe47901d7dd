/**
 * The policy compiler against the rules read plainly: for rule sets of
 * Kubernetes' shapes (blocks of every length, exceptions, port ranges,
 * protocols, both directions) and packets at and beside every edge, the
 * classifier and the walk over its tables (as bpf/policy.h walks them) deny
 * exactly what some rule matches. Also: every walk reads the key's bytes in
 * order, each at most once; a port range's prefixes cover it exactly; shared
 * shapes share tables; the rule checks.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { POLICY_ALLOW, POLICY_DENY, POLICY_KEY_BYTES, POLICY_POS_SHIFT, POLICY_TABLE_MASK } from '../maps.ts';
import { classifier, classify, compile, normaliseRule, policyKey, protoDportField, rangePrefixes, walkTables, type Tables } from './policy.ts';
import type { PolicyRuleRecord } from './protocol.ts';

interface Packet { dir: 'egress' | 'ingress'; src: number; dst: number; sport: number; dport: number; proto: number }

// ---- the rules read plainly, as a person reads them ----
const word = (a: string) => a.split('.').reduce((n, p) => n * 256 + Number(p), 0);
function inBlock(block: string | undefined, a: number): boolean {
  if (block === undefined) return true;
  const [net, len] = block.split('/');
  const size = 2 ** (32 - (len === undefined ? 32 : Number(len)));
  return Math.floor(word(net) / size) === Math.floor(a / size);
}
function matches(r: PolicyRuleRecord, p: Packet): boolean {
  const addr = (b: string | undefined, ex: string[] | undefined, a: number) => inBlock(b, a) && !(ex ?? []).some((e) => inBlock(e, a));
  const port = (lo: number | undefined, hi: number | undefined, x: number) => lo === undefined || (x >= lo && x <= (hi ?? lo));
  // ports exist for TCP and UDP only: the datapath sees 0 for every other protocol
  const ported = p.proto === 6 || p.proto === 17;
  return r.dir === p.dir && addr(r.src, r.srcExcept, p.src) && addr(r.dst, r.dstExcept, p.dst)
    && port(r.sport, r.sportEnd, ported ? p.sport : 0) && port(r.dport, r.dportEnd, ported ? p.dport : 0)
    && (r.proto === undefined || r.proto === p.proto);
}

const walk = (t: Tables, p: Packet) => {
  const ported = p.proto === 6 || p.proto === 17;
  return walkTables(t, p.dir, policyKey(p.src, p.dst, p.proto, ported ? p.dport : 0, ported ? p.sport : 0));
};

// ---- rule sets around a few addresses and ports, so that rules and packets meet ----
const ADDRS = [word('10.244.1.5'), word('10.244.2.7'), word('10.244.2.200'), word('192.168.0.1'), word('10.0.0.1')];
const PORTS = [1, 53, 79, 80, 81, 443, 8080, 65535];
const text = (n: number) => [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
const blockOf = (a: number, len: number) => `${text(len === 0 ? 0 : (a & ((0xffffffff << (32 - len)) >>> 0)) >>> 0)}/${len}`;

const block = fc.record({ a: fc.constantFrom(...ADDRS), len: fc.integer({ min: 0, max: 32 }), exceptLens: fc.array(fc.integer({ min: 1, max: 32 }), { maxLength: 2 }), flip: fc.array(fc.integer({ min: 1, max: 32 }), { maxLength: 2 }) })
  .map(({ a, len, exceptLens, flip }) => {
    const except = exceptLens.filter((l) => l > len).map((l, i) => blockOf(flip[i] > len && flip[i] <= l ? (a ^ (1 << (32 - flip[i]))) >>> 0 : a, l));
    return { block: len === 0 ? undefined : blockOf(a, len), except: except.length ? except : undefined };
  });
const ports = fc.oneof(fc.constant(undefined), fc.tuple(fc.constantFrom(...PORTS), fc.integer({ min: 0, max: 1000 })).map(([p, w]) => ({ p, end: Math.min(65535, p + w) })));
const rule = fc.record({ dir: fc.constantFrom('egress', 'ingress'), src: block, dst: block, sport: ports, dport: ports, proto: fc.constantFrom(undefined, 1, 6, 17, 132) })
  .map((r) => ({ ...r, proto: (r.sport || r.dport) && (r.proto === 1 || r.proto === 132) ? 6 : r.proto }));
const rules = fc.array(rule, { minLength: 0, maxLength: 12 }).map((rs) => rs.map((r, i) => normaliseRule({
  id: i + 1, dir: r.dir, src: r.src.block, srcExcept: r.src.except, dst: r.dst.block, dstExcept: r.dst.except,
  sport: r.sport?.p, sportEnd: r.sport?.end, dport: r.dport?.p, dportEnd: r.dport?.end, proto: r.proto,
}, () => i + 1)));
const near = (xs: number[]) => fc.constantFrom(...xs).chain((x) => fc.constantFrom(x, x - 1, x + 1, x ^ 0x100, x ^ 0x10000)).map((x) => x >>> 0);
const packet = fc.record({
  dir: fc.constantFrom('egress' as const, 'ingress' as const), src: near(ADDRS), dst: near(ADDRS),
  sport: near(PORTS).map((p) => p & 0xffff), dport: near(PORTS).map((p) => p & 0xffff), proto: fc.constantFrom(1, 6, 17, 132),
});

describe('policy compiler', () => {
  it('the classifier and the walk over its tables deny exactly what some rule matches', () => {
    fc.assert(fc.property(rules, fc.array(packet, { minLength: 20, maxLength: 20 }), (rs, ps) => {
      const c = classifier(rs);
      const t = compile(rs);
      for (const p of ps) {
        const want = rs.some((r) => matches(r, p));
        const ported = p.proto === 6 || p.proto === 17;
        const fields = [p.src, p.dst, protoDportField(p.proto, ported ? p.dport : 0), ported ? p.sport : 0];
        expect(classify(c, p.dir, fields), `classifier: ${JSON.stringify(p)} under ${JSON.stringify(rs)}`).toBe(want);
        expect(walk(t, p).denied, `tables: ${JSON.stringify(p)} under ${JSON.stringify(rs)}`).toBe(want);
      }
    }), { numRuns: 400, seed: 17 });
  });

  it("a walk reads the key's bytes in order, each at most once, whatever the rules", () => {
    fc.assert(fc.property(rules, fc.array(packet, { minLength: 20, maxLength: 20 }), (rs, ps) => {
      const t = compile(rs);
      // every slot leads to a verdict or to a table of a later byte: no cycle, no step past the key's last byte
      const posOf = (next: number) => next >>> POLICY_POS_SHIFT;
      for (const start of [t.start.egress, t.start.ingress]) {
        if (start !== POLICY_ALLOW && start !== POLICY_DENY) expect(t.tables.has(start & POLICY_TABLE_MASK)).toBe(true);
      }
      const posOfTable = new Map<number, number>();
      const steps = [t.start.egress, t.start.ingress];
      for (const slots of t.tables.values()) steps.push(...slots);
      for (const next of steps) if (next !== POLICY_ALLOW && next !== POLICY_DENY) posOfTable.set(next & POLICY_TABLE_MASK, posOf(next));
      const problems: string[] = [];
      for (const [id, slots] of t.tables) {
        const pos = posOfTable.get(id);
        if (pos === undefined || pos >= POLICY_KEY_BYTES) problems.push(`table ${id} reads byte ${pos}`);
        for (const next of slots) {
          if (next === POLICY_ALLOW || next === POLICY_DENY) continue;
          if (pos === undefined || posOf(next) <= pos) problems.push(`table ${id} (byte ${pos}) leads to byte ${posOf(next)}`);
          if (!t.tables.has(next & POLICY_TABLE_MASK)) problems.push(`table ${id} leads to table ${next & POLICY_TABLE_MASK}, which is not there`);
        }
      }
      expect(problems).toEqual([]);
      for (const p of ps) {
        const { read } = walk(t, p);
        expect(read.length).toBeLessThanOrEqual(POLICY_KEY_BYTES);
        for (let i = 1; i < read.length; i++) expect(read[i]).toBeGreaterThan(read[i - 1]);
      }
    }), { numRuns: 200, seed: 18 });
  });

  it("a port range's prefixes cover it exactly and are at most 30", () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: 65535 }), fc.integer({ min: 0, max: 65535 }), (a, b) => {
      const [lo, hi] = a <= b ? [a, b] : [b, a];
      const ps = rangePrefixes(lo, hi);
      expect(ps.length).toBeLessThanOrEqual(30);
      let next = lo;
      for (const p of ps) {
        expect(p.value).toBe(next);
        next += 2 ** (16 - p.len);
      }
      expect(next).toBe(hi + 1);
    }), { seed: 19 });
  });

  it('1,000 Kubernetes-style rules take a few tables, and rules of one shape share them', () => {
    // per pod (100), ten peer blocks with one port range each
    const rs: PolicyRuleRecord[] = [];
    for (let pod = 0; pod < 100; pod++) {
      for (let peer = 0; peer < 10; peer++) {
        rs.push(normaliseRule({ dir: 'ingress', src: `10.${100 + peer}.0.0/16`, srcExcept: [`10.${100 + peer}.7.0/24`], dst: `10.244.${pod >> 6}.${(pod & 63) + 2}`, dport: 8000 + peer, dportEnd: 8080 + peer, proto: 'tcp' }, () => rs.length + 1));
      }
    }
    const c = compile(rs);
    expect(c.tables.size).toBeLessThan(100);
    const p: Packet = { dir: 'ingress', src: word('10.103.9.9'), dst: word('10.244.0.7'), sport: 40000, dport: 8050, proto: 6 };
    expect(walk(c, p)).toEqual({ denied: true, read: [0, 1, 2, 4, 5, 6, 7, 8, 9, 10] });
    expect(walk(c, { ...p, src: word('10.103.7.9') }).denied).toBe(false);
    expect(walk(c, { ...p, dport: 8100 }).denied).toBe(false);
  });

  it('checks rules: blocks, exceptions, ranges', () => {
    const id = () => 1;
    expect(normaliseRule({ dir: 'egress', dst: '10.0.0.0/8', dstExcept: ['10.1.0.0/16', '10.1.0.0/16'], dport: 80, dportEnd: 80, mask: 26 }, id))
      .toEqual({ id: 1, dir: 'egress', dst: '10.0.0.0/8', dstExcept: ['10.1.0.0/16'], dport: 80 });
    expect(normaliseRule({ dir: 'egress', src: '10.1.2.3/32', dst: '0.0.0.0/0' }, id)).toEqual({ id: 1, dir: 'egress', src: '10.1.2.3' });
    expect(() => normaliseRule({ dir: 'egress', dst: '10.1.2.3/8' }, id)).toThrow(/host bits set: the block is 10\.0\.0\.0\/8/);
    expect(() => normaliseRule({ dir: 'egress', dst: '10.0.0.0/8', dstExcept: ['11.0.0.0/16'] }, id)).toThrow(/not inside rule\.dst/);
    expect(() => normaliseRule({ dir: 'egress', dst: '10.0.0.0/33' }, id)).toThrow(/CIDR block/);
    expect(() => normaliseRule({ dir: 'egress', dport: 90, dportEnd: 80 }, id)).toThrow(/dportEnd = 80/);
    expect(() => normaliseRule({ dir: 'egress', dportEnd: 80 }, id)).toThrow(/without rule\.dport/);
    expect(() => normaliseRule({ dir: 'egress', dport: 80, proto: 'icmp' }, id)).toThrow(/never match/);
  });
});
