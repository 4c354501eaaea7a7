/**
 * Walking what holds clusters for the qcow2 check: the +1 per reference into the in-memory
 * refcount array (QEMU's qcow2_inc_refcounts_imrt), L1/L2 tables with their per-entry checks and
 * allocation statistics, and the bitmaps. Messages and counting as qemu-img 7.2.
 */
import { loadBitmapList, loadBitmapTable } from './check-bitmaps.js';
import { checkOverlap } from './check-overlap.js';
import { CheckFailure, FIX_ERRORS, hex, hex64, masked, strerror, u32, type CheckResult, type RefcountArray } from './check-base.js';
import { readClusterRuns, type CheckImage } from './check-state.js';

export { u32 };

export const CHECK_FRAG_INFO = 2;

/** What one check pass accumulates besides the result counters. */
export interface Ctx {
  img: CheckImage;
  res: CheckResult;
  imrt: RefcountArray;
  /**
   * Set for a check-only pass (nothing is written, so the stored refcounts seen while walking are
   * the ones check_oflag_copied compares with later): entry i becomes 1 when every COPIED flag in
   * the L2 table of active L1 entry i was found right during the walk, so that table need not be
   * read again.
   */
  copiedVerified?: Uint8Array;
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

// ------------------------------------------------------------------------------------------------
// Reading the L2 tables of an L1 table ahead, in batches

/** Bytes of L2 tables fetched per window (two windows are in memory: the current and the next). */
const WINDOW_BYTES = 512 << 10;

interface Window {
  /** L1 indices [start, end) this window covers. */
  start: number;
  end: number;
  tables: Promise<Map<number, Uint8Array>>;
}

/**
 * The L2 tables named by an L1 table, for a pass that walks the L1 in order and writes nothing
 * meanwhile: tables at plain cluster-aligned offsets inside the file are read in windows of a few
 * MiB (adjacent tables in one read, several reads in flight, the next window read while the
 * current one is checked); anything else is read on its own when asked for, as before. With
 * `enabled` false (repairing passes, whose writes later tables must see), every table is read
 * when asked for.
 */
export class L2Tables {
  private cur = new Map<number, Uint8Array>();
  private curEnd = 0;
  private pending: Window | undefined;
  private readonly perWindow: number;
  /** Two window buffers, used in turn (the current window's and the next one's). */
  private buffers: Array<Uint8Array | undefined> = [undefined, undefined];
  private turn = 0;

  constructor(
    private readonly img: CheckImage,
    /** Raw big-endian L1 entries. */
    private readonly l1: Uint8Array,
    private readonly entries: number,
    private readonly enabled: boolean,
  ) {
    this.perWindow = Math.max(1, Math.floor(WINDOW_BYTES / img.cs));
  }

  /** L2 offset of L1 entry `i` when it can be fetched in bulk, else -1. */
  private fetchable(i: number): number {
    const hi = u32(this.l1, i * 8) & 0x00ffffff;
    const lo = (u32(this.l1, i * 8 + 4) & 0xfffffe00) >>> 0;
    if (hi >= 0x200000) return -1;
    const off = hi * 0x100000000 + lo;
    if (off === 0 || off % this.img.cs !== 0 || off >= this.img.fileSize) return -1;
    return off;
  }

  private window(start: number): Window {
    const offsets: number[] = [];
    const seen = new Set<number>();
    let i = start;
    for (; i < this.entries && offsets.length < this.perWindow; i++) {
      const off = this.fetchable(i);
      if (off < 0 || seen.has(off)) continue;
      seen.add(off);
      offsets.push(off);
    }
    offsets.sort((a, b) => a - b);
    const slot = this.turn;
    this.turn ^= 1;
    const tables = (async () => {
      const m = new Map<number, Uint8Array>();
      const want = offsets.length * this.img.cs;
      let buf = this.buffers[slot];
      if (!buf || buf.length < want) buf = this.buffers[slot] = new Uint8Array(Math.max(want, Math.min(this.perWindow * this.img.cs, want * 4)));
      await readClusterRuns(this.img, offsets, (off, t) => m.set(off, t), buf);
      return m;
    })();
    // A failed read surfaces when the window is used, not as an unhandled rejection.
    tables.catch(() => {});
    return { start, end: i, tables };
  }

  /** The table, when it is in the window already read (no waiting), else undefined. */
  ready(i: number, l2Offset: number | bigint): Uint8Array | undefined {
    if (!this.enabled || i >= this.curEnd || typeof l2Offset !== 'number') return undefined;
    return this.cur.get(l2Offset);
  }

