/**
 * The rpeer kernel end to end: builds it (or takes it from the cache), boots it under
 * QEMU with vm-tests/guest/init.sh, which runs the guest suites inside, and holds each
 * guest suite's outcome. A failure quotes the guest's own failure messages; the whole
 * console is kept in the results directory named in the message. A run whose every test
 * passed removes that directory: the passing runs would otherwise pile up in /tmp.
 */
import { rmSync } from 'node:fs';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ensureKernel } from '../kernel-patch/kernel.ts';
import { mustRun } from '../testing/command.ts';
import { runGuestSuites, type GuestRun } from './qemu.ts';
import { ROOT } from '../testing/root.ts';

if (process.getuid?.() !== 0) throw new Error('vm-tests need root: the kernel cache is in /var/cache and the guest runs the lab as root; run as root');

let vm: GuestRun;
let failed = false;
const where = () => `(console, report and dmesg in ${vm.resultsDir})`;

beforeAll(async () => {
  await mustRun('make', ['-s', '-C', `${ROOT}vm-tests/bpf`], { what: 'building the VM tests\' BPF objects' });
  const kernel = await ensureKernel({ log: (l) => console.log(l) });
  console.log(`vm: booting ${kernel.bzImage} (key ${kernel.key}) under QEMU TCG; the guest runs vm-tests/guest/*.guest.ts`);
  const started = Date.now();
  vm = await runGuestSuites({ bzImage: kernel.bzImage, log: (l) => console.log(`vm | ${l}`) });
  console.log(`vm: QEMU exited ${vm.qemuExit} after ${Math.round((Date.now() - started) / 1000)} s; results in ${vm.resultsDir}`);
});

afterEach((ctx) => {
  if (ctx.task.result?.state !== 'pass') failed = true;
});

afterAll(() => {
  // vm is unset when beforeAll failed, which also fails every test
  if (failed || vm === undefined) return;
  rmSync(vm.resultsDir, { recursive: true, force: true });
  console.log(`vm: every test passed; removed ${vm.resultsDir}`);
});

/** The assertions of one guest file, by the file's base name. */
function guestFile(base: string) {
  const f = vm.report?.testResults.find((r) => r.name.endsWith(`/vm-tests/guest/${base}.guest.ts`));
  expect(f, `vm-tests/guest/${base}.guest.ts is not in the guest's report ${where()}`).toBeDefined();
  return f!;
}

function expectAllPassed(base: string): void {
  const f = guestFile(base);
  const failed = f.assertionResults.filter((a) => a.status !== 'passed');
  // Skipped tests mean the file failed around them (beforeAll): its message says why.
  expect(failed.map((a) => `${a.fullName} (${a.status}): ${a.failureMessages.join('\n').slice(0, 2000)}`),
    `${base} ${where()}${f.message ? `\n${f.message.slice(0, 3000)}` : ''}`).toEqual([]);
  // A file that failed before its tests (in beforeAll, at import) has no assertion results.
  expect(f.assertionResults.length, `${base}: no test ran: ${f.message.slice(0, 2000)} ${where()}`).toBeGreaterThan(0);
  expect(f.status, f.message).toBe('passed');
}

describe('the rpeer kernel under QEMU', () => {
  it('boots the patched 6.1 kernel, runs the guest suites and reports back', () => {
    expect(vm.timedOut, `QEMU was killed after its timeout ${where()}`).toBe(false);
    expect(vm.status, `the guest's init stopped at "${vm.status ?? 'never started'}" ${where()}; console tail:\n${vm.console.slice(-3000)}`).toBe('done');
    expect(vm.uname).toMatch(/^6\.1\.\d+/);
    expect(vm.report, `no report.json ${where()}`).toBeDefined();
    expect(vm.guestExitCode, `vitest in the guest exited ${vm.guestExitCode} ${where()}`).toBe(0);
  });

  it('the rpeer datapath end to end: agents in auto mode report rpeer; TCP/UDP go VXLAN first, then masqueraded, bypassing the veth; the sending host\'s FORWARD DROP holds for a learned pair', () => {
    expectAllPassed('rpeer-e2e');
  });

  it('Geneve on 6081 end to end: learned from Geneve frames, masqueraded and restored, a pod\'s datagram to 6081 not learned from, the same answers without agents', () => {
    expectAllPassed('geneve');
  });

  it('helper numbering is unchanged: a program built against stock headers with late helper ids loads and works', () => {
    expectAllPassed('abi');
  });

  it('bpf_redirect_rpeer redirects from a pod eth0 egress, and drops for flags != 0, missing/down target, ingress, no peer, same netns', () => {
    expectAllPassed('rpeer-refusals');
  });
});
