/**
 * What `npm run image` puts in the image (scripts/image.ts stage(), the docker build
 * context the Dockerfile uses too), checked without building one: building needs root,
 * apt's network access and minutes, so it stays out of npm test. The staged commands are
 * run with the staged node, so the koffi files kept are the ones it needs.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROOT } from './bundle.ts';
import { COMMANDS, IMAGE_DIR, imagePackages, PREFIX, stage } from './image.ts';

let CTX = '';
const VERSION = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;

function files(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => !e.isDirectory())
    .map((e) => relative(dir, join(e.parentPath, e.name)))
    .sort();
}

beforeAll(() => {
  CTX = mkdtempSync('/tmp/xmasq-image-test-');
  stage(join(CTX, 'ctx'));
});
afterAll(() => {
  if (CTX) rmSync(CTX, { recursive: true, force: true });
});

describe('the staged image content', () => {
  it('is the package, node and the commands, and the Dockerfile with its package list', () => {
    const all = files(join(CTX, 'ctx'));
    expect(all.filter((f) => !f.startsWith('rootfs/opt/xmasq/node_modules/'))).toEqual([
      'Dockerfile', 'packages.txt',
      'rootfs/opt/xmasq/bpf/build/xmasq.bpf.o', 'rootfs/opt/xmasq/bpf/build/xmasq.rpeer.bpf.o',
      'rootfs/opt/xmasq/dataplane/cni/xmasq',
      'rootfs/opt/xmasq/dist/xmasq-agent.mjs', 'rootfs/opt/xmasq/dist/xmasq-cni-install.mjs', 'rootfs/opt/xmasq/dist/xmasq-cni.mjs', 'rootfs/opt/xmasq/dist/xmasq.mjs',
      'rootfs/opt/xmasq/package.json',
      'rootfs/usr/local/bin/node', 'rootfs/usr/local/bin/xmasq', 'rootfs/usr/local/bin/xmasq-agent', 'rootfs/usr/local/bin/xmasq-cni-install',
    ]);
    for (const c of COMMANDS) expect(readlinkSync(join(CTX, 'ctx/rootfs/usr/local/bin', c))).toBe(`${PREFIX}/dist/${c}.mjs`);
    // koffi: JavaScript, licence and the linux-x64 glibc binary; no C++ sources, docs or the musl binary.
    const koffi = all.filter((f) => f.startsWith('rootfs/opt/xmasq/node_modules/'));
    expect(koffi).toContain('rootfs/opt/xmasq/node_modules/@koromix/koffi-linux-x64/linux_x64/koffi.node');
    expect(koffi.filter((f) => !/\.(js|cjs|json|node)$|\/LICENSE[^/]*$/.test(f))).toEqual([]);
    expect(koffi.some((f) => f.includes('musl'))).toBe(false);
    const bytes = koffi.reduce((n, f) => n + statSync(join(CTX, 'ctx', f)).size, 0);
    expect(bytes).toBeLessThan(4 << 20);
    expect(readFileSync(join(CTX, 'ctx/Dockerfile'), 'utf8')).toBe(readFileSync(join(IMAGE_DIR, 'Dockerfile'), 'utf8'));
    expect(imagePackages()).toEqual(['iproute2', 'libbpf1', 'util-linux', 'mount', 'libstdc++6', 'libgcc-s1']);
  });

  it('runs: each command prints the version with the staged node, from the staged package alone', () => {
    const root = join(CTX, 'ctx/rootfs');
    for (const c of COMMANDS) {
      const r = spawnSync(join(root, 'usr/local/bin/node'), [join(root, PREFIX, 'dist', `${c}.mjs`), '--version'], { encoding: 'utf8', cwd: '/', env: { PATH: '/usr/bin:/bin' } });
      expect({ code: r.status, stdout: r.stdout, stderr: r.stderr }, c).toEqual({ code: 0, stdout: `${VERSION}\n`, stderr: '' });
    }
  });
});
