/**
 * Deny rules: validated, compiled into the classifier that bpf/policy.h walks
 * (policy_trie, policy_root), and kept in step with it.
 *
 * A rule is shaped as Kubernetes NetworkPolicy rules are: per direction, a
 * CIDR block of source and of destination (each with exceptions, ipBlock's
 * except), a protocol, and port ranges (port/endPort). Every rule denies.
 *
 * The classifier matches one field at a time, src, dst, protocol + dport,
 * sport, each by longest prefix under a node; a node stands for the set of
 * rules still possible after the fields before it, with only their remaining
 * fields (so rules that differ only in fields already matched share nodes). A
 * node's entries are its rules' prefixes for its field; an address's longest
 * matching prefix determines which rules hold, as the prefixes containing an
 * address form a chain. Hence a verdict costs at most POLICY_FIELDS lookups for
 * any rule set; the memory is what grows (bounded by policy_trie's size, which
 * the compile checks).
 *
 * Nodes are named by their content: a change writes the nodes that are new,
 * then switches policy_root, then deletes the nodes no longer reached, so a
 * packet racing a change walks the old classifier or the new one, both whole.
 */
import { POLICY_ALLOW, POLICY_DENY, POLICY_FIELDS, arrayIndex, policyLpmKey, policyNext, policyRoot } from '../maps.ts';
import type { MapOps } from '../map-ops.ts';

/** What PolicyTable uses of a map (dataplane/map-ops.ts): the kernel's or the cluster simulator's. */
export type PolicyMap = Pick<MapOps, 'maxEntries' | 'lookup' | 'update' | 'delete' | 'lookupBatch'>;
import type { PolicyRuleRecord } from './protocol.ts';

export const PROTOCOLS: Record<string, number> = { icmp: 1, tcp: 6, udp: 17 };
const TCP = 6;
const UDP = 17;
const ZERO = arrayIndex.encode({ index: 0 });

// ---- rules ----

/** A prefix of a 32-bit field: its value (bits past len are zero) and length. */
export interface Prefix { value: number; len: number }

const ANY: Prefix = { value: 0, len: 0 };

function ipv4Number(s: string): number | undefined {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(s);
  if (!m) return undefined;
  const parts = m.slice(1).map(Number);
  if (parts.some((p, i) => p > 255 || String(p) !== m[i + 1])) return undefined;
  return ((parts[0] << 24) | (parts[1] << 16) | (parts[2] << 8) | parts[3]) >>> 0;
}

