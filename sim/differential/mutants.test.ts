/** The differential run must catch every planted bug. */
import { expect, it } from 'vitest';
import { MUTANTS, checkMutants } from './mutants.ts';

it(`catches all ${MUTANTS.length} planted model bugs`, async () => {
  const results = await checkMutants(4000, 11);
  const survived = results.filter((r) => !r.caught).map((r) => r.name);
  expect(results.length).toBeGreaterThanOrEqual(5);
  expect(survived, `mutants not caught: ${survived.join(', ')}`).toEqual([]);
});
