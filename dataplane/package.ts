/**
 * The xmasq package this code runs from, the same way from the sources (dataplane/…/*.ts
 * under tsx) and from the bundles (dist/*.mjs under node): its root is the nearest
 * directory above the running file whose package.json is xmasq's. The root holds
 * bpf/build/ (the datapath objects) and node_modules/ (koffi, the one native module,
 * which the bundles leave outside); its package.json holds the version.
 *
 * A bundle carries the version it was built from (scripts/bundle.ts defines
 * XMASQ_BUNDLE_VERSION), so a copy of it alone, such as the CNI plugin's beside its
 * wrapper in /opt/cni/bin, still knows it. Nothing is read until asked: the plugin's
 * bundle starts for every pod and needs neither.
 */
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const PACKAGE_NAME = 'xmasq';

/** Replaced by the version string in a bundle; no such global from the sources. */
declare const XMASQ_BUNDLE_VERSION: string | undefined;

interface Found {
  root: string;
  /** undefined when no package.json of xmasq is above the running file. */
  version: string | undefined;
}

let found: Found | undefined;

function readPackageJson(file: string): { name?: unknown; version?: unknown } | undefined {
  try {
    return JSON.parse(readFileSync(file, 'utf8')) as { name?: unknown; version?: unknown };
  } catch {
    return undefined; // absent or not JSON: not ours
  }
}

function find(): Found {
  if (found) return found;
  const start = dirname(fileURLToPath(import.meta.url));
  for (let dir = start; ; dir = dirname(dir)) {
    const pkg = readPackageJson(join(dir, 'package.json'));
    if (pkg?.name === PACKAGE_NAME && typeof pkg.version === 'string') return (found = { root: dir, version: pkg.version });
    // Copied out of its package: guess the layout of a checkout (dist/ or dataplane/ under the root).
    if (dirname(dir) === dir) return (found = { root: dirname(start), version: undefined });
  }
}

/** The package's root directory (no trailing slash). */
export function packageRoot(): string {
  return find().root;
}

/** The version in the package's package.json. */
export function packageVersion(): string {
  if (typeof XMASQ_BUNDLE_VERSION === 'string') return XMASQ_BUNDLE_VERSION;
  return find().version ?? `unknown (no package.json of ${PACKAGE_NAME} above ${dirname(fileURLToPath(import.meta.url))})`;
}

/** Where `make -C bpf` puts the datapath objects, with a trailing slash. */
export function bpfBuildDir(): string {
  return `${join(packageRoot(), 'bpf', 'build')}/`;
}
