/**
 * Struct layouts and enums from a BPF object's BTF, read with
 * `bpftool -j btf dump file`, so tests can hold dataplane/maps.ts against
 * what the compiler actually laid out.
 */
import { execFileSync } from 'node:child_process';

interface BtfType {
  id: number;
  kind: string;
  name: string;
  size?: number;
  type_id?: number;
  nr_elems?: number;
  members?: Array<{ name: string; type_id: number; bits_offset: number; bitfield_size?: number }>;
  values?: Array<{ name: string; val: number }>;
}

export interface StructLayout {
  size: number;
  members: Array<{ name: string; offset: number; size: number; bitSize?: number }>;
}

function dump(objectPath: string): Map<number, BtfType> {
  let out: string;
  try {
    out = execFileSync('bpftool', ['-j', 'btf', 'dump', 'file', objectPath], { encoding: 'utf8', maxBuffer: 64 << 20 });
  } catch (e) {
    throw new Error(`bpftool could not read the BTF of ${objectPath}: ${(e as Error).message.split('\n')[0]} (is bpftool installed? scripts/setup.sh installs it)`);
  }
  const types = (JSON.parse(out) as { types: BtfType[] }).types;
  return new Map(types.map((t) => [t.id, t]));
}

function sizeOf(types: Map<number, BtfType>, id: number): number {
  const t = types.get(id);
  if (!t) throw new Error(`BTF type ${id} is missing`);
  switch (t.kind) {
    case 'INT': case 'STRUCT': case 'UNION': case 'ENUM': case 'ENUM64': case 'FLOAT':
      return t.size!;
    case 'PTR':
      return 8;
    case 'ARRAY':
      return t.nr_elems! * sizeOf(types, t.type_id!);
    case 'TYPEDEF': case 'VOLATILE': case 'CONST': case 'RESTRICT': case 'TYPE_TAG':
      return sizeOf(types, t.type_id!);
    default:
      throw new Error(`BTF type ${id} (${t.kind} ${t.name}) has no size`);
  }
}

/** Every named struct of the object's BTF. */
export function readStructLayouts(objectPath: string): Map<string, StructLayout> {
  const types = dump(objectPath);
  const out = new Map<string, StructLayout>();
  for (const t of types.values()) {
    if (t.kind !== 'STRUCT' || !t.name || t.name === '(anon)') continue;
    out.set(t.name, {
      size: t.size!,
      members: (t.members ?? []).map((m) => ({
        name: m.name,
        offset: Math.floor(m.bits_offset / 8),
        size: m.bitfield_size ? Math.ceil(m.bitfield_size / 8) : sizeOf(types, m.type_id),
        ...(m.bitfield_size ? { bitSize: m.bitfield_size } : {}),
      })),
    });
  }
  return out;
}

/** A named enum of the object's BTF: constant name -> value. */
export function readEnum(objectPath: string, name: string): Record<string, number> {
  for (const t of dump(objectPath).values()) {
    if ((t.kind === 'ENUM' || t.kind === 'ENUM64') && t.name === name) {
      return Object.fromEntries((t.values ?? []).map((v) => [v.name, Number(v.val)]));
    }
  }
  throw new Error(`enum ${name} is not in the BTF of ${objectPath} (only enums that type a C object are)`);
}
