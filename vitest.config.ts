import * as os from 'node:os';
import { defineConfig } from 'vitest/config';

// Most test time is spent in child processes (qemu-img, qemu-io, bin/qcowkit), so run test files in
// parallel forks, a little above the core count; each file uses its own temp folder.
const cores = typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
const workers = Math.max(2, Math.min(cores + 1, 6));

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    pool: 'forks',
    poolOptions: { forks: { minForks: 1, maxForks: workers } },
    testTimeout: 60_000,
    hookTimeout: 240_000,
    teardownTimeout: 30_000,
    reporters: process.env.CI ? ['dot'] : ['default'],
  },
});
