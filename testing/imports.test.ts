/**
 * The layout's two rules, over every .ts file of the checkout: the product (bpf/ and
 * dataplane/ but their tests) imports nothing of the checkout's development rooms and no
 * package beyond package.json's "dependencies", and no file imports in a circle.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { checkoutGraph, cycles, importsOf, isProduct } from './imports.ts';
import { ROOT } from './root.ts';

const graph = checkoutGraph();
const { dependencies } = JSON.parse(readFileSync(`${ROOT}package.json`, 'utf8')) as { dependencies: Record<string, string> };

describe('the import graph', () => {
  it('reads static, type-only, re-exported and dynamic imports, and files read by URL', () => {
    const text = `import { a } from './a.ts';\nimport type { B } from '../b/b.ts';\nexport * from './c.ts';\n`
      + `const d = await import('../../lab/d.ts');\nimport koffi from 'koffi';\nimport { x } from '@scope/pkg/sub';\n`
      + `import { readFileSync } from 'node:fs';\nimport { join } from 'path';\nconst o = new URL('../bpf/build/o.bpf.o', import.meta.url);\n`;
    expect(importsOf('dataplane/agent/x.ts', text)).toEqual({
      files: ['dataplane/agent/a.ts', 'dataplane/agent/c.ts', 'lab/d.ts', 'dataplane/bpf/build/o.bpf.o'],
      typeOnly: ['dataplane/b/b.ts'],
      packages: ['koffi', '@scope/pkg'],
    });
    expect(importsOf('x.ts', `import { type A, type B } from './ab.ts';\nimport { type C, d } from './cd.ts';\nimport type * as E from './e.ts';\n`))
      .toEqual({ files: ['cd.ts'], typeOnly: ['ab.ts', 'e.ts'], packages: [] });
    // The checkout's own graph was read: the agent's entry point imports its config.
    expect(graph.get('dataplane/agent/main.ts')?.files).toContain('dataplane/agent/config.ts');
  });

  it('the product imports only the product, node and its dependencies', () => {
    const product = [...graph.keys()].filter(isProduct);
    expect(product.length).toBeGreaterThan(20);
    const wrong: string[] = [];
    for (const f of product) {
      const { files, typeOnly, packages } = graph.get(f)!;
      for (const t of [...files, ...typeOnly]) if (!isProduct(t) && !t.startsWith('bpf/build/') && t !== 'package.json') wrong.push(`${f} -> ${t}`);
      for (const p of packages) if (!(p in dependencies)) wrong.push(`${f} -> package ${p} (not in package.json's dependencies)`);
    }
    expect(wrong).toEqual([]);
  });

  it('finds a planted cycle, and a file importing itself', () => {
    const planted = new Map([['a', ['b']], ['b', ['c', 'd']], ['c', ['a']], ['d', []], ['e', ['e']], ['f', ['a']]]);
    expect(cycles(planted).sort()).toEqual([['a', 'b', 'c', 'a'], ['e', 'e']]);
  });

  // Type-only imports are left out: the compiled code never loads them, so two files
  // that name each other's types (a map and the object that makes it) load in any order.
  it('has no cycle of files', () => {
    const files = new Map([...graph].map(([f, i]) => [f, i.files]));
    expect(cycles(files).map((c) => c.join(' -> '))).toEqual([]);
  });

  // A room (a top-level folder, or one of sim/'s) whose code imports from another room
  // that imports back is one room in two places. Tests are left out (a test may reach into
  // any room to check its own), and so is data read by path (the fixtures' files).
  it('has no cycle of rooms', () => {
    const room = (f: string) => (f.startsWith('sim/') ? f.split('/').slice(0, 2).join('/') : f.split('/')[0]);
    const rooms = new Map<string, string[]>();
    for (const [f, i] of graph) {
      if (f.endsWith('.test.ts')) continue;
      const from = room(f);
      const to = [...i.files, ...i.typeOnly].filter((t) => t.endsWith('.ts')).map(room).filter((r) => r !== from);
      rooms.set(from, [...new Set([...(rooms.get(from) ?? []), ...to])]);
    }
    expect(rooms.get('lab')).toContain('testing');
    expect(cycles(rooms).map((c) => c.join(' -> '))).toEqual([]);
  });
});
