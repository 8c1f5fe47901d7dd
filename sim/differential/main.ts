/**
 * npm run test:diff [-- --cases N --seed S|random]
 * Prints progress on stderr and, as its last line on stdout,
 * `differential: init=<n> restore=<n> masq=<n> mismatches=<m>`.
 */
import { commandLine, usageError, UsageError, intOption } from '../../testing/args.ts';
import { DEFAULT_SEED, differentialRun, outcomeTable, seedFrom, summaryLine } from './run.ts';

const HELP = `usage: npm run test:diff -- [--cases N] [--seed S|random] [--help] [--version]

Runs every fixture and N generated cases per program (default 20000) on the
TypeScript model and on the compiled programs (BPF_PROG_TEST_RUN), and compares
verdict, redirect, counters, output packet and every map entry. Needs root.
The cases come from seed ${DEFAULT_SEED} unless --seed gives another (random: a
fresh one, printed). Exit status 1 if anything differs.`;

async function main(argv: string[]): Promise<number> {
  const line = commandLine('test:diff', HELP, argv, { cases: { type: 'string' }, seed: { type: 'string' } });
  if (typeof line === 'number') return line;
  const values = line.values;
  let perProgram: number, seed: number;
  try {
    perProgram = intOption('--cases', values.cases, 20000, 0);
    try {
      seed = seedFrom(values.seed);
    } catch (e) {
      throw new UsageError(`--seed: ${(e as Error).message}`);
    }
  } catch (e) {
    return usageError('test:diff', HELP, e as Error);
  }
  console.error(`test:diff: ${perProgram} generated cases per program, seed ${seed} (rerun with --seed ${seed})`);
  const s = await differentialRun({ perProgram, seed, progress: (m) => console.error(`  ${m}`), report: 10 });
  for (const r of s.reports) console.error(r);
  console.error(`outcomes (cases per program and counter bumped):\n${outcomeTable(s)}`);
  console.log(summaryLine(s));
  return s.mismatches === 0 ? 0 : 1;
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (e) {
  console.error(`test:diff: ${(e as Error).message}`);
  process.exitCode = 2;
}
