import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/build.ts'],
    // The end-to-end test trains a small model several times on a 2-core machine.
    testTimeout: 300_000,
    hookTimeout: 60_000,
  },
});
