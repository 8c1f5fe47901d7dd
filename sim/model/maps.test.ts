/**
 * The model's maps (maps.ts) against the maps of the built objects, read from
 * their ELF and BTF by libbpf (opened, not loaded: no privilege needed): a map
 * the C gains, loses or renames, or whose size changes, fails here until the
 * model follows it.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { BpfObject } from '../../dataplane/libbpf.ts';
import { FILTER_BLOCK_BYTES, MAX_ENTRIES } from '../../dataplane/maps.ts';
import { emptyState, type DatapathState } from './maps.ts';

/** Maps the model holds outside DatapathState: what a run reports (state.ts RunEffects). */
const IN_EFFECTS = { counters: 'RunEffects.counters', redirect_trace: 'RunEffects.redirect' } as const;

const OBJECTS = [
  { file: 'xmasq.bpf.o', sizes: MAX_ENTRIES.production, effects: ['counters'] },
  { file: 'xmasq.rpeer.bpf.o', sizes: MAX_ENTRIES.production, effects: ['counters'] },
  { file: 'xmasq.test.bpf.o', sizes: MAX_ENTRIES.test, effects: ['counters', 'redirect_trace'] },
];

function mapsOf(file: string): Map<string, number> {
  const path = fileURLToPath(new URL(`../../bpf/build/${file}`, import.meta.url));
  if (!existsSync(path)) throw new Error(`${path} is missing: run 'npm run build:bpf' first (npm test does)`);
  const obj = BpfObject.open(path);
  try {
    // Names with a dot are libbpf's own maps of global data (.rodata, .bss), not ours.
    return new Map(obj.maps().filter((n) => !n.includes('.')).map((n) => [n, obj.map(n).maxEntries]));
  } finally {
    obj.close();
  }
}

describe.each(OBJECTS)('the model holds every map of $file', ({ file, sizes, effects }) => {
  const built = mapsOf(file);
  const s = emptyState(sizes);

  it('by the same names', () => {
    const modelled = [...Object.keys(s), ...effects].sort();
    expect(modelled).toEqual([...built.keys()].sort());
    for (const e of effects) expect(IN_EFFECTS).toHaveProperty(e);
  });

  it('hash maps of the same max_entries', () => {
    for (const [name, max] of built) {
      const t = (s as unknown as Record<string, unknown>)[name] as DatapathState['pod_info'] | undefined;
      if (t && typeof t === 'object' && 'maxEntries' in t) expect({ name, max: t.maxEntries }).toEqual({ name, max });
    }
  });

  it('ct_recent of the same slots (one CPU\'s)', () => {
    expect(s.ct_recent.length).toBe(built.get('ct_recent'));
  });

  it("egress_filter of the same blocks (each block's bytes u32 words in the model)", () => {
    expect(s.egress_filter.length * 4).toBe(FILTER_BLOCK_BYTES * built.get('egress_filter')!);
  });
});
