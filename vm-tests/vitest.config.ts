/**
 * `npm run test:vm`: the host side of the VM tests. Its file ends in .vmtest.ts so that
 * the repository's `vitest run` (every *.test.ts) does not build a kernel and boot a VM.
 */
import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  root: fileURLToPath(new URL('..', import.meta.url)),
  test: {
    include: ['vm-tests/*.vmtest.ts'],
    // The guest's lab runs the CNI plugin's bundle from dist/ (the host's root over 9p).
    globalSetup: ['scripts/bundle.ts'],
    // A kernel build (about 10 minutes, more on a busy machine) and a TCG boot running Node.
    testTimeout: 60_000,
    hookTimeout: 100 * 60_000,
  },
});
