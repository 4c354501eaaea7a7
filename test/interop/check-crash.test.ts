/**
 * Repairs under power cuts: a repair is recorded (RecordingIO), then replayed as a disk might hold
 * it after a cut at every point, with volatile writes kept, lost, reordered or partly lost. Every
 * such state must keep the guest data (qemu-img compare against the original) and must
 * be repairable to a clean image.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FIX_ERRORS, FIX_LEAKS, Qcow2Checker, repairDirty } from '../../src/formats/qcow2/check.js';
import { MemoryIO } from '../../src/io/memory.js';
import { RecordingIO, type ReplayStrategy } from '../../src/io/recording.js';
import { create, io } from '../helpers/build.js';
import { makeTmpDir, patchU64, readU64, removeTmpDir } from '../helpers/files.js';
import { l2Slots } from '../helpers/qcow2.js';
import { pool, qemuImg, qemuIo } from '../helpers/proc.js';
import { setRefcount } from './check-helpers.js';

let dir: string;
beforeAll(() => {
  dir = makeTmpDir('qk-check-crash-');
});
afterAll(() => removeTmpDir(dir));

/** Check + repair a state in memory; the second pass must be clean. */
async function repairsClean(state: Uint8Array): Promise<boolean> {
  const mem = new MemoryIO('state', state);
  const checker = await Qcow2Checker.open(mem, { writable: true });
  await checker.check(FIX_LEAKS | FIX_ERRORS);
  const again = await checker.check(0);
  return again.corruptions === 0 && again.leaks === 0 && again.checkErrors === 0;
}

async function crashMatrix(original: string, repair: (rec: RecordingIO) => Promise<unknown>): Promise<void> {
  const rec = RecordingIO.fromBytes('img', fs.readFileSync(original));
  await repair(rec);
  const n = rec.ops.length;
  expect(n).toBeGreaterThan(3);
  const strategies: ReplayStrategy[] = ['none', 'reverse', 'torn'];
  const states: Array<{ label: string; bytes: Uint8Array }> = [];
  for (let cut = 0; cut <= n; cut++) {
    for (const strategy of strategies) {
      if (cut === n && strategy !== 'none') continue;
      states.push({ label: `cut ${cut}/${n} ${strategy}`, bytes: rec.replay(cut, { strategy, seed: cut + 1 }) });
    }
  }
  const failures: string[] = [];
  await pool(
    6,
    states.map((s, i) => async () => {
      const file = path.join(path.dirname(original), `state-${i}.qcow2`);
      fs.writeFileSync(file, s.bytes);
      const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', original, file]);
      if (cmp.code !== 0) failures.push(`${s.label}: guest data changed: ${cmp.stdout}${cmp.stderr}`);
      if (!(await repairsClean(s.bytes))) failures.push(`${s.label}: not repairable to a clean image`);
      fs.rmSync(file);
    }),
  );
  expect(failures).toEqual([]);
}

describe('crash safety of repairs', () => {
  it('repairDirty on a crashed lazy-refcounts image (refcount rebuild, dirty bit cleared)', async () => {
    const file = path.join(dir, 'dirty.qcow2');
    await create(dir, 'dirty.qcow2', 64 * 1024 * 1024, { lazy_refcounts: true });
    await qemuIo(['-c', 'write -q -P 0x5a 0 128k', '-c', 'write -q -P 0x5b 3M 64k', '-c', 'abort', 'dirty.qcow2'], { cwd: dir });
    expect(readU64(file, 72) & 1n).toBe(1n);
    const lines: string[] = [];
    await crashMatrix(file, async (rec) => {
      const r = await repairDirty(rec, { log: (l) => lines.push(l) });
      expect(r.corruptions).toBe(0);
    });
    expect(lines).toContain('Rebuilding refcount structure');
  });

  it('-r all with leaks, a refcount too low and wrong COPIED flags (in-place fixes)', async () => {
    const file = path.join(dir, 'fix.qcow2');
    await create(dir, 'fix.qcow2', 64 * 1024 * 1024);
    await io(dir, 'fix.qcow2', ['write -q -P 1 0 192k', 'write -q -P 2 1M 64k']);
    setRefcount(file, 5, 3); // leak on a referenced cluster (and COPIED now wrong)
    const slots = l2Slots(file);
    patchU64(file, slots[3]!.fileOffset, slots[1]!.entry); // cluster 6 referenced twice (refcount 1), cluster 8 leaked
    const rec0 = RecordingIO.fromBytes('img', fs.readFileSync(file));
    await crashMatrix(file, async (rec) => {
      const checker = await Qcow2Checker.open(rec, { writable: true });
      const r = await checker.check(FIX_LEAKS | FIX_ERRORS);
      expect([r.leaksFixed, r.corruptionsFixed]).toEqual([2, 3]);
    });
    expect(rec0.ops.length).toBe(0);
  });
});
