/**
 * Building the rpeer kernel: Debian's linux-source-6.1 with bpf_redirect_rpeer.patch,
 * configured as tinyconfig + qemu.config, cached under a key made from the patch,
 * the config fragment and the source package version, so that a second run (or CI on
 * the same machine) boots the kernel it already has.
 */
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { btfHasFunc, kernelHasRpeer } from '../dataplane/agent/system.ts';
import { pidAlive } from '../testing/command.ts';

const HERE = dirname(fileURLToPath(import.meta.url));
export const PATCH = join(HERE, 'bpf_redirect_rpeer.patch');
export const CONFIG_FRAGMENT = join(HERE, 'qemu.config');
export const SOURCE_PACKAGE = 'linux-source-6.1';
export const SOURCE_TARBALL = `/usr/src/${SOURCE_PACKAGE}.tar.xz`;
/** Outside any clone, so every clone and CI run on this machine shares it. */
export const DEFAULT_CACHE_DIR = '/var/cache/xmasq-kernel';

export class KernelBuildError extends Error {
  override name = 'KernelBuildError';
}

export interface KernelBuild {
  key: string;
  dir: string;
  bzImage: string;
  /** The full .config the kernel was built with. */
  config: string;
  /** The raw .BTF section of vmlinux (what the guest sees as /sys/kernel/btf/vmlinux). */
  btf: string;
}

export interface BuildOptions {
  cacheDir?: string;
  jobs?: number;
  /** Progress lines (the build takes about 10 minutes on 2 cores). */
  log?: (line: string) => void;
}

/** The installed version of the source package, e.g. 6.1.192-2. */
export function sourceVersion(): string {
  let v = '';
  try {
    v = execFileSync('dpkg-query', ['-W', '-f', '${Version}', SOURCE_PACKAGE], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    // not installed: reported below
  }
  if (!v || !existsSync(SOURCE_TARBALL)) {
    throw new KernelBuildError(`${SOURCE_PACKAGE} is not installed (no ${SOURCE_TARBALL}): run scripts/setup.sh, or apt-get install ${SOURCE_PACKAGE}`);
  }
  return v;
}

/** sha256 over the three inputs that decide what gets built; 16 hex digits. */
export function buildKey(version = sourceVersion()): string {
  const h = createHash('sha256');
  for (const part of [readFileSync(PATCH), readFileSync(CONFIG_FRAGMENT), Buffer.from(version)]) {
    h.update(String(part.length)).update(':').update(part);
  }
  return h.digest('hex').slice(0, 16);
}

function describe(dir: string, key: string): KernelBuild {
  return { key, dir, bzImage: join(dir, 'bzImage'), config: join(dir, 'config'), btf: join(dir, 'vmlinux.btf') };
}

/** The cached build for the current inputs, if there is one. */
export function cachedKernel(cacheDir = DEFAULT_CACHE_DIR): KernelBuild | undefined {
  const key = buildKey();
  const k = describe(join(cacheDir, key), key);
  return existsSync(join(k.dir, 'meta.json')) ? k : undefined;
}

/** The options the fragment sets: name -> 'y' | 'm' | value | 'n' (for "# CONFIG_X is not set"). */
export function fragmentOptions(text = readFileSync(CONFIG_FRAGMENT, 'utf8')): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of text.split('\n')) {
    const set = /^(CONFIG_[A-Z0-9_]+)=(.*)$/.exec(line);
    const unset = /^# (CONFIG_[A-Z0-9_]+) is not set$/.exec(line);
    if (set) out.set(set[1], set[2]);
    else if (unset) out.set(unset[1], 'n');
  }
  return out;
}

/** Options of the fragment that Kconfig did not keep (a missing dependency), as "CONFIG_X=want (got …)". */
export function droppedOptions(fragment: Map<string, string>, config: string): string[] {
  const got = fragmentOptions(config);
  const dropped: string[] = [];
  for (const [name, want] of fragment) {
    const have = got.get(name) ?? 'n';
    if (have !== want) dropped.push(`${name}=${want} (got ${have})`);
  }
  return dropped;
}

