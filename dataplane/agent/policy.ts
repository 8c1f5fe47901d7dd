/**
 * Deny rules: validated, compiled into the tables that bpf/policy.h walks
 * (policy_table, policy_start), and kept in step with them.
 *
 * A rule is shaped as Kubernetes NetworkPolicy rules are: per direction, a
 * CIDR block of source and of destination (each with exceptions, ipBlock's
 * except), a protocol, and port ranges (port/endPort). Every rule denies.
 *
 * Two stages. First a classifier over the four fields (src, dst, protocol +
 * dport, sport): a node stands for the set of rules still possible after the
 * fields before it, with only their remaining fields (so rules that differ
 * only in fields already matched share nodes), and holds its rules' prefixes
 * for its field; an address's longest matching prefix determines which rules
 * hold, as the prefixes containing an address form a chain. Then each node is
 * lowered into tables of 256 slots, one per value of a byte of the packet's
 * key, each prefix spread over the slots it covers: a table reads one byte
 * and leads to the table of a later byte, or to a verdict. A byte no
 * remaining rule looks at gets no table (a field no rule names, an address's
 * bytes past its longest prefix), so the walk reads each of the key's 13
 * bytes at most once, in order, whatever the rules: at most 13 array lookups.
 * What grows with the rules is the number of tables (bounded by
 * policy_table's size, which the compile checks).
 *
 * Tables are named by their content: a change writes the tables that are new,
 * then switches policy_start, then zeroes the tables no longer reached, so a
 * packet racing a change walks the old tables or the new ones, both whole.
 */
import {
  POLICY_ALLOW, POLICY_DENY, POLICY_KEY_BYTES, POLICY_POS_SHIFT, POLICY_TABLE_MASK, POLICY_TABLE_SLOTS, arrayIndex, policySlot, policyStart,
} from '../maps.ts';
import type { MapOps } from '../map-ops.ts';

/** What PolicyTable uses of a map (dataplane/map-ops.ts): the kernel's or the cluster simulator's. */
export type PolicyMap = Pick<MapOps, 'maxEntries' | 'lookup' | 'update'> & {
  /** count keys and values packed one after another, written in one go (BpfMap.updateBatch). */
  updateBatch(keys: Buffer, values: Buffer, count: number): void;
};
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

/** The classifier's fields, in walk order: src, dst, protocol + dport, sport. */
const POLICY_FIELDS = 4;

/**
 * One field of a rule: it holds for a value inside some include prefix and
 * inside no exclude prefix (an exclude always lies within an include).
 */
interface FieldMatch { inc: Prefix[]; exc: Prefix[]; key: string }

/** A rule's match on each field in walk order; key[f] names fields f.. alike for alike rules. */
interface Cond { fields: FieldMatch[]; rest: string[] }

const fieldMatch = (inc: Prefix[], exc: Prefix[] = []): FieldMatch =>
  ({ inc, exc, key: `${inc.map((p) => `${p.value}/${p.len}`).join(',')}-${exc.map((p) => `${p.value}/${p.len}`).join(',')}` });

/** A field's 32-bit value: an address; proto + dport is 0, proto, dport; sport is 0, 0, sport. */
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

/** An entry of a classifier node: field's prefix leads to next (a verdict, or a node of a later field). */
export interface NodeEntry { prefix: Prefix; next: number }

/** The rules as a classifier over the four fields: each direction's root (a verdict or a node) and every node. */
export interface Classifier {
  root: { egress: number; ingress: number };
  nodes: Map<number, { field: number; entries: NodeEntry[] }>;
}

/** The classifier of rules; its node ids (1, 2, …) are its own, the tables below are what the map holds. */
export function classifier(rules: readonly PolicyRuleRecord[]): Classifier {
  const nodes = new Map<number, { field: number; entries: NodeEntry[] }>();
  const names = new Map<string, number>();
  const allocate = counter();

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
    const id = allocate();
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
    const out: NodeEntry[] = [];
    for (const p of order) {
      while (stack.length && !contains(stack[stack.length - 1].p, p)) stack.pop();
      const parent = stack[stack.length - 1];
      const active = new Set(parent?.active);
      const k = `${p.value}/${p.len}`;
      for (const c of adds.get(k) ?? []) active.add(c);
      for (const c of drops.get(k) ?? []) active.delete(c);
      const next = build(f + 1, [...active]);
      // A prefix leading where its parent does adds nothing; a miss allows.
      if (next !== (parent ? parent.next : POLICY_ALLOW)) out.push({ prefix: p, next });
      stack.push({ p, active, next });
    }
    nodes.set(id, { field: f, entries: out });
    return id;
  };

  return {
    root: {
      egress: build(0, rules.filter((r) => r.dir === 'egress').map(condOf)),
      ingress: build(0, rules.filter((r) => r.dir === 'ingress').map(condOf)),
    },
    nodes,
  };
}

