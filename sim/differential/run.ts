/**
 * One differential run: every fixture and N generated cases per program,
 * each run on the model and on the kernel, every difference reported.
 */
import { KernelDatapath } from './kernel.ts';
import { MODEL, runCase, type Case, type ModelProgram } from './compare.ts';
import { generateCases, type ClockSource } from './generate.ts';
import { measureTick } from '../../dataplane/agent/clock.ts';
import { loadFixtures } from './fixtures.ts';
import type { ProgramName } from './statespec.ts';

export const PROGRAMS: ProgramName[] = ['init', 'restore', 'masq'];

/**
 * The generator's seed unless one is asked for: the same cases on every run, so two
 * runs (before and after a change, here and on another machine) can be compared. It
 * reaches every path the differential test requires at least 14 times at 20,000 cases
 * per program. Fresh cases are one `random` away.
 */
export const DEFAULT_SEED = 16;

/** A seed as a command line or the environment gives it: absent, a whole number, or `random`. */
export function seedFrom(raw: string | undefined): number {
  if (raw === undefined || raw === '') return DEFAULT_SEED;
  if (raw === 'random') return Date.now() % 1_000_000;
  if (!/^\d+$/.test(raw)) throw new Error(`a seed is a whole number or "random", got "${raw}"`);
  return Number(raw);
}

export interface RunOptions {
  perProgram: number;
  seed: number;
  fixtures?: boolean;
  model?: Record<ProgramName, ModelProgram>;
  /** Stop at the first mismatching case (the mutation check wants only "caught or not"). */
  stopAtFirst?: boolean;
  /** Only these programs' fixtures and cases (all by default): the mutation check skips programs a mutant cannot change. */
  programs?: ProgramName[];
  /** Called every so often with progress, for long runs. */
  progress?: (msg: string) => void;
  /** How many mismatching cases to describe in full. */
  report?: number;
}

/**
 * Tags of cases the generator set up to take a branch the counters alone do not
 * tell: init's fast path (`fast`), taken where the node set or pod_info disagrees
 * with the entry (`fast-stale`); restore restoring for a sender the node set does
 * not hold as a peer (`hit-not-node`); masq run on a device other than the focus
 * pod's veth (`spoofed`), for a pair whose entry records no veth (`unfilled`).
 */
const PATH_TAGS = ['fast', 'fast-stale', 'hit-not-node', 'spoofed', 'unfilled', 'clock-uncalibrated', 'clock-calibrated', 'clock-odd'];

export interface RunSummary {
  counts: Record<ProgramName, number>;
  /**
   * How many cases ended in each "<program> <counter>" (the counter the kernel
   * bumped), and again as "<program> <counter> wide" for the cases the wide keys decide,
   * and as "<program> <counter> wide <tcp|udp|icmp>" by the pod packet's protocol, and
   * as "<program> <counter> <tag>" for each of PATH_TAGS the case has.
   */
  outcomes: Record<string, number>;
  mismatches: number;
  reports: string[];
}

export async function differentialRun(opts: RunOptions, kernel = new KernelDatapath()): Promise<RunSummary> {
  const counts: Record<ProgramName, number> = { init: 0, restore: 0, masq: 0 };
  const reports: string[] = [];
  const outcomes: Record<string, number> = {};
  let mismatches = 0;
  // The kernel's tick, for the generator's calibrated clock maps, found as the agent finds it.
  const measured = measureTick(kernel.clockProbe());
  if ('why' in measured.tick) throw new Error(`the differential cannot draw calibrated clock maps: ${measured.tick.why}`);
  const clockSource: ClockSource = { sample: () => kernel.probe(), tickNs: measured.tick.tickNs };
  const check = (c: Case) => {
    const o = runCase(kernel, c, opts.model ?? MODEL);
    counts[c.program]++;
    const tags = c.name.split(' ');
    const wide = tags.includes('wide');
    const proto = ['tcp', 'udp', 'icmp'].find((p) => tags.includes(p));
    const paths = PATH_TAGS.filter((p) => tags.includes(p));
    for (const [name, n] of Object.entries(o.kernel.effects.counters)) {
      if (n === 0) continue;
      const keys = [`${c.program} ${name}`];
      if (wide) keys.push(`${c.program} ${name} wide`);
      if (wide && proto) keys.push(`${c.program} ${name} wide ${proto}`);
      for (const p of paths) keys.push(`${c.program} ${name} ${p}`);
      for (const key of keys) outcomes[key] = (outcomes[key] ?? 0) + 1;
    }
    if (o.mismatches.length === 0) return true;
    mismatches++;
    if (reports.length < (opts.report ?? 5)) {
      reports.push(`MISMATCH ${c.program} "${c.name}":\n  ${o.mismatches.join('\n  ')}\n  packet: ${c.packet.toString('hex')}`);
    }
    return false;
  };
  try {
    if (opts.fixtures ?? true) {
      for (const c of await loadFixtures()) {
        if (opts.programs && !opts.programs.includes(c.program)) continue;
        if (!check(c) && opts.stopAtFirst) return { counts, outcomes, mismatches, reports };
      }
    }
    for (const program of opts.programs ?? PROGRAMS) {
      let n = 0;
      for (const c of generateCases(program, opts.perProgram, opts.seed, clockSource)) {
        if (!check(c) && opts.stopAtFirst) return { counts, outcomes, mismatches, reports };
        if (++n % 5000 === 0) opts.progress?.(`${program}: ${n}/${opts.perProgram} cases, ${mismatches} mismatches so far`);
      }
    }
  } finally {
    kernel.close();
  }
  return { counts, outcomes, mismatches, reports };
}

export function outcomeTable(s: RunSummary): string {
  return Object.entries(s.outcomes).sort().map(([k, n]) => `  ${k.padEnd(28)} ${n}`).join('\n');
}

export function summaryLine(s: RunSummary): string {
  return `differential: init=${s.counts.init} restore=${s.counts.restore} masq=${s.counts.masq} mismatches=${s.mismatches}`;
}
