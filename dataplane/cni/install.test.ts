/**
 * Chaining xmasq into the primary CNI config (conflist.ts) and the installer the DaemonSet
 * runs (install.ts, as its bundle dist/xmasq-cni-install.mjs): against conflists of the
 * shapes Flannel, Calico and Antrea write (testdata/, written from their documented
 * formats), in temporary directories standing for /opt/cni/bin and /etc/cni/net.d.
 * Nothing here needs root.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROOT, bundlePath } from '../../scripts/bundle.ts';
import { chainXmasq, ConflistError, isChained, primaryConfName, unchainXmasq, XMASQ_ENTRY } from './conflist.ts';
import { installFiles } from './install.ts';

const TESTDATA = fileURLToPath(new URL('./testdata/', import.meta.url));
const OVERLAYS = ['10-flannel.conflist', '10-calico.conflist', '10-antrea.conflist'];
const fixture = (name: string) => readFileSync(join(TESTDATA, name), 'utf8');

type Conf = { plugins: Array<Record<string, unknown>> } & Record<string, unknown>;

let TMP = '';
beforeAll(() => {
  TMP = mkdtempSync('/tmp/xmasq-cni-install-test-');
});
afterAll(() => {
  if (TMP) rmSync(TMP, { recursive: true, force: true });
});

describe('chainXmasq on the conflists of Flannel, Calico and Antrea', () => {
  for (const name of OVERLAYS) {
    it(`${name}: xmasq last, everything else as it was; again: the same text; unchained: the original`, () => {
      const text = fixture(name);
      const before = JSON.parse(text) as Conf;
      const r = chainXmasq(text, name);
      expect(r.changed).toBe(true);
      const after = JSON.parse(r.text) as Conf;
      expect(after.plugins.slice(0, -1)).toEqual(before.plugins);
      expect(after.plugins[after.plugins.length - 1]).toEqual(XMASQ_ENTRY);
      expect({ ...after, plugins: [] }).toEqual({ ...before, plugins: [] });
      expect(Object.keys(after)).toEqual(Object.keys(before)); // key order kept
      expect(isChained(r.text, name)).toBe(true);
      expect(chainXmasq(r.text, name)).toEqual({ text: r.text, changed: false });
      const un = unchainXmasq(r.text, name);
      expect(un.changed).toBe(true);
      expect(JSON.parse(un.text)).toEqual(before);
      expect(unchainXmasq(text, name)).toEqual({ text, changed: false });
    });
  }

  it('moves an xmasq entry that is not last to the end, keeps one, and replaces one that differs', () => {
    const conf = JSON.parse(fixture('10-calico.conflist')) as Conf;
    const [calico, portmap, bandwidth] = conf.plugins;
    const stale = { type: 'xmasq', agentSocket: '/old.sock' };
    const text = JSON.stringify({ ...conf, plugins: [calico, stale, portmap, XMASQ_ENTRY, bandwidth] });
    const out = JSON.parse(chainXmasq(text, 'x').text) as Conf;
    expect(out.plugins).toEqual([calico, portmap, bandwidth, XMASQ_ENTRY]);
    const custom = { type: 'xmasq', agentSocket: '/run/xmasq/agent.sock', required: true };
    expect((JSON.parse(chainXmasq(chainXmasq(text, 'x').text, 'x', custom).text) as Conf).plugins).toEqual([calico, portmap, bandwidth, custom]);
  });

  it('refuses what it cannot chain, saying why', () => {
    const bad: Array<[string, RegExp]> = [
      ['{"cniVersion":"0.3.1","name":"b","type":"bridge"}', /single-plugin config \(no "plugins" list\)/],
      ['{"cniVersion":"0.2.0","name":"b","plugins":[{"type":"bridge"}]}', /cniVersion "0.2.0" is not one the xmasq plugin speaks/],
      ['{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"xmasq"}]}', /holds no plugin but xmasq/],
      ['{"cniVersion":"1.0.0","name":"b","plugins":[', /not JSON/],
      ['{"cniVersion":"1.0.0","name":"b","plugins":["bridge"]}', /not an object/],
    ];
    for (const [text] of bad) expect(() => chainXmasq(text, 'f.conflist'), text).toThrow(ConflistError);
    for (const [text, why] of bad) expect(() => chainXmasq(text, 'f.conflist'), text).toThrow(why);
  });

  it('finds the file a runtime uses: the first .conf, .conflist or .json by name, no hidden file', () => {
    expect(primaryConfName(['99-loopback.conf', '10-flannel.conflist', 'README', 'calico-kubeconfig'])).toBe('10-flannel.conflist');
    expect(primaryConfName(['.10-calico.conflist.123.tmp', '.00-x.conflist', '10-calico.conflist'])).toBe('10-calico.conflist');
    expect(primaryConfName(['05-cilium.json', '10-antrea.conflist'])).toBe('05-cilium.json');
    expect(primaryConfName(['calico-kubeconfig', 'multus.d'])).toBeUndefined();
  });
});

/** Runs a file with plain node's environment (no vitest loader). */
function exec(file: string, args: string[], env: NodeJS.ProcessEnv = {}, input = '') {
  const e = { ...process.env, ...env };
  delete e.NODE_OPTIONS;
  const r = spawnSync(file, args, { env: e, input, encoding: 'utf8', timeout: 60_000 });
  return { code: r.status ?? 128, stdout: r.stdout, stderr: r.stderr };
}

