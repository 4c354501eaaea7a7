/**
 * Power-cut tests, data paths: allocating writes, copy-on-write over a backing file, zero writes and
 * discards, and the same on a compat=0.10 (v2) image. See harness.ts for what every cut must satisfy;
 * QCOWKIT_CRASH_FULL=1 checks every cut point, QCOWKIT_CRASH_TORN=1 adds torn writes.
 */
import { describe } from 'vitest';
import { crashTest } from './crash-test.js';
import { allocating, cowOverBacking, v2Variant, zeroDiscard } from './workloads.js';

describe('power cut: data paths', () => {
  for (const w of [allocating, cowOverBacking, zeroDiscard, v2Variant]) crashTest(w);
});
