/**
 * The bundles `npm run build` makes (scripts/bundle.ts; vitest's globalSetup built them
 * before this file runs), run as a user or a runtime runs them: plain node, no tsx, and
 * in a copy of the package that holds only what an installation holds (package.json,
 * dist/, node_modules/koffi). Their --version and --help, the agent's log formats, the
 * CLI's checkout-only commands, and the CNI plugin's wrapper with and without a bundle.
 * Nothing here needs root.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Code } from '../dataplane/cni/plugin.ts';
import { BUNDLES, ROOT, bundle, bundlePath } from './bundle.ts';

const VERSION = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
const WRAPPER = join(ROOT, 'dataplane/cni/xmasq');

/** A Node stack frame ("    at f (file:1:2)"): never shown for bad input. */
const STACK = /^\s+at .+:\d+:\d+\)?$/m;

interface Ran { code: number; stdout: string; stderr: string }

/** Runs a file (a bundle with its shebang, or the wrapper) with nothing of tsx in the environment. */
function exec(file: string, args: string[], opts: { env?: NodeJS.ProcessEnv; input?: string; cwd?: string } = {}): Ran {
  const env = { ...process.env, ...opts.env };
  delete env.NODE_OPTIONS; // vitest's or tsx's loader must not be what makes a bundle run
  const r = spawnSync(file, args, { env, input: opts.input ?? '', cwd: opts.cwd ?? '/', encoding: 'utf8', timeout: 30_000 });
  return { code: r.status ?? 128, stdout: r.stdout, stderr: r.stderr };
}

/** A copy of the package as an installation has it: package.json, dist/ and node_modules/koffi, nothing else. */
let INSTALL = '';
const installed = (name: keyof typeof BUNDLES) => join(INSTALL, 'dist', `${name}.mjs`);

beforeAll(() => {
  INSTALL = mkdtempSync('/tmp/xmasq-install-test-');
  copyFileSync(join(ROOT, 'package.json'), join(INSTALL, 'package.json'));
  mkdirSync(join(INSTALL, 'dist'));
  for (const name of Object.keys(BUNDLES) as Array<keyof typeof BUNDLES>) {
    copyFileSync(bundlePath(name), installed(name));
    chmodSync(installed(name), 0o755);
  }
  mkdirSync(join(INSTALL, 'node_modules'));
  symlinkSync(join(ROOT, 'node_modules/koffi'), join(INSTALL, 'node_modules/koffi'));
});

afterAll(() => {
  if (INSTALL) rmSync(INSTALL, { recursive: true, force: true });
});

