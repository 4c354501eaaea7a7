/**
 * The qcow2 write engine: allocating writes with copy-on-write (whole clusters, or subclusters
 * with extended L2), zero writes, discard, compressed cluster writes, the dirty bit of lazy
 * refcounts. Its parts: request-lock.ts (concurrency), l2-tables.ts (entries), refcount.ts
 * (allocation), metadata-flush.ts (the crash-safe order of metadata writes), table-resize.ts.
 *
 * Guest data is always written before the L2 entry that points to it, and new clusters get their
 * refcount before anything references them; replaced clusters are released only after the new
 * entries are durable. A crash at any point thus leaves at worst leaked clusters.
 */
import type { ByteIO } from '../../core/byte-io.js';
import { QcowError } from '../../core/errors.js';
import * as C from './constants.js';
import { entryOffset, type ClusterMap, type Geometry } from './cluster-map.js';
import type { L2Cache } from './l2-cache.js';
import { Refcounts } from './refcount.js';
import { writeReftablePointer, type Qcow2Header } from './header.js';
import { RequestLock } from './request-lock.js';
import { emptyActiveState, preallocateGrowth, resizeTables } from './table-resize.js';
import { durableBarrier, flushDirtyMetadata } from './metadata-flush.js';
import { COMPRESSED_HI, COPIED_HI, L2Tables, UNALLOCATED, type Entry } from './l2-tables.js';

export type { Entry } from './l2-tables.js';
import { CRYPT_SECTOR, giveCryptBuffer, takeCryptBuffer, type DataCipher } from './data-cipher.js';

/** Largest data run written in one request. */
const MAX_BATCH_BYTES = 32 << 20;

/** What the writer needs from the driver. */
export interface WriterHost {
  io: ByteIO;
  dataIO: ByteIO;
  header: Qcow2Header;
  g: Geometry;
  map: ClusterMap;
  l2cache: L2Cache;
  hasBacking: boolean;
  /** Encryption of guest data (whole 512-byte sectors), when the image is encrypted. */
  cipher?: DataCipher;
  /** Called (under the lock) for every range the guest changes: persistent bitmaps track it. */
  onGuestWrite?(offset: number, length: number): Promise<void>;
  /** Called (under the lock) before the final flush at close. */
  beforeClose?(): Promise<void>;
  /** Read guest data through the current mapping (used for copy-on-write). */
  readGuest(buf: Uint8Array, offset: number): Promise<void>;
}


/** One planned run (phase 1 of a write): where its data goes and what to record once written. */
interface RunPlan {
  /** Bytes of the caller's data this run consumes. */
  consumed: number;
  /** The bytes to write (the caller's data, or a padded copy) at `host`, guest offset `guest`. */
  buf: Uint8Array;
  host: number;
  guest: number;
  l2: number;
  idx0: number;
  firstCluster: number;
  n: number;
  /** In place: mark [from, to) written; else the replaced entries (new clusters at `host`). */
  inPlace: boolean;
  from: number;
  to: number;
  olds: Entry[];
  /** New clusters: bytes of the run before `buf` starts (extended L2: unallocated leading subclusters are not written). */
  skip?: number;
  /** Host offset just past the run's clusters (where QEMU tries to put what follows). */
  hostEnd: number;
}

export class Qcow2Writer {
  /** Replaced only by reloadRefcounts(). */
  refcounts: Refcounts;
  private started = false;
  private readonly requests = new RequestLock();
  /** The active L1/L2 tables (entries, in-place writability, releasing replaced clusters). */
  readonly tables: L2Tables;
  private readonly lazy: boolean;

  /**
   * Discard in the file what discard requests and zeroing with unmap free (QEMU's
   * pass-discard-request, on when the image is opened with unmap: qemu-nbd --discard=unmap).
   */
  passDiscard = false;

  private constructor(private h: WriterHost, refcounts: Refcounts) {
    this.refcounts = refcounts;
    this.tables = new L2Tables(h, () => this.refcounts);
    this.lazy = (h.header.compatibleFeatures & C.COMPAT_LAZY_REFCOUNTS) !== 0n;
  }

  static async create(h: WriterHost): Promise<Qcow2Writer> {
    return new Qcow2Writer(h, await Qcow2Writer.loadRefcounts(h));
  }

