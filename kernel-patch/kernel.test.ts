/**
 * The patch and the build inputs, without building (npm run test:vm builds and boots):
 * the patch applies to the installed linux-source-6.1 and moves no uapi helper id;
 * the cache key follows its inputs; a config option Kconfig drops is reported.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { PATCH, SOURCE_PACKAGE, SOURCE_TARBALL, buildKey, droppedOptions, fragmentOptions, sourceVersion } from './kernel.ts';

const patch = readFileSync(PATCH, 'utf8');
const added = patch.split('\n').filter((l) => l.startsWith('+') && !l.startsWith('+++')).map((l) => l.slice(1));
const tmp = mkdtempSync(join(tmpdir(), 'xmasq-kpatch-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe('kernel-patch/bpf_redirect_rpeer.patch', () => {
  it(`applies cleanly to the installed ${SOURCE_PACKAGE}`, () => {
    // Throws with the fix if the package is missing.
    sourceVersion();
    const files = [...patch.matchAll(/^\+\+\+ b\/(\S+)/gm)].map((m) => m[1]);
    expect(files).toEqual(['net/core/filter.c']);
    execFileSync('tar', ['-xf', SOURCE_TARBALL, '-C', tmp, `${SOURCE_PACKAGE}/net/core/filter.c`]);
    const r = execFileSync('patch', ['--dry-run', '-p1', '--forward', '--batch', '-d', join(tmp, SOURCE_PACKAGE), '-i', PATCH], { encoding: 'utf8' });
    expect(r).not.toMatch(/offset|fuzz|FAILED|Reversed/i);
  }, 120_000);

  it('moves no helper id: no uapi change, the new function is a kfunc registered for SCHED_CLS only', () => {
    expect(patch).not.toMatch(/^\+\+\+ b\/include\/uapi\//m);
    expect(added.filter((l) => /\bFN\(|BPF_FUNC_/.test(l))).toEqual([]);
    expect(added.filter((l) => l.includes('register_btf_kfunc_id_set'))).toEqual(['\treturn register_btf_kfunc_id_set(BPF_PROG_TYPE_SCHED_CLS,']);
    expect(added).toContain('BTF_ID_FLAGS(func, bpf_redirect_rpeer)');
    // The internal flag comes after NEXTHOP (1 << 18) and bpf_redirect refuses it from programs.
    expect(added).toContain('\tBPF_F_RPEER\t= (1ULL << 19),');
    expect(added.find((l) => l.startsWith('#define BPF_F_REDIRECT_INTERNAL'))).toMatch(/BPF_F_RPEER/);
  });
});

describe('the build inputs', () => {
  it('the cache key is stable and changes with the source version', () => {
    expect(buildKey('6.1.192-2')).toBe(buildKey('6.1.192-2'));
    expect(buildKey('6.1.192-2')).not.toBe(buildKey('6.1.193-1'));
    expect(buildKey('6.1.192-2')).toMatch(/^[0-9a-f]{16}$/);
  });

  it('reads the config fragment, and names each option Kconfig did not keep', () => {
    const frag = fragmentOptions('CONFIG_A=y\n# comment\nCONFIG_B="x"\n# CONFIG_C is not set\nCONFIG_D=y\n');
    expect([...frag]).toEqual([['CONFIG_A', 'y'], ['CONFIG_B', '"x"'], ['CONFIG_C', 'n'], ['CONFIG_D', 'y']]);
    const config = 'CONFIG_A=y\nCONFIG_B="x"\nCONFIG_C=y\n# CONFIG_D is not set\n';
    expect(droppedOptions(frag, config)).toEqual(['CONFIG_C=n (got y)', 'CONFIG_D=y (got n)']);
    expect(fragmentOptions().get('CONFIG_DEBUG_INFO_BTF')).toBe('y');
  });
});
