/**
 * Struct layouts and enum values from a BPF object's BTF, read through
 * `bpftool -j btf dump file`. The tests hold the TypeScript codecs and
 * constants against these, so C and TypeScript cannot drift apart silently.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';

export interface StructMember {
  /** '' for an anonymous struct/union member. */
  name: string;
  /** Byte offset; for a bitfield, the byte holding its first bit. */
  offset: number;
  /** Byte size of the member's type (a bitfield's underlying integer type). */
  size: number;
  /** Only for bitfields: the width in bits... */
  bitSize?: number;
  /** ...and the first bit's position within the byte at offset. */
  bitOffset?: number;
}

export interface StructLayout {
  size: number;
  members: StructMember[];
}

interface BtfMember { name: string; type_id: number; bits_offset: number; bitfield_size?: number }
interface BtfType {
  id: number;
  kind: string;
  name: string;
  size?: number;
  type_id?: number;
  nr_elems?: number;
  nr_bits?: number;
  bits_offset?: number;
  members?: BtfMember[];
  encoding?: string;
  /** A string when the number has more digits than a double holds exactly (see btfTypes). */
  values?: Array<{ name: string; val: number | string }>;
}

const cache = new Map<string, { stamp: string; types: Map<number, BtfType> }>();

/** Every BTF type of the object by id, from bpftool (cached until the file changes). */
function btfTypes(objectPath: string): Map<number, BtfType> {
  if (!existsSync(objectPath)) throw new Error(`cannot read BTF of ${objectPath}: no such file (build it first)`);
  const st = statSync(objectPath);
  const stamp = `${st.mtimeMs}:${st.size}:${st.ino}`;
  const hit = cache.get(objectPath);
  if (hit && hit.stamp === stamp) return hit.types;

  let out: string;
  try {
    out = execFileSync('bpftool', ['-j', 'btf', 'dump', 'file', objectPath], {
      encoding: 'utf8', maxBuffer: 512 << 20, stdio: ['ignore', 'pipe', 'pipe'],
    });
  } catch (e) {
    const err = e as NodeJS.ErrnoException & { stderr?: string };
    if (err.code === 'ENOENT') throw new Error(`cannot read BTF of ${objectPath}: bpftool is not installed (apt-get install bpftool)`);
    throw new Error(`cannot read BTF of ${objectPath}: bpftool failed: ${(err.stderr || err.message).trim()} (was it compiled with -g?)`);
  }
  // bpftool prints a 32-bit unsigned enum's 0xffffffff sign-extended, as
  // 18446744073709551615, which JSON.parse would round; keep such values as text.
  const parsed = JSON.parse(out.replace(/"val":\s*(-?\d{16,})/g, '"val":"$1"')) as { types?: BtfType[] };
  if (!Array.isArray(parsed.types)) throw new Error(`cannot read BTF of ${objectPath}: bpftool's JSON has no "types" array`);
  const types = new Map(parsed.types.map((t) => [t.id, t]));
  cache.set(objectPath, { stamp, types });
  return types;
}

const QUALIFIERS = new Set(['TYPEDEF', 'VOLATILE', 'CONST', 'RESTRICT', 'TYPE_TAG']);

/** Follows typedefs and qualifiers down to the type that has the storage. */
function strip(types: Map<number, BtfType>, id: number): BtfType | undefined {
  for (let depth = 0; depth < 64; depth++) {
    if (id === 0) return undefined; // void
    const t = types.get(id);
    if (!t) throw new Error(`BTF type id ${id} is referenced but missing`);
    if (!QUALIFIERS.has(t.kind)) return t;
    id = t.type_id ?? 0;
  }
  throw new Error(`BTF type id ${id}: typedef/qualifier chain deeper than 64`);
}

function sizeOf(types: Map<number, BtfType>, id: number, what: string): number {
  const t = strip(types, id);
  if (!t) return 0;
  switch (t.kind) {
    case 'INT': case 'STRUCT': case 'UNION': case 'ENUM': case 'ENUM64': case 'FLOAT': case 'DATASEC':
      return t.size ?? 0;
    case 'PTR':
      return 8; // the BPF target is 64-bit
    case 'ARRAY':
      return (t.nr_elems ?? 0) * sizeOf(types, t.type_id ?? 0, what);
    case 'VAR':
      return sizeOf(types, t.type_id ?? 0, what);
    default:
      throw new Error(`${what}: BTF ${t.kind} '${t.name}' (id ${t.id}) has no size`);
  }
}

function anon(name: string): string {
  return name === '(anon)' ? '' : name;
}

function layoutOf(types: Map<number, BtfType>, t: BtfType): StructLayout {
  const members = (t.members ?? []).map((m): StructMember => {
    const what = `struct ${t.name}.${anon(m.name) || '(anon)'}`;
    let bits = m.bits_offset;
    let bitSize = m.bitfield_size ?? 0;
    // Old-style BTF (no kind_flag) encodes a bitfield in its INT type instead.
    const direct = types.get(m.type_id);
    if (!bitSize && direct?.kind === 'INT' && direct.size !== undefined &&
        ((direct.nr_bits ?? direct.size * 8) !== direct.size * 8 || (direct.bits_offset ?? 0) !== 0)) {
      bitSize = direct.nr_bits ?? 0;
      bits += direct.bits_offset ?? 0;
    }
    const offset = Math.floor(bits / 8);
    const out: StructMember = { name: anon(m.name), offset, size: sizeOf(types, m.type_id, what) };
    if (bitSize) {
      out.bitSize = bitSize;
      out.bitOffset = bits - offset * 8;
    }
    return out;
  });
  return { size: t.size ?? 0, members };
}