describe('the build', () => {
  it('is repeatable: a second build writes nothing', async () => {
    const again = await bundle();
    expect(again.map((b) => b.file).sort()).toEqual(Object.keys(BUNDLES).map((n) => `dist/${n}.mjs`).sort());
    expect(again.filter((b) => b.written)).toEqual([]);
  });

  it('keeps koffi outside and holds no test, lab or simulator code', () => {
    for (const name of Object.keys(BUNDLES) as Array<keyof typeof BUNDLES>) {
      const text = readFileSync(bundlePath(name), 'utf8');
      expect(text.startsWith('#!/usr/bin/env node\n'), name).toBe(true);
      expect(text, name).not.toMatch(/^\/\/ (lab|demo|sim|fixtures|bench)\//m); // esbuild's per-file markers
      expect(text, name).not.toContain('node_modules/koffi/');
    }
    expect(readFileSync(bundlePath('xmasq-agent'), 'utf8')).toMatch(/^import \w+ from "koffi";$/m);
  });
});

describe('--version and --help, from an installed copy, with plain node', () => {
  it('every command prints the version of package.json', () => {
    const runs: Array<[string, string[]]> = [
      [installed('xmasq-agent'), ['--version']],
      [installed('xmasq-agent'), ['cleanup', '--version']],
      [installed('xmasq'), ['--version']],
      ...['status', 'pods', 'cache dump', 'policy add', 'policy del', 'policy list'].map(
        (c): [string, string[]] => [installed('xmasq'), [...c.split(' '), '--version']]),
    ];
    for (const [file, args] of runs) {
      const r = exec(file, args);
      expect(r, `${file} ${args.join(' ')}`).toEqual({ code: 0, stdout: `${VERSION}\n`, stderr: '' });
    }
  });

  it('the CNI plugin prints its version, beside its bundle or in a checkout', () => {
    const dir = join(INSTALL, 'opt-cni-bin');
    mkdirSync(dir);
    copyFileSync(WRAPPER, join(dir, 'xmasq'));
    chmodSync(join(dir, 'xmasq'), 0o755);
    copyFileSync(installed('xmasq-cni'), join(dir, 'xmasq-cni.mjs'));
    for (const wrapper of [WRAPPER, join(dir, 'xmasq')]) expect(exec(wrapper, ['--version'])).toEqual({ code: 0, stdout: `${VERSION}\n`, stderr: '' });
    // Copied beside the wrapper alone, with no package.json above it: the version is built in.
    const r = exec(join(dir, 'xmasq'), [], { env: { CNI_COMMAND: 'VERSION' }, input: '{"cniVersion":"1.0.0"}' });
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ cniVersion: '1.0.0', supportedVersions: ['0.3.0', '0.3.1', '0.4.0', '1.0.0', '1.1.0'] });
  });

  it('every command has --help: usage on stdout, status 0', () => {
    const runs: Array<[string, string[], string]> = [
      [installed('xmasq-agent'), ['--help'], 'usage: xmasq-agent'],
      [installed('xmasq'), ['--help'], 'usage: xmasq <command>'],
      [installed('xmasq'), ['status', '--help'], 'usage: xmasq status'],
      [installed('xmasq'), ['pods', '--help'], 'usage: xmasq pods'],
      [installed('xmasq'), ['cache', 'dump', '--help'], 'usage: xmasq cache dump'],
      [installed('xmasq'), ['policy', 'add', '--help'], 'usage: xmasq policy add'],
      [WRAPPER, ['--help'], 'usage: CNI_COMMAND='],
    ];
    for (const [file, args, usage] of runs) {
      const r = exec(file, args);
      expect(r.code, `${file} ${args.join(' ')}: ${r.stderr}`).toBe(0);
      expect(r.stdout.startsWith(usage), `${file} ${args.join(' ')}:\n${r.stdout}`).toBe(true);
      expect(r.stdout).toContain('--version');
    }
    expect(exec(installed('xmasq-agent'), ['--help']).stdout).toContain('--log-format text|json');
  });
});

describe('the agent\'s log lines', () => {
  const bad = ['--egress-idle', '0', '--socket', '/tmp/nowhere/agent.sock'];

  it('text: each line starts with its UTC time, then xmasq-agent:', () => {
    const before = Date.now();
    const r = exec(installed('xmasq-agent'), bad);
    expect(r.code).toBe(2);
    const lines = r.stderr.trimEnd().split('\n');
    expect(lines).toHaveLength(1);
    const m = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) xmasq-agent: error: --egress-idle \(egressIdleSeconds\) = "0": must be a number of seconds > 0/.exec(lines[0]);
    expect(m, lines[0]).not.toBeNull();
    const t = Date.parse(m![1]);
    expect(t).toBeGreaterThanOrEqual(before - 1000);
    expect(t).toBeLessThanOrEqual(Date.now() + 1000);
  });

  it('json: one object per line, with time, level, logger and msg', () => {
    for (const flag of [['--log-format', 'json'], ['--log-format=json']]) {
      const r = exec(installed('xmasq-agent'), [...flag, ...bad]);
      expect(r.code).toBe(2);
      const lines = r.stderr.trimEnd().split('\n');
      expect(lines).toHaveLength(1);
      const o = JSON.parse(lines[0]) as Record<string, unknown>;
      expect(Object.keys(o)).toEqual(['time', 'level', 'logger', 'msg']);
      expect(o).toMatchObject({ level: 'error', logger: 'xmasq-agent' });
      expect(new Date(o.time as string).toISOString()).toBe(o.time);
      expect(o.msg).toMatch(/^--egress-idle \(egressIdleSeconds\) = "0": must be/);
    }
  });

  it('an unknown format is a configuration error, not a stack trace', () => {
    const r = exec(installed('xmasq-agent'), ['--log-format', 'yaml']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/xmasq-agent: error: --log-format \(logFormat\) = "yaml": must be text or json\n$/);
    expect(r.stderr).not.toMatch(STACK);
  });
});

