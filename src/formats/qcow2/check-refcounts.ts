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
  L2Tables,
  type Ctx,
} from './check-tables.js';

const INT_MAX = 0x7fffffff;
const MAX_L1_ENTRIES = 0x2000000 / 8;

/** check_refblocks: refcount blocks are referenced once and lie inside the image. Returns "rebuild needed". */
async function checkRefblocks(ctx: Ctx, fix: number): Promise<boolean> {
  const { img, res, imrt } = ctx;
  const cs = img.cs;
  let rebuild = false;
  const rt = new DataView(img.reftable.buffer, img.reftable.byteOffset, img.reftable.byteLength);
  for (let i = 0; i < img.reftableSize; i++) {
    // An empty entry (most of a large table) has nothing to check.
    if (rt.getInt32(i * 8) === 0 && rt.getInt32(i * 8 + 4) === 0) continue;
    const lo = img.reftableLo(i);
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
  await img.preloadRefblocks(0, n);
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
    let i = start;
    if (!failed) {
      // Whole bytes that match need no per-entry look (the common case): skip them, noting the
      // highest used cluster among them.
      const same = sameBytes(imrt.buf, start, block, end - start, order);
      if (same.entries) {
        if (same.lastNonZero >= 0) highest = start + same.lastNonZero;
        i = start + same.entries;
      }
    }
    for (; i < end; i++) {
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

/**
 * Compare the in-memory refcounts of `count` entries from `start` (packed, width 2^order bits) with
 * the refcount block `block` (undefined: all zeros) from its first entry. Returns how many leading
 * entries are covered by identical whole bytes (0 when anything differs) and, among them, the
 * index of the last non-zero one (-1 when none).
 */
function sameBytes(
  buf: Uint8Array,
  start: number,
  block: Uint8Array | undefined,
  count: number,
  order: number,
): { entries: number; lastNonZero: number } {
  const bits = 1 << order;
  const bytes = Math.floor((count * bits) / 8);
  const from = (start * bits) / 8; // `start` begins a refcount block: a whole number of bytes
  if (bytes === 0 || !Number.isInteger(from)) return { entries: 0, lastNonZero: -1 };
  const a = buf.subarray(from, from + bytes);
  let last = -1;
  // Whole 32-bit words where both views allow it, then bytes.
  const words = (a.byteOffset & 3) === 0 && (!block || (block.byteOffset & 3) === 0) ? bytes >>> 2 : 0;
  const aw = new Int32Array(a.buffer, a.byteOffset, words);
  if (block) {
    const bw = new Int32Array(block.buffer, block.byteOffset, words);
    for (let k = 0; k < words; k++) {
      const x = aw[k]!;
      if (x !== bw[k]) return { entries: 0, lastNonZero: -1 };
      if (x !== 0) last = k;
    }
    if (last >= 0) last = last * 4 + 3;
    for (let k = words * 4; k < bytes; k++) {
      const x = a[k]!;
      if (x !== block[k]) return { entries: 0, lastNonZero: -1 };
      if (x) last = k;
    }
  } else {
    for (let k = 0; k < words; k++) if (aw[k] !== 0) return { entries: 0, lastNonZero: -1 };
    for (let k = words * 4; k < bytes; k++) if (a[k]) return { entries: 0, lastNonZero: -1 };
  }
  // Within the last non-zero word, the last non-zero byte.
  while (last >= 0 && a[last] === 0) last--;
  const entries = Math.floor((bytes * 8) / bits);
  if (last < 0) return { entries, lastNonZero: -1 };
  // The last entry with a bit in byte `last` that is non-zero.
  let e = Math.floor(((last + 1) * 8 - 1) / bits);
  const firstInByte = Math.floor((last * 8) / bits);
  while (e > firstInByte && getPacked(a, e, order) === 0) e--;
  return { entries, lastNonZero: e };
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
async function checkOflagCopied(img: CheckImage, res: CheckResult, fix: number, verified?: Uint8Array): Promise<void> {
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
  await img.preloadRefblocks(0, Math.ceil(img.fileSize / cs));
  // Tables are read ahead only when nothing is written meanwhile (no repair).
  const l2s = new L2Tables(img, img.l1, img.l1Size, !repair);
  const plain = !img.extL2 && !img.dataFile;
  const cb = img.clusterBits;
  const shift = 32 - cb;
  const hLimit = 2 ** (cb - 2);
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
    // Tables whose flags the walk already found right (check-only passes) are not read again.
    if (verified?.[i] === 1) continue;
    const table = await l2s.table(i, l2Offset);
    let dirty = 0;
    for (let j = 0; j < img.l2Size; j++) {
      const p = j * eb;
      if (plain) {
        // Fast path: unallocated entries, and normal ones whose stored refcount is cached and
        // agrees. Halves as signed 32-bit integers (never boxed).
        const shi = (table[p]! << 24) | (table[p + 1]! << 16) | (table[p + 2]! << 8) | table[p + 3]!;
        const slo = (table[p + 4]! << 24) | (table[p + 5]! << 16) | (table[p + 6]! << 8) | table[p + 7]!;
        if (shi === 0 && slo === 0) continue;
        const h = shi & 0x00ffffff;
        if ((shi & 0x40000000) === 0 && h < hLimit && (h | (slo & 0xfffffe00)) !== 0) {
          // The cluster index (floor(offset / cluster size), below 2^30 here).
          const dr = img.cachedRefcount((h << shift) | (slo >>> cb));
          if (dr !== undefined && (dr === 1) === shi < 0) continue;
        }
      }
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
  // Stored refcounts in a few large reads, up front: the walk compares COPIED flags with them.
  await img.preloadRefblocks(0, nbClusters);
  if (!fix) ctx.copiedVerified = new Uint8Array(img.l1Size);
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
  await checkOflagCopied(img, res, fix, ctx.copiedVerified);
  res.imageEndOffset = (highest + 1) * cs;
}