function sameLayout(a: StructLayout, b: StructLayout): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

/** The layout of every named struct in the object's BTF, by name. */
export function readStructLayouts(objectPath: string): Map<string, StructLayout> {
  const types = btfTypes(objectPath);
  const out = new Map<string, StructLayout>();
  for (const t of types.values()) {
    if (t.kind !== 'STRUCT' || anon(t.name) === '') continue;
    const layout = layoutOf(types, t);
    const prev = out.get(t.name);
    // Identical duplicates come from several compilation units; different
    // ones would make any answer for this name a guess.
    if (prev && !sameLayout(prev, layout)) {
      throw new Error(`${objectPath}: BTF has two different layouts named struct ${t.name}`);
    }
    out.set(t.name, layout);
  }
  return out;
}

/** One struct's layout; throws naming the structs the object has if it is missing. */
export function readStruct(objectPath: string, name: string): StructLayout {
  const all = readStructLayouts(objectPath);
  const s = all.get(name);
  if (!s) {
    throw new Error(`struct ${name} is not in ${objectPath}'s BTF (only types the programs or maps use are); it has: ${[...all.keys()].sort().join(', ')}`);
  }
  return s;
}

/**
 * The values of a named enum. An enum has BTF only if some emitted type or
 * variable uses it, so a constant the C code only compares against may be absent.
 */
export function readEnum(objectPath: string, name: string): Record<string, number> {
  const types = btfTypes(objectPath);
  const enums = [...types.values()].filter((t) => t.kind === 'ENUM' || t.kind === 'ENUM64');
  const e = enums.find((t) => t.name === name);
  if (!e) {
    const names = enums.map((t) => anon(t.name)).filter(Boolean).sort();
    throw new Error(`enum ${name} is not in ${objectPath}'s BTF (an enum is there only if some type uses it); it has: ${names.join(', ') || '(none)'}`);
  }
  const out: Record<string, number> = {};
  const bits = (e.size ?? 4) * 8;
  for (const v of e.values ?? []) {
    const big = BigInt(v.val);
    const val = e.encoding === 'SIGNED' ? BigInt.asIntN(bits, big) : BigInt.asUintN(bits, big);
    if (val > BigInt(Number.MAX_SAFE_INTEGER) || val < BigInt(Number.MIN_SAFE_INTEGER)) {
      throw new Error(`enum ${name}: ${v.name} = ${val} does not fit a JavaScript number`);
    }
    out[v.name] = Number(val);
  }
  return out;
}

export interface MapDef {
  name: string;
  /** enum bpf_map_type value, from __uint(type, ...). */
  type: number;
  maxEntries: number;
  /** The C type names of __type(key, ...) and __type(value, ...) ('__u32', 'pod_info', ...). */
  key: string;
  value: string;
  keySize: number;
  valueSize: number;
}

/**
 * Every map the object declares in SEC(".maps"), as libbpf reads it: __uint()
 * members are pointers to arrays whose length is the number, __type()
 * members pointers to the type.
 */
export function readMaps(objectPath: string): MapDef[] {
  const types = btfTypes(objectPath);
  const sec = [...types.values()].find((t) => t.kind === 'DATASEC' && t.name === '.maps');
  if (!sec) return [];
  const vars = (sec as BtfType & { vars?: Array<{ type_id: number }> }).vars ?? [];
  return vars.map(({ type_id }) => {
    const v = types.get(type_id);
    if (!v || v.kind !== 'VAR') throw new Error(`${objectPath}: .maps holds BTF id ${type_id}, not a variable`);
    const def = strip(types, v.type_id ?? 0);
    if (def?.kind !== 'STRUCT') throw new Error(`${objectPath}: map ${v.name} is not declared as a struct`);
    const member = (name: string) => {
      const m = def.members?.find((x) => x.name === name);
      if (!m) throw new Error(`${objectPath}: map ${v.name} declares no ${name}`);
      const ptr = strip(types, m.type_id);
      if (ptr?.kind !== 'PTR') throw new Error(`${objectPath}: map ${v.name}'s ${name} is not __uint()/__type()`);
      return ptr.type_id ?? 0;
    };
    const number = (name: string) => {
      const arr = strip(types, member(name));
      if (arr?.kind !== 'ARRAY') throw new Error(`${objectPath}: map ${v.name}'s ${name} is not __uint()`);
      return arr.nr_elems ?? 0;
    };
    const typeName = (id: number) => {
      const t = types.get(id);
      return t ? anon(t.name) || t.kind.toLowerCase() : 'void';
    };
    const key = member('key');
    const value = member('value');
    return {
      name: v.name, type: number('type'), maxEntries: number('max_entries'),
      key: typeName(key), value: typeName(value),
      keySize: sizeOf(types, key, `map ${v.name} key`), valueSize: sizeOf(types, value, `map ${v.name} value`),
    };
  });
}
