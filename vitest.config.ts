import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['**/*.test.ts'],
    exclude: ['node_modules/**'],
    // The differential suites share one kernel object and its maps; running files
    // in parallel would interleave map state between them.
    fileParallelism: false,
    // The tests run the bundles in dist/ (the CNI plugin through dataplane/cni/xmasq): built first, in ~1 s.
    globalSetup: ['scripts/bundle.ts'],
    testTimeout: 600_000,
    hookTimeout: 120_000,
  },
});
