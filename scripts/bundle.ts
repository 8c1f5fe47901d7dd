/**
 * npm run build:js: the agent, the CLI and the CNI plugin as plain JavaScript (ESM)
 * bundles in dist/, which run with node alone (no tsx, no dev dependency):
 *
 *   dist/xmasq-agent.mjs   dataplane/agent/main.ts     bin xmasq-agent, npm run agent, deploy/systemd
 *   dist/xmasq.mjs         dataplane/cli/main.ts       bin xmasq
 *   dist/xmasq-cni.mjs     dataplane/cni/xmasq-cni.ts  run by the dataplane/cni/xmasq wrapper
 *   dist/xmasq-cni-install.mjs  dataplane/cni/xmasq-cni-install.ts  the DaemonSet's plugin installer
 *
 * Left outside the bundles:
 * - koffi, a native module (a .node file per platform): the bundles import it as a
 *   package, which node finds in the node_modules/ beside dist/ (its lookup walks up from
 *   the bundle's directory). A copy of the package therefore needs dist/,
 *   node_modules/koffi, bpf/build/ (the datapath objects) and package.json (how
 *   dataplane/package.ts finds them). The version is built in.
 * - test, lab, demo, simulator and benchmark code: the product imports none
 *   (testing/imports.test.ts holds the sources to it); should a bundle hold any, the
 *   build fails.
 *
 * A bundle is written whole to a temporary file and renamed into place, and only when it
 * changed: a plugin that a runtime (or another test run) starts meanwhile never reads
 * half a file. vitest runs this first (globalSetup), so the tests run what they build.
 */
import { chmodSync, mkdirSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { commandLine } from '../testing/args.ts';

export const ROOT = fileURLToPath(new URL('..', import.meta.url));
export const DIST = join(ROOT, 'dist');

export const BUNDLES = {
  'xmasq-agent': 'dataplane/agent/main.ts',
  xmasq: 'dataplane/cli/main.ts',
  'xmasq-cni': 'dataplane/cni/xmasq-cni.ts',
  'xmasq-cni-install': 'dataplane/cni/xmasq-cni-install.ts',
} as const;

/** Path of a bundle by its name in BUNDLES. */
export const bundlePath = (name: keyof typeof BUNDLES) => join(DIST, `${name}.mjs`);

/** Source that no bundle may hold. */
const NOT_PRODUCT = /^(lab|demo|sim|fixtures|bench|testing|vm-tests|kernel-patch)\/|\.test\.ts$/;

export interface BundleResult {
  file: string;
  bytes: number;
  written: boolean;
}

export async function bundle(): Promise<BundleResult[]> {
  const { version } = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string };
  const r = await build({
    absWorkingDir: ROOT,
    entryPoints: Object.fromEntries(Object.entries(BUNDLES).map(([name, src]) => [name, join(ROOT, src)])),
    outdir: DIST,
    outExtension: { '.js': '.mjs' },
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    external: ['koffi'],
    define: { XMASQ_BUNDLE_VERSION: JSON.stringify(version) },
    banner: { js: '#!/usr/bin/env node' },
    metafile: true,
    write: false,
    logLevel: 'silent',
  });
  for (const [out, meta] of Object.entries(r.metafile.outputs)) {
    const foreign = Object.keys(meta.inputs).filter((i) => NOT_PRODUCT.test(i));
    if (foreign.length) throw new Error(`${out} would hold ${foreign.join(', ')}: product code must not import test, lab or simulator code`);
  }
  mkdirSync(DIST, { recursive: true });
  return r.outputFiles.map((f) => {
    let old: Buffer | undefined;
    try {
      old = readFileSync(f.path);
    } catch {
      // first build
    }
    const written = !old || !old.equals(f.contents);
    if (written) {
      const tmp = join(dirname(f.path), `.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`);
      writeFileSync(tmp, f.contents, { mode: 0o755 });
      renameSync(tmp, f.path);
    }
    // Only when needed: a run that writes nothing (npm run test:unit as nobody) may own nothing.
    if ((statSync(f.path).mode & 0o777) !== 0o755) chmodSync(f.path, 0o755);
    return { file: relative(ROOT, f.path), bytes: f.contents.length, written };
  });
}

/** vitest globalSetup: the tests spawn the bundles (the CNI plugin through its wrapper). */
export async function setup(): Promise<void> {
  await bundle();
}

const USAGE = `usage: npm run build:js [-- --help] [-- --version]

Bundles the agent, the CLI, the CNI plugin and its installer into dist/*.mjs (esbuild),
writing only the bundles whose bytes changed.`;

const line = process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url) ? commandLine('build:js', USAGE, process.argv.slice(2), {}) : undefined;
if (typeof line === 'number') process.exitCode = line;
else if (line) {
  bundle().then((files) => {
    // Quiet when nothing changed: npm run agent and npm run xmasq build first every time.
    for (const f of files) if (f.written) process.stderr.write(`build:js: wrote ${f.file} (${(f.bytes / 1024).toFixed(0)} KiB)\n`);
  }, (e: Error) => {
    // esbuild's own errors carry the file and line of each problem in their message.
    process.stderr.write(`build:js: ${e.message}\n`);
    process.exitCode = 1;
  });
}
