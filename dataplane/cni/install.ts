/**
 * xmasq-cni-install (dist/xmasq-cni-install.mjs): puts the CNI plugin on a node and keeps
 * it chained. The DaemonSet (deploy/kubernetes/xmasq.yaml) runs it twice: once as an init
 * container (`install`), then beside the agent (`install --watch`).
 *
 * install: copies into --bin-dir the plugin's wrapper (`xmasq`), its bundle
 *   (`xmasq-cni.mjs`) and a node binary (`xmasq-node`, which the wrapper prefers to a node
 *   on the runtime's PATH: a Kubernetes node seldom has Node.js 20), each only when it
 *   differs, each written whole and renamed into place (a runtime may start the plugin at
 *   any moment); then chains `{"type":"xmasq",…}` last into the primary conflist of
 *   --net-dir (conflist.ts). No conflist yet, or one that cannot be chained, is logged and
 *   is not an error: the watcher chains it when the overlay writes it.
 * --watch: then stays, and chains again whenever the overlay rewrites its file (Flannel,
 *   Calico and Antrea write theirs whenever their own pods start), on every change in
 *   --net-dir and every --interval; puts back plugin files that went missing.
 * uninstall: takes xmasq out of every conflist in --net-dir and removes the three files.
 *
 * Pods that start before the entry is back come up on the overlay alone; the agent's pod
 * discovery serves them within --discover-interval.
 */
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, renameSync, rmSync, statSync, watch, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { packageRoot, packageVersion } from '../package.ts';
import { stderrLog, type Log } from '../agent/log.ts';
import { chainXmasq, CONF_EXTENSIONS, ConflistError, primaryConfName, unchainXmasq, XMASQ_ENTRY } from './conflist.ts';

export const USAGE = `usage: xmasq-cni-install [install] [--watch] [flags]   install the CNI plugin, chain it into the primary conflist
       xmasq-cni-install uninstall [flags]            unchain it from every conflist, remove the plugin's files
       xmasq-cni-install --help | --version

flags:
  --bin-dir DIR        the node's CNI plugin directory (default /opt/cni/bin)
  --net-dir DIR        the node's CNI config directory (default /etc/cni/net.d)
  --conflist NAME      the file in --net-dir to chain into (default: the one a runtime uses,
                       the first .conf/.conflist/.json by name)
  --entry JSON         the chained entry (default ${JSON.stringify(XMASQ_ENTRY)})
  --node FILE|none     the node binary copied beside the plugin as xmasq-node (default: the
                       one running this; none: the runtime's PATH must hold node 20 or later)
  --watch              after installing, keep the entry chained when the file is rewritten
  --interval SECONDS   how often --watch looks even without a change event (default 5)`;

export interface InstallOptions {
  binDir: string;
  netDir: string;
  conflist?: string;
  entry: Record<string, unknown>;
  /** A node binary to copy as xmasq-node, or undefined for none. */
  node: string | undefined;
  /** Where the wrapper (dataplane/cni/xmasq) and the bundle (dist/xmasq-cni.mjs) are. */
  root: string;
}

/** The plugin's files: their names in --bin-dir and where each comes from. */
export function pluginFiles(o: Pick<InstallOptions, 'root' | 'node'>): Array<{ name: string; from: string }> {
  return [
    { name: 'xmasq-cni.mjs', from: join(o.root, 'dist', 'xmasq-cni.mjs') },
    ...(o.node ? [{ name: 'xmasq-node', from: o.node }] : []),
    // Last: a runtime that finds `xmasq` finds what it runs.
    { name: 'xmasq', from: join(o.root, 'dataplane', 'cni', 'xmasq') },
  ];
}

