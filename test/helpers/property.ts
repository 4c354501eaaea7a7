/** Shared plumbing of the property tests (test/property/*.test.ts). */
import * as fs from 'node:fs';
import * as path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, expect } from 'vitest';
import { fileVsBuffer, firstDiffBuf, makeTmpDir, removeTmpDir } from './files.js';
import { allExtents, loadLib, type LibDriver } from './lib.js';
import { createOptions, type CreateChoice, type Op } from './model.js';
import { describeResult, qemuImg, qk } from './proc.js';

export const RUNS = Number(process.env.QK_FC_RUNS ?? 24);
export const fcParams = (): fc.Parameters<unknown> => ({
  numRuns: RUNS,
  seed: process.env.QK_FC_SEED ? Number(process.env.QK_FC_SEED) : undefined,
  // Every run spawns processes: keep shrinking bounded so a failure doesn't take forever.
  interruptAfterTimeLimit: Number(process.env.QK_FC_TIME_LIMIT_MS ?? 90_000),
  markInterruptAsFailure: false,
});

/** Registers a temp root for the calling test file; returns a maker of fresh per-run folders. */
export function propertyDirs(): () => string {
  let root = '';
  let counter = 0;
  beforeAll(() => {
    root = makeTmpDir('qk-prop-');
  });
  afterAll(() => removeTmpDir(root));
  return () => {
    const d = path.join(root, `case-${counter++}`);
    fs.mkdirSync(d);
    return d;
  };
}

/** Read through the library and compare with the model: whole image, odd-sized pieces, block status. */
export async function checkLibrary(
  file: string,
  model: Uint8Array,
  reads: Array<[number, number]>,
  snapshot?: string,
): Promise<void> {
  const lib = await loadLib();
  let d: LibDriver | undefined;
  try {
    d = await lib.open(file, snapshot ? { snapshot: { name: snapshot } } : {});
    expect(d.size, 'virtual size').toBe(model.length);
    // Whole image in uneven chunks.
    const chunk = 200_003;
    for (let off = 0; off < model.length; off += chunk) {
      const len = Math.min(chunk, model.length - off);
      const got = await d.read(off, len);
      expect(got.length).toBe(len);
      const diff = firstDiffBuf(got, model.subarray(off, off + len));
      expect(diff, `library read(${off}, ${len}) differs from the model at +${diff}`).toBe(-1);
    }
    // Arbitrary unaligned reads.
    for (const [a, b] of reads) {
      const off = a % model.length;
      const len = Math.max(1, Math.min(b, model.length - off));
      const got = await d.read(off, len);
      const diff = firstDiffBuf(got, model.subarray(off, off + len));
      expect(diff, `library read(${off}, ${len}) differs from the model at +${diff}`).toBe(-1);
    }
    // Extents tile the image; zero/unallocated ones must really read as zeros.
    for (const e of await allExtents(d)) {
      if (e.kind === 'zero' || e.kind === 'unallocated') {
        const slice = model.subarray(e.offset, e.offset + e.length);
        const nz = slice.findIndex((x) => x !== 0);
        expect(nz, `blockStatus says ${e.kind} for [${e.offset}, +${e.length}) but byte ${e.offset + nz} is non-zero`).toBe(-1);
      }
    }
  } finally {
    await d?.close();
  }
}

/** The oracle first: if qemu-img disagrees with the model, the model (i.e. this test) is wrong. */
export async function checkModel(dir: string, file: string, model: Uint8Array, extra: string[] = []): Promise<void> {
  const q = await qemuImg(['convert', ...extra, '-O', 'raw', file, 'qemu.raw'], { cwd: dir });
  expect(q.code, describeResult(q)).toBe(0);
  expect(await fileVsBuffer(path.join(dir, 'qemu.raw'), model), 'MODEL CHECK: qemu-img disagrees with the model').toBe('');
}

export async function checkOurConvert(dir: string, file: string, model: Uint8Array, extra: string[] = []): Promise<void> {
  const r = await qk(['convert', ...extra, '-O', 'raw', file, 'ours.raw'], { cwd: dir });
  expect(r.code, describeResult(r)).toBe(0);
  expect(await fileVsBuffer(path.join(dir, 'ours.raw'), model), 'our convert -O raw differs from the model').toBe('');
}

export const readsArb = fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 300_000 })), { maxLength: 8 });

export function label(c: CreateChoice, ops: Op[]): string {
  return `${createOptions(c)} size=${c.size} ops=${JSON.stringify(ops)}`;
}

