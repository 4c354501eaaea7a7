/**
 * Walking what holds clusters for the qcow2 check: the +1 per reference into the in-memory
 * refcount array (QEMU's qcow2_inc_refcounts_imrt), L1/L2 tables with their per-entry checks and
 * allocation statistics, and the bitmaps. Messages and counting as qemu-img 7.2.
 */
import { loadBitmapList, loadBitmapTable } from './check-bitmaps.js';
import { checkOverlap } from './check-overlap.js';
import { CheckFailure, FIX_ERRORS, hex, hex64, masked, strerror, type CheckResult, type RefcountArray } from './check-base.js';
import type { CheckImage } from './check-state.js';

export const CHECK_FRAG_INFO = 2;

/** What one check pass accumulates besides the result counters. */
export interface Ctx {
  img: CheckImage;
  res: CheckResult;
  imrt: RefcountArray;
}

/** qcow2_inc_refcounts_imrt: +1 on every cluster of [offset, offset+size). */
export function incRefcounts(ctx: Ctx, offset: number | bigint, size: number): void {
  if (size <= 0) return;
  const { img, res, imrt } = ctx;
  const cs = img.cs;
  if (typeof offset === 'bigint' || offset + size - img.fileSize >= cs) {
    img.log(
      `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hex(offset)} size 0x${hex(size)}`,
    );
    res.corruptions++;
    return;
  }
  const first = Math.floor(offset / cs);
  const last = Math.floor((offset + size - 1) / cs);
  for (let k = first; k <= last; k++) {
    if (k >= imrt.size) imrt.resize(k + 1);
    const r = imrt.get(k);
    if (r === imrt.max) {
      img.log(`ERROR: overflow cluster offset=0x${hex(k * cs)}`);
      img.log(
        'Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing',
      );
      res.corruptions++;
      continue;
    }
    imrt.set(k, r + 1);
  }
}

export function u32(b: Uint8Array, p: number): number {
  return ((b[p]! << 24) | (b[p + 1]! << 16) | (b[p + 2]! << 8) | b[p + 3]!) >>> 0;
}

export type ClusterType = 'compressed' | 'zero-plain' | 'zero-alloc' | 'normal' | 'unallocated';

/** qcow2_get_cluster_type on the first u64 of an L2 entry. */
export function clusterType(img: CheckImage, hi: number, lo: number): ClusterType {
  if (hi & 0x40000000) return 'compressed';
  const hasOffset = (hi & 0x00ffffff) !== 0 || (lo & 0xfffffe00) !== 0;
  if (lo & 1 && !img.extL2) return hasOffset ? 'zero-alloc' : 'zero-plain';
  if (!hasOffset) return img.dataFile && hi & 0x80000000 ? 'normal' : 'unallocated';
  return 'normal';
}

/** Byte offset and length of a compressed cluster descriptor's data. */
function compressedRange(img: CheckImage, hi: number, lo: number): { offset: number | bigint; size: number } {
  const shift = 70 - img.clusterBits; // csize_shift = 62 - (cluster_bits - 8)
  const hiBits = shift - 32;
  const off = masked(hi, lo, 2 ** hiBits - 1, 0xffffffff);
  const sectors = (Math.floor((hi >>> 0) / 2 ** hiBits) & (2 ** (img.clusterBits - 8) - 1)) + 1;
  const inSector = Number(typeof off === 'bigint' ? off & 511n : off % 512);
  return { offset: off, size: sectors * 512 - inSector };
}

export function notAligned(v: number | bigint, cs: number): boolean {
  return typeof v === 'bigint' ? v % BigInt(cs) !== 0n : v % cs !== 0;
}

