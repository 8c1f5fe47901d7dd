/**
 * Writes dataplane/generated/objects.ts from the built BPF objects, the way
 * bpf2go or a libbpf skeleton does: the program names of each build, each map's
 * type, key and value types and sizes (written once: the builds share them) and
 * its max_entries in each build (what the builds differ in), the layouts of the
 * structs the maps hold, and the enums and constants xmasq.h exports through BTF
 * (enum xmasq_btf_consts and struct xmasq_btf_export). maps.ts and the agent
 * import them, so a renamed map, program, counter or constant fails `tsc`
 * instead of a run.
 *
 * `npm run build:bpf` runs it after make (bpf/Makefile). Usage:
 *   tsx scripts/gen-objects.ts [--check]
 * --check writes nothing and fails if the committed file differs.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { readEnum, readMaps, readStructLayouts, type StructLayout } from '../dataplane/btf.ts';
import { BpfObject, MapType } from '../dataplane/libbpf.ts';

export const GENERATED = fileURLToPath(new URL('../dataplane/generated/objects.ts', import.meta.url));
const BUILD = fileURLToPath(new URL('../bpf/build/', import.meta.url));

/** The builds of bpf/Makefile, by the name TypeScript calls them. */
const BUILD_FILES = { production: 'xmasq.bpf.o', test: 'xmasq.test.bpf.o', rpeer: 'xmasq.rpeer.bpf.o', bench: 'xmasq.bench.bpf.o' } as const;

/** C enum -> the prefix its values lose in TypeScript, and the exported name. */
const ENUMS = [
  { c: 'xmasq_btf_consts', prefix: 'XMASQ_BTF_', ts: 'CONSTS' },
  { c: 'xmasq_counter', prefix: 'XMASQ_CNT_', ts: 'COUNTER' },
  { c: 'xmasq_redirect_kind', prefix: 'XMASQ_REDIRECT_', ts: 'REDIRECT_KIND' },
  { c: 'xmasq_policy_dir', prefix: 'XMASQ_DIR_', ts: 'POLICY_DIR' },
  { c: 'xmasq_probe_cb', prefix: 'XMASQ_PROBE_', ts: 'PROBE_CB' },
] as const;

const MAP_TYPE_NAMES = new Map<number, string>(Object.entries(MapType).map(([k, v]) => [v, k.toLowerCase()]));

function same(a: unknown, b: unknown): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

/** The width the generated lines keep to. */
const WIDTH = 110;

const key = (k: string) => (/^[A-Za-z_$][\w$]*$/.test(k) ? k : `'${k}'`);

/** A value on one line: identifier keys unquoted, strings in single quotes. */
function flat(x: unknown): string {
  if (Array.isArray(x)) return `[${x.map(flat).join(', ')}]`;
  if (typeof x === 'object' && x !== null) {
    const e = Object.entries(x);
    return e.length ? `{ ${e.map(([k, v]) => `${key(k)}: ${flat(v)}`).join(', ')} }` : '{}';
  }
  return typeof x === 'string' ? `'${x.replace(/[\\']/g, '\\$&')}'` : String(x);
}

/**
 * A TypeScript literal: on one line when it fits, else an object's entries one to a
 * line (an enum reads as a list) and an array's short elements (a struct's members)
 * as many to a line as fit.
 */
function literal(x: unknown, indent = ''): string {
  const one = flat(x);
  if (one.length + indent.length <= WIDTH || typeof x !== 'object' || x === null) return one;
  const inner = indent + '  ';
  if (Array.isArray(x)) {
    const items = x.map((v) => literal(v, inner));
    if (items.some((i) => i.includes('\n'))) return `[\n${items.map((i) => inner + i).join(',\n')},\n${indent}]`;
    const lines: string[] = [];
    for (const i of items) {
      const last = lines.length - 1;
      if (last >= 0 && inner.length + lines[last].length + i.length + 3 <= WIDTH) lines[last] += `, ${i}`;
      else lines.push(i);
    }
    return `[\n${lines.map((l) => `${inner}${l},`).join('\n')}\n${indent}]`;
  }
  return `{\n${Object.entries(x).map(([k, v]) => `${inner}${key(k)}: ${literal(v, inner)}`).join(',\n')},\n${indent}}`;
}