  /** The L2 table at `l2Offset`, named by L1 entry `i` (calls come in increasing `i`). */
  async table(i: number, l2Offset: number | bigint): Promise<Uint8Array> {
    if (this.enabled && typeof l2Offset === 'number') {
      if (i >= this.curEnd) {
        let w = this.pending;
        this.pending = undefined;
        if (w && (i < w.start || i >= w.end)) {
          // Not needed after all: let its reads finish before its buffer is used again.
          await w.tables.catch(() => {});
          w = undefined;
        }
        if (!w) w = this.window(i);
        this.cur = await w.tables;
        this.curEnd = w.end;
        this.pending = w.end < this.entries ? this.window(w.end) : undefined;
      }
      const t = this.cur.get(l2Offset);
      if (t) return t;
    }
    return this.img.readPadded(l2Offset, this.img.cs);
  }
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

/** State of one L2 table's walk shared by the fast path (walkPlain) and the general one. */
class L2Walk {
  /** Allocation statistics counted by walkPlain (added to the result at the end). */
  allocated = 0;
  fragmented = 0;
  /** Where the next cluster would be contiguous: a cluster index (walkPlain), else the byte offset. */
  nextK = 0;
  nextContiguous = 0;
  /** Set by walkL2 when it stops at a repair to write. */
  pending: PendingRepair | undefined = undefined;
  readonly shift: number;
  readonly hLimit: number;
  readonly csMask: number;
  readonly inFile: number;

  constructor(
    readonly img: CheckImage,
    readonly imrt: RefcountArray,
    readonly frag: boolean,
    /** Still true: every COPIED flag seen so far agrees with the stored refcount. */
    public copiedOk: boolean,
  ) {
    this.shift = 32 - img.clusterBits;
    this.hLimit = 2 ** (img.clusterBits - 2);
    this.csMask = img.cs - 1;
    this.inFile = Math.min(Math.ceil(img.fileSize / img.cs), imrt.size);
  }
}

/**
 * The fast path of the L2 walk (standard entries, no external data file), from entry `from`:
 * unallocated entries, and normal clusters with no reserved bit set at a cluster-aligned offset
 * inside the file whose cluster index is below 2^30, worked on as that index (a small integer, so
 * no float arithmetic or boxing). Returns the index of the first entry it cannot take (or `n`),
 * which the general path then handles. Kept small so that V8 optimizes it early.
 */
function walkPlain(table: Uint8Array, from: number, n: number, w: L2Walk): number {
  const { imrt, img, shift, hLimit, csMask, inFile, frag } = w;
  const cb = img.clusterBits;
  // 16-bit refcounts (the default) are read and counted inline: no calls in the loop, which is
  // what makes it fast before V8 has optimized it.
  const wide16 = imrt.order === 4;
  const counts = imrt.buf;
  const rbBits = img.rbBits;
  const rbMask = img.rbSize - 1;
  let verify = w.copiedOk;
  let nextK = w.nextK;
  let allocated = 0;
  let fragmented = 0;
  let curRt = -1;
  let curBlock: Uint8Array | null | undefined;
  // Both halves as signed 32-bit integers (small integers to V8, never boxed); DataView reads are
  // the cheapest way to get them, in unoptimized code as well as in optimized code.
  const dv = new DataView(table.buffer, table.byteOffset, table.byteLength);
  let i = from;
  for (; i < n; i++) {
    const hi = dv.getInt32(i * 8);
    const lo = dv.getInt32(i * 8 + 4);
    if (hi === 0 && lo === 0) continue;
    const h = hi & 0x00ffffff;
    if ((hi & 0x7f000000) !== 0 || (lo & 0x1ff) !== 0 || (lo & csMask) !== 0 || h >= hLimit) break;
    const k = (h << shift) | (lo >>> cb);
    if (k === 0 || k >= inFile) break;
    if (wide16) {
      const q = 2 * k;
      const v = (counts[q]! << 8) | counts[q + 1]!;
      if (v === 0xffff) break;
      counts[q] = (v + 1) >>> 8;
      counts[q + 1] = (v + 1) & 0xff;
    } else if (!imrt.inc(k)) break;
    if (frag) {
      allocated++;
      if (nextK ? k !== nextK : w.nextContiguous !== 0 && k * img.cs !== w.nextContiguous) fragmented++;
      nextK = k + 1;
    }
    if (verify) {
      let stored: number | undefined;
      const rt = k >>> rbBits;
      if (rt !== curRt) {
        curRt = rt;
        curBlock = img.preloadedRefblock(rt);
      }
      if (curBlock && wide16) {
        const q = 2 * (k & rbMask);
        stored = (curBlock[q]! << 8) | curBlock[q + 1]!;
      } else stored = img.cachedRefcount(k);
      if (stored === undefined || (stored === 1) !== hi < 0) verify = false;
    }
  }
  w.copiedOk = verify;
  w.nextK = nextK;
  w.allocated += allocated;
  w.fragmented += fragmented;
  return i;
}

/** A repair write the walk stopped at (see walkL2). */
interface PendingRepair {
  offset: number | bigint;
  entryOffset: number;
  patched: Uint8Array;
  overlap: ReturnType<typeof checkOverlap>;
}

/**
 * check_refcounts_l2 from entry `from`, synchronously: returns n when the table is done, or the
 * index of an entry whose repair must be written first (w.pending; only with FIX_ERRORS), after
 * which the walk goes on from the next entry.
 */
function walkL2(
  ctx: Ctx,
  w: L2Walk,
  table: Uint8Array,
  from: number,
  l2Offset: number | bigint,
  flags: number,
  fix: number,
  active: boolean,
): number {
  const { img, res } = ctx;
  const cs = img.cs;
  const eb = img.l2EntryBytes;
  const ext = img.extL2;
  const plain = !ext && !img.dataFile;
  const n = img.l2Size;
  for (let i = from; i < n; i++) {
    if (plain) {
      i = walkPlain(table, i, n, w);
      if (i >= n) break;
    }
    const p = i * eb;
    let hi = u32(table, p);
    const lo = u32(table, p + 4);
    const bhi = ext ? u32(table, p + 8) : 0;
    const blo = ext ? u32(table, p + 12) : 0;
    const type = clusterType(img, hi, lo);
    // check_oflag_copied looks at these (and only these) again.
    if (type === 'normal' || type === 'zero-alloc') w.copiedOk = false;
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
              w.pending = { offset, entryOffset, patched, overlap };
              return i;
            }
          } else {
            img.log(`ERROR offset=${hex(offset)}: Data cluster is not properly aligned; L2 entry corrupted.`);
          }
        }
        countCluster(ctx, w, offset, flags);
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
  return n;
}