const ipv4Text = (n: number) => [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
const maskOf = (len: number) => (len === 0 ? 0 : (0xffffffff << (32 - len)) >>> 0);

/** "10.0.0.0/8" or "10.1.2.3" (a /32) as a prefix; a clear error naming the rule's field otherwise. */
export function parseBlock(text: unknown, what: string): Prefix {
  if (typeof text !== 'string') throw new Error(`${what} = ${JSON.stringify(text)}: must be an IPv4 address or CIDR block like 10.244.1.5 or 10.244.0.0/16`);
  const [addr, len, ...rest] = text.split('/');
  const value = ipv4Number(addr);
  const n = len === undefined ? 32 : /^\d{1,2}$/.test(len) ? Number(len) : NaN;
  if (value === undefined || rest.length || !(n >= 0 && n <= 32)) {
    throw new Error(`${what} = ${JSON.stringify(text)}: must be an IPv4 address or CIDR block like 10.244.1.5 or 10.244.0.0/16`);
  }
  if ((value & ~maskOf(n)) >>> 0) {
    throw new Error(`${what} = ${JSON.stringify(text)} has host bits set: the block is ${ipv4Text((value & maskOf(n)) >>> 0)}/${n}`);
  }
  return { value, len: n };
}

/** A block as the agent stores it: an address alone for a /32, as before CIDR blocks. */
export function blockText(p: Prefix): string {
  return p.len === 32 ? ipv4Text(p.value) : `${ipv4Text(p.value)}/${p.len}`;
}

/** Whether a contains b (every value b matches, a matches). */
export function contains(a: Prefix, b: Prefix): boolean {
  return a.len <= b.len && (a.len === 0 || (a.value ^ b.value) >>> (32 - a.len) === 0);
}

/** The fewest prefixes of a 16-bit number that cover [lo, hi] exactly, as {value, len of 16}. */
export function rangePrefixes(lo: number, hi: number): Prefix[] {
  const out: Prefix[] = [];
  while (lo <= hi) {
    let size = 1;
    // the largest aligned block starting at lo that stays within hi
    while (size < 0x10000 && lo % (size * 2) === 0 && lo + size * 2 - 1 <= hi) size *= 2;
    out.push({ value: lo, len: 16 - Math.log2(size) });
    lo += size;
  }
  return out;
}

const FIELDS = ['id', 'dir', 'src', 'dst', 'srcExcept', 'dstExcept', 'sport', 'sportEnd', 'dport', 'dportEnd', 'proto'];

/**
 * A rule as the agent stores it: absent fields and 0 both mean any, normalised
 * to absent; a /32 block is written as its address. ("mask", which records of
 * earlier versions hold, is accepted and dropped.)
 */
export function normaliseRule(spec: unknown, defaultId: () => number): PolicyRuleRecord {
  if (!spec || typeof spec !== 'object' || Array.isArray(spec)) throw new Error('rule must be an object like {"dir":"egress","dst":"10.244.2.0/24","dport":80,"proto":"tcp"}');
  const s = spec as Record<string, unknown>;
  for (const k of Object.keys(s)) if (!FIELDS.includes(k) && k !== 'mask') throw new Error(`rule field "${k}" is unknown; the fields are ${FIELDS.join(', ')}`);
  if (s.dir !== 'egress' && s.dir !== 'ingress') throw new Error(`rule.dir = ${JSON.stringify(s.dir)}: must be "egress" (leaving a local pod) or "ingress" (entering one)`);
  const r: PolicyRuleRecord = { id: 0, dir: s.dir };
  for (const f of ['src', 'dst'] as const) {
    const v = s[f];
    // 0.0.0.0 alone meant any before blocks, and still does
    const block = v === undefined || v === null || v === '' || v === '0.0.0.0' ? ANY : parseBlock(v, `rule.${f}`);
    if (block.len > 0) r[f] = blockText(block);
    const ex = s[`${f}Except`];
    if (ex === undefined || ex === null) continue;
    if (!Array.isArray(ex)) throw new Error(`rule.${f}Except = ${JSON.stringify(ex)}: must be a list of CIDR blocks inside rule.${f}`);
    const blocks = ex.map((e, i) => parseBlock(e, `rule.${f}Except[${i}]`));
    for (const [i, b] of blocks.entries()) {
      if (!contains(block, b) || b.len === block.len) {
        throw new Error(`rule.${f}Except[${i}] = ${blockText(b)} is not inside rule.${f} (${block.len ? blockText(block) : 'any'}): an exception must be a smaller block within it, as in Kubernetes' ipBlock`);
      }
    }
    const texts = [...new Set(blocks.map(blockText))].sort();
    if (texts.length) r[`${f}Except`] = texts;
  }
  for (const f of ['sport', 'dport'] as const) {
    const v = s[f];
    const end = s[`${f}End`];
    if (v === undefined || v === null || v === 0) {
      if (end !== undefined && end !== null) throw new Error(`rule.${f}End = ${JSON.stringify(end)} without rule.${f}: a range needs its first port`);
      continue;
    }
    if (!Number.isInteger(v) || (v as number) < 1 || (v as number) > 65535) throw new Error(`rule.${f} = ${JSON.stringify(v)}: must be a port 1-65535, or absent/0 for any`);
    r[f] = v as number;
    if (end === undefined || end === null || end === v) continue;
    if (!Number.isInteger(end) || (end as number) < (v as number) || (end as number) > 65535) {
      throw new Error(`rule.${f}End = ${JSON.stringify(end)}: must be a port from rule.${f} (${String(v)}) to 65535, the last of the range`);
    }
    r[`${f}End`] = end as number;
  }
  if (s.proto !== undefined && s.proto !== null && s.proto !== 0) {
    const p = typeof s.proto === 'string' ? (PROTOCOLS[s.proto.toLowerCase()] ?? (/^\d+$/.test(s.proto) ? Number(s.proto) : NaN)) : s.proto;
    if (!Number.isInteger(p) || (p as number) < 1 || (p as number) > 255) throw new Error(`rule.proto = ${JSON.stringify(s.proto)}: must be tcp, udp, icmp or a protocol number 1-255, or absent for any`);
    r.proto = p as number;
  }
  if ((r.sport || r.dport) && r.proto !== undefined && r.proto !== TCP && r.proto !== UDP) {
    throw new Error(`rule names a port with proto ${r.proto}: the datapath sees ports only for tcp (6) and udp (17), so this rule could never match`);
  }
  if (s.id === undefined || s.id === null) r.id = defaultId();
  else if (Number.isInteger(s.id) && (s.id as number) >= 1 && (s.id as number) <= 0xffffffff) r.id = s.id as number;
  else throw new Error(`rule.id = ${JSON.stringify(s.id)}: must be an integer 1-4294967295, or absent to pick one`);
  return r;
}

const portText = (p?: number, end?: number) => (p === undefined ? '*' : end === undefined ? String(p) : `${p}-${end}`);
const blockDesc = (b?: string, ex?: string[]) => `${b ?? '*'}${ex?.length ? ` except ${ex.join(',')}` : ''}`;

export function protoName(p: number | undefined): string {
  return p === undefined ? 'any' : Object.entries(PROTOCOLS).find(([, n]) => n === p)?.[0] ?? String(p);
}

export function describeRule(r: PolicyRuleRecord): string {
  return `#${r.id} deny ${r.dir} ${blockDesc(r.src, r.srcExcept)}:${portText(r.sport, r.sportEnd)} -> ${blockDesc(r.dst, r.dstExcept)}:${portText(r.dport, r.dportEnd)} proto ${protoName(r.proto)}`;
}

/** What a rule matches, apart from its id: equal for two rules exactly when they match the same fields alike. */
function matchKey(r: PolicyRuleRecord): string {
  return JSON.stringify([r.dir, r.src, r.srcExcept, r.dst, r.dstExcept, r.sport, r.sportEnd, r.dport, r.dportEnd, r.proto]);
}

// ---- the classifier ----

/**
 * One field of a rule: it holds for a value inside some include prefix and
 * inside no exclude prefix (an exclude always lies within an include).
 */
interface FieldMatch { inc: Prefix[]; exc: Prefix[]; key: string }

/** A rule's match on each field in walk order; key[f] names fields f.. alike for alike rules. */
interface Cond { fields: FieldMatch[]; rest: string[] }

const fieldMatch = (inc: Prefix[], exc: Prefix[] = []): FieldMatch =>
  ({ inc, exc, key: `${inc.map((p) => `${p.value}/${p.len}`).join(',')}-${exc.map((p) => `${p.value}/${p.len}`).join(',')}` });

/** The field values of the key (bpf/xmasq.h policy_lpm_key): proto + dport is 0, proto, dport; sport is 0, 0, sport. */
export const protoDportField = (proto: number, dport: number) => ((proto << 16) | dport) >>> 0;

function condOf(r: PolicyRuleRecord): Cond {
  const block = (b?: string, ex?: string[]) => fieldMatch([b ? parseBlock(b, 'block') : ANY], (ex ?? []).map((e) => parseBlock(e, 'except')));
  const ports = (p?: number, end?: number) => (p === undefined ? undefined : rangePrefixes(p, end ?? p));
  const dports = ports(r.dport, r.dportEnd);
  const sports = ports(r.sport, r.sportEnd);
  const protos = r.proto !== undefined ? [r.proto] : dports || sports ? [TCP, UDP] : [];
  // protocol (8 bits past a zero byte), then dport's prefix after it
  const pd = protos.length === 0 ? [ANY] : protos.flatMap((p) => (dports ?? [{ value: 0, len: 0 }]).map((d) => ({ value: protoDportField(p, d.value), len: 16 + d.len })));
  const sp = sports ? sports.map((s) => ({ value: s.value, len: 16 + s.len })) : [ANY];
  const fields = [block(r.src, r.srcExcept), block(r.dst, r.dstExcept), fieldMatch(pd), fieldMatch(sp)];
  const rest: string[] = [];
  for (let f = POLICY_FIELDS - 1, acc = ''; f >= 0; f--) rest[f] = acc = `${fields[f].key};${acc}`;
  return { fields, rest };
}

const trivial = (m: FieldMatch) => m.exc.length === 0 && m.inc.length === 1 && m.inc[0].len === 0;

/** An entry of policy_trie: under node, field's prefix leads to next. */
export interface TrieEntry { node: number; prefix: Prefix; next: number }

/** A compiled rule set: each direction's root and every node's entries. */
export interface Classifier {
  root: { egress: number; ingress: number };
  /** Entries by node, for the nodes the roots reach. */
  nodes: Map<number, TrieEntry[]>;
  /** Node ids by content, to name the same nodes alike in the next compile. */
  names: Map<string, number>;
  entries: number;
}

/**
 * Compiles rules into a classifier. Nodes whose content the previous compile
 * had keep its ids; new ones get ids neither uses (allocate).
 */
export function compile(rules: readonly PolicyRuleRecord[], previous: Map<string, number> = new Map(), allocate: () => number = counter()): Classifier {
  const nodes = new Map<number, TrieEntry[]>();
  const names = new Map<string, number>();
  let entries = 0;

  const build = (f: number, conds: Cond[]): number => {
    if (conds.length === 0) return POLICY_ALLOW;
    const unique = new Map<string, Cond>();
    for (const c of conds) {
      // a rule whose remaining fields are all "any" holds already
      if (c.fields.slice(f).every(trivial)) return POLICY_DENY;
      if (!unique.has(c.rest[f])) unique.set(c.rest[f], c);
    }
    const name = `${f}|${[...unique.keys()].sort().join('|')}`;
    const known = names.get(name);
    if (known !== undefined) return known;
    const id = previous.get(name) ?? allocate();
    names.set(name, id);
    const list = [...unique.values()];

    // Every prefix this field's matches name, in trie order (value, then shorter
    // first), so that each one's enclosing prefixes come before it.
    const adds = new Map<string, Cond[]>();
    const drops = new Map<string, Cond[]>();
    const prefixes = new Map<string, Prefix>([['0/0', ANY]]);
    const at = (m: Map<string, Cond[]>, p: Prefix, c: Cond) => {
      const k = `${p.value}/${p.len}`;
      prefixes.set(k, p);
      const l = m.get(k);
      if (l) l.push(c);
      else m.set(k, [c]);
    };
    for (const c of list) {
      for (const p of c.fields[f].inc) at(adds, p, c);
      for (const p of c.fields[f].exc) at(drops, p, c);
    }
    const order = [...prefixes.values()].sort((a, b) => a.value - b.value || a.len - b.len);
    // A walk down the prefixes with a stack of the enclosing ones: the rules
    // that hold at a prefix are those at its parent, plus those it includes,
    // less those it excepts.
    const stack: Array<{ p: Prefix; active: Set<Cond>; next: number }> = [];
    const out: TrieEntry[] = [];
    for (const p of order) {
      while (stack.length && !contains(stack[stack.length - 1].p, p)) stack.pop();
      const parent = stack[stack.length - 1];
      const active = new Set(parent?.active);
      const k = `${p.value}/${p.len}`;
      for (const c of adds.get(k) ?? []) active.add(c);
      for (const c of drops.get(k) ?? []) active.delete(c);
      const next = build(f + 1, [...active]);
      // A prefix leading where its parent does adds nothing; the root's miss already allows.
      if (next !== (parent ? parent.next : POLICY_ALLOW)) out.push({ node: id, prefix: p, next });
      stack.push({ p, active, next });
    }
    nodes.set(id, out);
    entries += out.length;
    return id;
  };

  const root: { egress: number; ingress: number } = { egress: POLICY_ALLOW, ingress: POLICY_ALLOW };
  for (const dir of ['egress', 'ingress'] as const) {
    root[dir] = build(0, rules.filter((r) => r.dir === dir).map(condOf));
    // a root that is a verdict (a rule with every field "any" denies all) is a node all the same
    if (root[dir] === POLICY_DENY) {
      const id = previous.get(`deny-all ${dir}`) ?? allocate();
      names.set(`deny-all ${dir}`, id);
      nodes.set(id, [{ node: id, prefix: ANY, next: POLICY_DENY }]);
      entries++;
      root[dir] = id;
    }
  }
  return { root, nodes, names, entries };
}

/** Node ids 1, 2, …: for a compile whose ids need not avoid any in use. */
export function counter(): () => number {
  let n = 0;
  return () => ++n;
}

/** The verdict the classifier gives, walked as bpf/policy.h walks policy_trie (for tests and tools). */
export function classify(c: Classifier, dir: 'egress' | 'ingress', fields: readonly number[]): boolean {
  let node = c.root[dir];
  if (node === POLICY_ALLOW) return false;
  for (let f = 0; f < POLICY_FIELDS; f++) {
    let best: TrieEntry | undefined;
    for (const e of c.nodes.get(node) ?? []) {
      if (contains(e.prefix, { value: fields[f], len: 32 }) && (!best || e.prefix.len > best.prefix.len)) best = e;
    }
    node = best ? best.next : POLICY_ALLOW;
    if (node === POLICY_ALLOW) return false;
    if (node === POLICY_DENY) return true;
  }
  return false;
}

/** The key and value bytes of an entry: the node's 32 bits, then the field's prefix. */
export function entryBytes(e: TrieEntry): [Buffer, Buffer] {
  return [policyLpmKey.encode({ prefixlen: 32 + e.prefix.len, node: e.node, field: e.prefix.value }), policyNext.encode({ next: e.next })];
}

/** The bytes of policy_root's slot for a classifier. */
export function rootBytes(c: Classifier): Buffer {
  return policyRoot.encode(c.root);
}

/**
 * The rules, compiled into policy_trie and policy_root. Every change compiles
 * the whole rule set again (the nodes it already has keep their ids and
 * entries) and writes only what differs.
 */
export class PolicyTable {
  private rules: PolicyRuleRecord[];
  private current: Classifier | undefined;

  /** initial: the state file's rules, checked again as if added (a file of an earlier version holds a "mask" more). */
  constructor(private readonly trieMap: PolicyMap, private readonly rootMap: PolicyMap, initial: readonly PolicyRuleRecord[]) {
    this.rules = initial.map((r, i) => {
      try {
        return normaliseRule(r, () => 0);
      } catch (e) {
        throw new Error(`policy rule ${i + 1} of the state file: ${(e as Error).message}`);
      }
    });
  }

  list(): PolicyRuleRecord[] {
    return [...this.rules].sort((a, b) => a.id - b.id);
  }

  /** Entries the rules take in policy_trie. */
  entries(): number {
    return this.current?.entries ?? 0;
  }

  /** Whether the pinned maps hold a classifier (with no state file, its rules cannot be read back from it). */
  static holdsRules(rootMap: PolicyMap): boolean {
    const v = rootMap.lookup(ZERO);
    if (!v) return false;
    const r = policyRoot.decode(v);
    return r.egress !== POLICY_ALLOW || r.ingress !== POLICY_ALLOW;
  }

  /** Makes the maps hold exactly this.rules (at start, after a restart): every entry not theirs goes. */
  sync(): { removed: number; written: number } {
    const inMap = this.trieMap.lookupBatch().map(([k]) => Buffer.from(k));
    const used = new Set(inMap.map((k) => policyLpmKey.decode(k).node));
    const next = this.compileAvoiding(this.rules, new Map(), used);
    for (const es of next.nodes.values()) for (const e of es) this.trieMap.update(...entryBytes(e));
    this.rootMap.update(ZERO, rootBytes(next));
    const want = new Set([...next.nodes.values()].flat().map((e) => entryBytes(e)[0].toString('hex')));
    const stale = inMap.filter((k) => !want.has(k.toString('hex')));
    for (const k of stale) this.trieMap.delete(k);
    this.current = next;
    return { removed: stale.length, written: next.entries };
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
    const dup = this.rules.find((x) => matchKey(x) === matchKey(r));
    if (dup) throw new Error(`rule ${describeRule(dup)} already matches exactly this; delete it first to change its id`);
    this.install([...this.rules, r]);
    this.rules.push(r);
    return r;
  }

  remove(id: number): PolicyRuleRecord {
    const r = this.rules.find((x) => x.id === id);
    if (!r) {
      const ids = this.rules.map((x) => x.id).sort((a, b) => a - b);
      throw new Error(`no rule with id ${id}; the ids are ${ids.length ? ids.join(', ') : '(none: no rules installed)'}`);
    }
    const rest = this.rules.filter((x) => x !== r);
    this.install(rest);
    this.rules = rest;
    return r;
  }

  private compileAvoiding(rules: readonly PolicyRuleRecord[], previous: Map<string, number>, used: Set<number>): Classifier {
    let n = 0;
    const allocate = () => {
      do n++; while (used.has(n));
      if (n >= POLICY_DENY) throw new Error('policy: no free node id left in policy_trie');
      return n;
    };
    const c = compile(rules, previous, allocate);
    if (c.entries > this.trieMap.maxEntries) {
      throw new Error(`these ${rules.length} rules compile to ${c.entries} policy_trie entries, more than it holds (${this.trieMap.maxEntries}); nothing was changed. Rules sharing blocks and ports take fewer`);
    }
    return c;
  }

  /**
   * New nodes first, then the roots, then the nodes no longer reached: a packet
   * walks the old classifier or the new one. A failed write takes the new
   * nodes out again and leaves the old classifier in place.
   */
  private install(rules: readonly PolicyRuleRecord[]): void {
    const old = this.current ?? this.compileAvoiding(this.rules, new Map(), new Set());
    const next = this.compileAvoiding(rules, old.names, new Set(old.nodes.keys()));
    const added = [...next.nodes].filter(([id]) => !old.nodes.has(id));
    const written: Buffer[] = [];
    try {
      for (const [, es] of added) {
        for (const e of es) {
          const [k, v] = entryBytes(e);
          this.trieMap.update(k, v, 'noexist');
          written.push(k);
        }
      }
      this.rootMap.update(ZERO, rootBytes(next));
    } catch (e) {
      for (const k of written) this.trieMap.delete(k);
      throw new Error(`policy: writing the classifier failed (${(e as Error).message}); the rules are as they were`);
    }
    for (const [id, es] of old.nodes) if (!next.nodes.has(id)) for (const e of es) this.trieMap.delete(entryBytes(e)[0]);
    this.current = next;
  }
}
