import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, expect, it } from 'vitest';
import { recordBase } from './records.ts';

let dir = '';
afterEach(() => rmSync(dir, { recursive: true, force: true }));

it("takes the day's name first, then -2, -3 … once any of the record's files exists", () => {
  dir = mkdtempSync(join(tmpdir(), 'xmasq-records-'));
  const exts = ['json', 'svg', 'md'];
  expect(recordBase(dir, 'demo-2026-12-07', exts)).toBe(join(dir, 'demo-2026-12-07'));
  writeFileSync(join(dir, 'demo-2026-12-07.md'), '');
  expect(recordBase(dir, 'demo-2026-12-07', exts)).toBe(join(dir, 'demo-2026-12-07-2'));
  writeFileSync(join(dir, 'demo-2026-12-07-2.svg'), '');
  expect(recordBase(dir, 'demo-2026-12-07', exts)).toBe(join(dir, 'demo-2026-12-07-3'));
  // another record's files do not count
  expect(recordBase(dir, 'vm-rpeer-2026-12-07', exts)).toBe(join(dir, 'vm-rpeer-2026-12-07'));
});