/** Runs a command; its output goes to logFile; onLine sees each line. Rejects with the log's tail. */
function runLogged(cmd: string, args: string[], opts: { cwd?: string; logFile: string; what: string; onLine?: (l: string) => void }): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let tail: string[] = [];
    let partial = '';
    const chunks: Buffer[] = [];
    const take = (b: Buffer) => {
      chunks.push(b);
      const lines = (partial + b.toString()).split('\n');
      partial = lines.pop() ?? '';
      for (const l of lines) {
        opts.onLine?.(l);
        tail.push(l);
      }
      if (tail.length > 200) tail = tail.slice(-40);
    };
    child.stdout!.on('data', take);
    child.stderr!.on('data', take);
    child.on('error', (e) => reject(new KernelBuildError(`${opts.what}: cannot run ${cmd}: ${e.message}`)));
    child.on('close', (code) => {
      writeFileSync(opts.logFile, Buffer.concat(chunks), { flag: 'a' });
      if (code === 0) return resolve();
      if (partial) tail.push(partial);
      reject(new KernelBuildError(`${opts.what}: '${[cmd, ...args].join(' ')}' exited ${code}; full log in ${opts.logFile}; last lines:\n  ${tail.slice(-25).join('\n  ')}`));
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * The kernel for the current patch + config + source: from the cache, or built
 * (about 10 minutes on 2 cores, at nice 10 so that concurrent tests keep their CPU).
 * A second caller while a build runs waits for it rather than building twice.
 */
export async function ensureKernel(opts: BuildOptions = {}): Promise<KernelBuild> {
  const cacheDir = opts.cacheDir ?? DEFAULT_CACHE_DIR;
  const log = opts.log ?? ((l: string) => console.log(l));
  const version = sourceVersion();
  const key = buildKey(version);
  const done = describe(join(cacheDir, key), key);
  if (existsSync(join(done.dir, 'meta.json'))) return done;

  mkdirSync(cacheDir, { recursive: true });
  const work = join(cacheDir, `${key}.build`);
  // mkdir is the lock: it fails if another build of this key is running.
  for (;;) {
    try {
      mkdirSync(work);
      writeFileSync(join(work, 'pid'), String(process.pid));
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      const pid = Number(existsSync(join(work, 'pid')) ? readFileSync(join(work, 'pid'), 'utf8') : NaN);
      if (Number.isInteger(pid) && pidAlive(pid)) {
        log(`kernel: ${key} is being built by pid ${pid}; waiting for it`);
        while (pidAlive(pid) && !existsSync(join(done.dir, 'meta.json'))) await sleep(5_000);
        if (existsSync(join(done.dir, 'meta.json'))) return done;
      }
      log(`kernel: removing the leftovers of an interrupted build in ${work}`);
      rmSync(work, { recursive: true, force: true });
    }
  }

  const started = Date.now();
  const elapsed = () => `${Math.round((Date.now() - started) / 1000)} s`;
  const src = join(work, 'src');
  const obj = join(work, 'obj');
  // Beside the work tree, not in it: it outlives a failed build.
  const logFile = join(cacheDir, `${key}.build.log`);
  writeFileSync(logFile, '');
  try {
    log(`kernel: building ${SOURCE_PACKAGE} ${version} + ${PATCH.split('/').pop()} (key ${key}) in ${work}`);
    mkdirSync(src);
    mkdirSync(obj);
    log('kernel: extracting the source');
    await runLogged('tar', ['-xf', SOURCE_TARBALL, '-C', src, '--strip-components=1'], { logFile, what: 'extracting the kernel source' });
    log('kernel: applying the patch');
    await runLogged('patch', ['-p1', '--forward', '--batch', '-d', src, '-i', PATCH], { logFile, what: `applying ${PATCH} to ${SOURCE_PACKAGE} ${version}` });

    log('kernel: configuring (tinyconfig + qemu.config)');
    await runLogged('make', ['-C', src, `O=${obj}`, 'tinyconfig'], { logFile, what: 'make tinyconfig' });
    await runLogged(join(src, 'scripts/kconfig/merge_config.sh'), ['-m', '-O', obj, join(obj, '.config'), CONFIG_FRAGMENT], { cwd: src, logFile, what: 'merging qemu.config' });
    await runLogged('make', ['-C', src, `O=${obj}`, 'olddefconfig'], { logFile, what: 'make olddefconfig' });
    const dropped = droppedOptions(fragmentOptions(), readFileSync(join(obj, '.config'), 'utf8'));
    if (dropped.length) {
      throw new KernelBuildError(`Kconfig did not keep these options of ${CONFIG_FRAGMENT} (a dependency is missing from the fragment): ${dropped.join(', ')}`);
    }

    const jobs = opts.jobs ?? cpus().length;
    log(`kernel: compiling with ${jobs} jobs at nice 10 (about 10 minutes on 2 cores)`);
    let built = 0;
    let lastReport = Date.now();
    await runLogged('nice', ['-n', '10', 'make', '-C', src, `O=${obj}`, `-j${jobs}`, 'bzImage'], {
      logFile,
      what: 'compiling the kernel',
      onLine: (l) => {
        if (/^\s+(CC|AS|LD|AR)\s/.test(l)) built++;
        if (Date.now() - lastReport >= 30_000) {
          lastReport = Date.now();
          log(`kernel: ${built} objects compiled, ${elapsed()}`);
        }
      },
    });

    const out = join(cacheDir, `${key}.tmp`);
    rmSync(out, { recursive: true, force: true });
    mkdirSync(out);
    const k = describe(out, key);
    copyFileSync(join(obj, 'arch/x86/boot/bzImage'), k.bzImage);
    copyFileSync(join(obj, '.config'), k.config);
    await runLogged('objcopy', ['-O', 'binary', '--only-section=.BTF', join(obj, 'vmlinux'), k.btf], { logFile, what: 'extracting the BTF of vmlinux' });
    const rpeer = kernelHasRpeer(k.btf);
    if (!rpeer.present) throw new KernelBuildError(`the kernel was built but its BTF has no bpf_redirect_rpeer (${rpeer.why}); is pahole (apt-get install dwarves) installed?`);
    // The programs' conntrack admission: registered by nf_conntrack_bpf.c, built only with NF_CONNTRACK=y and DEBUG_INFO_BTF.
    for (const kfunc of ['bpf_skb_ct_lookup', 'bpf_ct_release']) {
      if (!btfHasFunc(readFileSync(k.btf), kfunc)) throw new KernelBuildError(`the kernel was built but its BTF has no ${kfunc}: ${CONFIG_FRAGMENT} must keep CONFIG_NF_CONNTRACK=y (built in) and CONFIG_DEBUG_INFO_BTF=y`);
    }
    writeFileSync(join(out, 'meta.json'), JSON.stringify({ key, sourcePackage: SOURCE_PACKAGE, sourceVersion: version, builtAt: new Date().toISOString(), seconds: Math.round((Date.now() - started) / 1000) }, null, 2) + '\n');
    renameSync(out, done.dir);
    rmSync(work, { recursive: true, force: true });
    rmSync(logFile, { force: true });
    log(`kernel: built in ${elapsed()}: ${done.bzImage}`);
    return done;
  } catch (e) {
    // Keep the log, drop the 1 GB tree; the next run starts over.
    rmSync(work, { recursive: true, force: true });
    throw e;
  }
}
