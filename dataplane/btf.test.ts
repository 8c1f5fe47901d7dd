/**
 * readStructLayouts/readEnum against testdata/probe.bpf.c, whose comments
 * give every offset. Reading BTF from a file needs no privileges, only
 * clang-16 and bpftool.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readEnum, readStruct, readStructLayouts } from './btf.ts';
import { SK_BUFF_OFFSETS, SK_BUFF_SIZE } from './libbpf.ts';

const SOURCE = fileURLToPath(new URL('./testdata/probe.bpf.c', import.meta.url));

let dir: string;
let obj: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'xmasq-btf-test-'));
  obj = join(dir, 'probe.bpf.o');
  try {
    execFileSync('clang-16', ['-O2', '-g', '-target', 'bpf', '-I/usr/include/x86_64-linux-gnu', '-c', SOURCE, '-o', obj], { stdio: 'pipe' });
  } catch (e) {
    const err = e as Error & { stderr?: Buffer };
    throw new Error(`compiling ${SOURCE} with clang-16 failed: ${err.stderr?.toString() || err.message}`);
  }
});

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('readStructLayouts', () => {
  it('lays out a struct with tail padding', () => {
    expect(readStructLayouts(obj).get('probe_key')).toEqual({
      size: 8,
      members: [
        { name: 'addr', offset: 0, size: 4 },
        { name: 'port', offset: 4, size: 2 },
        { name: 'proto', offset: 6, size: 1 },
      ],
    });
  });

  it('lays out a struct with interior padding', () => {
    expect(readStructLayouts(obj).get('probe_inner')).toEqual({
      size: 8,
      members: [
        { name: 'lo', offset: 0, size: 2 },
        { name: 'hi', offset: 4, size: 4 },
      ],
    });
  });

  it('resolves arrays, nested structs, enums, bitfields, typedefs and qualifiers', () => {
    expect(readStructLayouts(obj).get('probe_value')).toEqual({
      size: 48,
      members: [
        { name: 'flag', offset: 0, size: 1 },
        { name: 'bytes', offset: 8, size: 8 },
        { name: 'mac', offset: 16, size: 6 },
        { name: 'inner', offset: 24, size: 8 },
        { name: 'kind', offset: 32, size: 4 },
        { name: 'small', offset: 36, size: 4, bitSize: 3, bitOffset: 0 },
        { name: 'wide', offset: 36, size: 4, bitSize: 13, bitOffset: 3 },
        { name: 'tail', offset: 38, size: 2 },
        { name: 'words', offset: 40, size: 8 },
      ],
    });
  });

  it('agrees with libbpf.ts on struct __sk_buff', () => {
    const skb = readStruct(obj, '__sk_buff');
    expect(skb.size).toBe(SK_BUFF_SIZE);
    const at = (name: string) => skb.members.find((m) => m.name === name)?.offset;
    for (const [name, offset] of Object.entries(SK_BUFF_OFFSETS)) expect({ name, offset: at(name) }).toEqual({ name, offset });
    // The anonymous unions around flow_keys and sk are members without a name.
    expect(skb.members.filter((m) => m.name === '').map((m) => [m.offset, m.size])).toEqual([[144, 8], [168, 8]]);
  });

  it('leaves out anonymous structs (the map definitions)', () => {
    expect([...readStructLayouts(obj).keys()].every((n) => n !== '' && n !== '(anon)')).toBe(true);
  });

  it('names the structs it has when one is missing', () => {
    expect(() => readStruct(obj, 'no_such_struct')).toThrow(/struct no_such_struct is not in .*probe_inner, probe_key, probe_value/);
  });

  it('says what to do when the object is missing', () => {
    expect(() => readStructLayouts(join(dir, 'missing.o'))).toThrow(/no such file/);
  });
});

describe('readEnum', () => {
  it('reads a signed enum', () => {
    expect(readEnum(obj, 'probe_kind')).toEqual({
      PROBE_KIND_NONE: 0, PROBE_KIND_SEEN: 1, PROBE_KIND_DROPPED: 7, PROBE_KIND_BOGUS: -1,
    });
  });

  it('names the enums it has when one is missing', () => {
    expect(() => readEnum(obj, 'nope')).toThrow(/enum nope is not in .*it has: probe_kind/);
  });
});