/** A normal or preallocated zero cluster's statistics and reference. */
function countCluster(ctx: Ctx, w: L2Walk, offset: number | bigint, flags: number): void {
  const { img, res } = ctx;
  const cs = img.cs;
  if (flags & CHECK_FRAG_INFO) {
    res.allocatedClusters++;
    const o = Number(offset);
    const expected = w.nextK ? w.nextK * cs : w.nextContiguous;
    if (expected && o !== expected) res.fragmentedClusters++;
    w.nextContiguous = o + cs;
    w.nextK = 0;
  }
  if (!img.dataFile) incRefcounts(ctx, offset, cs);
}

/** Write the repair walkL2 stopped at (the rest of that entry's processing included). */
async function writeRepair(ctx: Ctx, w: L2Walk, flags: number): Promise<void> {
  const { img, res } = ctx;
  const r = w.pending!;
  w.pending = undefined;
  if (r.overlap) {
    await r.overlap.signal();
    img.log('ERROR: Overlap check failed');
    res.checkErrors++;
    throw new CheckFailure('EIO');
  }
  try {
    await img.write(r.patched, r.entryOffset);
    await img.io.flush();
    res.corruptions--;
    res.corruptionsFixed++;
    return;
  } catch {
    img.log(`ERROR: Failed to overwrite L2 table entry: ${strerror('EIO')}`);
    res.checkErrors++;
  }
  countCluster(ctx, w, r.offset, flags);
}

/**
 * check_refcounts_l2 on one table. Returns, when `verifyCopied`, whether every COPIED flag of the
 * table was checked and right; synchronously unless a repair has to be written (so a check-only
 * pass walks the whole L1 without a promise per table).
 */
function checkRefcountsL2(
  ctx: Ctx,
  table: Uint8Array,
  l2Offset: number | bigint,
  flags: number,
  fix: number,
  active: boolean,
  verifyCopied: boolean,
): boolean | Promise<boolean> {
  const { img, res } = ctx;
  const plain = !img.extL2 && !img.dataFile;
  const w = new L2Walk(img, ctx.imrt, (flags & CHECK_FRAG_INFO) !== 0, verifyCopied && plain);
  const n = img.l2Size;
  const finish = (): boolean => {
    res.allocatedClusters += w.allocated;
    res.fragmentedClusters += w.fragmented;
    return w.copiedOk;
  };
  const i = walkL2(ctx, w, table, 0, l2Offset, flags, fix, active);
  if (i >= n) return finish();
  return (async () => {
    for (let j = i; j < n; ) {
      await writeRepair(ctx, w, flags);
      j = walkL2(ctx, w, table, j + 1, l2Offset, flags, fix, active);
    }
    return finish();
  })();
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
  const l2s = new L2Tables(img, l1, entries, fix === 0);
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
    const verified = active && ctx.copiedVerified !== undefined && i < ctx.copiedVerified.length;
    const table = l2s.ready(i, l2Offset) ?? (await l2s.table(i, l2Offset));
    let ok = checkRefcountsL2(ctx, table, l2Offset, flags, fix, active, verified);
    if (typeof ok !== 'boolean') ok = await ok;
    if (verified) ctx.copiedVerified![i] = ok ? 1 : 0;
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