/** Node and table ids 1, 2, …: for a compile whose ids need not avoid any in use. */
export function counter(): () => number {
  let n = 0;
  return () => ++n;
}

/** The classifier's verdict: each field's longest matching prefix in turn (for tests and tools). */
export function classify(c: Classifier, dir: 'egress' | 'ingress', fields: readonly number[]): boolean {
  let node = c.root[dir];
  for (let f = 0; node !== POLICY_ALLOW && node !== POLICY_DENY && f < POLICY_FIELDS; f++) {
    let best: NodeEntry | undefined;
    for (const e of c.nodes.get(node)?.entries ?? []) {
      if (contains(e.prefix, { value: fields[f], len: 32 }) && (!best || e.prefix.len > best.prefix.len)) best = e;
    }
    node = best ? best.next : POLICY_ALLOW;
  }
  return node === POLICY_DENY;
}

// ---- the tables ----

// The lowering's hot loops read these: module locals, not imported bindings (a getter each under tsx).
const SLOTS = POLICY_TABLE_SLOTS;
const ALLOW = POLICY_ALLOW;
const DENY = POLICY_DENY;
const POS_SHIFT = POLICY_POS_SHIFT;

/**
 * Where byte b (0-3, first highest) of field f's 32-bit value is in the key
 * the walk reads (bpf/xmasq.h, XMASQ_POLICY_KEY_BYTES); -1: a byte always 0,
 * which needs no table (proto + dport's first, sport's first two).
 */
const KEY_POS = [[0, 1, 2, 3], [4, 5, 6, 7], [-1, 8, 9, 10], [-1, -1, 11, 12]];

/** A walk's next step: the key's byte and table (bpf/xmasq.h), or a verdict. */
const goOn = (pos: number, table: number) => ((pos << POS_SHIFT) | table) >>> 0;

/** Rules lowered into tables of policy_table: where each direction starts, and every table's slots. */
export interface Tables {
  start: { egress: number; ingress: number };
  /** Table id -> its SLOTS slots. */
  tables: Map<number, Uint32Array>;
  /** Table ids by content, to name the same tables alike in the next compile. */
  names: Map<string, number>;
  /** Slots holding something other than ALLOW (0), the entries written. */
  entries: number;
}

/** A table's content as text: the key's byte it reads and its slots in runs. */
function tableName(pos: number, slots: Uint32Array): string {
  let out = `${pos}:`;
  for (let v = 0; v < slots.length;) {
    let n = 1;
    while (v + n < slots.length && slots[v + n] === slots[v]) n++;
    out += `${slots[v]}*${n},`;
    v += n;
  }
  return out;
}

/**
 * Compiles rules into tables. Tables whose content the previous compile had
 * keep its ids; new ones get ids neither uses (allocate).
 */