  /** The refcount structures the header points to (a moved reftable updates the header). */
  private static loadRefcounts(h: WriterHost): Promise<Refcounts> {
    const hdr = h.header;
    return Refcounts.load({
      io: h.io,
      clusterBits: hdr.clusterBits,
      refcountOrder: hdr.refcountOrder,
      reftableOffset: hdr.refcountTableOffset,
      reftableClusters: hdr.refcountTableClusters,
      onReftableMoved: async (offset, clusters) => {
        hdr.refcountTableOffset = offset;
        hdr.refcountTableClusters = clusters;
        await writeReftablePointer(h.io, offset, clusters);
      },
    });
  }

  /**
   * After the header switched to refcount structures built beside the old ones (amend
   * refcount_bits, v2 snapshot operations): load them. Nothing may be dirty (the caller flushed).
   */
  async reloadRefcounts(): Promise<void> {
    this.refcounts = await Qcow2Writer.loadRefcounts(this.h);
  }

  /**
   * Run `fn` with exclusive access to metadata, once no guest data write is in flight (so `fn`
   * may change any mapping). Waiting exclusive operations hold back new data writes.
   */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    return this.requests.exclusive(fn);
  }

  private get cs(): number {
    return this.h.g.clusterSize;
  }
  private get dataFile(): boolean {
    return this.h.g.dataFile;
  }

  /** First write: clear autoclear bits we do not maintain, mark the image dirty under lazy refcounts. */
  async start(): Promise<void> {
    if (this.started) return;
    this.started = true;
    const hdr = this.h.header;
    if (hdr.version !== 3) return;
    // We maintain persistent bitmaps and raw data files; any other autoclear bit must go.
    const keep = hdr.autoclearFeatures & (C.AUTOCLEAR_DATA_FILE_RAW | C.AUTOCLEAR_BITMAPS);
    if (hdr.autoclearFeatures !== keep) {
      hdr.autoclearFeatures = keep;
      await this.writeHeaderFeatures();
    }
    if (this.lazy && !(hdr.incompatibleFeatures & C.INCOMPAT_DIRTY)) {
      hdr.incompatibleFeatures |= C.INCOMPAT_DIRTY;
      await this.writeHeaderFeatures();
      await this.h.io.flush();
    }
  }

  async writeHeaderFeatures(): Promise<void> {
    const hdr = this.h.header;
    const b = new Uint8Array(24);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, hdr.incompatibleFeatures);
    dv.setBigUint64(8, hdr.compatibleFeatures);
    dv.setBigUint64(16, hdr.autoclearFeatures);
    await this.h.io.write(b, 72);
  }

  // ---- writes ---------------------------------------------------------------------------

  /**
   * Write guest data. The runs of each piece (within one L2 table: clusters written in place,
   * clusters that need new host clusters) are planned together under the metadata lock (host
   * clusters chosen, copy-on-write done) — so they are allocated before any later request's, as
   * QEMU does — their data written without the lock so that concurrent requests overlap, then
   * their L2 entries updated under the lock again. Data is thus written before anything points
   * to it; clusters of runs in flight are off limits to other requests.
   */
  async write(offset: number, data: Uint8Array): Promise<void> {
    let pos = 0;
    let hint: number | undefined;
    while (pos < data.length) {
      const { plan: plans, done } = await this.planWrite(offset + pos, data.subarray(pos), hint);
      hint = plans[plans.length - 1]!.hostEnd;
      const written = await Promise.allSettled(
        plans.map((p) => {
          const skip = p.skip ?? 0;
          return this.writeData(p.buf, p.host + skip, p.guest + skip);
        }),
      );
      let failure: unknown;
      const release = await this.requests.acquire();
      try {
        for (let k = 0; k < plans.length; k++) {
          const plan = plans[k]!;
          const w = written[k]!;
          if (w.status === 'fulfilled' && failure === undefined) await this.commitRun(plan);
          else {
            if (w.status === 'rejected') failure ??= w.reason;
            if (!plan.inPlace && !this.dataFile) this.refcounts.free(plan.host / this.cs, plan.n);
          }
        }
      } catch (e) {
        failure ??= e;
      } finally {
        done();
        try {
          if (failure === undefined) await this.maybeFlushMetadata();
        } finally {
          release();
        }
      }
      if (failure !== undefined) throw failure;
      for (const p of plans) pos += p.consumed;
    }
  }

  /** Phase 1 of a write: wait for a free path, then plan the runs of one piece and register them in flight. */
  private planWrite(offset: number, data: Uint8Array, hint?: number): Promise<{ plan: RunPlan[]; done: () => void }> {
    const { g } = this.h;
    const cs = this.cs;
    const tableEnd = (Math.floor(offset / g.l1Coverage) + 1) * g.l1Coverage;
    const limit = Math.min(data.length, tableEnd - offset, MAX_BATCH_BYTES);
    const first = Math.floor(offset / cs);
    const end = Math.ceil((offset + limit) / cs);
    return this.requests.reserve(first, end, async () => {
      await this.start();
      const plans: RunPlan[] = [];
      for (let pos = 0; pos < limit; ) {
        const plan = await this.planRun(offset + pos, data.subarray(pos, limit), plans.length ? plans[plans.length - 1]!.hostEnd : hint);
        await this.h.onGuestWrite?.(offset + pos, plan.consumed);
        plans.push(plan);
        pos += plan.consumed;
      }
      const last = plans[plans.length - 1]!;
      return { plan: plans, first: plans[0]!.firstCluster, end: last.firstCluster + last.n };
    });
  }

  /** Write a prefix of `data` that stays within one L2 table, caller holding the lock; returns bytes written. */
  private async writeRun(offset: number, data: Uint8Array): Promise<number> {
    const plan = await this.planRun(offset, data);
    const skip = plan.skip ?? 0;
    await this.writeData(plan.buf, plan.host + skip, plan.guest + skip);
    await this.commitRun(plan);
    return plan.consumed;
  }

  /**
   * Choose where a prefix of `data` (within one L2 table) goes; copy-on-write if needed. New
   * clusters go first, as QEMU puts them, right after the host clusters of the run before
   * (`hint`), as many as are free there; else where the allocator finds room.
   */
  private async planRun(offset: number, data: Uint8Array, hint?: number): Promise<RunPlan> {
    const { g } = this.h;
    const cs = this.cs;
    const l1i = Math.floor(offset / g.l1Coverage);
    const tableEnd = (l1i + 1) * g.l1Coverage;
    const len = Math.min(data.length, tableEnd - offset, MAX_BATCH_BYTES);
    const l2 = await this.tables.writableL2(l1i);
    const firstCluster = Math.floor(offset / cs);
    const idx0 = firstCluster % g.l2Entries;
    const e0 = await this.tables.getEntry(l2, idx0);

    if (this.tables.inPlace(e0)) {
      // Extend over clusters that are writable in place and contiguous on the host.
      const host0 = this.dataFile ? firstCluster * cs : this.tables.hostOf(e0);
      let n = 1;
      while ((firstCluster + n) * cs < offset + len) {
        const e = this.tables.entryNow(l2, idx0 + n) ?? (await this.tables.getEntry(l2, idx0 + n));
        if (!this.tables.inPlace(e) || (this.dataFile ? false : this.tables.hostOf(e) !== host0 + n * cs)) break;
        n++;
      }
      const end = Math.min(offset + len, (firstCluster + n) * cs);
      const buf = await this.padInPlace(l2, idx0, n, offset, data.subarray(0, end - offset));
      return {
        consumed: end - offset, buf: buf.data, host: host0 + (buf.start - firstCluster * cs), guest: buf.start,
        l2, idx0, firstCluster, n, inPlace: true, from: buf.start, to: buf.start + buf.data.length, olds: [],
        hostEnd: host0 + n * cs,
      };
    }

    // Clusters that need a new host cluster: batch consecutive ones. Unallocated entries (all
    // those of a new image) are counted by a scan of the table, not decoded one by one.
    // (`olds` then starts with UNALLOCATED itself: commitRun knows them by that.)
    let olds: Entry[];
    if (e0.hi === 0 && e0.lo === 0 && e0.bhi === 0 && e0.blo === 0) {
      const free = 1 + this.tables.unallocatedRunNow(l2, idx0 + 1, Math.ceil((offset + len) / cs) - firstCluster - 1);
      olds = new Array<Entry>(free).fill(UNALLOCATED);
    } else olds = [e0];
    while ((firstCluster + olds.length) * cs < offset + len) {
      const e = this.tables.entryNow(l2, idx0 + olds.length) ?? (await this.tables.getEntry(l2, idx0 + olds.length));
      if (this.tables.inPlace(e)) break;
      olds.push(e);
    }
    let contiguous: number | undefined;
    if (!this.dataFile && hint !== undefined && hint % cs === 0) {
      const k = await this.refcounts.allocateAtMost(hint / cs, olds.length);
      if (k > 0) {
        olds.length = k;
        contiguous = hint;
      }
    }
    const n = olds.length;
    const end = Math.min(offset + len, (firstCluster + n) * cs);
    const runStart = firstCluster * cs;
    let buf: Uint8Array;
    if (offset === runStart && end === runStart + n * cs) {
      buf = data.subarray(0, end - offset); // whole clusters: no copy
    } else {
      buf = new Uint8Array(n * cs);
      // Copy-on-write: old content of the clusters, where the write does not cover it.
      for (let k = 0; k < n; k++) {
        const cStart = runStart + k * cs;
        if (offset <= cStart && end >= cStart + cs) continue;
        await this.cowFill(buf.subarray(k * cs, (k + 1) * cs), cStart, olds[k]!, offset, end);
      }
      buf.set(data.subarray(0, end - offset), offset - runStart);
    }
    // Extended L2: like QEMU, leave out the subclusters at either end of the run that stay
    // unallocated (in a last cluster, the file then ends where its data does).
    let skip = 0;
    if (g.extendedL2 && buf.length === n * cs) {
      const sc = g.subclusterSize;
      const first = this.newBitmap(olds[0]!, runStart, offset, end).alloc;
      const last = n === 1 ? first : this.newBitmap(olds[n - 1]!, runStart + (n - 1) * cs, offset, end).alloc;
      if (first && last) {
        skip = (31 - Math.clz32(first & -first)) * sc;
        buf = buf.subarray(skip, (n - 1) * cs + (32 - Math.clz32(last)) * sc);
      }
    }
    const host = this.dataFile ? runStart : (contiguous ?? (await this.refcounts.allocate(n)));
    return { consumed: end - offset, buf, host, guest: runStart, l2, idx0, firstCluster, n, inPlace: false, from: offset, to: end, olds, skip, hostEnd: host + n * cs };
  }

  /** Phase 3 of a write (data is written): point the L2 entries at it. */
  private async commitRun(p: RunPlan): Promise<void> {
    const { g } = this.h;
    const cs = this.cs;
    if (p.inPlace) {
      for (let k = 0; k < p.n; k++) await this.markWritten(p.l2, p.idx0 + k, p.firstCluster + k, p.from, p.to, true);
      return;
    }
    // All the replaced entries unallocated (UNALLOCATED only ever starts `olds`, so the last one
    // tells): nothing to release, the new entries are set in one pass over the table.
    if (p.olds[p.n - 1] === UNALLOCATED && this.tables.setRunNow(p.l2, p.idx0, p.n, p.host)) return;
    const runStart = p.firstCluster * cs;
    for (let k = 0; k < p.n; k++) {
      const old = p.olds[k]!;
      const newHost = p.host + k * cs;
      const e: Entry = { hi: Math.floor(newHost / 0x100000000) | COPIED_HI, lo: newHost >>> 0, bhi: 0, blo: 0 };
      if (g.extendedL2) {
        const { alloc, zero } = this.newBitmap(old, runStart + k * cs, p.from, p.to);
        e.blo = alloc;
        e.bhi = zero;
      }
      if (!this.tables.setEntryNow(p.l2, p.idx0 + k, e)) await this.tables.setEntry(p.l2, p.idx0 + k, e);
      this.tables.releaseOld(old);
    }
  }

  /**
   * Write guest data at `host`. Encrypted images take whole sectors: partial sectors at the edges
   * are completed with the current plaintext, then everything is encrypted (on a copy).
   */
  private async writeData(data: Uint8Array, host: number, guest: number): Promise<void> {
    const cipher = this.h.cipher;
    if (!cipher) {
      await this.h.dataIO.write(data, host);
      return;
    }
    const head = guest % CRYPT_SECTOR;
    const len = Math.ceil((head + data.length) / CRYPT_SECTOR) * CRYPT_SECTOR;
    const buf = takeCryptBuffer(len); // every byte is set below
    try {
      if (head) await this.h.readGuest(buf.subarray(0, CRYPT_SECTOR), guest - head);
      if ((head + data.length) % CRYPT_SECTOR) await this.h.readGuest(buf.subarray(len - CRYPT_SECTOR), guest - head + len - CRYPT_SECTOR);
      buf.set(data, head);
      await cipher.encrypt(buf, host - head, guest - head);
      await this.h.dataIO.write(buf, host - head);
    } finally {
      giveCryptBuffer(buf);
    }
  }

  /**
   * Fill the parts of the new cluster `dst` (guest range starting at cStart) that the write does not
   * cover with the old content. With extended L2, only subclusters that stay allocated need it.
   */
  private async cowFill(dst: Uint8Array, cStart: number, old: Entry, covStart: number, covEnd: number): Promise<void> {
    const { g } = this.h;
    if (!g.extendedL2) {
      await this.h.readGuest(dst, cStart);
      return;
    }
    const sc = g.subclusterSize;
    for (let s = 0; s < g.subclustersPerCluster; s++) {
      const a = cStart + s * sc;
      const b = a + sc;
      const touched = covStart < b && covEnd > a;
      const full = covStart <= a && covEnd >= b;
      const oldAlloc = this.tables.hostOf(old) !== 0 && !(old.hi & COMPRESSED_HI) && ((old.blo >>> s) & 1) === 1;
      const compressed = (old.hi & COMPRESSED_HI) !== 0;
      if ((touched && !full) || (!touched && (oldAlloc || compressed))) {
        await this.h.readGuest(dst.subarray(s * sc, (s + 1) * sc), a);
      }
    }
  }

  /** Extended L2 bitmaps of a freshly allocated cluster replacing `old`. */
  private newBitmap(old: Entry, cStart: number, covStart: number, covEnd: number): { alloc: number; zero: number } {
    const { g } = this.h;
    const sc = g.subclusterSize;
    const compressed = (old.hi & COMPRESSED_HI) !== 0;
    const oldHost = this.tables.hostOf(old) !== 0;
    let alloc = 0;
    let zero = 0;
    for (let s = 0; s < 32; s++) {
      const a = cStart + s * sc;
      const touched = covStart < a + sc && covEnd > a;
      const bit = (1 << s) >>> 0;
      if (touched || compressed || (oldHost && old.blo & bit)) alloc |= bit;
      else if (old.bhi & bit) zero |= bit;
    }
    return { alloc: alloc >>> 0, zero: zero >>> 0 };
  }

  /**
   * In-place write into clusters we own. With extended L2, subclusters the write touches but that
   * are not allocated yet are padded to whole subclusters with their current content.
   */
  private async padInPlace(
    l2: number,
    idx0: number,
    n: number,
    offset: number,
    data: Uint8Array,
  ): Promise<{ start: number; data: Uint8Array }> {
    const { g } = this.h;
    if (!g.extendedL2) {
      // Non-extended: zero-alloc clusters we own must be rewritten whole (their bytes are stale).
      const e0 = await this.tables.getEntry(l2, idx0);
      const eN = n > 1 ? await this.tables.getEntry(l2, idx0 + n - 1) : e0;
      const c0 = Math.floor(offset / this.cs) * this.cs;
      const cEnd = c0 + n * this.cs;
      const padHead = (e0.lo & 1) === 1 && offset > c0;
      const padTail = (eN.lo & 1) === 1 && offset + data.length < cEnd;
      if (!padHead && !padTail) return { start: offset, data };
      const start = padHead ? c0 : offset;
      const end = padTail ? Math.min(cEnd, Math.ceil((offset + data.length) / this.cs) * this.cs) : offset + data.length;
      const buf = new Uint8Array(end - start); // zero-alloc clusters read as zeros
      buf.set(data, offset - start);
      return { start, data: buf };
    }
    const sc = g.subclusterSize;
    const start = Math.floor(offset / sc) * sc;
    const end = Math.ceil((offset + data.length) / sc) * sc;
    if (start === offset && end === offset + data.length) return { start, data };
    const buf = new Uint8Array(end - start);
    // Head and tail subclusters: current content (the write replaces the middle).
    if (start < offset) await this.h.readGuest(buf.subarray(0, sc), start);
    if (end > offset + data.length && (end - sc >= start + sc || start === offset)) {
      await this.h.readGuest(buf.subarray(buf.length - sc), end - sc);
    }
    buf.set(data, offset - start);
    return { start, data: buf };
  }

  /** After an in-place write: clear the zero flag / set subcluster allocation for [from, to). */
  private async markWritten(l2: number, idx: number, cluster: number, from: number, to: number, _inPlace: boolean): Promise<void> {
    const { g } = this.h;
    const e = await this.tables.getEntry(l2, idx);
    const cStart = cluster * this.cs;
    let changed = false;
    if (!(e.hi & COPIED_HI)) {
      e.hi |= COPIED_HI; // data file clusters
      changed = true;
    }
    if (!g.extendedL2) {
      if (e.lo & 1) {
        e.lo &= ~1;
        changed = true;
      }
      if (this.dataFile && !entryOffset(e.hi, e.lo) && cStart) {
        e.hi = (e.hi & 0xff000000) | Math.floor(cStart / 0x100000000);
        e.lo = (e.lo & 0x1ff) | (cStart >>> 0);
        changed = true;
      }
    } else {
      const sc = g.subclusterSize;
      for (let s = 0; s < 32; s++) {
        const a = cStart + s * sc;
        if (from < a + sc && to > a) {
          const bit = (1 << s) >>> 0;
          if (!(e.blo & bit) || e.bhi & bit) {
            e.blo = (e.blo | bit) >>> 0;
            e.bhi = (e.bhi & ~bit) >>> 0;
            changed = true;
          }
        }
      }
    }
    if (changed) await this.tables.setEntry(l2, idx, e);
  }

  /**
   * Zero `[offset, offset+length)`. Whole clusters (subclusters with extended L2) become zero
   * entries on v3 images; the rest is written as zeros.
   */
  async writeZeroes(offset: number, length: number, mayUnmap: boolean): Promise<void> {
    const { g, header } = this.h;
    const unit = g.subclusterSize;
    // v3: zero flags; v2 without a backing file: QEMU discards (unallocated reads as zeros).
    const canFlag = (header.version >= 3 || !this.h.hasBacking) && !(header.autoclearFeatures & C.AUTOCLEAR_DATA_FILE_RAW);
    if (!canFlag) {
      await this.writeZeroBytes(offset, length);
      return;
    }
    // As QEMU: the request in (sub)cluster pieces; a partial piece zeroes its whole unit when the
    // rest of the unit reads as zero already (unallocated without a backing file, or zero), and
    // is written as zero bytes otherwise. A piece that ends the image counts as whole.
    const end = offset + length;
    const pieces: Array<[number, number]> = [];
    let pos = offset;
    if (pos % unit) {
      const e = Math.min(end, Math.ceil(pos / unit) * unit);
      pieces.push([pos, e]);
      pos = e;
    }
    const midEnd = end === header.size ? end : Math.floor(end / unit) * unit;
    if (pos < midEnd) {
      pieces.push([pos, midEnd]);
      pos = midEnd;
    }
    if (pos < end) pieces.push([pos, end]);
    for (const [from, to] of pieces) {
      const aligned = from % unit === 0 && (to % unit === 0 || to === header.size);
      const byteWrite = await this.exclusive(async () => {
        let zFrom = from;
        let zTo = to;
        if (!aligned) {
          const u = Math.floor(from / unit) * unit;
          if (!(await this.unitReadsZero(u))) return true;
          zFrom = u;
          zTo = Math.min(u + unit, header.size);
        }
        await this.start();
        await this.h.onGuestWrite?.(zFrom, zTo - zFrom);
        await this.zeroUnits(zFrom, zTo - zFrom, mayUnmap, false);
        await this.maybeFlushMetadata();
        return false;
      });
      if (byteWrite) await this.writeZeroBytes(from, to - from);
    }
  }

  /** Whether the (sub)cluster at `offset` is unallocated without a backing file, or zero. */
  private async unitReadsZero(offset: number): Promise<boolean> {
    const { g } = this.h;
    const l1i = Math.floor(offset / g.l1Coverage);
    const { hi, lo } = this.tables.l1Entry(l1i);
    const l2 = entryOffset(hi, lo);
    if (!l2) return !this.h.hasBacking;
    const e = await this.tables.getEntry(l2, Math.floor(offset / this.cs) % g.l2Entries);
    if (e.hi & COMPRESSED_HI) return false;
    if (g.extendedL2) {
      const bit = 2 ** Math.floor((offset % this.cs) / g.subclusterSize);
      if ((e.blo >>> 0) & bit) return false;
      return ((e.bhi >>> 0) & bit) !== 0 || !this.h.hasBacking;
    }
    if (e.lo & 1) return true;
    return !entryOffset(e.hi, e.lo) && !this.h.hasBacking;
  }

  private async writeZeroBytes(offset: number, length: number): Promise<void> {
    const chunk = new Uint8Array(Math.min(length, 4 << 20));
    for (let done = 0; done < length; ) {
      const n = Math.min(chunk.length, length - done);
      await this.write(offset + done, chunk.subarray(0, n));
      done += n;
    }
  }

  /**
   * Discard whole clusters; partial ones are ignored, as QEMU does (also with subclusters), but
   * for a last partial cluster that ends the image.
   */
  async discard(offset: number, length: number): Promise<void> {
    const unit = this.cs;
    const end = offset + length;
    const a = Math.ceil(offset / unit) * unit;
    const b = end === this.h.header.size ? end : Math.floor(end / unit) * unit;
    if (a >= b) return;
    await this.exclusive(async () => {
      await this.start();
      await this.h.onGuestWrite?.(a, b - a);
      await this.zeroUnits(a, b - a, true, true);
      await this.maybeFlushMetadata();
    });
  }

  /** Set whole units to zero (or unallocated for discard on v2). */
  private async zeroUnits(offset: number, length: number, unmap: boolean, discard: boolean): Promise<void> {
    const { g, header } = this.h;
    const cs = this.cs;
    const v3 = header.version >= 3;
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const cluster = Math.floor(pos / cs);
      const cStart = cluster * cs;
      const cEnd = Math.min(cStart + cs, end);
      const l1i = Math.floor(pos / g.l1Coverage);
      const { hi, lo } = this.tables.l1Entry(l1i);
      if (!entryOffset(hi, lo) && !this.h.hasBacking && !v3) {
        pos = Math.min(end, (l1i + 1) * g.l1Coverage);
        continue;
      }
      if (!entryOffset(hi, lo) && discard && !this.h.hasBacking) {
        pos = Math.min(end, (l1i + 1) * g.l1Coverage);
        continue;
      }
      if (discard && entryOffset(hi, lo) && !this.h.hasBacking) {
        // Discarding what is already unallocated (without backing) changes nothing.
        const cur = await this.tables.getEntry(entryOffset(hi, lo), cluster % g.l2Entries);
        if (!cur.hi && !cur.lo && !cur.blo && !cur.bhi) {
          pos = cEnd;
          continue;
        }
      }
      const l2 = await this.tables.writableL2(l1i);
      const idx = cluster % g.l2Entries;
      const old = await this.tables.getEntry(l2, idx);
      const whole = pos === cStart && cEnd === cStart + cs;
      if (g.extendedL2) {
        const sc = g.subclusterSize;
        let mask = 0;
        for (let s = Math.floor((pos - cStart) / sc); s < Math.ceil((cEnd - cStart) / sc); s++) mask |= 1 << s;
        mask >>>= 0;
        const compressed = (old.hi & COMPRESSED_HI) !== 0;
        if (compressed && !whole) {
          // Decompress-and-rewrite the cluster first so subclusters can be addressed.
          const buf = new Uint8Array(cs);
          await this.h.readGuest(buf, cStart);
          buf.fill(0, pos - cStart, cEnd - cStart);
          await this.writeRunUnlocked(cStart, buf);
        } else if (whole && (unmap || compressed || !this.tables.inPlace(old))) {
          await this.tables.setEntry(l2, idx, { hi: 0, lo: 0, bhi: 0xffffffff, blo: 0 });
          this.tables.releaseOld(old, this.passDiscard && (unmap || discard));
        } else {
          const e = { ...old };
          e.bhi = (e.bhi | mask) >>> 0;
          e.blo = (e.blo & ~mask) >>> 0;
          await this.tables.setEntry(l2, idx, e);
        }
      } else if (!v3) {
        // v2 (discard, or zeroing without a backing file, which QEMU does as a discard): the
        // cluster becomes unallocated.
        await this.tables.setEntry(l2, idx, { hi: 0, lo: 0, bhi: 0, blo: 0 });
        this.tables.releaseOld(old, this.passDiscard);
      } else if (!unmap && this.tables.inPlace(old)) {
        await this.tables.setEntry(l2, idx, { ...old, lo: (old.lo | 1) >>> 0 });
      } else {
        await this.tables.setEntry(l2, idx, { hi: 0, lo: 1, bhi: 0, blo: 0 });
        this.tables.releaseOld(old, this.passDiscard && (unmap || discard));
      }
      pos = cEnd;
    }
  }

  private async writeRunUnlocked(offset: number, data: Uint8Array): Promise<void> {
    let pos = 0;
    while (pos < data.length) pos += await this.writeRun(offset + pos, data.subarray(pos));
  }

  /**
   * Store an already compressed cluster at guest cluster `offset` (cluster aligned). The cluster
   * must not be allocated (convert's fresh targets).
   */
  async writeCompressed(offset: number, compressed: Uint8Array): Promise<void> {
    await this.exclusive(async () => {
      await this.start();
      await this.h.onGuestWrite?.(offset, this.cs);
      const { g } = this.h;
      const cs = this.cs;
      if (this.dataFile) throw new QcowError('ENOTSUP', 'Compression is not supported with an external data file');
      const l1i = Math.floor(offset / g.l1Coverage);
      const l2 = await this.tables.writableL2(l1i);
      const idx = Math.floor(offset / cs) % g.l2Entries;
      const old = await this.tables.getEntry(l2, idx);
      const host = await this.refcounts.allocateBytes(compressed.length);
      await this.h.io.write(compressed, host);
      const x = 70 - g.clusterBits;
      const nbAdditional = Math.floor((host + compressed.length - 1) / 512) - Math.floor(host / 512);
      const hi = COMPRESSED_HI | (nbAdditional << (x - 32)) | Math.floor(host / 0x100000000);
      await this.tables.setEntry(l2, idx, { hi: hi >>> 0, lo: host >>> 0, bhi: 0, blo: 0 });
      this.tables.releaseOld(old);
      await this.maybeFlushMetadata();
    });
  }

  /** Round the file's length up to whole 512-byte sectors (the end of a compressed copy). */
  async alignFileEnd(): Promise<void> {
    await this.exclusive(async () => {
      const size = await this.h.io.size();
      if (size % 512) await this.h.io.truncate(size + 512 - (size % 512));
    });
  }

  // ---- flush ----------------------------------------------------------------------------

  private async maybeFlushMetadata(): Promise<void> {
    if (this.h.l2cache.pressure) await this.flushMetadata();
  }

  /** Make everything written so far durable (image file, and data file first). */
  barrier(): Promise<void> {
    return durableBarrier(this.h);
  }

  /** Write all dirty metadata in crash-safe order (see metadata-flush.ts). Caller holds the lock. */
  flushMetadata(): Promise<void> {
    return flushDirtyMetadata(this.h, this.refcounts, this.tables);
  }

  async flush(): Promise<void> {
    await this.exclusive(() => this.flushMetadata());
  }

  /** Flush, then clear the dirty bit we set for lazy refcounts. */
  async close(): Promise<void> {
    await this.exclusive(async () => {
      await this.h.beforeClose?.();
      await this.flushMetadata();
      const hdr = this.h.header;
      if (this.lazy && hdr.incompatibleFeatures & C.INCOMPAT_DIRTY) {
        hdr.incompatibleFeatures &= ~C.INCOMPAT_DIRTY;
        await this.writeHeaderFeatures();
        await this.h.io.flush();
      }
    });
  }

  /**
   * Drop every cluster of the active state: all L1 entries become 0, so the whole image reads
   * from its backing file again (`commit` empties the top image this way).
   */
  makeEmpty(): Promise<void> {
    return this.exclusive(async () => {
      await this.start();
      await emptyActiveState(this);
      // Lazy refcounts: the image stays marked dirty while open (emptying cleared the bit).
      const hdr = this.h.header;
      if (this.lazy && hdr.version === 3 && !(hdr.incompatibleFeatures & C.INCOMPAT_DIRTY)) {
        hdr.incompatibleFeatures |= C.INCOMPAT_DIRTY;
        await this.writeHeaderFeatures();
        await this.h.io.flush();
      }
    });
  }

  /**
   * Change the virtual size (see table-resize.ts). Returns the new L1 bytes when the table moved.
   */
  resize(newSize: number): Promise<Uint8Array | undefined> {
    return this.exclusive(async () => {
      await this.start();
      return resizeTables(this, newSize);
    });
  }

  /**
   * Run `fn` (under the caller's exclusive access); afterwards the clusters it freed are discarded
   * in the file, as QEMU does for snapshot operations, shrinking and emptying.
   */
  async discardingFreed<T>(fn: () => Promise<T>): Promise<T> {
    const rc = this.refcounts;
    rc.startCollectingFreed();
    try {
      const out = await fn();
      await this.flushMetadata();
      await rc.discardFreed();
      return out;
    } finally {
      rc.stopCollectingFreed();
    }
  }

  /** Preallocate the clusters of a grown image's new area, as QEMU does (see table-resize.ts). */
  preallocate(oldSize: number, newSize: number, mode: 'falloc' | 'full'): Promise<void> {
    return this.exclusive(async () => {
      await this.start();
      await preallocateGrowth(this, oldSize, newSize, mode);
    });
  }

  /** What the writer works on (for the table-level operations in table-resize.ts). */
  get host(): WriterHost {
    return this.h;
  }
}
