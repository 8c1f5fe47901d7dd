/**
 * ct_admitted_copy (bpf/conntrack.h) against the kernel's own hash: the
 * element a program's lookup of flow A returned is freed and reused under
 * its read, as when another CPU deletes A and inserts a flow (testdata/
 * ct-reuse.bpf.c plays both CPUs in one BPF_PROG_TEST_RUN). Needs root and
 * clang-16.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BpfObject } from './libbpf.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'BPF programs: CAP_BPF');

const SOURCE = fileURLToPath(new URL('./testdata/ct-reuse.bpf.c', import.meta.url));
const BPF_DIR = fileURLToPath(new URL('../bpf/', import.meta.url));

let dir: string;
let obj: BpfObject;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'xmasq-ct-admitted-test-'));
  const out = join(dir, 'ct-reuse.bpf.o');
  try {
    execFileSync('clang-16', ['-O2', '-g', '-target', 'bpf', '-mcpu=v3', '-I/usr/include/x86_64-linux-gnu', `-I${BPF_DIR}`, '-DXMASQ_TEST',
      '-c', SOURCE, '-o', out], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    throw new Error(`clang-16 could not build ${SOURCE}: ${(e as { stderr?: string }).stderr ?? (e as Error).message}`);
  }
  obj = BpfObject.open(out);
  obj.load();
});

afterAll(() => {
  obj?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** What one run of program saw: the checked read in place, the copy's verdict, checked and destination. */
function run(program: string): { inPlace: bigint; whole: bigint; checked: bigint; daddr: bigint } {
  const r = obj.program(program).testRun({ data: Buffer.alloc(64) });
  expect(r.retval, `${program} could not set its entries up`).toBe(0);
  const at = (i: number) => {
    const k = Buffer.alloc(4);
    k.writeUInt32LE(i);
    return obj.map('reuse_out').lookup(k)!.readBigUInt64LE(0);
  };
  return { inPlace: at(0), whole: at(1), checked: at(2), daddr: at(3) };
}

// 10.0.0.2 and 10.0.0.9 as the programs hold them (network order words, read little-endian).
const TO_A = 0x0200000an;
const TO_LATER = 0x0900000an;

describe('ct_admitted_copy', () => {
  it('takes an entry nobody touched, whole', () => {
    expect(run('untouched')).toEqual({ inPlace: 1000n, whole: 1n, checked: 1000n, daddr: TO_A });
  });

  it("refuses an element reused for another flow under the read (the kernel's reuse is real: the read in place sees the other flow's admission)", () => {
    const seen = run('reused_for_another');
    expect(seen.inPlace, 'the kernel did not hand the freed element to the next insert: this test no longer sets the race up').toBe(2000n);
    expect(seen.whole).toBe(0n);
  });

  it('takes an element reused for the same flow as that later admission, whole', () => {
    expect(run('reused_for_the_same')).toEqual({ inPlace: 2000n, whole: 1n, checked: 2000n, daddr: TO_LATER });
  });
});
