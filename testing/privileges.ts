/**
 * The first check of every suite that needs root. CI runs as root, so a suite
 * never skips: started as another user it stops, saying what it needs root for.
 */
import { fileURLToPath } from 'node:url';
import { ROOT } from './root.ts';

/** Throws unless running as root; suiteUrl: the suite's import.meta.url, why: what it does that needs root. */
export function requireRoot(suiteUrl: string, why: string): void {
  if (process.getuid?.() === 0) return;
  const path = fileURLToPath(suiteUrl);
  const suite = path.startsWith(ROOT) ? path.slice(ROOT.length) : path;
  throw new Error(`${suite} needs root (${why}): run it as root`);
}
