/**
 * npm run test:diff [-- --cases N --seed S|random]
 * Prints progress on stderr and, as its last line on stdout,
 * `differential: init=<n> restore=<n> masq=<n> mismatches=<m>`.
 */
import { parseArgs } from 'node:util';
import { DEFAULT_SEED, differentialRun, outcomeTable, seedFrom, summaryLine } from './run.ts';

const HELP = `usage: npm run test:diff -- [--cases N] [--seed S|random]

Runs every fixture and N generated cases per program (default 20000) on the
TypeScript model and on the compiled programs (BPF_PROG_TEST_RUN), and compares
verdict, redirect, counters, output packet and every map entry. Needs root.
The cases come from seed ${DEFAULT_SEED} unless --seed gives another (random: a
fresh one, printed). Exit status 1 if anything differs.`;

async function main(): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({ options: { cases: { type: 'string' }, seed: { type: 'string' }, help: { type: 'boolean', short: 'h' } } }));
  } catch (e) {
    console.error(`test:diff: ${(e as Error).message}\n\n${HELP}`);
    return 2;
  }
  if (values.help) {
    console.log(HELP);
    return 0;
  }
  const perProgram = Number(values.cases ?? 20000);
  if (!Number.isInteger(perProgram) || perProgram < 0) {
    console.error(`test:diff: --cases wants a whole number, got "${values.cases}"`);
    return 2;
  }
  let seed: number;
  try {
    seed = seedFrom(values.seed);
  } catch (e) {
    console.error(`test:diff: --seed: ${(e as Error).message}`);
    return 2;
  }
  console.error(`test:diff: ${perProgram} generated cases per program, seed ${seed} (rerun with --seed ${seed})`);
  const s = await differentialRun({ perProgram, seed, progress: (m) => console.error(`  ${m}`), report: 10 });
  for (const r of s.reports) console.error(r);
  console.error(`outcomes (cases per program and counter bumped):\n${outcomeTable(s)}`);
  console.log(summaryLine(s));
  return s.mismatches === 0 ? 0 : 1;
}

try {
  process.exitCode = await main();
} catch (e) {
  console.error(`test:diff: ${(e as Error).message}`);
  process.exitCode = 2;
}
