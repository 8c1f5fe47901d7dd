/**
 * The TypeScript layouts in maps.ts against the BTF of the built objects:
 * every struct's size, every member's name, offset and size, every enum value.
 */
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { readEnum, readStructLayouts } from './btf.ts';
import {
  COUNTER_COUNT, Counter, PolicyDir, ProbeCb, RedirectKind,
  clock, config, ctAdmission, ctRecent, ctTuple, egressKey, ingressKey, nodeInfo, path, podInfo, policySlot, policyStart, redirectTrace,
} from './maps.ts';
import type { Struct } from './layout.ts';
import { GENERATED, generate } from '../scripts/gen-objects.ts';

const objects = ['xmasq.bpf.o', 'xmasq.test.bpf.o', 'xmasq.rpeer.bpf.o'].map((o) => fileURLToPath(new URL(`../bpf/build/${o}`, import.meta.url)));

describe.each(objects)('map layouts in %s', (obj) => {
  if (!existsSync(obj)) throw new Error(`${obj} is missing: run 'make -C bpf' first (npm test does)`);
  const btf = readStructLayouts(obj);

  // pod_ip/node_ip/array_index/counter_value are plain integers in C, not structs.
  // redirect_trace exists only in the test build.
  const testBuild = obj.endsWith('.test.bpf.o');
  const structs: Struct<never>[] = [podInfo, egressKey, ingressKey, path, config, clock, policySlot, policyStart, ctTuple, ctAdmission, ctRecent, nodeInfo,
    ...(testBuild ? [redirectTrace] : [])] as never;
  it.each(structs.map((s) => [s.name, s] as const))('struct %s matches', (name, s) => {
    const c = btf.get(name);
    if (!c) throw new Error(`struct ${name} is not in ${obj}'s BTF (is it used by a map?)`);
    expect({ name, size: s.size }).toEqual({ name, size: c.size });
    const want = c.members.map((m) => ({ name: m.name, offset: m.offset, size: m.size }));
    const got = s.fields.map((f) => ({ name: f.name, offset: f.offset, size: f.size }));
    expect(got).toEqual(want);
  });
});

// ct_recent is a flow and its admission as ct_admitted's key and value lay them
// out: 40 bytes, the admission's checked at 16 as in the flat struct it replaced,
// and each member's own layout is its struct's (so a slot copies them whole).
it('struct ct_recent is a ct_tuple and a ct_admission', () => {
  const obj = fileURLToPath(new URL('../bpf/build/xmasq.bpf.o', import.meta.url));
  const btf = readStructLayouts(obj);
  const members = btf.get('ct_recent')!.members.map((m) => ({ name: m.name, offset: m.offset, size: m.size }));
  expect({ size: btf.get('ct_recent')!.size, members }).toEqual({
    size: 40, members: [{ name: 'flow', offset: 0, size: 16 }, { name: 'admitted', offset: 16, size: 24 }],
  });
  expect(ctRecent.field('admitted').offset + ctAdmission.field('checked').offset).toBe(16);
  expect(ctRecent.field('flow').type).toEqual({ struct: ctTuple });
  expect(ctRecent.field('admitted').type).toEqual({ struct: ctAdmission });
  const slot = ctRecent.encode({
    flow: { saddr: '10.244.1.5', daddr: '10.244.2.6', sport: 40000, dport: 80, protocol: 6 },
    admitted: { checked: 7n, saddr: '10.244.1.5', daddr: '10.244.3.9', sport: 40000, dport: 8080 },
  });
  expect(slot.toString('hex')).toBe('0af401050af40206'+'9c400050'+'06000000'+'0700000000000000'+'0af401050af40309'+'9c401f90'+'00000000');
  expect(ctRecent.decode(slot).admitted.daddr).toBe('10.244.3.9');
});

// maps.ts takes its constants, enums, map names and sizes from this generated
// module; a stale one (vitest run without npm run build:bpf after a C change)
// would hold the TypeScript against yesterday's C.
it('dataplane/generated/objects.ts is what the built objects say', () => {
  const committed = readFileSync(GENERATED, 'utf8');
  expect(generate(), `${GENERATED} is stale: run npm run build:bpf`).toBe(committed);
});

// Read straight from BTF here rather than through the generated module.
it('the redirect kinds match the test build', () => {
  const obj = fileURLToPath(new URL('../bpf/build/xmasq.test.bpf.o', import.meta.url));
  const strip = (e: Record<string, number>, prefix: string) =>
    Object.fromEntries(Object.entries(e).filter(([k]) => k.startsWith(prefix)).map(([k, v]) => [k.slice(prefix.length), v]));
  expect(strip(readEnum(obj, 'xmasq_redirect_kind'), 'XMASQ_REDIRECT_')).toEqual(RedirectKind);
});

it('the counters and policy enums match the production build', () => {
  const obj = fileURLToPath(new URL('../bpf/build/xmasq.bpf.o', import.meta.url));
  const strip = (e: Record<string, number>, prefix: string) =>
    Object.fromEntries(Object.entries(e).map(([k, v]) => [k.slice(prefix.length), v]));
  expect({ ...Counter, MAX: COUNTER_COUNT }).toEqual(strip(readEnum(obj, 'xmasq_counter'), 'XMASQ_CNT_'));
  expect(PolicyDir).toEqual(strip(readEnum(obj, 'xmasq_policy_dir'), 'XMASQ_DIR_'));
  expect(ProbeCb).toEqual(strip(readEnum(obj, 'xmasq_probe_cb'), 'XMASQ_PROBE_'));
});
