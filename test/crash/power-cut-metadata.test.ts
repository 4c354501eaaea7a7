/**
 * Power-cut tests, metadata paths: refcount-table growth, lazy refcounts (dirty bit), extended L2
 * subclusters, and a resize that moves the L1 table. See harness.ts; env switches as in
 * power-cut-data.test.ts.
 */
import { describe } from 'vitest';
import { crashTest } from './crash-test.js';
import { extendedL2, lazyRefcounts, reftableGrowth, resizeMovesL1 } from './workloads.js';

describe('power cut: metadata paths', () => {
  for (const w of [reftableGrowth, lazyRefcounts, extendedL2, resizeMovesL1]) crashTest(w);
});
