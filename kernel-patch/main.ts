/**
 * kernel-patch CLI: builds (or finds in the cache) the rpeer kernel for the QEMU tests.
 *   npx tsx kernel-patch/main.ts [build|key|path] [--cache-dir DIR] [--jobs N]
 */
import { cpus } from 'node:os';
import { DEFAULT_CACHE_DIR, KernelBuildError, SOURCE_PACKAGE, buildKey, cachedKernel, ensureKernel } from './kernel.ts';

const HELP = `usage: tsx kernel-patch/main.ts [build|key|path] [options]

Builds Debian's ${SOURCE_PACKAGE} with kernel-patch/bpf_redirect_rpeer.patch, configured
as tinyconfig + kernel-patch/qemu.config, for the QEMU tests (npm run test:vm).
The result is cached under <cache-dir>/<key>/, where key hashes the patch, the config
fragment and the source package version; a fresh build takes about 10 minutes on 2 cores.

commands:
  build   (default) build unless cached; the last line printed is the bzImage path
  key     print the cache key of the current inputs
  path    print the cached bzImage path, or exit 1 if it is not built yet

options:
  --cache-dir DIR   where builds are kept (default ${DEFAULT_CACHE_DIR})
  --jobs N          make -j N (default: the number of CPUs, ${cpus().length})
  -h, --help        this text
`;

function fail(msg: string): never {
  console.error(`kernel-patch: ${msg}`);
  process.exit(2);
}

function parse(argv: string[]): { cmd: string; cacheDir: string; jobs?: number } {
  let cmd = 'build';
  let cacheDir = DEFAULT_CACHE_DIR;
  let jobs: number | undefined;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      const v = argv[++i];
      if (v === undefined) fail(`${a} needs a value (see --help)`);
      return v;
    };
    if (a === '-h' || a === '--help') {
      process.stdout.write(HELP);
      process.exit(0);
    } else if (a === '--cache-dir') cacheDir = value();
    else if (a === '--jobs') {
      const v = value();
      jobs = Number(v);
      if (!Number.isInteger(jobs) || jobs < 1) fail(`--jobs "${v}" must be a whole number of at least 1`);
    } else if (['build', 'key', 'path'].includes(a) && i === 0) cmd = a;
    else fail(`unknown argument "${a}" (see --help)`);
  }
  return { cmd, cacheDir, jobs };
}

async function main(): Promise<void> {
  const { cmd, cacheDir, jobs } = parse(process.argv.slice(2));
  if (process.getuid?.() !== 0 && cmd === 'build' && cacheDir === DEFAULT_CACHE_DIR) {
    fail(`building into ${DEFAULT_CACHE_DIR} needs root; run as root or pass --cache-dir`);
  }
  try {
    if (cmd === 'key') {
      console.log(buildKey());
    } else if (cmd === 'path') {
      const k = cachedKernel(cacheDir);
      if (!k) {
        console.error(`kernel-patch: no build for key ${buildKey()} in ${cacheDir}; run 'tsx kernel-patch/main.ts build'`);
        process.exit(1);
      }
      console.log(k.bzImage);
    } else {
      const k = await ensureKernel({ cacheDir, jobs });
      console.log(k.bzImage);
    }
  } catch (e) {
    if (e instanceof KernelBuildError) fail(e.message);
    throw e;
  }
}

await main();