describe('installFiles: the plugin in /opt/cni/bin', () => {
  it('copies the wrapper, its bundle and node; again writes nothing; the plugin then runs with no node on the PATH', () => {
    const bin = join(TMP, 'bin');
    const o = { root: ROOT, node: process.execPath, binDir: bin };
    expect(installFiles(o).sort()).toEqual(['xmasq', 'xmasq-cni.mjs', 'xmasq-node']);
    expect(installFiles(o)).toEqual([]);
    expect(readdirSync(bin).sort()).toEqual(['xmasq', 'xmasq-cni.mjs', 'xmasq-node']); // no temporary file left
    // A file that changed (an upgrade) is written again, and only it.
    writeFileSync(join(bin, 'xmasq-cni.mjs'), '// old\n', { mode: 0o755 });
    expect(installFiles(o)).toEqual(['xmasq-cni.mjs']);
    // The runtime's PATH holds what the wrapper needs (readlink) and no node.
    const path = join(TMP, 'path-without-node');
    mkdirSync(path);
    symlinkSync(spawnSync('sh', ['-c', 'command -v readlink'], { encoding: 'utf8' }).stdout.trim(), join(path, 'readlink'));
    const r = exec(join(bin, 'xmasq'), [], { CNI_COMMAND: 'VERSION', PATH: path }, '{"cniVersion":"1.0.0"}');
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ cniVersion: '1.0.0', supportedVersions: ['0.3.0', '0.3.1', '0.4.0', '1.0.0', '1.1.0'] });
  });
});

