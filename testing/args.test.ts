/**
 * The checkout's command lines: commandLine's answers to --help, --version and bad options,
 * then every command package.json's scripts run (each started as its script starts it) asked
 * for its version, its usage and an option it does not have. None of these needs root, and
 * none may start any work: a command that ignored its arguments would start it.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { commandLine, intOption, UsageError } from './args.ts';
import { ROOT } from './root.ts';

const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string; scripts: Record<string, string> };
const USAGE = 'usage: tool [--n N]';

function captured() {
  const out = { stdout: '', stderr: '' };
  vi.spyOn(process.stdout, 'write').mockImplementation((c: string | Uint8Array) => ((out.stdout += String(c)), true));
  vi.spyOn(process.stderr, 'write').mockImplementation((c: string | Uint8Array) => ((out.stderr += String(c)), true));
  return out;
}

afterEach(() => {
  vi.restoreAllMocks();
});

describe('commandLine', () => {
  it('--version prints the version of package.json, --help the usage; both exit 0', () => {
    const out = captured();
    expect(commandLine('tool', USAGE, ['--version'], { n: { type: 'string' } })).toBe(0);
    expect(commandLine('tool', USAGE, ['-h'], { n: { type: 'string' } })).toBe(0);
    expect(out.stdout).toBe(`${pkg.version}\n${USAGE}\n`);
    expect(out.stderr).toBe('');
  });

  it('an unknown option, a missing value or a positional: the tool, what, the usage on stderr; exit 2', () => {
    const out = captured();
    expect(commandLine('tool', USAGE, ['--bogus'], { n: { type: 'string' } })).toBe(2);
    expect(out.stderr).toBe(`tool: Unknown option '--bogus'\n\n${USAGE}\n`);
    out.stderr = '';
    expect(commandLine('tool', USAGE, ['--n'], { n: { type: 'string' } })).toBe(2);
    expect(out.stderr).toMatch(/^tool: Option '--n <value>' argument missing\n\nusage: tool/);
    out.stderr = '';
    expect(commandLine('tool', USAGE, ['stray'], { n: { type: 'string' } })).toBe(2);
    expect(out.stderr).toMatch(/^tool: unexpected argument "stray"\n/);
    expect(out.stdout).toBe('');
  });

  it('parses what it was given', () => {
    const line = commandLine('tool', USAGE, ['--n', '7'], { n: { type: 'string' } });
    expect(typeof line).toBe('object');
    expect(typeof line === 'object' && line.values.n).toBe('7');
  });

  it('intOption: the fallback when absent, a UsageError when not a whole number or below the least', () => {
    expect(intOption('--n', undefined, 5, 1)).toBe(5);
    expect(intOption('--n', '12', 5, 1)).toBe(12);
    expect(() => intOption('--n', '0', 5, 1)).toThrow(UsageError);
    expect(() => intOption('--n', '1.5', 5, 1)).toThrow(/--n wants a whole number of at least 1, got "1.5"/);
    expect(() => intOption('--n', 'x', 5)).toThrow(UsageError);
  });
});

/** The file each script's last command runs with tsx or node: the one the user's arguments go to. */
function entryPoints(): Array<{ script: string; file: string }> {
  const out: Array<{ script: string; file: string }> = [];
  for (const [script, line] of Object.entries(pkg.scripts)) {
    // The last command of the script is the one that gets the user's arguments.
    const last = line.split('&&').at(-1)!.trim().replace(/^exec /, '');
    const m = /^(?:tsx|node) (\S+\.(?:ts|mjs))$/.exec(last);
    if (m) out.push({ script, file: m[1] });
  }
  return out;
}

function run(file: string, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const tsx = join(ROOT, 'node_modules/.bin/tsx');
  const [cmd, argv] = file.endsWith('.mjs') ? [process.execPath, [file, ...args]] : [tsx, [file, ...args]];
  return new Promise((done, fail) => {
    const p = spawn(cmd, argv, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '', stderr = '';
    p.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
    p.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    const timer = setTimeout(() => p.kill('SIGKILL'), 30_000);
    p.on('error', fail);
    p.on('close', (code) => {
      clearTimeout(timer);
      done({ code, stdout, stderr });
    });
  });
}

describe("every command of package.json's scripts", () => {
  const entries = entryPoints();

  it('are found: the tools, the benchmarks, the demo, the CLI and the agent', () => {
    const scripts = entries.map((e) => e.script);
    for (const s of ['demo', 'lab', 'bench', 'bench:prog', 'bench:agent', 'bench:vm', 'bench:tc', 'bench:sim', 'sim:study',
      'test:diff', 'test:mutants', 'fixtures', 'build:js', 'agent', 'xmasq']) expect(scripts).toContain(s);
  });

  // The three runs of a command at once: each is a node process starting tsx, ~1 s.
  it.each(entries.map((e) => [e.script, e.file]))('%s (%s): --version, --help, and an option it lacks', async (_script, file) => {
    const [version, help, bad] = await Promise.all([run(file, ['--version']), run(file, ['--help']), run(file, ['--no-such-option'])]);
    expect(version.code, version.stderr).toBe(0);
    expect(version.stdout).toBe(`${pkg.version}\n`);
    expect(help.code, help.stderr).toBe(0);
    expect(help.stdout.toLowerCase()).toMatch(/usage/);
    expect(help.stdout).toContain('--version');
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/no-such-option/);
    expect(bad.stderr).not.toMatch(/\n\s+at /);
    expect(bad.stdout).toBe('');
  }, 60_000);
});
