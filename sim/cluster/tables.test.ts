/**
 * The tables' own bookkeeping, against a plain Map run through the same
 * operations: the model's HashTable, and the simulator's PairTable, which
 * keeps its entries twice, in ordered maps for scans and the boundary and in
 * a flat index for the programs' lookups; the two must agree after any
 * sequence of inserts, updates and deletes, across the index's growth and the
 * reuse of its deleted slots.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { E2BIG, EEXIST, ENOENT, emptyState, zeroPath, type DatapathState, type HashTable, type ModelPath } from '../model/index.ts';
import { simTables } from './datapath.ts';

const SIZES = { pods: 16, paths: 64, policySlots: 32 * 256 };
type Flag = 'any' | 'noexist' | 'exist';
interface Op { del: boolean; first: number; second: number; flag: Flag }

/** What the kernel's hash table does, on a Map keyed by text. */
class Reference {
  readonly m = new Map<string, bigint>();
  constructor(private readonly max: number) {}

  update(first: number, second: number, stamp: bigint, flag: Flag): number {
    const id = `${first} ${second}`, old = this.m.has(id);
    if (old && flag === 'noexist') return EEXIST;
    if (!old && flag === 'exist') return ENOENT;
    if (!old && this.m.size >= this.max) return E2BIG;
    this.m.set(id, stamp);
    return 0;
  }
}

/** Runs ops on a table (key made by makeKey) and the reference, checking every result and lookup. */
function agree<MK>(table: HashTable<unknown, unknown, MK, ModelPath>, makeKey: (first: number, second: number) => MK, ops: Op[], firsts: number[], seconds: number[]): void {
  const ref = new Reference(table.maxEntries);
  ops.forEach((op, step) => {
    const key = makeKey(op.first, op.second);
    if (op.del) {
      expect(table.deleteElem(key)).toBe(ref.m.delete(`${op.first} ${op.second}`));
    } else {
      const stamp = BigInt(step + 1);
      expect(table.updateElem(key, { ...zeroPath(), last_seen: stamp }, op.flag)).toBe(ref.update(op.first, op.second, stamp, op.flag));
    }
    expect(table.lookupElem(key)?.last_seen).toBe(ref.m.get(`${op.first} ${op.second}`));
  });
  for (const f of firsts) for (const s of seconds) expect(table.lookupElem(makeKey(f, s))?.last_seen).toBe(ref.m.get(`${f} ${s}`));
  expect(table.size).toBe(ref.m.size);
  expect(table.entriesBytes().length).toBe(ref.m.size);
  const copy = table.clone();
  for (const f of firsts) for (const s of seconds) expect(copy.lookupElem(makeKey(f, s))?.last_seen).toBe(ref.m.get(`${f} ${s}`));
}

// Words at and above 2^31 too: the index holds key numbers as int32.
const HOSTS = [0x01fa1fac, 0x02fa1fac, 0x80fa1fac, 0xfffffffe];
const KEYS = [1, 2, 5, 63, 64, 65, 100, 8191, 16383];
const PODS = [0x0201f40a, 0x0301f40a, 0xc801f40a];

const opsOf = (firsts: number[], seconds: number[]) => fc.array(fc.record({
  del: fc.boolean(),
  first: fc.constantFrom(...firsts),
  second: fc.constantFrom(...seconds),
  flag: fc.constantFrom<Flag>('any', 'noexist', 'exist'),
}), { maxLength: 300 });

for (const [kind, tables] of [['the model\'s HashTable', (s: DatapathState) => s], ['the simulator\'s PairTable', simTables]] as const) {
describe(`tables: ${kind}`, () => {
  it('ingress_cache agrees with a plain map through any inserts, updates and deletes', () => {
    fc.assert(fc.property(opsOf(HOSTS, KEYS), (ops) => {
      agree(tables(emptyState(SIZES)).ingress_cache, (remote_host, key) => ({ remote_host, key }), ops, HOSTS, KEYS);
    }), { numRuns: 150 });
  });

  it('egress_cache agrees with a plain map through any inserts, updates and deletes', () => {
    fc.assert(fc.property(opsOf(PODS, PODS), (ops) => {
      agree(tables(emptyState(SIZES)).egress_cache, (local_pod, remote_pod) => ({ local_pod, remote_pod }), ops, PODS, PODS);
    }), { numRuns: 150 });
  });

  it('keeps every entry through growth to thousands of keys and the reuse of deleted slots', () => {
    const t = tables(emptyState({ pods: 16, paths: 65536, policySlots: 32 * 256 })).ingress_cache;
    const hosts = [0x01fa1fac, 0x80fa1fac];
    const keys = Array.from({ length: 3000 }, (_, i) => 64 + ((i * 7919) % 16000));
    const ops: Op[] = [];
    for (const first of hosts) for (const second of keys) ops.push({ del: false, first, second, flag: 'noexist' });
    for (const first of hosts) for (const second of keys.filter((_, i) => i % 3 === 0)) ops.push({ del: true, first, second, flag: 'any' });
    for (const first of hosts) for (const second of keys.filter((_, i) => i % 6 === 0)) ops.push({ del: false, first, second, flag: 'noexist' });
    agree(t, (remote_host, key) => ({ remote_host, key }), ops, hosts, keys);
  });
});
}
