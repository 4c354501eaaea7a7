/**
 * `measure`: how big a qcow2 (or raw) image holding a given content would be — QEMU's own
 * arithmetic (qcow2_calc_prealloc_size, qcow2_refcount_metadata_size), so the numbers are equal.
 */
import type { BlockDriver } from '../core/block-driver.js';
import { QcowError } from '../core/errors.js';
import { alignUp } from '../core/util.js';
import { dirEntrySize } from '../formats/qcow2/bitmap-directory.js';
import { refcountMetadataBlocks } from '../formats/qcow2/refcount-area.js';

export interface MeasureTarget {
  format: 'qcow2' | 'raw';
  clusterSize?: number;
  refcountBits?: number;
  extendedL2?: boolean;
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
}

export interface MeasureResult {
  required: number;
  fullyAllocated: number;
  /** Present when the source has persistent bitmaps that the target can hold. */
  bitmaps?: number;
}

/** Bytes of refcount table + blocks needed to describe `clusters` clusters (and themselves). */
export function refcountMetadataSize(clusters: number, clusterSize: number, refcountBits: number): number {
  const perTableCluster = clusterSize / 8;
  const blocks = refcountMetadataBlocks(clusters, (clusterSize * 8) / refcountBits, perTableCluster, false);
  return (blocks + Math.ceil(blocks / perTableCluster)) * clusterSize;
}

/** Header + L1 + L2 + refcount metadata + data for a fully allocated image of `size` bytes. */
export function qcow2PreallocSize(size: number, clusterSize: number, refcountBits: number, extendedL2: boolean): number {
  const aligned = alignUp(size, clusterSize);
  const l2e = extendedL2 ? 16 : 8;
  let meta = clusterSize;
  const nl2e = alignUp(aligned / clusterSize, clusterSize / l2e);
  meta += nl2e * l2e;
  const nl1e = alignUp((nl2e * l2e) / clusterSize, clusterSize / 8);
  meta += nl1e * 8;
  meta += refcountMetadataSize((meta + aligned) / clusterSize, clusterSize, refcountBits);
  return meta + aligned;
}

/** Bytes of data the source holds, counted as QEMU does (allocated non-zero runs, extended to clusters). */
async function allocatedData(src: BlockDriver, clusterSize: number): Promise<number> {
  let required = 0;
  let offset = 0;
  let extents: { offset: number; length: number; kind: string; zeroData?: boolean }[] = [];
  let idx = 0;
  while (offset < src.size) {
    // Find the extent holding `offset` (refetch when we ran past the cached ones).
    while (idx < extents.length && extents[idx]!.offset + extents[idx]!.length <= offset) idx++;
    if (idx >= extents.length) {
      extents = await src.blockStatus(offset, Math.min(src.size - offset, 1 << 30));
      idx = 0;
      continue;
    }
    const e = extents[idx]!;
    let pnum = e.offset + e.length - offset;
    const zero = e.kind !== 'data' || e.zeroData;
    if (!zero) {
      pnum = alignUp(offset + pnum, clusterSize) - offset;
      required += (offset % clusterSize) + pnum;
    }
    offset += pnum;
  }
  return required;
}

export interface BitmapInfo {
  name: string;
  granularity: number;
}

export async function measure(
  target: MeasureTarget,
  source: { driver: BlockDriver; bitmaps?: BitmapInfo[] } | { size: number },
): Promise<MeasureResult> {
  const ssize = 'driver' in source ? source.driver.size : source.size;
  const virtualSize = alignUp(ssize, 512);
  const prealloc = target.preallocation ?? 'off';
  if (target.format === 'raw') {
    let required = virtualSize;
    if ('driver' in source && prealloc === 'off') {
      required = 0;
      for (let off = 0; off < ssize; ) {
        const ext = await source.driver.blockStatus(off, Math.min(ssize - off, 1 << 30));
        for (const e of ext) if (e.kind === 'data' && !e.zeroData) required += e.length;
        const last = ext[ext.length - 1]!;
        off = last.offset + last.length;
      }
      required = virtualSize; // raw files are measured at their full size, like qemu-img
    }
    return { required, fullyAllocated: virtualSize };
  }
  const cs = target.clusterSize ?? 65536;
  const rb = target.refcountBits ?? 16;
  if (cs < 512 || cs > 2 << 20 || (cs & (cs - 1)) !== 0) {
    throw new QcowError('EINVAL', 'Cluster size must be a power of two between 512 and 2048k');
  }
  let data: number;
  if (prealloc === 'full' || prealloc === 'falloc') data = virtualSize;
  else if ('driver' in source) data = await allocatedData(source.driver, cs);
  else data = 0;
  const fullyAllocated = qcow2PreallocSize(virtualSize, cs, rb, target.extendedL2 ?? false);
  const result: MeasureResult = { required: prealloc === 'full' || prealloc === 'falloc' ? fullyAllocated : fullyAllocated - alignUp(virtualSize, cs) + data, fullyAllocated };
  if ('driver' in source && source.bitmaps) {
    let size = 0;
    let dir = 0;
    for (const b of source.bitmaps) {
      const bits = Math.ceil(source.driver.size / b.granularity);
      const clusters = Math.ceil(Math.ceil(bits / 8) / cs);
      size += clusters * cs + alignUp(clusters * 8, cs);
      dir += dirEntrySize(new TextEncoder().encode(b.name).length, 0);
    }
    result.bitmaps = size + alignUp(dir, cs);
  }
  return result;
}
