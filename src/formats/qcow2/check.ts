/**
 * qcow2 consistency check and repair (`qemu-img check [-r leaks|all]`), reproducing qemu-img 7.2:
 * the same traversal, messages (through `log`), counters and repairs. It reads the image's
 * structures directly, so it works on images the normal open refuses (dirty, corrupt bit, broken
 * refcount table); it opens nothing for writing unless repairing.
 *
 * Public API:
 * - `checkQcow2(io, { repair, log })`: one check pass (QEMU's bdrv_check) → CheckResult.
 * - `Qcow2Checker`: open once, run several passes (qemu-img re-checks after repairing).
 * - `repairDirty(io, { log })`: what QEMU does when opening a dirty (lazy refcounts) image
 *   read/write: rebuild refcounts, fix what can be fixed, clear the dirty bit.
 *
 * Memory: one refcount array the width of the image's refcounts over the file's cluster count
 * (QEMU's own bound); references far past the end of the file are reported, not allocated for.
 */
import type { ByteIO } from '../../core/byte-io.js';
import { QcowError } from '../../core/errors.js';
import { bitmapsOpenError } from './check-bitmaps.js';
import { checkRefcounts } from './check-refcounts.js';
import { checkFixSnapshotTable, checkReadSnapshotTable } from './check-snapshots.js';
import { CheckFailure, FIX_ERRORS, FIX_LEAKS, emptyResult, type CheckLog, type CheckResult } from './check-base.js';
import { CheckImage } from './check-state.js';

export { CheckFailure, FIX_ERRORS, FIX_LEAKS, emptyResult };
export type { CheckLog, CheckResult };

export type RepairMode = 'leaks' | 'all';

export interface CheckOptions {
  /** `-r leaks` / `-r all`; absent = check only (read-only). */
  repair?: RepairMode;
  /** Receives QEMU's stderr lines (default: dropped). */
  log?: CheckLog;
}

export function fixMode(repair: RepairMode | undefined): number {
  return repair === 'all' ? FIX_LEAKS | FIX_ERRORS : repair === 'leaks' ? FIX_LEAKS : 0;
}

/** qcow2_add_check_result. */
function addResult(out: CheckResult, src: CheckResult, allocationInfo: boolean): void {
  out.corruptions += src.corruptions;
  out.leaks += src.leaks;
  out.checkErrors += src.checkErrors;
  out.corruptionsFixed += src.corruptionsFixed;
  out.leaksFixed += src.leaksFixed;
  if (allocationInfo) {
    out.imageEndOffset = src.imageEndOffset;
    out.totalClusters = src.totalClusters;
    out.allocatedClusters = src.allocatedClusters;
    out.fragmentedClusters = src.fragmentedClusters;
    out.compressedClusters = src.compressedClusters;
  }
}

/** An image opened for checking; `check()` may run repeatedly (repair, then double-check). */
export class Qcow2Checker {
  private headerUpdated = false;
  private constructor(readonly img: CheckImage) {}

  /**
   * Open `io` for checking. `writable` must be true to repair (the ByteIO must then be writable).
   * Throws QcowError for images QEMU would not open at all (bad header and such).
   */
  static async open(io: ByteIO, opts: { writable: boolean; log?: CheckLog }): Promise<Qcow2Checker> {
    const img = await CheckImage.open(io, { writable: opts.writable, log: opts.log ?? (() => {}) });
    if (img.bitmaps) {
      const err = await bitmapsOpenError(img);
      if (err) throw new QcowError('EINVAL', err);
    }
    return new Qcow2Checker(img);
  }

  /** One pass (QEMU's qcow2_co_check_locked). Throws CheckFailure when the check cannot complete. */
  async check(fix: number): Promise<CheckResult> {
    const img = this.img;
    if (fix && !img.writable) throw new QcowError('EPERM', 'Image opened read-only: cannot repair');
    if (img.writable && !this.headerUpdated) {
      // What a read/write open does first (done here so a failed open leaves the file untouched).
      this.headerUpdated = true;
      await img.updateHeaderForWrite();
    }
    await img.refreshSize();
    const result = emptyResult();
    const snapshotRes = emptyResult();
    const refcountRes = emptyResult();
    await checkReadSnapshotTable(img, snapshotRes, fix);
    await checkRefcounts(img, refcountRes, fix);
    addResult(result, refcountRes, true);
    await checkFixSnapshotTable(img, snapshotRes, fix);
    addResult(result, snapshotRes, false);
    if (fix && result.checkErrors === 0 && result.corruptions === 0) await img.markCleanAndConsistent();
    return result;
  }
}

/** One check pass over a qcow2 image (like QEMU's bdrv_check). */
export async function checkQcow2(io: ByteIO, opts: CheckOptions = {}): Promise<CheckResult> {
  const fix = fixMode(opts.repair);
  const checker = await Qcow2Checker.open(io, { writable: fix !== 0, log: opts.log });
  return checker.check(fix);
}

/**
 * Repair a dirty image (incompatible bit 0, lazy refcounts) the way QEMU does on a read/write
 * open: a full `-r all` pass, after which the dirty bit is cleared (when no corruption remains).
 * QEMU prints the pass's messages to stderr; they go to `log`. Throws
 * QcowError('EIO', 'Could not repair dirty image: ...') when the repair fails.
 */
export async function repairDirty(io: ByteIO, opts: { log?: CheckLog } = {}): Promise<CheckResult> {
  try {
    const checker = await Qcow2Checker.open(io, { writable: true, log: opts.log });
    const r = await checker.check(FIX_LEAKS | FIX_ERRORS);
    if (r.checkErrors) throw new CheckFailure('EIO');
    return r;
  } catch (e) {
    if (e instanceof CheckFailure) throw new QcowError('EIO', `Could not repair dirty image: ${e.message}`);
    throw e;
  }
}
