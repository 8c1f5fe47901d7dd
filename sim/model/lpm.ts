/**
 * Twin of policy_trie (bpf/maps.h), a BPF_MAP_TYPE_LPM_TRIE keyed by struct
 * policy_lpm_key: a node, always matched whole, and a 32-bit field matched by
 * longest prefix. The kernel walks a path-compressed trie; here each node's
 * entries are kept by prefix length, longest first, and a lookup tries those
 * lengths in turn: the same answer, the longest prefix that matches.
 */
import { policyLpmKey, policyNext, type PolicyLpmKey } from '../../dataplane/maps.ts';

const maskOf = (len: number) => (len === 0 ? 0 : (0xffffffff << (32 - len)) >>> 0);

interface NodeEntries {
  /** Prefix lengths (of the field) in use under the node, longest first. */
  lens: number[];
  /** By length, the masked field value -> next. */
  byLen: Map<number, Map<number, number>>;
}

export class LpmTrie {
  private readonly nodes = new Map<number, NodeEntries>();
  private count = 0;

  constructor(readonly maxEntries: number) {}

  get size(): number {
    return this.count;
  }

  /** C: bpf_map_lookup_elem with prefixlen 64: the next of the longest prefix matching (node, field). */
  lookup(node: number, field: number): number | undefined {
    const n = this.nodes.get(node);
    if (!n) return undefined;
    for (const len of n.lens) {
      const next = n.byLen.get(len)!.get((field & maskOf(len)) >>> 0);
      if (next !== undefined) return next;
    }
    return undefined;
  }

  /** An entry as the agent writes it; false when the trie is full (the kernel's E2BIG/ENOSPC). */
  update(k: PolicyLpmKey, next: number): boolean {
    if (k.prefixlen < 32 || k.prefixlen > 64) throw new RangeError(`policy_lpm_key.prefixlen ${k.prefixlen}: the node's 32 bits are always matched whole`);
    const len = k.prefixlen - 32;
    const value = (k.field & maskOf(len)) >>> 0;
    let n = this.nodes.get(k.node);
    if (!n) this.nodes.set(k.node, (n = { lens: [], byLen: new Map() }));
    let m = n.byLen.get(len);
    if (!m) {
      n.byLen.set(len, (m = new Map()));
      n.lens.push(len);
      n.lens.sort((a, b) => b - a);
    }
    if (!m.has(value)) {
      if (this.count >= this.maxEntries) return false;
      this.count++;
    }
    m.set(value, next);
    return true;
  }

  /** Whether the exact entry (node, prefix) is there. */
  has(k: PolicyLpmKey): boolean {
    const len = k.prefixlen - 32;
    return this.nodes.get(k.node)?.byLen.get(len)?.has((k.field & maskOf(len)) >>> 0) ?? false;
  }

  /** True if the exact entry (node, prefix) was there. */
  delete(k: PolicyLpmKey): boolean {
    const len = k.prefixlen - 32;
    const n = this.nodes.get(k.node);
    const m = n?.byLen.get(len);
    if (!n || !m || !m.delete((k.field & maskOf(len)) >>> 0)) return false;
    this.count--;
    if (m.size === 0) {
      n.byLen.delete(len);
      n.lens = n.lens.filter((l) => l !== len);
      if (n.lens.length === 0) this.nodes.delete(k.node);
    }
    return true;
  }

  updateBytes(k: Buffer, v: Buffer): boolean {
    return this.update(policyLpmKey.decode(k), policyNext.decode(v).next);
  }

  /** Every entry, keys with the field's bits past the prefix zero (as the kernel gives them back). */
  entries(): Array<[PolicyLpmKey, number]> {
    const out: Array<[PolicyLpmKey, number]> = [];
    for (const [node, n] of this.nodes) {
      for (const [len, m] of n.byLen) for (const [field, next] of m) out.push([{ prefixlen: 32 + len, node, field }, next]);
    }
    return out;
  }

  entriesBytes(): Array<[Buffer, Buffer]> {
    return this.entries().map(([k, next]) => [policyLpmKey.encode(k), policyNext.encode({ next })]);
  }

  clone(): LpmTrie {
    const t = new LpmTrie(this.maxEntries);
    for (const [k, next] of this.entries()) t.update(k, next);
    return t;
  }
}