describe('the CLI outside a checkout', () => {
  it('lab and demo are no commands of xmasq and say where they are; status without an agent says so', () => {
    for (const args of [['lab', 'status'], ['demo', '--quick']]) {
      const r = exec(installed('xmasq'), args);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toBe(`xmasq: ${args[0]} is a tool of the source checkout, not a command of xmasq: run it from a checkout as npm run ${args[0]} -- …\n`);
      expect(r.stderr).not.toMatch(STACK);
    }
    const r = exec(installed('xmasq'), ['status', '--socket', join(INSTALL, 'none.sock')]);
    expect(r).toMatchObject({ code: 3, stdout: '' });
    expect(r.stderr).toBe(`xmasq: no agent at ${join(INSTALL, 'none.sock')}: start xmasq-agent, or pass --socket\n`);
  });
});

describe('the CNI plugin wrapper without its bundle', () => {
  it('answers every call with a CNI error (code 104) that says to run npm run build', () => {
    const dir = join(INSTALL, 'bare');
    mkdirSync(dir);
    copyFileSync(WRAPPER, join(dir, 'xmasq'));
    chmodSync(join(dir, 'xmasq'), 0o755);
    for (const cmd of ['ADD', 'DEL', 'VERSION']) {
      const r = exec(join(dir, 'xmasq'), [], { env: { CNI_COMMAND: cmd }, input: '{"cniVersion":"1.0.0","name":"n","type":"xmasq"}' });
      expect(r.code).toBe(1);
      const e = JSON.parse(r.stdout) as { cniVersion: string; code: number; msg: string };
      expect(e.code).toBe(Code.notInstalled);
      expect(e.cniVersion).toBe('1.1.0');
      expect(e.msg).toContain(`looked for ${dir}/xmasq-cni.mjs`);
      expect(e.msg).toContain('run npm run build');
      expect(r.stderr).toBe(`${e.msg}\n`);
    }
  });

  it('says so when node is not in the PATH the runtime gives', () => {
    // A PATH with what the wrapper itself needs (readlink) and no node.
    const dir = join(INSTALL, 'path-without-node');
    mkdirSync(dir);
    const readlink = spawnSync('sh', ['-c', 'command -v readlink'], { encoding: 'utf8' }).stdout.trim();
    symlinkSync(readlink, join(dir, 'readlink'));
    const r = exec(WRAPPER, [], { env: { CNI_COMMAND: 'VERSION', PATH: dir } });
    expect(r.code).toBe(1);
    const e = JSON.parse(r.stdout) as { code: number; msg: string };
    expect(e.code).toBe(Code.notInstalled);
    expect(e.msg).toContain(`node is not in the PATH the runtime gives plugins (${dir}): install Node.js 20 or later there`);
  });
});

describe('how the wrapper starts the plugin', () => {
  it('execs node on the bundle, nothing else on the command line, without extra CA certificates to load', () => {
    // A node in front of the real one on PATH, recording how it was called.
    const dir = join(INSTALL, 'spy');
    mkdirSync(dir);
    writeFileSync(join(dir, 'node'), `#!/bin/sh\nprintf '%s\\n' "$@" > ${dir}/args\nenv > ${dir}/env\nexec ${process.execPath} "$@"\n`, { mode: 0o755 });
    const r = exec(WRAPPER, [], { env: { CNI_COMMAND: 'VERSION', PATH: `${dir}:${process.env.PATH}`, NODE_EXTRA_CA_CERTS: '/etc/ssl/certs/ca-certificates.crt' } });
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout).supportedVersions).toContain('1.1.0');
    const args = readFileSync(join(dir, 'args'), 'utf8').trimEnd().split('\n');
    expect(args).toHaveLength(1);
    expect(resolve(args[0])).toBe(bundlePath('xmasq-cni'));
    expect(readFileSync(join(dir, 'env'), 'utf8')).not.toMatch(/^NODE_EXTRA_CA_CERTS=/m);
  });
});
