/**
 * Argument handling for the checkout's commands (the lab, the demo, the benchmarks, the
 * simulator's study, the differential, the fixtures): node:util's parseArgs plus what each of
 * them would otherwise repeat. `--help`/`-h` prints the usage on stdout (exit 0), `--version`
 * the checkout's version (exit 0); an unknown option, a missing value or a bad value prints
 * `<tool>: <what>` and the usage on stderr (exit 2).
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { packageVersion } from '../dataplane/package.ts';

type Options = NonNullable<ParseArgsConfig['options']>;
type WithHelp<O extends Options> = O & { help: { type: 'boolean'; short: 'h' }; version: { type: 'boolean' } };
type Config<O extends Options> = { args: string[]; options: WithHelp<O>; strict: true; allowPositionals: true };

/** What parseArgs gives for these options: typed values (help included) and positionals. */
export type CommandLine<O extends Options> = ReturnType<typeof parseArgs<Config<O>>>;

/** A bad command line, found after parsing (a value out of range, a wrong positional). */
export class UsageError extends Error {}

/**
 * Parses argv, or answers --help, --version and bad options itself: then it returns the exit
 * status the command should end with. Positionals are refused unless `positionals` is set.
 */
export function commandLine<const O extends Options>(
  tool: string, usage: string, argv: readonly string[], options: O, positionals = false,
): CommandLine<O> | number {
  let parsed: CommandLine<O>;
  try {
    const config: Config<O> = { args: [...argv], options: { ...options, help: { type: 'boolean', short: 'h' }, version: { type: 'boolean' } }, strict: true, allowPositionals: true };
    parsed = parseArgs(config);
    if (!positionals && parsed.positionals.length) throw new UsageError(`unexpected argument "${parsed.positionals[0]}"`);
  } catch (e) {
    return usageError(tool, usage, e as Error);
  }
  const asked = parsed.values as { help?: boolean; version?: boolean };
  if (asked.help) {
    process.stdout.write(`${usage}\n`);
    return 0;
  }
  if (asked.version) {
    process.stdout.write(`${packageVersion()}\n`);
    return 0;
  }
  return parsed;
}

/** Prints a usage error the way commandLine does, and gives its exit status (2). */
export function usageError(tool: string, usage: string, e: Error): number {
  // parseArgs adds a hint on positionals that start with '-' to an unknown option, which none of these commands take.
  const what = e.message.replace(/\. To specify a positional argument starting with a '-'.*$/s, '');
  process.stderr.write(`${tool}: ${what}\n\n${usage}\n`);
  return 2;
}

/** A whole number option: `fallback` when absent, a UsageError below `min` or not a number. */
export function intOption(flag: string, raw: string | undefined, fallback: number, min = 0): number {
  if (raw === undefined) return fallback;
  if (!/^-?\d+$/.test(raw) || Number(raw) < min) throw new UsageError(`${flag} wants a whole number of at least ${min}, got "${raw}"`);
  return Number(raw);
}
