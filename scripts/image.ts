/**
 * npm run image: the xmasq container image, built on this machine from Debian packages and
 * the bundles only (no registry: Docker Hub is out of reach here).
 *
 *   1. stage: rootfs/ with /opt/xmasq (package.json, dist/*.mjs, bpf/build's datapath
 *      objects, the CNI plugin's wrapper, koffi for linux-x64: only its JavaScript, licence
 *      and koffi.node), /usr/local/bin/node (the node running this: Debian 12's nodejs is
 *      18 and bookworm-backports has none, so the image takes the build host's, 20 or
 *      later) and xmasq-agent, xmasq, xmasq-cni-install on the PATH; plus the Dockerfile
 *      and packages.txt of deploy/image/. That directory is a complete `docker build`
 *      context (--context-only stops here).
 *   2. rootfs: mmdebstrap, variant essential, bookworm with deploy/image/packages.txt,
 *      from this host's apt sources for Debian; the staged files synced in; documentation
 *      left out; node and the three commands run in it before it is packed.
 *   3. `docker import` into the lab's Docker daemon (lab/docker.ts: the system's, or one
 *      that leaves the host network alone), then the image is run: node, --version of
 *      each command, the agent's --help.
 *   4. --save FILE: `docker save` of the image, for `ctr -n k8s.io images import FILE` or
 *      `docker load` on the nodes.
 *
 * Needs root (mmdebstrap's root mode, dockerd) and apt's network access. npm test runs it
 * through lab/daemonset.test.ts when the lab's dockerd has no image of this checkout (the
 * CONTENT_LABEL digest). Prints the time each step took and the image's size.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  chmodSync, copyFileSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { commandLine } from '../testing/args.ts';
import { BUNDLES, ROOT, bundlePath } from './bundle.ts';

export const IMAGE_DIR = join(ROOT, 'deploy/image');
/** Where the package sits in the image. */
export const PREFIX = '/opt/xmasq';
/** The datapath objects the agent loads (config.ts --object, --rpeer-object). */
const OBJECTS = ['xmasq.bpf.o', 'xmasq.rpeer.bpf.o'];
/** The commands on the image's PATH, each a link to its bundle. */
export const COMMANDS = ['xmasq-agent', 'xmasq', 'xmasq-cni-install'] as const;
/**
 * Programs the agent runs (ip, nsenter) and those the DaemonSet's shell commands name
 * (deploy/kubernetes/xmasq.yaml: mount-bpffs, the agent's pid file, preStop): the image
 * build fails without one of them.
 */
export const TOOLS = ['ip', 'nsenter', 'mount', 'stat', 'grep', 'cat', 'sleep'] as const;
/** What of koffi and its linux-x64 binary a running node loads. */
const RUNTIME_FILE = /\.(js|cjs|mjs|json|node)$|^LICENSE/;

