/**
 * Where a benchmark writes its record: bench/results/<stem>.<ext> for the day's
 * first run, then <stem>-2, <stem>-3, … so that a second run of the same day
 * does not overwrite a record that may already be committed.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';

/** The first of dir/stem, dir/stem-2, … none of whose exts exists (without an extension). */
export function recordBase(dir: string, stem: string, exts: readonly string[]): string {
  for (let n = 1; ; n++) {
    const base = join(dir, n === 1 ? stem : `${stem}-${n}`);
    if (!exts.some((e) => existsSync(`${base}.${e}`))) return base;
  }
}