/** Whether two files hold the same bytes, read a chunk at a time (the node binary is ~100 MB). */
function sameContent(a: string, b: string): boolean {
  let sa, sb;
  try {
    sa = statSync(a);
    sb = statSync(b);
  } catch {
    return false;
  }
  if (sa.size !== sb.size || (sb.mode & 0o111) === 0) return false;
  const fa = openSync(a, 'r'), fb = openSync(b, 'r');
  try {
    const ba = Buffer.alloc(1 << 20), bb = Buffer.alloc(1 << 20);
    for (let pos = 0; pos < sa.size;) {
      const n = readSync(fa, ba, 0, ba.length, pos);
      if (n <= 0 || readSync(fb, bb, 0, n, pos) !== n || !ba.subarray(0, n).equals(bb.subarray(0, n))) return false;
      pos += n;
    }
    return true;
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
}

/** Writes a file whole under a name no runtime reads, then renames it into place. */
function writeAtomic(dir: string, name: string, data: Buffer | string, mode: number): void {
  const tmp = join(dir, `.${name}.${process.pid}.tmp`);
  try {
    writeFileSync(tmp, data, { mode });
    renameSync(tmp, join(dir, name));
  } finally {
    rmSync(tmp, { force: true });
  }
}

/** Copies the plugin's files that differ; returns the names written. */
export function installFiles(o: Pick<InstallOptions, 'root' | 'node' | 'binDir'>): string[] {
  const files = pluginFiles(o);
  for (const f of files) {
    if (!existsSync(f.from)) throw new Error(`${f.from} is missing: ${f.name === 'xmasq-cni.mjs' ? 'run npm run build' : 'is this an xmasq package?'}`);
  }
  mkdirSync(o.binDir, { recursive: true });
  const written: string[] = [];
  for (const f of files) {
    if (sameContent(f.from, join(o.binDir, f.name))) continue;
    writeAtomic(o.binDir, f.name, readFileSync(f.from), 0o755);
    written.push(f.name);
  }
  return written;
}

export type ChainOutcome =
  | { file: string; changed: boolean }
  | { file: undefined; why: string };

/** Chains the entry into --conflist or the primary file of --net-dir (writing only when it changes). */
export function chainPrimary(o: Pick<InstallOptions, 'netDir' | 'conflist' | 'entry'>): ChainOutcome {
  let names: string[];
  try {
    names = readdirSync(o.netDir);
  } catch (e) {
    return { file: undefined, why: `cannot list ${o.netDir} (${(e as NodeJS.ErrnoException).code})` };
  }
  const name = o.conflist ?? primaryConfName(names);
  if (!name || !names.includes(name)) {
    return { file: undefined, why: o.conflist ? `${join(o.netDir, o.conflist)} does not exist yet` : `no CNI config in ${o.netDir} yet (the overlay writes it when it starts)` };
  }
  const path = join(o.netDir, name);
  const text = readFileSync(path, 'utf8');
  const r = chainXmasq(text, path, o.entry);
  if (r.changed) writeAtomic(o.netDir, name, r.text, statSync(path).mode & 0o777);
  return { file: path, changed: r.changed };
}

/** Takes xmasq out of every config file of --net-dir and removes the plugin's files. */
export function uninstall(o: Pick<InstallOptions, 'netDir' | 'binDir'>, log: Log): void {
  let names: string[] = [];
  try {
    names = readdirSync(o.netDir);
  } catch (e) {
    log.warn(`cannot list ${o.netDir} (${(e as NodeJS.ErrnoException).code}): no conflist unchained`);
  }
  for (const name of names.filter((n) => !n.startsWith('.') && CONF_EXTENSIONS.some((e) => n.endsWith(e)))) {
    const path = join(o.netDir, name);
    try {
      const r = unchainXmasq(readFileSync(path, 'utf8'), path);
      if (r.changed) {
        writeAtomic(o.netDir, name, r.text, statSync(path).mode & 0o777);
        log.info(`took xmasq out of ${path}`);
      }
    } catch (e) {
      if (!(e instanceof ConflistError)) throw e;
    }
  }
  for (const f of ['xmasq', 'xmasq-cni.mjs', 'xmasq-node']) {
    const path = join(o.binDir, f);
    if (existsSync(path)) {
      rmSync(path, { force: true });
      log.info(`removed ${path}`);
    }
  }
}

/** One look: chain if needed, and say what happened (once per distinct message). */
export class Chainer {
  private lastWhy = '';
  rechained = 0;

  constructor(private readonly o: InstallOptions, private readonly log: Log) {}

  check(): ChainOutcome | undefined {
    let r: ChainOutcome;
    try {
      r = chainPrimary(this.o);
    } catch (e) {
      if (!(e instanceof ConflistError) && (e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      this.note(`not chained: ${(e as Error).message}`);
      return undefined;
    }
    if (r.file === undefined) this.note(`not chained: ${r.why}`);
    else if (r.changed) {
      this.rechained++;
      this.lastWhy = '';
      this.log.info(`chained xmasq last into ${r.file}${this.rechained > 1 ? ` (again: it was rewritten without it; ${this.rechained} times so far)` : ''}`);
    } else this.note(`${r.file} has xmasq last`);
    return r;
  }

  private note(msg: string): void {
    if (msg === this.lastWhy) return;
    this.lastWhy = msg;
    this.log.info(msg);
  }
}

/** Keeps the entry chained until SIGTERM/SIGINT: on every change in --net-dir, and every interval. */
export function watchChain(o: InstallOptions, intervalMs: number, log: Log): Promise<void> {
  const chainer = new Chainer(o, log);
  chainer.check();
  return new Promise((resolve) => {
    let timer: NodeJS.Timeout | undefined;
    // A rewrite comes as several events (create, write, rename): look once they settle.
    const soon = () => {
      clearTimeout(timer);
      timer = setTimeout(look, 200);
    };
    const look = () => {
      try {
        const put = installFiles(o);
        if (put.length) log.info(`put back ${put.join(', ')} in ${o.binDir}`);
        chainer.check();
      } catch (e) {
        log.error((e as Error).message);
      }
    };
    let watcher: ReturnType<typeof watch> | undefined;
    try {
      watcher = watch(o.netDir, soon);
      watcher.on('error', (e) => log.warn(`watching ${o.netDir}: ${e.message}; looking every ${intervalMs / 1000} s only`));
    } catch (e) {
      log.warn(`cannot watch ${o.netDir} (${(e as Error).message}); looking every ${intervalMs / 1000} s only`);
    }
    const every = setInterval(look, intervalMs);
    const stop = () => {
      clearInterval(every);
      clearTimeout(timer);
      watcher?.close();
      resolve();
    };
    process.once('SIGTERM', stop);
    process.once('SIGINT', stop);
  });
}

interface Parsed {
  command: 'install' | 'uninstall' | 'help' | 'version';
  watch: boolean;
  intervalMs: number;
  options: InstallOptions;
}

export function parseInstallArgs(argv: readonly string[], defaults: { root: string; node: string }): Parsed {
  const o: InstallOptions = { binDir: '/opt/cni/bin', netDir: '/etc/cni/net.d', entry: { ...XMASQ_ENTRY }, node: defaults.node, root: defaults.root };
  let command: Parsed['command'] = 'install';
  let watching = false;
  let intervalMs = 5000;
  let help = false, version = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value; see --help`);
      return v;
    };
    if (a === '--help' || a === '-h') help = true;
    else if (a === '--version') version = true;
    else if (i === 0 && (a === 'install' || a === 'uninstall')) command = a;
    else if (a === '--watch') watching = true;
    else if (a === '--bin-dir') o.binDir = value();
    else if (a === '--net-dir') o.netDir = value();
    else if (a === '--conflist') {
      o.conflist = value();
      if (o.conflist.includes('/')) throw new Error(`--conflist ${o.conflist}: give a file name in --net-dir, not a path`);
    } else if (a === '--node') {
      const v = value();
      o.node = v === 'none' ? undefined : v;
    } else if (a === '--entry') {
      const v = value();
      let entry: unknown;
      try {
        entry = JSON.parse(v);
      } catch (e) {
        throw new Error(`--entry ${v}: not JSON (${(e as Error).message})`);
      }
      if (typeof entry !== 'object' || entry === null || Array.isArray(entry) || (entry as { type?: unknown }).type !== 'xmasq') {
        throw new Error(`--entry ${v}: must be an object with "type": "xmasq", e.g. ${JSON.stringify(XMASQ_ENTRY)}`);
      }
      o.entry = entry as Record<string, unknown>;
    } else if (a === '--interval') {
      const v = Number(value());
      if (!(v >= 0.1 && v <= 3600)) throw new Error(`--interval ${argv[i]}: must be from 0.1 to 3600 seconds`);
      intervalMs = v * 1000;
    } else throw new Error(`unknown argument ${a}; see --help`);
  }
  if (help) command = 'help';
  else if (version) command = 'version';
  if (watching && command === 'uninstall') throw new Error('--watch goes with install, not uninstall');
  return { command, watch: watching, intervalMs, options: o };
}

export async function main(argv: string[]): Promise<number> {
  const log = stderrLog(false, 'xmasq-cni-install:');
  let p: Parsed;
  try {
    p = parseInstallArgs(argv, { root: packageRoot(), node: process.execPath });
  } catch (e) {
    log.error((e as Error).message);
    return 2;
  }
  if (p.command === 'help' || p.command === 'version') {
    process.stdout.write(`${p.command === 'help' ? USAGE : packageVersion()}\n`);
    return 0;
  }
  try {
    if (p.command === 'uninstall') {
      uninstall(p.options, log);
      return 0;
    }
    const written = installFiles(p.options);
    log.info(written.length ? `installed ${written.join(', ')} in ${p.options.binDir}` : `${p.options.binDir} already holds this plugin`);
    if (p.watch) await watchChain(p.options, p.intervalMs, log);
    else new Chainer(p.options, log).check();
    return 0;
  } catch (e) {
    log.error((e as Error).message);
    return 1;
  }
}