/** The Debian packages of packages.txt (comments and blank lines dropped). */
export function imagePackages(): string[] {
  return readFileSync(join(IMAGE_DIR, 'packages.txt'), 'utf8').split('\n').map((l) => l.replace(/#.*/, '').trim()).filter(Boolean);
}

function copyRuntimeFiles(from: string, to: string, skip: (rel: string) => boolean): void {
  for (const entry of readdirSync(from, { withFileTypes: true, recursive: true })) {
    if (!entry.isFile()) continue;
    const src = join(entry.parentPath, entry.name);
    const rel = relative(from, src);
    if (!RUNTIME_FILE.test(entry.name) || skip(rel)) continue;
    mkdirSync(dirname(join(to, rel)), { recursive: true });
    copyFileSync(src, join(to, rel));
  }
}

/** Writes the docker build context (Dockerfile, packages.txt, rootfs/) into dir. */
export function stage(dir: string, node: string = process.execPath): void {
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as Record<string, unknown>;
  for (const name of Object.keys(BUNDLES) as Array<keyof typeof BUNDLES>) {
    if (!existsSync(bundlePath(name))) throw new Error(`${bundlePath(name)} is missing: run npm run build first`);
  }
  for (const o of OBJECTS) if (!existsSync(join(ROOT, 'bpf/build', o))) throw new Error(`bpf/build/${o} is missing: run npm run build first`);
  rmSync(dir, { recursive: true, force: true });
  const root = join(dir, 'rootfs');
  const opt = join(root, PREFIX);
  mkdirSync(join(opt, 'dist'), { recursive: true });
  // What dataplane/package.ts reads: the name and the version.
  writeFileSync(join(opt, 'package.json'), `${JSON.stringify({ name: pkg.name, version: pkg.version, private: true, type: pkg.type, description: pkg.description }, null, 2)}\n`);
  for (const name of Object.keys(BUNDLES) as Array<keyof typeof BUNDLES>) copyFileSync(bundlePath(name), join(opt, 'dist', `${name}.mjs`));
  mkdirSync(join(opt, 'bpf/build'), { recursive: true });
  for (const o of OBJECTS) copyFileSync(join(ROOT, 'bpf/build', o), join(opt, 'bpf/build', o));
  mkdirSync(join(opt, 'dataplane/cni'), { recursive: true });
  copyFileSync(join(ROOT, 'dataplane/cni/xmasq'), join(opt, 'dataplane/cni/xmasq'));
  copyRuntimeFiles(join(ROOT, 'node_modules/koffi'), join(opt, 'node_modules/koffi'), () => false);
  copyRuntimeFiles(join(ROOT, 'node_modules/@koromix/koffi-linux-x64'), join(opt, 'node_modules/@koromix/koffi-linux-x64'), (rel) => rel.startsWith('musl_'));
  const bin = join(root, 'usr/local/bin');
  mkdirSync(bin, { recursive: true });
  copyFileSync(node, join(bin, 'node'));
  for (const c of COMMANDS) symlinkSync(`${PREFIX}/dist/${c}.mjs`, join(bin, c));
  for (const f of [join(opt, 'dataplane/cni/xmasq'), join(bin, 'node'), ...COMMANDS.map((c) => join(opt, 'dist', `${c}.mjs`))]) chmodSync(f, 0o755);
  copyFileSync(join(IMAGE_DIR, 'Dockerfile'), join(dir, 'Dockerfile'));
  copyFileSync(join(IMAGE_DIR, 'packages.txt'), join(dir, 'packages.txt'));
}

/**
 * The image's label holding stagedDigest(): a suite that runs the image (lab/daemonset.test.ts)
 * compares it with the checkout's own digest and rebuilds a stale image rather than testing
 * yesterday's agent.
 */
export const CONTENT_LABEL = 'xmasq.content';

/** sha256 over what stage() wrote into dir's rootfs (paths, modes, link targets, bytes) and the package list. */
export function stagedDigest(dir: string): string {
  const h = createHash('sha256');
  const root = join(dir, 'rootfs');
  const paths = readdirSync(root, { recursive: true, encoding: 'utf8' }).sort();
  for (const rel of paths) {
    const p = join(root, rel);
    const st = lstatSync(p);
    h.update(`${rel}\0${st.mode}\0`);
    if (st.isSymbolicLink()) h.update(readlinkSync(p));
    else if (st.isFile()) h.update(readFileSync(p));
    h.update('\0');
  }
  h.update(readFileSync(join(IMAGE_DIR, 'packages.txt')));
  return h.digest('hex');
}

/** The digest an image built from this checkout (its bundles and objects as built now) carries. */
export function checkoutDigest(node: string = process.execPath): string {
  const dir = mkdtempSync(join(tmpdir(), 'xmasq-stage-'));
  try {
    stage(dir, node);
    return stagedDigest(dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * This host's apt sources for Debian's own archive (deb822 stanzas or one-line entries
 * signed by debian-archive-keyring), as a deb822 file for mmdebstrap: the image comes
 * from the mirrors this machine already uses, and no other repository (NodeSource…).
 */
export function debianSources(): string {
  const stanzas: string[] = [];
  const dir = '/etc/apt/sources.list.d';
  const files = [...(existsSync('/etc/apt/sources.list') ? ['/etc/apt/sources.list'] : []),
    ...(existsSync(dir) ? readdirSync(dir).map((f) => join(dir, f)) : [])];
  for (const file of files) {
    const text = readFileSync(file, 'utf8');
    if (file.endsWith('.sources')) {
      for (const s of text.split(/\n\s*\n/)) {
        if (/^Signed-By:\s*\/usr\/share\/keyrings\/debian-archive-keyring\.gpg\s*$/m.test(s) && /^Types:.*\bdeb\b/m.test(s) && !/^Enabled:\s*no/mi.test(s)) {
          stanzas.push(s.split('\n').filter((l) => !l.startsWith('#')).join('\n').trim());
        }
      }
    } else if (file.endsWith('.list')) {
      for (const line of text.split('\n')) {
        const m = /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.+)$/.exec(line.trim());
        if (m && /debian/.test(m[1]) && /^bookworm/.test(m[2])) stanzas.push(`Types: deb\nURIs: ${m[1]}\nSuites: ${m[2]}\nComponents: ${m[3]}`);
      }
    }
  }
  if (!stanzas.length) throw new Error('no Debian apt source found in /etc/apt/sources.list{,.d}: add one for bookworm, or pass --sources FILE');
  return `${stanzas.join('\n\n')}\n`;
}

function must(cmd: string, args: string[], what: string, opts: { input?: string } = {}): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', input: opts.input, maxBuffer: 64 << 20, stdio: ['pipe', 'pipe', 'pipe'] });
  if (r.status !== 0) {
    const out = `${r.stderr ?? ''}${r.stdout ?? ''}`.trim().split('\n').slice(-20).join('\n  ');
    throw new Error(`${what}: ${cmd} ${args.join(' ')} ${r.error ? `failed (${r.error.message})` : `exited ${r.status}`}\n  ${out}`);
  }
  return r.stdout;
}

interface Options {
  tag: string;
  contextOnly?: string;
  save?: string;
  sources?: string;
  node: string;
}

const USAGE = `usage: npm run image -- [--tag NAME:TAG] [--save FILE] [--sources FILE] [--node FILE]
       npm run image -- --context-only DIR

  --tag NAME:TAG       the image's name (default xmasq:<package version>)
  --save FILE          also write the image as a tarball (docker save), for the nodes
  --sources FILE       apt sources (deb822) for mmdebstrap (default: this host's Debian ones)
  --node FILE          the node binary to put in the image (default: the one running this)
  --context-only DIR   only stage the docker build context (Dockerfile, packages.txt, rootfs/) in DIR
  --help               this text
  --version            the checkout's version`;

/** The options, or the exit status when commandLine answered (--help, --version, a bad option). */
function parse(argv: string[], version: string): Options | number {
  const line = commandLine('image', USAGE, argv, {
    tag: { type: 'string' }, save: { type: 'string' }, sources: { type: 'string' }, node: { type: 'string' }, 'context-only': { type: 'string' },
  });
  if (typeof line === 'number') return line;
  const v = line.values;
  return { tag: v.tag ?? `xmasq:${version}`, node: v.node ?? process.execPath, save: v.save, sources: v.sources, contextOnly: v['context-only'] };
}

const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;

async function main(argv: string[]): Promise<void> {
  const version = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
  const o = parse(argv, version);
  if (typeof o === 'number') {
    process.exitCode = o;
    return;
  }
  const nodeMajor = Number(must(o.node, ['-p', 'process.versions.node.split(".")[0]'], 'asking node its version').trim());
  if (!(nodeMajor >= 20)) throw new Error(`${o.node} is Node.js ${nodeMajor}; the image needs 20 or later (--node FILE)`);
  const t0 = Date.now();
  const step = (what: string, since: number) => process.stderr.write(`image: ${what} (${((Date.now() - since) / 1000).toFixed(1)} s)\n`);

  if (o.contextOnly) {
    stage(o.contextOnly, o.node);
    step(`staged the build context in ${o.contextOnly}: docker build -t ${o.tag} ${o.contextOnly}`, t0);
    return;
  }
  if (process.getuid?.() !== 0) throw new Error('npm run image needs root (mmdebstrap in root mode, dockerd); --context-only does not');
  if (spawnSync('mmdebstrap', ['--version']).error) throw new Error("mmdebstrap is not installed: apt-get install mmdebstrap (scripts/setup.sh installs it: lab/daemonset.test.ts builds the image when it is missing or stale)");
  const work = mkdtempSync(join(tmpdir(), 'xmasq-image-'));
  try {
    const context = join(work, 'context');
    stage(context, o.node);
    const digest = stagedDigest(context);
    step('staged /opt/xmasq, node and the commands', t0);

    const t1 = Date.now();
    const sources = join(work, 'debian.sources');
    writeFileSync(sources, o.sources ? readFileSync(o.sources, 'utf8') : debianSources());
    const tar = join(work, 'rootfs.tar');
    const smoke = ['node --version', ...COMMANDS.map((c) => `${c} --version`),
      `for t in ${TOOLS.join(' ')}; do command -v $t >/dev/null || { echo "image: $t is missing"; exit 1; }; done`].join(' && ');
    must('mmdebstrap', [
      '--mode=root', '--variant=essential', `--include=${imagePackages().join(',')}`,
      // No documentation, manual pages or translations: nobody reads them in a container.
      '--dpkgopt=path-exclude=/usr/share/doc/*', '--dpkgopt=path-include=/usr/share/doc/*/copyright',
      '--dpkgopt=path-exclude=/usr/share/man/*', '--dpkgopt=path-exclude=/usr/share/info/*',
      '--dpkgopt=path-exclude=/usr/share/locale/*', '--dpkgopt=path-exclude=/usr/share/lintian/*',
      `--customize-hook=sync-in ${join(context, 'rootfs')} /`,
      `--customize-hook=chroot "$1" sh -c '${smoke}'`,
      // The apt lists and caches of the build are no part of the image.
      '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
      'bookworm', tar, sources,
    ], 'making the rootfs');
    step(`rootfs: Debian 12 with ${imagePackages().join(', ')} (${mib(statSync(tar).size)} as a tar)`, t1);

    const t2 = Date.now();
    const { DockerDaemon } = await import('../lab/docker.ts');
    const docker = await DockerDaemon.ensure();
    await docker.must(['import',
      '--change', 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
      '--change', `WORKDIR ${PREFIX}`,
      '--change', 'CMD ["xmasq-agent"]',
      '--change', `LABEL org.opencontainers.image.title=xmasq org.opencontainers.image.version=${version} nodejs=${must(o.node, ['--version'], 'node --version').trim()} ${CONTENT_LABEL}=${digest}`,
      '--message', `xmasq ${version}: Debian 12 (mmdebstrap) and the bundles`,
      tar, o.tag], { what: 'importing the rootfs', timeoutMs: 600_000 });
    step(`imported as ${o.tag} into ${docker.origin === 'system' ? 'the system\'s dockerd' : `the lab's dockerd (${docker.hostArgs.join(' ')})`}`, t2);

    const run = async (args: string[]) => (await docker.must(['run', '--rm', '--network', 'none', o.tag, ...args], { what: `docker run ${o.tag} ${args.join(' ')}` })).stdout;
    const said = [
      `node ${(await run(['node', '--version'])).trim()}`,
      ...(await Promise.all(COMMANDS.map(async (c) => `${c} ${(await run([c, '--version'])).trim()}`))),
      `xmasq-agent --help: ${(await run(['xmasq-agent', '--help'])).split('\n')[0]}`,
      (await run(['ip', '-V'])).trim(),
    ];
    for (const s of said) process.stderr.write(`image: run: ${s}\n`);
    const size = Number((await docker.must(['image', 'inspect', '--format', '{{.Size}}', o.tag])).stdout.trim());
    if (o.save) {
      mkdirSync(dirname(o.save), { recursive: true });
      await docker.must(['save', '-o', o.save, o.tag], { what: 'saving the image', timeoutMs: 600_000 });
      step(`saved ${o.save} (${mib(statSync(o.save).size)})`, t2);
    }
    step(`${o.tag}: ${mib(size)}, built`, t0);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.argv.slice(2)).catch((e: Error) => {
    process.stderr.write(`image: ${e.message}\n`);
    process.exitCode = 1;
  });
}
