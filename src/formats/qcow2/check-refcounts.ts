/**
 * qcow2 refcount check: rebuild the reference counts from every structure that holds clusters,
 * compare them with the stored refcounts, check the COPIED flags, and repair what the mode allows.
 * Mirrors qemu-img 7.2 (qcow2_check_refcounts and helpers): same traversal order, same messages,
 * same counting, so output and exit codes match.
 */
import {
  CheckFailure,
  FIX_ERRORS,
  FIX_LEAKS,
  RefcountArray,
  emptyResult,
  getPacked,
  hex64,
  hexAlt,
  masked,
  refcountText,
  strerror,
  type CheckResult,
  type Errno,
} from './check-base.js';
import { checkOverlap } from './check-overlap.js';
import { rebuildRefcountStructure } from './check-rebuild.js';
import type { CheckImage } from './check-state.js';
import {
  CHECK_FRAG_INFO,
  checkBitmapsRefcounts,
  checkRefcountsL1,
  clusterType,
  incRefcounts,
  notAligned,
  u32,
  type Ctx,
} from './check-tables.js';

const INT_MAX = 0x7fffffff;
const MAX_L1_ENTRIES = 0x2000000 / 8;

/** check_refblocks: refcount blocks are referenced once and lie inside the image. Returns "rebuild needed". */
async function checkRefblocks(ctx: Ctx, fix: number): Promise<boolean> {
  const { img, res, imrt } = ctx;
  const cs = img.cs;
  let rebuild = false;
  for (let i = 0; i < img.reftableSize; i++) {
    const { lo } = img.reftableEntry(i);
    const offset = img.refblockOffset(i);
    if (lo & 0x1ff) {
      img.log(`ERROR refcount table entry ${i} has reserved bits set`);
      res.corruptions++;
      rebuild = true;
      continue;
    }
    if (notAligned(offset, cs)) {
      img.log(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      res.corruptions++;
      rebuild = true;
      continue;
    }
    const cluster = typeof offset === 'bigint' ? Number.POSITIVE_INFINITY : offset / cs;
    if (cluster >= imrt.size) {
      res.corruptions++;
      img.log(`${fix & FIX_ERRORS ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
      if (fix & FIX_ERRORS) {
        let errno: Errno | undefined;
        if (typeof offset === 'bigint' || offset + cs > Number.MAX_SAFE_INTEGER) errno = 'EINVAL';
        else {
          try {
            await img.io.truncate(offset + cs);
            const size = await img.refreshSize();
            imrt.resize(Math.max(imrt.size, Math.ceil(size / cs)));
            if (cluster >= imrt.size) errno = 'EINVAL';
          } catch (e) {
            if (e instanceof CheckFailure) {
              res.checkErrors++;
              throw e;
            }
            errno = /EFBIG|too large/i.test(String((e as { code?: string }).code ?? e)) ? 'EFBIG' : 'EIO';
            img.log(`Could not resize file: ${strerror(errno)}`, 'report');
          }
        }
        if (!errno) {
          res.corruptions--;
          res.corruptionsFixed++;
          incRefcounts(ctx, offset, cs);
          continue;
        }
        rebuild = true;
        img.log(`ERROR could not resize image: ${strerror(errno)}`);
      }
      continue;
    }
    if (offset !== 0) {
      incRefcounts(ctx, offset, cs);
      const r = imrt.get(cluster);
      if (r !== 1) {
        img.log(`ERROR refcount block ${i} refcount=${r}`);
        res.corruptions++;
        rebuild = true;
      }
    }
  }
  return rebuild;
}

/** calculate_refcounts: fill the in-memory refcount array from every structure. Returns "rebuild needed". */
async function calculateRefcounts(ctx: Ctx, fix: number): Promise<boolean> {
  const { img, res } = ctx;
  incRefcounts(ctx, 0, img.cs);
  await checkRefcountsL1(ctx, img.l1Offset, img.l1Size, CHECK_FRAG_INFO, fix, true);
  if (img.dataFile && img.nbSnapshots) {
    img.log(`ERROR ${img.nbSnapshots} snapshots in image with data file`);
    res.corruptions++;
  }
  for (const sn of img.snapshots) {
    if (notAligned(sn.l1TableOffset, img.cs)) {
      img.log(
        `ERROR snapshot ${sn.idStr} (${sn.name}) l1_offset=${hexAlt(sn.l1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted`,
      );
      res.corruptions++;
      continue;
    }
    if (sn.l1Size > MAX_L1_ENTRIES) {
      img.log(`ERROR snapshot ${sn.idStr} (${sn.name}) l1_size=${hexAlt(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`);
      res.corruptions++;
      continue;
    }
    await checkRefcountsL1(ctx, sn.l1TableOffset, sn.l1Size, 0, fix, false);
  }
  incRefcounts(ctx, img.snapshotsOffset, img.snapshotsSize);
  incRefcounts(ctx, img.reftableOffset, img.reftableSize * 8);
  const crypto = img.header.cryptoHeader;
  if (crypto && crypto.length) incRefcounts(ctx, crypto.offset, crypto.length);
  await checkBitmapsRefcounts(ctx);
  return checkRefblocks(ctx, fix);
}

/**
 * compare_refcounts: report (and, as allowed, repair) every cluster whose stored refcount differs
 * from the computed one.
 */
async function compareRefcounts(ctx: Ctx, fix: number): Promise<{ rebuild: boolean; highest: number }> {
  const { img, res, imrt } = ctx;
  let rebuild = false;
  let highest = 0;
  const n = imrt.size;
  const order = img.refcountOrder;
  const freed: number[] = [];
  for (let start = 0; start < n; start += img.rbSize) {
    let block: Uint8Array | undefined;
    let failed: CheckFailure | undefined;
    try {
      block = await img.refblockFor(start);
    } catch (e) {
      if (!(e instanceof CheckFailure)) throw e;
      failed = e;
    }
    const end = Math.min(n, start + img.rbSize);
    for (let i = start; i < end; i++) {
      if (failed) {
        img.log(`Can't get refcount for cluster ${i}: ${failed.message}`);
        res.checkErrors++;
        continue;
      }
      const r1 = block ? getPacked(block, i - start, order) : 0;
      const r2 = imrt.get(i);
      if (r1 > 0 || r2 > 0) highest = i;
      if (r1 === r2) continue;
      let fixKind: 'leaks' | 'corruptions' | undefined;
      if (r1 === 0) rebuild = true;
      else if (r1 > r2 && fix & FIX_LEAKS) fixKind = 'leaks';
      else if (r1 < r2 && fix & FIX_ERRORS) fixKind = 'corruptions';
      const what = fixKind ? 'Repairing' : r1 < r2 ? 'ERROR' : 'Leaked';
      img.log(`${what} cluster ${i} refcount=${refcountText(r1)} reference=${r2}`);
      if (fixKind && (await img.setRefcount(i, r2))) {
        if (r2 === 0) freed.push(i);
        if (fixKind === 'leaks') res.leaksFixed++;
        else res.corruptionsFixed++;
        continue;
      }
      if (r1 < r2) res.corruptions++;
      else res.leaks++;
    }
  }
  await img.flushRefcounts();
  await discardClusters(img, freed);
  return { rebuild, highest };
}

/** Like QEMU's discard of clusters whose refcount dropped to 0 (punch holes where the storage can). */
async function discardClusters(img: CheckImage, clusters: number[]): Promise<void> {
  const punch = img.io.punchHole?.bind(img.io);
  if (!punch) return;
  for (const c of clusters) {
    const off = c * img.cs;
    if (off >= img.fileSize) continue;
    try {
      await punch(off, Math.min(img.cs, img.fileSize - off));
    } catch {
      /* discard is advisory */
    }
  }
}

/** check_oflag_copied: COPIED must be set exactly where the refcount is 1 (active L1 and its L2s). */
async function checkOflagCopied(img: CheckImage, res: CheckResult, fix: number): Promise<void> {
  let repair: boolean;
  if (fix & FIX_ERRORS) repair = true;
  else if (fix & FIX_LEAKS) repair = !res.checkErrors && !res.corruptions && !res.leaks;
  else repair = false;
  const cs = img.cs;
  const eb = img.l2EntryBytes;
  const refcountAt = async (offset: number | bigint): Promise<number | undefined> => {
    if (typeof offset === 'bigint') return 0;
    try {
      return await img.getRefcount(Math.floor(offset / cs));
    } catch (e) {
      if (e instanceof CheckFailure) return undefined;
      throw e;
    }
  };
  for (let i = 0; i < img.l1Size; i++) {
    const { hi, lo } = img.l1Entry(i);
    const l2Offset = masked(hi, lo, 0x00ffffff, 0xfffffe00);
    if (l2Offset === 0) continue;
    const r = await refcountAt(l2Offset);
    if (r === undefined) continue;
    const copied = (hi & 0x80000000) !== 0;
    if ((r === 1) !== copied) {
      res.corruptions++;
      img.log(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex64(hi, lo)} refcount=${refcountText(r)}`);
      if (repair) {
        const nhi = r === 1 ? (hi | 0x80000000) >>> 0 : (hi & 0x7fffffff) >>> 0;
        img.setL1Entry(i, nhi, lo);
        try {
          await img.write(img.l1.slice(i * 8, i * 8 + 8), img.l1Offset + i * 8);
          await img.io.flush();
        } catch {
          res.checkErrors++;
          throw new CheckFailure('EIO');
        }
        res.corruptions--;
        res.corruptionsFixed++;
      }
    }
    const table = await img.readPadded(l2Offset, cs);
    let dirty = 0;
    for (let j = 0; j < img.l2Size; j++) {
      const p = j * eb;
      const ehi = u32(table, p);
      const elo = u32(table, p + 4);
      const type = clusterType(img, ehi, elo);
      if (type !== 'normal' && type !== 'zero-alloc') continue;
      let dr: number | undefined = 1;
      if (!img.dataFile) dr = await refcountAt(masked(ehi, elo, 0x00ffffff, 0xfffffe00));
      if (dr === undefined) continue;
      if ((dr === 1) !== ((ehi & 0x80000000) !== 0)) {
        res.corruptions++;
        img.log(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hex64(ehi, elo)} refcount=${refcountText(dr)}`);
        if (repair) {
          const nhi = dr === 1 ? (ehi | 0x80000000) >>> 0 : (ehi & 0x7fffffff) >>> 0;
          new DataView(table.buffer).setUint32(p, nhi);
          dirty++;
        }
      }
    }
    if (dirty > 0) {
      const at = Number(l2Offset);
      const overlap = checkOverlap(img, at, cs, 'active-l2');
      if (overlap) {
        await overlap.signal();
        img.log(`ERROR: Could not write L2 table; metadata overlap check failed: ${strerror('EIO')}`);
        res.checkErrors++;
        throw new CheckFailure('EIO');
      }
      try {
        await img.write(table, at);
        await img.io.flush();
      } catch {
        img.log(`ERROR: Could not write L2 table: ${strerror('EIO')}`);
        res.checkErrors++;
        throw new CheckFailure('EIO');
      }
      res.corruptions -= dirty;
      res.corruptionsFixed += dirty;
    }
  }
}

/** qcow2_check_refcounts: the whole refcount part of one check pass. */
export async function checkRefcounts(img: CheckImage, res: CheckResult, fix: number): Promise<void> {
  const size = await img.refreshSize();
  const cs = img.cs;
  const nbClusters = Math.ceil(size / cs);
  if (nbClusters > INT_MAX) {
    res.checkErrors++;
    throw new CheckFailure('EFBIG');
  }
  res.totalClusters = Math.ceil(img.totalBytes / cs);
  const imrt = new RefcountArray(img.refcountOrder, cs);
  try {
    imrt.resize(nbClusters);
  } catch (e) {
    res.checkErrors++;
    throw e;
  }
  const ctx: Ctx = { img, res, imrt };
  let rebuild = await calculateRefcounts(ctx, fix);
  const preCompare = { ...res };
  const first = await compareRefcounts(ctx, 0);
  rebuild ||= first.rebuild;
  let highest = first.highest;

  if (rebuild && fix & FIX_ERRORS) {
    const old = { ...res };
    let freshLeaks = 0;
    img.log('Rebuilding refcount structure');
    await rebuildRefcountStructure(img, res, imrt);
    res.corruptions = 0;
    res.leaks = 0;
    imrt.clear();
    await calculateRefcounts(ctx, 0);
    if (fix & FIX_LEAKS) {
      const saved = { ...res };
      Object.assign(res, emptyResult());
      const again = await compareRefcounts(ctx, FIX_LEAKS);
      highest = again.highest;
      if (again.rebuild) img.log('ERROR rebuilt refcount structure is still broken');
      freshLeaks = res.leaks;
      Object.assign(res, saved);
    }
    if (res.corruptions < old.corruptions) res.corruptionsFixed += old.corruptions - res.corruptions;
    if (res.leaks < old.leaks) res.leaksFixed += old.leaks - res.leaks;
    res.leaks += freshLeaks;
  } else if (fix) {
    if (rebuild) {
      img.log('ERROR need to rebuild refcount structures');
      res.checkErrors++;
      throw new CheckFailure('EIO');
    }
    if (res.leaks || res.corruptions) {
      Object.assign(res, preCompare);
      highest = (await compareRefcounts(ctx, fix)).highest;
    }
  }
  await checkOflagCopied(img, res, fix);
  res.imageEndOffset = (highest + 1) * cs;
}
