/**
 * Changing a qcow2 image's virtual size (library level; `qemu-img resize` and amend's size=
 * build on it), as QEMU 7.2's qcow2_co_truncate + bdrv_co_truncate do it:
 *  - v2 images with internal snapshots cannot be resized at all;
 *  - v3 images with snapshots may shrink: only the active state's clusters past the new end are
 *    dropped (each snapshot keeps its own L1 table and records its own disk size);
 *  - growing over a backing file larger than the old size zeroes the new area up to the backing
 *    file's end, so the backing file's data does not show through; v2 images have no zero
 *    clusters, and QEMU refuses that growth ("Failed to zero out new clusters") — so do we,
 *    before changing anything.
 */
import { QcowError } from '../../core/errors.js';
import type { Qcow2Driver } from './driver.js';

export async function resizeQcow2Image(drv: Qcow2Driver, newSize: number): Promise<void> {
  const w = drv.writer;
  if (!w) throw new QcowError('EPERM', `Image '${drv.filename}' is opened read-only`);
  if (!Number.isSafeInteger(newSize) || newSize < 0) throw new QcowError('EINVAL', 'Invalid image size');
  const old = drv.size;
  if (newSize === old) return;
  if (drv.snapshots.length && drv.header.version < 3) throw new QcowError('ENOTSUP', "Can't resize a v2 image which has snapshots");
  const b = drv.backing;
  const zeroNew = newSize > old && b !== undefined && b.size > old;
  if (zeroNew && drv.header.version < 3) throw new QcowError('ENOTSUP', 'Failed to zero out new clusters: Operation not supported');
  if (newSize > old) await drv.growRawDataFile(newSize);
  await w.resize(newSize);
  drv.size = newSize;
  if (zeroNew) await drv.writeZeroes(old, Math.min(newSize, b!.size) - old);
}
