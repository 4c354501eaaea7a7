/**
 * Rebuilding the refcount structures from the in-memory refcount array (QEMU's
 * rebuild_refcount_structure, qemu 7.1+ algorithm): refcount blocks are slices of the array written
 * to clusters the array shows free, then the refcount table is placed (re-writing the blocks its
 * allocation touched, growing and retrying if it needs more blocks), made durable, and only then
 * does the header switch to it. The old structures are left untouched until the caller frees them
 * as leaks — a crash at any point leaves either the old or the new structures in charge.
 */
import { CheckFailure, strerror, type CheckResult, type Errno, type RefcountArray } from './check-base.js';
import { type CheckImage } from './check-state.js';

/** alloc_clusters_imrt: first fit from `first.v`, growing the array past the end when needed. */
export function allocClustersImrt(imrt: RefcountArray, count: number, first: { v: number }): number {
  let cluster = first.v;
  let contiguous = 0;
  let firstGap = true;
  for (; cluster < imrt.size && contiguous < count; cluster++) {
    if (!imrt.get(cluster)) {
      contiguous++;
      if (firstGap) {
        first.v = cluster;
        firstGap = false;
      }
    } else if (contiguous) contiguous = 0;
  }
  if (contiguous < count) imrt.resize(cluster + count - contiguous);
  cluster -= contiguous;
  for (let i = 0; i < count; i++) imrt.set(cluster + i, 1);
  return cluster;
}

interface OnDiskReftable {
  /** Refcount block offsets (bytes), 0 = none. */
  table: number[];
}

class RebuildError extends Error {
  constructor(
    readonly what: string,
    readonly errno: Errno,
  ) {
    super(`${what}: ${strerror(errno)}`);
  }
}

async function writeOrFail(img: CheckImage, buf: Uint8Array, offset: number, what: string): Promise<void> {
  try {
    await img.write(buf, offset);
  } catch {
    throw new RebuildError(what, 'EIO');
  }
}

/**
 * rebuild_refcounts_write_refblocks: for each refcount block range holding a used cluster in
 * [first, end), allocate the block (if new) and write the array slice. Returns whether the on-disk
 * reftable had to grow.
 */
async function writeRefblocks(img: CheckImage, imrt: RefcountArray, first: number, end: number, rt: OnDiskReftable): Promise<boolean> {
  const cs = img.cs;
  const per = img.rbSize;
  let grown = false;
  const firstFree = { v: 0 };
  for (let cluster = first; cluster < end; cluster++) {
    if (!imrt.get(cluster)) continue;
    const index = Math.floor(cluster / per);
    const blockStart = index * per;
    let offset: number;
    if (rt.table.length > index && rt.table[index]) {
      offset = rt.table[index]!;
    } else {
      if (firstFree.v < blockStart) firstFree.v = blockStart;
      const c = allocClustersImrt(imrt, 1, firstFree);
      offset = c * cs;
      if (c >= end) end = c + 1;
      if (rt.table.length <= index) {
        const entries = (Math.ceil(((index + 1) * 8) / cs) * cs) / 8;
        while (rt.table.length < entries) rt.table.push(0);
        grown = true;
      }
      rt.table[index] = offset;
    }
    await writeOrFail(img, imrt.buf.slice(index * cs, (index + 1) * cs), offset, 'ERROR writing refblock');
    cluster = blockStart + per - 1;
  }
  return grown;
}

/** Build and install new refcount structures from `imrt`. */
export async function rebuildRefcountStructure(img: CheckImage, res: CheckResult, imrt: RefcountArray): Promise<void> {
  const cs = img.cs;
  await img.flushRefcounts();
  img.dropRefcountCache();
  const rt: OnDiskReftable = { table: [] };
  try {
    let changed = await writeRefblocks(img, imrt, 0, imrt.size, rt);
    let reftableOffset = -1;
    let reftableClusters = 0;
    do {
      reftableClusters = Math.ceil((rt.table.length * 8) / cs);
      const start = allocClustersImrt(imrt, reftableClusters, { v: 0 });
      reftableOffset = start * cs;
      changed = await writeRefblocks(img, imrt, start, start + reftableClusters, rt);
      if (changed) for (let c = start; c < start + reftableClusters; c++) imrt.set(c, 0);
    } while (changed);

    const raw = new Uint8Array(reftableClusters * cs);
    const dv = new DataView(raw.buffer);
    rt.table.forEach((off, i) => dv.setBigUint64(i * 8, BigInt(off)));
    await writeOrFail(img, raw.subarray(0, rt.table.length * 8), reftableOffset, 'ERROR writing reftable');
    try {
      await img.io.flush();
    } catch {
      throw new RebuildError('ERROR writing reftable', 'EIO');
    }
    // Switch the header to the new table (offset + clusters, as one write), durably.
    const ptr = new Uint8Array(12);
    const pdv = new DataView(ptr.buffer);
    pdv.setBigUint64(0, BigInt(reftableOffset));
    pdv.setUint32(8, reftableClusters);
    await writeOrFail(img, ptr, 48, 'ERROR setting reftable');
    try {
      await img.io.flush();
    } catch {
      throw new RebuildError('ERROR setting reftable', 'EIO');
    }
    img.setReftable(reftableOffset, raw.subarray(0, rt.table.length * 8).slice());
  } catch (e) {
    res.checkErrors++;
    if (e instanceof RebuildError) {
      img.log(e.message, 'report');
      throw new CheckFailure(e.errno);
    }
    throw e;
  }
}
