/**
 * dataplane/libbpf.ts against the kernel, with testdata/probe.bpf.c compiled
 * into a temp dir. Needs root (CAP_BPF, CAP_NET_ADMIN), clang-16 and iproute2.
 * TC attachment happens only on a veth pair inside a network namespace this
 * file creates and deletes; no packet leaves it.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  BpfMap, BpfObject, LibbpfError, MapType, SK_BUFF_OFFSETS, SK_BUFF_SIZE, STRUCT_SIZES, koffiLayout, possibleCpus,
  readSkbCtx, setLibbpfLogger, skbCtx, tcAttach, tcDestroyHook, tcDetach, tcQuery, withNetns,
} from './libbpf.ts';
import type { MapSnapshot } from './map-ops.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'BPF programs, network namespaces: CAP_BPF + CAP_NET_ADMIN');

const SOURCE = fileURLToPath(new URL('./testdata/probe.bpf.c', import.meta.url));
const TC_ACT_OK = 0;
const TC_ACT_SHOT = 2;
const NETNS = `xmasq-libbpf-test-${process.pid}`;
const PIN_DIR = `/sys/fs/bpf/xmasq-libbpf-test-${process.pid}`;

let dir: string;
const objects = { plain: '', bad: '', pin: '' };
const opened: BpfObject[] = [];

function run(cmd: string, args: string[]): string {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    const err = e as Error & { stderr?: string };
    throw new Error(`${cmd} ${args.join(' ')} failed: ${err.stderr?.trim() || err.message}`);
  }
}

function compile(out: string, defines: string[]): string {
  const path = join(dir, out);
  run('clang-16', ['-O2', '-g', '-target', 'bpf', '-I/usr/include/x86_64-linux-gnu', ...defines, '-c', SOURCE, '-o', path]);
  return path;
}

function open(path: string, opts?: { pinRoot?: string }): BpfObject {
  const o = BpfObject.open(path, opts);
  opened.push(o);
  return o;
}

function loaded(path = objects.plain): BpfObject {
  const o = open(path);
  o.load();
  return o;
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n);
  return b;
}

function probeKey(addr: number, port = 0, proto = 0): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(addr, 0);
  b.writeUInt16LE(port, 4);
  b[6] = proto;
  return b;
}

/** A packet long enough for an skb test run (at least an Ethernet header). */
function packet(first: number, len = 64): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = i;
  b[0] = first;
  return b;
}

function thrown(fn: () => unknown): Error {
  try {
    fn();
  } catch (e) {
    return e as Error;
  }
  throw new Error('expected an error, got none');
}

function bpffsMounted(): boolean {
  return readFileSync('/proc/self/mounts', 'utf8').split('\n').some((l) => {
    const [, mnt, type] = l.split(' ');
    return mnt === '/sys/fs/bpf' && type === 'bpf';
  });
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'xmasq-libbpf-test-'));
  objects.plain = compile('probe.bpf.o', []);
  objects.bad = compile('probe-bad.bpf.o', ['-DPROBE_BAD']);
  objects.pin = compile('probe-pin.bpf.o', ['-DPROBE_PIN']);
  if (!bpffsMounted()) {
    mkdirSync('/sys/fs/bpf', { recursive: true });
    run('mount', ['-t', 'bpf', 'bpf', '/sys/fs/bpf']);
  }
  mkdirSync(PIN_DIR, { recursive: true });
});