export function generate(): string {
  const builds: Record<string, { file: string; programs: Record<string, string> }> = {};
  /** Each map as the builds declare it: what no build changes, and max_entries per build. */
  const maps = new Map<string, { decl: Record<string, unknown>; maxEntries: Record<string, number> }>();
  const structs = new Map<string, StructLayout>();
  const enums = new Map<string, Record<string, number>>();
  for (const [build, file] of Object.entries(BUILD_FILES)) {
    const path = BUILD + file;
    const obj = BpfObject.open(path);
    let sections: Record<string, string>;
    try {
      sections = obj.programSections();
    } finally {
      obj.close();
    }
    const layouts = readStructLayouts(path);
    for (const m of readMaps(path)) {
      const type = MAP_TYPE_NAMES.get(m.type);
      if (!type) throw new Error(`${path}: map ${m.name} has type ${m.type}, which dataplane/libbpf/map.ts MapType does not name`);
      // Only the size differs between builds (bpf/maps.h sizes the test build's maps
      // small); a map that changes its type or layout per build is not one map.
      const decl = { type, key: m.key, value: m.value, keySize: m.keySize, valueSize: m.valueSize };
      const prev = maps.get(m.name);
      if (prev && !same(prev.decl, decl)) throw new Error(`map ${m.name} differs between the builds (${path}): ${JSON.stringify(decl)} against ${JSON.stringify(prev.decl)}`);
      const entry = prev ?? { decl, maxEntries: {} as Record<string, number> };
      entry.maxEntries[build] = m.maxEntries;
      maps.set(m.name, entry);
      for (const t of [m.key, m.value]) {
        const layout = layouts.get(t);
        if (!layout) continue; // a plain integer
        const prevLayout = structs.get(t);
        if (prevLayout && !same(prevLayout, layout)) throw new Error(`struct ${t} differs between the builds (${path})`);
        structs.set(t, layout);
      }
    }
    builds[build] = { file, programs: Object.fromEntries(Object.entries(sections).sort(([a], [b]) => a.localeCompare(b))) };
    for (const e of ENUMS) {
      const raw = readEnum(path, e.c);
      const values = Object.fromEntries(Object.entries(raw).map(([k, v]) => {
        if (!k.startsWith(e.prefix)) throw new Error(`${path}: enum ${e.c} value ${k} lacks the prefix ${e.prefix}`);
        return [k.slice(e.prefix.length), v];
      }));
      const prev = enums.get(e.ts);
      if (prev && !same(prev, values)) throw new Error(`enum ${e.c} differs between the builds (${path})`);
      enums.set(e.ts, values);
    }
  }
  const out: string[] = [
    '// Generated by scripts/gen-objects.ts from bpf/build/*.bpf.o (npm run build:bpf). Do not edit:',
    '// change the C and rebuild. See that script for what comes from where.',
    '',
  ];
  for (const e of ENUMS) {
    const values = { ...enums.get(e.ts)! };
    out.push(`/** enum ${e.c} (bpf/xmasq.h), ${e.prefix} dropped. */`);
    if ('MAX' in values && e.c === 'xmasq_counter') {
      out.push(`export const COUNTER_MAX = ${values.MAX};`);
      delete values.MAX;
    }
    out.push(`export const ${e.ts} = ${literal(values)} as const;`, '');
  }
  const byName = <T>(m: Map<string, T>) => [...m.entries()].sort(([a], [b]) => a.localeCompare(b));
  const structObj = Object.fromEntries(byName(structs).map(([name, l]) => [name, {
    size: l.size, members: l.members.map((m) => [m.name, m.offset, m.size]),
  }]));
  out.push('/** The layout of every struct a map holds: its size, and each member as [name, offset, size] in bytes. */');
  out.push(`export const STRUCTS = ${literal(structObj)} as const;`, '');
  out.push('/** Every map of the builds: its type, key and value (a struct above or a C integer type) and their sizes, the same in each build. */');
  out.push(`export const OBJECT_MAPS = ${literal(Object.fromEntries(byName(maps).map(([n, m]) => [n, m.decl])))} as const;`, '');
  out.push('/** Each map\'s max_entries in each build that has it. */');
  out.push(`export const MAP_MAX_ENTRIES = ${literal(Object.fromEntries(byName(maps).map(([n, m]) => [n, m.maxEntries])))} as const;`, '');
  out.push('/** Each build of bpf/Makefile: its object and its programs (name: ELF section). */');
  out.push(`export const BUILDS = ${literal(builds)} as const;`, '');
  out.push('export type BuildName = keyof typeof BUILDS;');
  out.push("export type ProgramName<B extends BuildName = 'production'> = keyof (typeof BUILDS)[B]['programs'];");
  out.push('type MapNames = keyof typeof MAP_MAX_ENTRIES;');
  out.push('/** The maps build B has. */');
  out.push("export type ObjectMapName<B extends BuildName = 'production'> = { [M in MapNames]: B extends keyof (typeof MAP_MAX_ENTRIES)[M] ? M : never }[MapNames];");
  out.push('export type StructName = keyof typeof STRUCTS;');
  return out.join('\n') + '\n';
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  try {
    const text = generate();
    if (process.argv.includes('--check')) {
      let old = '';
      try {
        old = readFileSync(GENERATED, 'utf8');
      } catch {
        // missing counts as different
      }
      if (old !== text) {
        process.stderr.write(`${GENERATED} is not what bpf/build/*.bpf.o say: run 'npm run build:bpf' and commit it\n`);
        process.exit(1);
      }
    } else {
      writeFileSync(GENERATED, text);
    }
  } catch (e) {
    process.stderr.write(`gen-objects: ${(e as Error).message}\n`);
    process.exit(1);
  }
}
