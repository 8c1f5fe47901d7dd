/**
 * The suites that run INSIDE the test VM (vm-tests/guest/init.sh starts vitest with
 * this config). Their files end in .guest.ts so that the repository's own `vitest run`
 * (which takes every *.test.ts) never runs them on a stock kernel.
 */
import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  root: fileURLToPath(new URL('../..', import.meta.url)),
  test: {
    include: ['vm-tests/guest/*.guest.ts'],
    // One VM, one set of network namespaces and bpffs at a time.
    fileParallelism: false,
    // Node under QEMU's TCG runs several times slower than on the host.
    testTimeout: 300_000,
    hookTimeout: 300_000,
  },
});