export function compile(rules: readonly PolicyRuleRecord[], previous: Map<string, number> = new Map(), allocate: () => number = counter()): Tables {
  const c = classifier(rules);
  const tables = new Map<number, Uint32Array>();
  const names = new Map<string, number>();
  const lowered = new Map<number, number>();
  let entries = 0;

  /** Where the walk goes for a classifier's next: a verdict, or the first table of the node. */
  const target = (next: number): number => {
    if (next === ALLOW || next === DENY) return next;
    let v = lowered.get(next);
    if (v === undefined) {
      const node = c.nodes.get(next)!;
      const any = node.entries.find((e) => e.prefix.len === 0);
      v = under(node.field, 0, node.entries.filter((e) => e.prefix.len > 0), any ? any.next : ALLOW);
      lowered.set(next, v);
    }
    return v;
  };

  /**
   * The values of field f under a prefix of b whole bytes: inner, the node's
   * longer prefixes within it; d, where its longest prefix of b bytes or fewer
   * containing it leads. Byte b gets a table unless every value of it leads alike.
   */
  const under = (f: number, b: number, inner: NodeEntry[], d: number): number => {
    if (inner.length === 0) return target(d);
    const shift = 24 - 8 * b;
    const end = 8 * (b + 1);
    // each slot's longest prefix ending within this byte: shorter ones first, longer ones over them
    const dv = new Uint32Array(SLOTS).fill(d);
    const deeper = new Map<number, NodeEntry[]>();
    for (const e of inner.filter((x) => x.prefix.len <= end).sort((x, y) => x.prefix.len - y.prefix.len)) {
      const lo = (e.prefix.value >>> shift) & 255;
      dv.fill(e.next, lo, lo + 2 ** (end - e.prefix.len));
    }
    for (const e of inner) {
      if (e.prefix.len <= end) continue;
      const v = (e.prefix.value >>> shift) & 255;
      const l = deeper.get(v);
      if (l) l.push(e);
      else deeper.set(v, [e]);
    }
    const pos = KEY_POS[f][b];
    if (pos < 0) return under(f, b + 1, deeper.get(0) ?? [], dv[0]);
    const slots = new Uint32Array(SLOTS);
    for (let v = 0, lastD = -1, lastT = 0; v < SLOTS; v++) {
      const dl = deeper.get(v);
      if (dl) slots[v] = under(f, b + 1, dl, dv[v]);
      else if (dv[v] === lastD) slots[v] = lastT;
      else slots[v] = lastT = target((lastD = dv[v]));
    }
    // a table whose slots all lead alike would read its byte for nothing
    if (slots.every((x) => x === slots[0])) return slots[0];
    const name = tableName(pos, slots);
    let id = names.get(name);
    if (id === undefined) {
      id = previous.get(name) ?? allocate();
      names.set(name, id);
      tables.set(id, slots);
      entries += slots.filter((x) => x !== ALLOW).length;
    }
    return goOn(pos, id);
  };

  return { start: { egress: target(c.root.egress), ingress: target(c.root.ingress) }, tables, names, entries };
}

/** The walk over tables as bpf/policy.h makes it, over the key's 13 bytes: the verdict and the bytes read (for tests and tools). */
export function walkTables(t: Tables, dir: 'egress' | 'ingress', key: readonly number[]): { denied: boolean; read: number[] } {
  let next = t.start[dir];
  const read: number[] = [];
  for (let i = 0; i < POLICY_KEY_BYTES && next !== POLICY_ALLOW && next !== POLICY_DENY; i++) {
    const pos = next >>> POLICY_POS_SHIFT;
    read.push(pos);
    next = t.tables.get(next & POLICY_TABLE_MASK)?.[key[pos]] ?? POLICY_ALLOW;
  }
  return { denied: next === POLICY_DENY, read };
}

/** The key a walk reads (bpf/policy.h): src, dst, protocol, dport, sport, as bytes. */
export function policyKey(src: number, dst: number, proto: number, dport: number, sport: number): number[] {
  const be = (x: number, n: number) => Array.from({ length: n }, (_, i) => (x >>> (8 * (n - 1 - i))) & 255);
  return [...be(src, 4), ...be(dst, 4), proto, ...be(dport, 2), ...be(sport, 2)];
}

/** A table no rule uses: every slot ALLOW, as an unwritten one. */
const EMPTY = new Uint32Array(POLICY_TABLE_SLOTS);

/** The bytes of policy_start's slot for compiled tables. */
export function startBytes(t: Tables): Buffer {
  return policyStart.encode(t.start);
}

/**
 * The rules, compiled into policy_table and policy_start. Every change
 * compiles the whole rule set again (the tables it already has keep their ids
 * and slots) and writes only what differs.
 */
export class PolicyTable {
  private rules: PolicyRuleRecord[];
  private current: Tables | undefined;