/** The installer's bundle as the DaemonSet runs it; its stderr collected. */
function installer(args: string[]): { child: ChildProcess; log: () => string; exited: Promise<number | null> } {
  const env = { ...process.env };
  delete env.NODE_OPTIONS;
  const child = spawn(process.execPath, [bundlePath('xmasq-cni-install'), ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { child, log: () => err, exited };
}

async function until(what: string, cond: () => boolean, log: () => string, ms = 15_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`not within ${ms} ms: ${what}; installer's log:\n${log()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('xmasq-cni-install, the bundle', () => {
  it('install with no config yet: installs the plugin, says so, exits 0', async () => {
    const dir = join(TMP, 'init-empty');
    const net = join(dir, 'net.d');
    mkdirSync(net, { recursive: true });
    const run = installer(['--bin-dir', join(dir, 'bin'), '--net-dir', net, '--node', 'none']);
    expect(await run.exited, run.log()).toBe(0);
    expect(run.log()).toMatch(/installed xmasq-cni.mjs, xmasq in .*\/bin\n/);
    expect(run.log()).toContain(`not chained: no CNI config in ${net} yet`);
    expect(readdirSync(join(dir, 'bin')).sort()).toEqual(['xmasq', 'xmasq-cni.mjs']);
  });

  for (const overlay of OVERLAYS) {
    it(`--watch with ${overlay}: chains the file the overlay writes, and again each time the overlay rewrites it; uninstall undoes it`, async () => {
      const dir = join(TMP, `watch-${overlay}`);
      const net = join(dir, 'net.d'), bin = join(dir, 'bin');
      mkdirSync(net, { recursive: true });
      writeFileSync(join(net, '99-loopback.conf'), '{"cniVersion":"0.3.1","name":"lo","type":"loopback"}\n');
      const conf = join(net, overlay);
      const chained = () => existsSync(conf) && isChained(readFileSync(conf, 'utf8'), conf);
      const run = installer(['--bin-dir', bin, '--net-dir', net, '--node', 'none', '--watch', '--interval', '1']);
      try {
        await until('the installer to start', () => run.log().includes('not chained'), run.log);
        // The overlay's pod starts and writes its file (the way their installers do: write and rename).
        writeFileSync(`${conf}.tmp`, fixture(overlay));
        copyFileSync(`${conf}.tmp`, conf);
        rmSync(`${conf}.tmp`);
        await until('xmasq chained into the new file', chained, run.log);
        const first = readFileSync(conf, 'utf8');
        expect(JSON.parse(first).plugins.slice(0, -1)).toEqual(JSON.parse(fixture(overlay)).plugins);
        // The overlay restarts and writes its own version again.
        writeFileSync(conf, fixture(overlay));
        await until('xmasq chained again after the rewrite', () => chained() && run.log().includes('again'), run.log);
        expect(readFileSync(conf, 'utf8')).toBe(first);
        // The plugin's files removed by someone: put back.
        rmSync(join(bin, 'xmasq'));
        await until('the wrapper put back', () => existsSync(join(bin, 'xmasq')), run.log);
        expect(readFileSync(join(net, '99-loopback.conf'), 'utf8')).toBe('{"cniVersion":"0.3.1","name":"lo","type":"loopback"}\n');
        expect(readdirSync(net).sort()).toEqual([overlay, '99-loopback.conf'].sort()); // no temporary file left
      } finally {
        run.child.kill('SIGTERM');
      }
      expect(await run.exited, run.log()).toBe(0);
      expect(run.log().match(/chained xmasq last into/g)).toHaveLength(2);
      const un = installer(['uninstall', '--bin-dir', bin, '--net-dir', net]);
      expect(await un.exited, un.log()).toBe(0);
      expect(JSON.parse(readFileSync(conf, 'utf8'))).toEqual(JSON.parse(fixture(overlay)));
      expect(readdirSync(bin)).toEqual([]);
    });
  }

  it('bad arguments: status 2 and what to fix; --help and --version', async () => {
    for (const [args, msg] of [
      [['--entry', '{"type":"bridge"}'], /--entry .*must be an object with "type": "xmasq"/],
      [['--conflist', '/etc/cni/net.d/10-flannel.conflist'], /give a file name in --net-dir, not a path/],
      [['--bogus'], /unknown argument --bogus; see --help/],
      [['uninstall', '--watch'], /--watch goes with install/],
    ] as Array<[string[], RegExp]>) {
      const run = installer(args);
      expect(await run.exited, args.join(' ')).toBe(2);
      expect(run.log()).toMatch(msg);
    }
    const version = exec(bundlePath('xmasq-cni-install'), ['--version']);
    expect(version.stdout).toBe(`${(JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version}\n`);
    expect(exec(bundlePath('xmasq-cni-install'), ['--help']).stdout).toMatch(/^usage: xmasq-cni-install/);
  });
});