async function checkRefcountsL2(ctx: Ctx, l2Offset: number | bigint, flags: number, fix: number, active: boolean): Promise<void> {
  const { img, res } = ctx;
  const cs = img.cs;
  const eb = img.l2EntryBytes;
  const table = await img.readPadded(l2Offset, cs);
  let nextContiguous = 0;
  for (let i = 0; i < img.l2Size; i++) {
    const p = i * eb;
    let hi = u32(table, p);
    const lo = u32(table, p + 4);
    const bhi = img.extL2 ? u32(table, p + 8) : 0;
    const blo = img.extL2 ? u32(table, p + 12) : 0;
    const type = clusterType(img, hi, lo);
    if (type !== 'compressed' && (hi & 0x3f000000 || lo & 0x1fe)) {
      img.log(`ERROR found l2 entry with reserved bits set: ${hex64(hi, lo)}`);
      res.corruptions++;
    }
    switch (type) {
      case 'compressed': {
        if (hi & 0x80000000) {
          const { offset } = compressedRange(img, hi, lo);
          img.log(`ERROR: coffset=0x${hex(offset)}: copied flag must never be set for compressed clusters`);
          hi = (hi & 0x7fffffff) >>> 0;
          res.corruptions++;
        }
        if (img.dataFile) {
          img.log(`ERROR compressed cluster ${i} with data file, entry=0x${hex64(hi, lo)}`);
          res.corruptions++;
          break;
        }
        if (bhi || blo) {
          img.log(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${hex64(hi, lo)}`);
          res.corruptions++;
          break;
        }
        const { offset, size } = compressedRange(img, hi, lo);
        incRefcounts(ctx, offset, size);
        if (flags & CHECK_FRAG_INFO) {
          res.allocatedClusters++;
          res.compressedClusters++;
          res.fragmentedClusters++;
        }
        break;
      }
      case 'zero-alloc':
      case 'normal': {
        const offset = masked(hi, lo, 0x00ffffff, 0xfffffe00);
        if (bhi & blo) {
          res.corruptions++;
          img.log(`ERROR offset=${hex(offset)}: Allocated cluster has corrupted subcluster allocation bitmap`);
        }
        if (notAligned(offset, cs)) {
          res.corruptions++;
          const containsData = img.extL2 ? blo !== 0 : !(lo & 1);
          if (!containsData) {
            img.log(`${fix & FIX_ERRORS ? 'Repairing' : 'ERROR'} offset=${hex(offset)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
            if (fix & FIX_ERRORS) {
              const entryOffset = Number(l2Offset) + i * eb;
              const patched = table.slice(p, p + eb);
              patched.fill(0, 0, 8);
              if (!img.extL2) patched[7] = 1;
              table.set(patched, p);
              const overlap = checkOverlap(img, entryOffset, eb, active ? 'active-l2' : 'inactive-l2');
              if (overlap) {
                await overlap.signal();
                img.log('ERROR: Overlap check failed');
                res.checkErrors++;
                throw new CheckFailure('EIO');
              }
              try {
                await img.write(patched, entryOffset);
                await img.io.flush();
                res.corruptions--;
                res.corruptionsFixed++;
                continue;
              } catch {
                img.log(`ERROR: Failed to overwrite L2 table entry: ${strerror('EIO')}`);
                res.checkErrors++;
              }
            }
          } else {
            img.log(`ERROR offset=${hex(offset)}: Data cluster is not properly aligned; L2 entry corrupted.`);
          }
        }
        if (flags & CHECK_FRAG_INFO) {
          res.allocatedClusters++;
          const o = Number(offset);
          if (nextContiguous && o !== nextContiguous) res.fragmentedClusters++;
          nextContiguous = o + cs;
        }
        if (!img.dataFile) incRefcounts(ctx, offset, cs);
        break;
      }
      case 'zero-plain':
        break;
      case 'unallocated':
        if (blo) {
          res.corruptions++;
          img.log('ERROR: Unallocated cluster has non-zero subcluster allocation map');
        }
        break;
    }
  }
}

export async function checkRefcountsL1(
  ctx: Ctx,
  l1Offset: number | bigint,
  l1Size: number,
  flags: number,
  fix: number,
  active: boolean,
): Promise<void> {
  if (!l1Size) return;
  const { img, res } = ctx;
  incRefcounts(ctx, l1Offset, l1Size * 8);
  // Entries past the end of the file read as zeros (no L2 table): only read what the file holds.
  const inFile = typeof l1Offset === 'number' ? Math.max(0, Math.min(l1Size * 8, img.fileSize - l1Offset)) : 0;
  const entries = Math.ceil(inFile / 8);
  const l1 = await img.readPadded(l1Offset, entries * 8);
  for (let i = 0; i < entries; i++) {
    const hi = u32(l1, i * 8);
    const lo = u32(l1, i * 8 + 4);
    if (!hi && !lo) continue;
    if (hi & 0x7f000000 || lo & 0x1ff) {
      img.log(`ERROR found L1 entry with reserved bits set: ${hex64(hi, lo)}`);
      res.corruptions++;
    }
    const l2Offset = masked(hi, lo, 0x00ffffff, 0xfffffe00);
    incRefcounts(ctx, l2Offset, img.cs);
    if (notAligned(l2Offset, img.cs)) {
      img.log(`ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
      res.corruptions++;
    }
    await checkRefcountsL2(ctx, l2Offset, flags, fix, active);
  }
}

/** qcow2_check_bitmaps_refcounts. */
export async function checkBitmapsRefcounts(ctx: Ctx): Promise<void> {
  const { img, res } = ctx;
  if (!img.bitmaps) return;
  incRefcounts(ctx, img.bitmaps.directoryOffset, img.bitmaps.directorySize);
  const list = await loadBitmapList(img);
  if ('error' in list) {
    res.corruptions++;
    throw new CheckFailure('EINVAL');
  }
  for (const bm of list.bitmaps) {
    incRefcounts(ctx, bm.tableOffset, bm.tableSize * 8);
    const entries = await loadBitmapTable(img, bm);
    if (!entries) {
      res.corruptions++;
      throw new CheckFailure('EINVAL');
    }
    for (const off of entries) if (off !== 0) incRefcounts(ctx, off, img.cs);
  }
}