  /** initial: the state file's rules, checked again as if added (a file of an earlier version holds a "mask" more). */
  constructor(private readonly tableMap: PolicyMap, private readonly startMap: PolicyMap, initial: readonly PolicyRuleRecord[]) {
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

  /** Slots the rules take in policy_table (those holding something other than ALLOW). */
  entries(): number {
    return this.current?.entries ?? 0;
  }

  /** Whether the pinned maps hold rules (with no state file, they cannot be read back from the tables). */
  static holdsRules(startMap: PolicyMap): boolean {
    const v = startMap.lookup(ZERO);
    if (!v) return false;
    const r = policyStart.decode(v);
    return r.egress !== POLICY_ALLOW || r.ingress !== POLICY_ALLOW;
  }

  /**
   * The tables the pinned maps' walks reach (an earlier agent's): read slot
   * by slot, following every step from policy_start.
   */
  private pinnedTables(): Set<number> {
    const v = this.startMap.lookup(ZERO);
    const start = v ? policyStart.decode(v) : { egress: POLICY_ALLOW, ingress: POLICY_ALLOW };
    const capacity = Math.floor(this.tableMap.maxEntries / POLICY_TABLE_SLOTS);
    const seen = new Set<number>();
    const todo = [start.egress, start.ingress];
    while (todo.length) {
      const next = todo.pop()!;
      if (next === POLICY_ALLOW || next === POLICY_DENY) continue;
      const id = next & POLICY_TABLE_MASK;
      if (seen.has(id) || id >= capacity) continue;
      seen.add(id);
      for (let b = 0; b < POLICY_TABLE_SLOTS; b++) {
        const slot = this.tableMap.lookup(arrayIndex.encode({ index: id * POLICY_TABLE_SLOTS + b }));
        if (slot) todo.push(policySlot.decode(slot).next);
      }
    }
    return seen;
  }

  /**
   * Makes the maps hold exactly this.rules (at start, after a restart): new
   * tables beside those the pinned walks reach, then the starts, then those
   * zeroed. Tables no walk reaches (an agent stopped while it changed them)
   * are left: every table is written whole, so ids are reused safely.
   */
  sync(): { removed: number; written: number } {
    const pinned = this.pinnedTables();
    const next = this.compileAvoiding(this.rules, new Map(), pinned);
    for (const [id, slots] of next.tables) this.writeTable(id, slots);
    this.startMap.update(ZERO, startBytes(next));
    for (const id of pinned) this.writeTable(id, EMPTY);
    this.current = next;
    return { removed: pinned.size, written: next.tables.size };
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

  /** Table 0 is never used (a step to it would be 0, ALLOW), so ids run from 1 to the map's last table. */
  private compileAvoiding(rules: readonly PolicyRuleRecord[], previous: Map<string, number>, used: Set<number>): Tables {
    let n = 0;
    const allocate = () => {
      do n++; while (used.has(n));
      return n;
    };
    const t = compile(rules, previous, allocate);
    const capacity = Math.floor(this.tableMap.maxEntries / POLICY_TABLE_SLOTS) - 1;
    const last = Math.max(0, ...t.tables.keys());
    if (last > capacity) {
      throw new Error(`these ${rules.length} rules compile to ${t.tables.size} policy_table tables, and with the ${used.size} in use while it changes that is more than it holds (${capacity}); nothing was changed. Rules sharing blocks and ports take fewer`);
    }
    return t;
  }

  /** A table's every slot, in one batch: a table never relies on what its id held before. */
  private writeTable(id: number, slots: Uint32Array): void {
    const keys = Buffer.alloc(POLICY_TABLE_SLOTS * arrayIndex.size);
    const values = Buffer.alloc(POLICY_TABLE_SLOTS * policySlot.size);
    for (let v = 0; v < POLICY_TABLE_SLOTS; v++) {
      arrayIndex.encode({ index: id * POLICY_TABLE_SLOTS + v }).copy(keys, v * arrayIndex.size);
      policySlot.encode({ next: slots[v] }).copy(values, v * policySlot.size);
    }
    this.tableMap.updateBatch(keys, values, POLICY_TABLE_SLOTS);
  }

  /**
   * New tables first, then the starts, then the tables no longer reached
   * zeroed: a packet walks the old tables or the new ones. A failed write
   * zeroes the new tables again and leaves the old ones in place.
   */
  private install(rules: readonly PolicyRuleRecord[]): void {
    const old = this.current ?? this.compileAvoiding(this.rules, new Map(), new Set());
    const next = this.compileAvoiding(rules, old.names, new Set(old.tables.keys()));
    const added = [...next.tables].filter(([id]) => !old.tables.has(id));
    try {
      for (const [id, slots] of added) this.writeTable(id, slots);
      this.startMap.update(ZERO, startBytes(next));
    } catch (e) {
      try {
        for (const [id] of added) this.writeTable(id, EMPTY);
      } catch {
        // no walk reaches them: the next sync or install writes over them whole
      }
      throw new Error(`policy: writing the tables failed (${(e as Error).message}); the rules are as they were`);
    }
    for (const id of old.tables.keys()) if (!next.tables.has(id)) this.writeTable(id, EMPTY);
    this.current = next;
  }
}
