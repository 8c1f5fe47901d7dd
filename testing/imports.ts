/**
 * The checkout's import graph, read from the sources with TypeScript's own parser
 * (static imports, `import type`, re-exports, dynamic imports, files read by URL), for
 * testing/imports.test.ts: what the product may import, and that nothing imports in
 * a circle.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { builtinModules } from 'node:module';
import { dirname, join, normalize } from 'node:path';
import ts from 'typescript';
import { ROOT } from './root.ts';

/**
 * One file's imports: files of the checkout (repository paths) and packages by name.
 * `typeOnly` are the files it imports only types from, which the compiled code never loads.
 */
export interface FileImports {
  files: string[];
  typeOnly: string[];
  packages: string[];
}

/** The imports of a TypeScript source, `file` being its repository path. */
export function importsOf(file: string, text: string): FileImports {
  const out: FileImports = { files: [], typeOnly: [], packages: [] };
  const add = (spec: string, typeOnly: boolean) => {
    if (spec.startsWith('.')) (typeOnly ? out.typeOnly : out.files).push(normalize(join(dirname(file), spec)));
    else if (!spec.startsWith('node:') && !builtinModules.includes(spec)) out.packages.push(spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0]);
  };
  const visit = (n: ts.Node): void => {
    if (ts.isImportDeclaration(n) && ts.isStringLiteral(n.moduleSpecifier)) {
      const c = n.importClause;
      const named = c?.namedBindings && ts.isNamedImports(c.namedBindings) ? c.namedBindings.elements : undefined;
      add(n.moduleSpecifier.text, !!c && (c.isTypeOnly || (!c.name && !!named && named.length > 0 && named.every((e) => e.isTypeOnly))));
    } else if (ts.isExportDeclaration(n) && n.moduleSpecifier && ts.isStringLiteral(n.moduleSpecifier)) {
      add(n.moduleSpecifier.text, n.isTypeOnly);
    } else if (ts.isCallExpression(n) && n.expression.kind === ts.SyntaxKind.ImportKeyword && n.arguments[0] && ts.isStringLiteralLike(n.arguments[0])) {
      add(n.arguments[0].text, false);
    } else if (ts.isImportTypeNode(n) && ts.isLiteralTypeNode(n.argument) && ts.isStringLiteral(n.argument.literal)) {
      add(n.argument.literal.text, true);
    } else if (ts.isNewExpression(n) && ts.isIdentifier(n.expression) && n.expression.text === 'URL' && n.arguments?.length === 2
      && ts.isStringLiteralLike(n.arguments[0]) && n.arguments[0].text.startsWith('.') && n.arguments[1].getText() === 'import.meta.url') {
      // A file read by path is a dependency as much as an import is.
      add(n.arguments[0].text, false);
    }
    ts.forEachChild(n, visit);
  };
  visit(ts.createSourceFile(file, text, ts.ScriptTarget.Latest, true));
  return out;
}

/** Every tracked .ts file of the checkout and its imports. */
export function checkoutGraph(): Map<string, FileImports> {
  // safe.directory: the checkout may belong to another user (test:unit runs as nobody).
  const files = execFileSync('git', ['-c', 'safe.directory=*', 'ls-files', '--cached', '--others', '--exclude-standard', '*.ts'], { cwd: ROOT, encoding: 'utf8' })
    .split('\n').filter((f) => f && !f.endsWith('.d.ts'));
  return new Map(files.map((f) => [f, importsOf(f, readFileSync(join(ROOT, f), 'utf8'))]));
}

/**
 * The import cycles of a graph (its strongly connected components of more than one
 * file, or a file importing itself), each as a path that closes on its first file.
 */
export function cycles(graph: ReadonlyMap<string, readonly string[]>): string[][] {
  // Tarjan's algorithm, iterative so a deep chain cannot overflow the stack.
  let next = 0;
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const found: string[][] = [];
  const edges = (v: string) => (graph.get(v) ?? []).filter((w) => graph.has(w));
  for (const root of graph.keys()) {
    if (index.has(root)) continue;
    const work: Array<{ v: string; i: number }> = [{ v: root, i: 0 }];
    index.set(root, next); low.set(root, next++); stack.push(root); onStack.add(root);
    while (work.length) {
      const top = work[work.length - 1];
      const out = edges(top.v);
      if (top.i < out.length) {
        const w = out[top.i++];
        if (!index.has(w)) {
          index.set(w, next); low.set(w, next++); stack.push(w); onStack.add(w);
          work.push({ v: w, i: 0 });
        } else if (onStack.has(w)) {
          low.set(top.v, Math.min(low.get(top.v)!, index.get(w)!));
        }
        continue;
      }
      work.pop();
      if (work.length) low.set(work[work.length - 1].v, Math.min(low.get(work[work.length - 1].v)!, low.get(top.v)!));
      if (low.get(top.v) !== index.get(top.v)) continue;
      const scc: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        onStack.delete(w);
        scc.push(w);
      } while (w !== top.v);
      if (scc.length > 1 || edges(top.v).includes(top.v)) found.push(closedPath(scc, edges));
    }
  }
  return found;
}

/** A path through a cycle's files, from its first file (in sorted order) back to it. */
function closedPath(scc: string[], edges: (v: string) => string[]): string[] {
  const members = new Set(scc);
  const start = [...scc].sort()[0];
  // Breadth-first from start to any file that imports start, within the component.
  const prev = new Map<string, string>([[start, '']]);
  const queue = [start];
  while (queue.length) {
    const v = queue.shift()!;
    for (const w of edges(v)) {
      if (w === start) {
        const path = [start];
        for (let u = v; u !== start; u = prev.get(u)!) path.splice(1, 0, u);
        return [...path, start];
      }
      if (members.has(w) && !prev.has(w)) {
        prev.set(w, v);
        queue.push(w);
      }
    }
  }
  return [start, start];
}

/** What ships: bpf/ and dataplane/ but their tests and test data. */
export const isProduct = (f: string) => /^(bpf|dataplane)\//.test(f) && !/\.test\.ts$/.test(f) && !/(^|\/)testdata\//.test(f);