afterAll(() => {
  for (const o of opened) o.close();
  if (existsSync(`/run/netns/${NETNS}`)) run('ip', ['netns', 'del', NETNS]);
  rmSync(PIN_DIR, { recursive: true, force: true });
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('struct layouts', () => {
  it('koffi lays out every libbpf struct exactly as the installed headers do', () => {
    // Unnamed padding members in C have names only on the koffi side.
    const unnamed = new Set(['removed_attach_prog_fd', 'pad']);
    const structs = Object.keys(STRUCT_SIZES) as Array<keyof typeof STRUCT_SIZES>;
    const lines = structs.map((s) => {
      const members = Object.keys(koffiLayout(s).offsets).filter((m) => !unnamed.has(m));
      const offs = members.map((m) => `"\\"${m}\\": %zu"`).join(' ", " ');
      return `printf("\\"${s}\\": {\\"size\\": %zu, \\"offsets\\": {" ${offs || '""'} "}},\\n", sizeof(struct ${s})${members.map((m) => `, offsetof(struct ${s}, ${m})`).join('')});`;
    });
    const skb = Object.keys(SK_BUFF_OFFSETS).map((f) => `offsetof(struct __sk_buff, ${f})`).join(', ');
    const c = `#include <stdio.h>
#include <stddef.h>
#include <linux/bpf.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
int main(void) {
  printf("{");
  ${lines.join('\n  ')}
  printf("\\"__sk_buff\\": [%zu, ${Object.keys(SK_BUFF_OFFSETS).map(() => '%zu').join(', ')}]}\\n", sizeof(struct __sk_buff), ${skb});
  return 0;
}
`;
    writeFileSync(join(dir, 'layouts.c'), c);
    run('clang-16', ['-O0', '-o', join(dir, 'layouts'), join(dir, 'layouts.c')]);
    const c_ = JSON.parse(run(join(dir, 'layouts'), [])) as Record<string, unknown>;
    for (const s of structs) {
      const k = koffiLayout(s);
      for (const m of unnamed) delete k.offsets[m];
      expect({ struct: s, ...k }).toEqual({ struct: s, ...(c_[s] as object) });
      expect(k.size).toBe(STRUCT_SIZES[s]);
    }
    expect(c_.__sk_buff).toEqual([SK_BUFF_SIZE, ...Object.values(SK_BUFF_OFFSETS)]);
  });
});

describe('objects', () => {
  it('lists programs and maps, and names them when one is missing', () => {
    const o = open(objects.plain);
    expect(o.programs()).toEqual(['probe_prog', 'probe_pass']);
    expect(o.maps().sort()).toEqual(['probe_array', 'probe_counters', 'probe_hash', 'probe_percpu_hash']);
    expect(() => o.program('nope')).toThrow(`no program 'nope' in ${objects.plain}; it has: probe_prog, probe_pass`);
    expect(() => o.map('nope')).toThrow(/no map 'nope' in .*; it has: .*probe_array.*probe_hash/);
  });

  it('refuses map and program fds before load, and works after', () => {
    const o = open(objects.plain);
    expect(() => o.map('probe_array').fd).toThrow(/has no fd yet: call load\(\)/);
    o.load();
    expect(o.isLoaded).toBe(true);
    expect(o.map('probe_array').fd).toBeGreaterThan(0);
    expect(o.program('probe_prog').fd).toBeGreaterThan(0);
    expect(() => o.load()).toThrow(/load\(\) was already called/);
  });

  it('skips programs whose autoload is off', () => {
    const o = open(objects.plain);
    o.setAutoload('probe_pass', false);
    o.load();
    expect(o.program('probe_prog').fd).toBeGreaterThan(0);
    expect(() => o.program('probe_pass').fd).toThrow(/has no fd/);
    expect(() => o.setAutoload('probe_pass', true)).toThrow(/call setAutoload before it/);
  });

  it('close is idempotent and later use says the object is closed', () => {
    const o = open(objects.plain);
    o.load();
    const m = o.map('probe_array');
    o.close();
    o.close();
    expect(() => m.lookup(u32(0))).toThrow(/the object was closed/);
    expect(() => o.programs()).toThrow(/is closed/);
  });

  it('names the file and errno when opening fails', () => {
    const e = thrown(() => BpfObject.open(join(dir, 'missing.o')));
    expect(e).toBeInstanceOf(LibbpfError);
    expect(e.message).toMatch(/^open of .*missing\.o failed: ENOENT \(no such file/);
    expect((e as LibbpfError).code).toBe('ENOENT');
  });

  it('puts the verifier log of a rejected program into the error', () => {
    const o = open(objects.bad);
    const e = thrown(() => o.load()) as LibbpfError;
    expect(e).toBeInstanceOf(LibbpfError);
    expect(e.code).toBe('EACCES');
    expect(e.message).toContain(`load of ${objects.bad} failed: EACCES (the verifier rejected program 'probe_bad'`);
    expect(e.message).toMatch(/verifier log.*:\n(.|\n)*invalid access to packet/);
    expect(e.message).toContain('libbpf: prog \'probe_bad\': BPF program load failed');
    expect(e.log).toContain('-- BEGIN PROG LOAD LOG --');
    expect(() => o.load()).toThrow(/already called and failed; open the file again/);
  });

  // Root with every capability dropped (bounding set emptied before exec) is
  // refused by bpf() just like an unprivileged user, and can still read the checkout.
  const tsx = fileURLToPath(new URL('../node_modules/.bin/tsx', import.meta.url));
  const module = fileURLToPath(new URL('./libbpf.ts', import.meta.url));
  it('tells a caller without CAP_BPF to be root with CAP_BPF', () => {
    const sub = mkdtempSync(join(tmpdir(), 'xmasq-libbpf-eperm-'));
    try {
      const script = join(sub, 'load.ts');
      writeFileSync(script, `import { BpfObject } from ${JSON.stringify(module)};
const o = BpfObject.open(${JSON.stringify(join(sub, 'probe.bpf.o'))});
try { o.load(); console.log('loaded'); } catch (e) { console.log((e as Error).message); }
`);
      writeFileSync(join(sub, 'probe.bpf.o'), readFileSync(objects.plain));
      const out = execFileSync('setpriv', ['--bounding-set=-all', '--inh-caps=-all', '--ambient-caps=-all', tsx, script], { encoding: 'utf8' });
      expect(out).toMatch(/^load of .*probe\.bpf\.o failed: EPERM \(are you root with CAP_BPF\?\)/);
    } finally {
      rmSync(sub, { recursive: true, force: true });
    }
  });

  it('passes every libbpf message to a logger', () => {
    const lines: string[] = [];
    setLibbpfLogger((level, line) => lines.push(`${level} ${line}`));
    try {
      loaded();
    } finally {
      setLibbpfLogger(undefined);
    }
    expect(lines.some((l) => /^debug libbpf: .*probe_array/.test(l))).toBe(true);
  });
});

describe('maps', () => {
  it('reports the declared shape', () => {
    const o = loaded();
    const shape = (m: BpfMap) => [m.name, m.type, m.keySize, m.valueSize, m.maxEntries];
    expect(shape(o.map('probe_hash'))).toEqual(['probe_hash', MapType.HASH, 8, 48, 64]);
    expect(shape(o.map('probe_array'))).toEqual(['probe_array', MapType.ARRAY, 4, 4, 4]);
    expect(shape(o.map('probe_counters'))).toEqual(['probe_counters', MapType.PERCPU_ARRAY, 4, 8, 2]);
    expect(shape(o.map('probe_percpu_hash'))).toEqual(['probe_percpu_hash', MapType.PERCPU_HASH, 4, 4, 8]);
  });

  it('does hash CRUD with noexist/exist semantics', () => {
    const h = loaded().map('probe_hash');
    const k = probeKey(0x0a000001, 80, 6);
    const v1 = Buffer.alloc(48, 1);
    const v2 = Buffer.alloc(48, 2);
    expect(h.lookup(k)).toBeUndefined();

    const absent = thrown(() => h.update(k, v1, 'exist')) as LibbpfError;
    expect(absent.code).toBe('ENOENT');
    expect(absent.message).toMatch(/^update \(exist\) of map 'probe_hash' of .* failed: ENOENT \(the key 0100000a50000600 is absent and flags were 'exist'\)$/);

    h.update(k, v1, 'noexist');
    expect(h.lookup(k)).toEqual(v1);
    const present = thrown(() => h.update(k, v2, 'noexist')) as LibbpfError;
    expect(present.code).toBe('EEXIST');
    expect(present.message).toContain("already present and flags were 'noexist'");

    h.update(k, v2, 'exist');
    expect(h.lookup(k)).toEqual(v2);
    h.update(k, v1);
    expect(h.lookup(k)).toEqual(v1);

    expect(h.delete(k)).toBe(true);
    expect(h.delete(k)).toBe(false);
    expect(h.lookup(k)).toBeUndefined();
  });

  it('checks key and value sizes before the kernel reads past a Buffer', () => {
    const h = loaded().map('probe_hash');
    expect(() => h.lookup(Buffer.alloc(4))).toThrow(/key must be a Buffer of 8 bytes, got 4/);
    expect(() => h.update(probeKey(1), Buffer.alloc(47))).toThrow(/value must be 48 bytes, got 47/);
    expect(() => h.delete(Buffer.alloc(9))).toThrow(/key must be a Buffer of 8 bytes, got 9/);
  });

  it('says when a hash map is full', () => {
    const h = loaded().map('probe_hash');
    for (let i = 0; i < h.maxEntries; i++) h.update(probeKey(i), Buffer.alloc(48), 'noexist');
    const e = thrown(() => h.update(probeKey(1000), Buffer.alloc(48))) as LibbpfError;
    expect(e.code).toBe('E2BIG');
    expect(e.message).toContain('the map is full (max_entries 64)');
  });

  it('explains array semantics: fixed size, zero-filled, never deleted', () => {
    const a = loaded().map('probe_array');
    expect(a.lookup(u32(3))).toEqual(u32(0));
    expect(a.lookup(u32(4))).toBeUndefined();
    a.update(u32(3), u32(0xdeadbeef));
    expect(a.lookup(u32(3))).toEqual(u32(0xdeadbeef));
    expect((thrown(() => a.update(u32(4), u32(1))) as LibbpfError).message).toContain('index out of range: the array has 4 entries');
    expect((thrown(() => a.update(u32(1), u32(1), 'noexist')) as LibbpfError).message)
      .toContain("EEXIST (array elements always exist: 'noexist' can never succeed)");
    expect((thrown(() => a.delete(u32(1))) as LibbpfError).message).toContain('array elements cannot be deleted');
    expect(a.keys()).toEqual([0, 1, 2, 3].map(u32));
    a.clear();
    expect(a.entries()).toEqual([0, 1, 2, 3].map((i) => [u32(i), u32(0)]));
  });

  it('lists keys and entries, batch-looks-up and batch-deletes a hash map', () => {
    const h = loaded().map('probe_hash');
    const want = new Map<string, Buffer>();
    for (let i = 0; i < 20; i++) {
      const v = Buffer.alloc(48, i);
      h.update(probeKey(i, i * 2, i % 3), v);
      want.set(probeKey(i, i * 2, i % 3).toString('hex'), v);
    }
    const asMap = (es: Array<[Buffer, Buffer]>) => new Map(es.map(([k, v]) => [k.toString('hex'), v]));
    expect(new Set(h.keys().map((k) => k.toString('hex')))).toEqual(new Set(want.keys()));
    expect(asMap(h.entries())).toEqual(want);
    // A batch of 3 makes the kernel page through buckets and end with ENOENT.
    expect(asMap(h.lookupBatch({ batchSize: 3 }))).toEqual(want);
    expect(asMap(h.lookupBatch())).toEqual(want);

    // Absent keys are skipped, not fatal: 3 of these 5 exist.
    const n = h.deleteBatch([probeKey(0, 0, 0), probeKey(999), probeKey(1, 2, 1), probeKey(998), probeKey(2, 4, 2)]);
    expect(n).toBe(3);
    expect(h.keys()).toHaveLength(17);
    h.clear();
    expect(h.keys()).toEqual([]);
    expect(h.lookupBatch()).toEqual([]);
    expect(h.deleteBatch([])).toBe(0);
  });

  it('reads a whole hash map in place (readAll), looks up into a buffer, deletes packed keys', () => {
    const h = loaded().map('probe_hash');
    h.clear();
    const entriesOf = (s: MapSnapshot) => new Map(Array.from({ length: s.count }, (_, i) =>
      [s.keys.subarray(i * s.keySize, (i + 1) * s.keySize).toString('hex'), Buffer.from(s.values.subarray(i * s.valueSize, (i + 1) * s.valueSize))]));
    expect(h.readAll().count).toBe(0);
    // Full: max_entries entries, what one batch of the kept buffers holds.
    const want = new Map<string, Buffer>();
    for (let i = 0; i < h.maxEntries; i++) {
      const v = Buffer.alloc(48, i + 1);
      h.update(probeKey(i, i, 6), v);
      want.set(probeKey(i, i, 6).toString('hex'), v);
    }
    const first = h.readAll();
    expect(first).toMatchObject({ count: h.maxEntries, keySize: h.keySize, valueSize: 48 });
    expect(entriesOf(first)).toEqual(want);
    // The same buffers the next time, holding the map as it is then.
    h.delete(probeKey(3, 3, 6));
    want.delete(probeKey(3, 3, 6).toString('hex'));
    const second = h.readAll();
    expect(second.keys).toBe(first.keys);
    expect(second.values).toBe(first.values);
    expect(entriesOf(second)).toEqual(want);

    const out = Buffer.alloc(48);
    expect(h.lookupInto(probeKey(5, 5, 6), out)).toBe(true);
    expect(out).toEqual(Buffer.alloc(48, 6));
    expect(h.lookupInto(probeKey(3, 3, 6), out)).toBe(false);
    expect(() => h.lookupInto(probeKey(5, 5, 6), Buffer.alloc(47))).toThrow(/must hold 48 bytes/);

    // Absent keys are skipped: 2 of these 3 exist; bytes past count are not keys.
    const packed = Buffer.concat([probeKey(5, 5, 6), probeKey(3, 3, 6), probeKey(7, 7, 6), probeKey(9, 9, 6)]);
    expect(h.deleteKeys(packed, 3)).toBe(2);
    expect(h.lookup(probeKey(9, 9, 6))).toBeDefined();
    expect(h.readAll().count).toBe(h.maxEntries - 3);
    expect(() => h.deleteKeys(packed, 5)).toThrow(/at least 5 × 8 bytes/);
    h.clear();
  });

  it('batch-looks-up an array', () => {
    const a = loaded().map('probe_array');
    a.update(u32(2), u32(7));
    expect(a.lookupBatch({ batchSize: 3 })).toEqual([[u32(0), u32(0)], [u32(1), u32(0)], [u32(2), u32(7)], [u32(3), u32(0)]]);
  });

  it('gives per-CPU values one 8-byte-aligned slot per possible CPU', () => {
    const ncpu = possibleCpus();
    expect(ncpu).toBeGreaterThan(0);
    const o = loaded();
    const h = o.map('probe_percpu_hash');
    expect(h.isPerCpu).toBe(true);
    expect(h.fullValueSize).toBe(8 * ncpu);

    // One CPU's value is copied to every CPU.
    h.update(u32(1), u32(0x11223344));
    const all = h.lookup(u32(1))!;
    expect(all).toHaveLength(8 * ncpu);
    for (let c = 0; c < ncpu; c++) expect(all.subarray(c * 8, c * 8 + 8)).toEqual(Buffer.from([0x44, 0x33, 0x22, 0x11, 0, 0, 0, 0]));

    // The whole array sets each CPU's own value.
    const each = Buffer.alloc(8 * ncpu);
    for (let c = 0; c < ncpu; c++) each.writeUInt32LE(100 + c, c * 8);
    h.update(u32(2), each);
    expect(h.lookupPerCpu(u32(2))).toEqual(Array.from({ length: ncpu }, (_, c) => u32(100 + c)));
    expect(h.lookupBatch().find(([k]) => k.equals(u32(2)))?.[1]).toEqual(each);
    expect(() => h.update(u32(3), Buffer.alloc(5))).toThrow(`value must be 4 (one CPU's) or ${8 * ncpu} (${ncpu} CPUs x 8) bytes, got 5`);

    const c = o.map('probe_counters');
    expect(c.lookup(u32(0))).toEqual(Buffer.alloc(8 * ncpu));
    c.update(u32(1), Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]));
    expect(c.lookupPerCpu(u32(1))!.map((b) => b.readBigUInt64LE())).toEqual(Array(ncpu).fill(1n));
    c.clear();
    expect(c.lookup(u32(1))).toEqual(Buffer.alloc(8 * ncpu));
  });
});

describe('testRun', () => {
  it('runs the program: verdict, rewritten packet, map writes, context out', () => {
    const o = loaded();
    const p = o.program('probe_prog');
    const data = packet(0x11);
    const r = p.testRun({ data, ctx: skbCtx({ mark: 5, ifindex: 1 }) });
    expect(r.retval).toBe(TC_ACT_OK);
    expect(r.data).toHaveLength(data.length);
    const want = Buffer.from(data);
    want[1] = 0x11 ^ 0x5a;
    expect(r.data).toEqual(want);
    expect(data[1]).toBe(1); // the input is not touched
    expect(readSkbCtx(r.ctx!)).toEqual({ mark: 6, priority: 0, ingressIfindex: 0, ifindex: 1 });
    expect(o.map('probe_array').lookup(u32(0))).toEqual(u32(0x11));
    expect(r.durationNs).toBeGreaterThanOrEqual(0);

    const drop = p.testRun({ data: packet(0xff) });
    expect(drop.retval).toBe(TC_ACT_SHOT);
    expect(drop.ctx).toBeUndefined();
    expect(o.map('probe_array').lookup(u32(0))).toEqual(u32(0xff));
  });

  it('repeats: the program runs repeat times on the same skb', () => {
    const o = loaded();
    const r = o.program('probe_prog').testRun({ data: packet(0x22), ctx: skbCtx({ mark: 100 }), repeat: 50 });
    expect(r.retval).toBe(TC_ACT_OK);
    expect(readSkbCtx(r.ctx!).mark).toBe(150);
    const perCpu = o.map('probe_counters').lookupPerCpu(u32(0))!.map((b) => b.readBigUInt64LE());
    expect(perCpu.reduce((a, b) => a + b, 0n)).toBe(50n);
    expect(typeof r.durationNs).toBe('number');
  });

  it('explains the kernel refusing a run', () => {
    const p = loaded().program('probe_prog');
    const short = thrown(() => p.testRun({ data: Buffer.alloc(8) })) as LibbpfError;
    expect(short.code).toBe('EINVAL');
    expect(short.message).toMatch(/test run of program 'probe_prog' of .* failed: EINVAL \(.*at least an Ethernet header/);

    const small = thrown(() => p.testRun({ data: packet(1), dataSizeOut: 16 })) as LibbpfError;
    expect(small.code).toBe('ENOSPC');
    expect(small.message).toContain('the output is 64 bytes, more than dataSizeOut (16)');

    const badCtx = skbCtx();
    badCtx.writeUInt32LE(1, 0); // len is not one of the fields the kernel accepts
    expect((thrown(() => p.testRun({ data: packet(1), ctx: badCtx })) as LibbpfError).code).toBe('EINVAL');

    const noDev = thrown(() => p.testRun({ data: packet(1), ctx: skbCtx({ ifindex: 0x7fff0000 }) })) as LibbpfError;
    expect(noDev.code).toBe('ENODEV');
    expect(noDev.message).toContain('ctx.ifindex names no interface in this network namespace');
  });
});

describe('pinning', () => {
  it('pins a map, reopens it with fromPinned, and unpins it', () => {
    const o = loaded();
    const a = o.map('probe_array');
    const path = `${PIN_DIR}/probe_array`;
    a.pin(path);
    expect(existsSync(path)).toBe(true);
    // libbpf treats pinning a map again at its own pin path as a no-op...
    a.pin(path);
    // ...but another map there is refused.
    const clash = thrown(() => o.map('probe_hash').pin(path)) as LibbpfError;
    expect(clash.code).toBe('EEXIST');
    expect(clash.message).toContain(`something is already pinned at ${path}: unpin it first`);

    const again = BpfMap.fromPinned(path);
    try {
      expect([again.name, again.type, again.keySize, again.valueSize, again.maxEntries]).toEqual(['probe_array', MapType.ARRAY, 4, 4, 4]);
      again.update(u32(2), u32(42));
      expect(a.lookup(u32(2))).toEqual(u32(42));
      expect(again.fd).not.toBe(a.fd);
    } finally {
      again.close();
    }
    expect(() => again.fd).toThrow(/is closed/);
    a.unpin(path);
    expect(existsSync(path)).toBe(false);

    const e = thrown(() => BpfMap.fromPinned(path)) as LibbpfError;
    expect(e.code).toBe('ENOENT');
    expect(e.message).toContain(`opening pinned map ${path} failed: ENOENT (nothing is pinned there)`);
  });

  it('reads per-CPU maps through a pinned fd with the same layout', () => {
    const h = loaded().map('probe_percpu_hash');
    h.update(u32(9), u32(9));
    const path = `${PIN_DIR}/probe_percpu_hash`;
    h.pin(path);
    const p = BpfMap.fromPinned(path);
    try {
      expect(p.isPerCpu).toBe(true);
      expect(p.lookup(u32(9))).toEqual(h.lookup(u32(9)));
    } finally {
      p.close();
      p.unpin(path);
    }
  });

  it('pins a program, and fromPinned refuses it as a map', () => {
    const p = loaded().program('probe_pass');
    const path = `${PIN_DIR}/probe_pass`;
    p.pin(path);
    try {
      expect(() => BpfMap.fromPinned(path)).toThrow(/is pinned, but not a map/);
    } finally {
      p.unpin(path);
    }
    expect(existsSync(path)).toBe(false);
  });

  it('reuses a map through setPinPath, and refuses a pinned map of another shape', () => {
    const path = `${PIN_DIR}/by-path`;
    const first = open(objects.plain);
    first.map('probe_array').setPinPath(path);
    first.load();
    expect(first.map('probe_array').isPinned).toBe(true);
    expect(first.map('probe_hash').isPinned).toBe(false);
    expect(() => first.map('probe_array').setPinPath(path)).toThrow(/must come before load\(\)/);
    first.map('probe_array').update(u32(1), u32(0xabcd));

    const second = open(objects.plain);
    second.map('probe_array').setPinPath(path);
    second.load();
    expect(second.map('probe_array').lookup(u32(1))).toEqual(u32(0xabcd));

    const clash = open(objects.plain);
    clash.map('probe_hash').setPinPath(path);
    const e = thrown(() => clash.load()) as LibbpfError;
    expect(e.code).toBe('EINVAL');
    expect(e.message).toContain('failed: EINVAL (a map pinned at the pin path differs in type, key/value size, max_entries or flags');
    expect(e.message).toContain(`couldn't reuse pinned map at '${path}': parameter mismatch`);
    second.map('probe_array').unpin(); // the pin path set above
    expect(existsSync(path)).toBe(false);
  });

  it('pins maps declared with LIBBPF_PIN_BY_NAME under pinRoot and reuses them', () => {
    const root = `${PIN_DIR}/root`;
    mkdirSync(root, { recursive: true });
    const first = open(objects.pin, { pinRoot: root });
    first.load();
    expect(existsSync(`${root}/probe_pinned`)).toBe(true);
    first.map('probe_pinned').update(u32(0), Buffer.from('0123456789abcdef', 'hex'));
    first.close();

    const second = open(objects.pin, { pinRoot: root });
    second.load();
    expect(second.map('probe_pinned').lookup(u32(0))!.toString('hex')).toBe('0123456789abcdef');
    second.map('probe_pinned').unpin(`${root}/probe_pinned`);
    expect(existsSync(`${root}/probe_pinned`)).toBe(false);
  });
});

describe('tc attachment in a private network namespace', () => {
  let ifindex = 0;
  const nsPath = `/run/netns/${NETNS}`;

  beforeAll(() => {
    run('ip', ['netns', 'add', NETNS]);
    run('ip', ['-n', NETNS, 'link', 'add', 'veth0', 'type', 'veth', 'peer', 'name', 'veth1']);
    run('ip', ['-n', NETNS, 'link', 'set', 'veth0', 'up']);
    run('ip', ['-n', NETNS, 'link', 'set', 'veth1', 'up']);
    ifindex = (JSON.parse(run('ip', ['-n', NETNS, '-j', 'link', 'show', 'dev', 'veth0'])) as Array<{ ifindex: number }>)[0].ifindex;
  });

  it('returns to the original namespace, also when fn throws', () => {
    const home = readlinkSync('/proc/thread-self/ns/net');
    const inside = withNetns(nsPath, () => readlinkSync('/proc/thread-self/ns/net'));
    expect(inside).not.toBe(home);
    expect(() => withNetns(nsPath, () => { throw new Error('boom'); })).toThrow('boom');
    expect(readlinkSync('/proc/thread-self/ns/net')).toBe(home);
    expect(() => withNetns(`${nsPath}-missing`, () => 1)).toThrow(/ENOENT/);
  });

  it('attaches, queries, replaces and detaches on clsact ingress and egress', () => {
    const o = loaded();
    const prog = o.program('probe_prog');
    const pass = o.program('probe_pass');
    withNetns(nsPath, () => {
      expect(tcQuery(ifindex, 'ingress', 1, 1)).toBeUndefined();

      const at = tcAttach(ifindex, 'ingress', prog);
      expect(at).toEqual({ handle: 1, priority: 1, progId: prog.id });
      expect(tcQuery(ifindex, 'ingress', 1, 1)).toBe(prog.id);

      // The second direction finds the clsact qdisc already there (EEXIST, fine).
      expect(tcAttach(ifindex, 'egress', prog, { handle: 7, priority: 3 })).toEqual({ handle: 7, priority: 3, progId: prog.id });
      expect(tcQuery(ifindex, 'egress', 7, 3)).toBe(prog.id);
      expect(tcQuery(ifindex, 'egress', 1, 1)).toBeUndefined();

      const taken = thrown(() => tcAttach(ifindex, 'ingress', pass)) as LibbpfError;
      expect(taken.code).toBe('EEXIST');
      expect(taken.message).toContain('a filter already sits at handle 1 priority 1');
      tcAttach(ifindex, 'ingress', pass, { replace: true });
      expect(tcQuery(ifindex, 'ingress', 1, 1)).toBe(pass.id);
    });

    // tc(8), from outside, sees the filters in the namespace only.
    const filters = run('tc', ['-n', NETNS, 'filter', 'show', 'dev', 'veth0', 'ingress']);
    expect(filters).toMatch(/probe_pass.*direct-action/);

    withNetns(nsPath, () => {
      tcDetach(ifindex, 'ingress', 1, 1);
      expect(tcQuery(ifindex, 'ingress', 1, 1)).toBeUndefined();
      expect((thrown(() => tcDetach(ifindex, 'ingress', 1, 1)) as LibbpfError).code).toBe('ENOENT');
      tcDetach(ifindex, 'egress', 7, 3);
      tcDestroyHook(ifindex);
      expect(tcQuery(ifindex, 'egress', 7, 3)).toBeUndefined();
    });
    expect(run('tc', ['-n', NETNS, 'qdisc', 'show', 'dev', 'veth0'])).not.toContain('clsact');
  });

  it('rejects bad arguments before calling libbpf', () => {
    const prog = loaded().program('probe_prog');
    expect(() => tcAttach(0, 'ingress', prog)).toThrow(/ifindex must be a positive integer/);
    expect(() => tcAttach(ifindex, 'sideways' as 'ingress', prog)).toThrow(/where must be 'ingress' or 'egress'/);
  });
});
