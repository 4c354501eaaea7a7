/**
 * The image as the qcow2 consistency check (`qemu-img check`) and its repairs see it: its
 * structures read straight from the file (so images the normal open refuses — dirty, corrupt,
 * broken refcount table — can be checked), access to the stored refcounts, header updates.
 *
 * Behaviour reproduced from qemu-img 7.2 (messages, counting rules, repair order); see
 * /work/shared/qcow-notes.md §2, §9, §11.
 */
import { readInto, type ByteIO } from '../../core/byte-io.js';
import * as C from './constants.js';
import { CheckFailure, getPacked, hexAlt, masked, setPacked, u32, type CheckLog } from './check-base.js';
import { decodeExtensions, decodeHeader, encodeHeader, validateHeader, type Qcow2Header } from './header.js';

// ------------------------------------------------------------------------------------------------
// Snapshot table entries as the check reads them

export interface CheckSnapshot {
  l1TableOffset: number | bigint;
  l1Size: number;
  idStr: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  vmStateSize: bigint;
  /** After a repair truncated it, the kept size. */
  extraDataSize: number;
  diskSize: bigint;
  icount: bigint;
  unknownExtra: Uint8Array;
}

// ------------------------------------------------------------------------------------------------
// The image

export interface BitmapsInfo {
  nbBitmaps: number;
  directoryOffset: number;
  directorySize: number;
}

/** What QEMU's BDRVQcow2State holds for a check: opened "for check" (BDRV_O_CHECK). */
export class CheckImage {
  readonly cs: number;
  readonly clusterBits: number;
  readonly refcountOrder: number;
  /** Refcount entries per refcount block, and its log2. */
  readonly rbSize: number;
  readonly rbBits: number;
  /** Entries per L2 table and bytes per entry. */
  readonly l2Size: number;
  readonly l2EntryBytes: number;
  readonly extL2: boolean;
  readonly dataFile: boolean;
  readonly refcountMax: number;

  l1Offset: number;
  l1Size: number;
  /** Active L1 table, raw big-endian (QEMU's s->l1_table). */
  l1: Uint8Array;
  reftableOffset: number;
  /** Reftable entries (QEMU's s->refcount_table_size). */
  reftableSize: number;
  /** Raw big-endian reftable. */
  reftable: Uint8Array;

  nbSnapshots = 0;
  snapshotsOffset: number | bigint = 0;
  snapshotsSize = 0;
  snapshots: CheckSnapshot[] = [];
  bitmaps?: BitmapsInfo;

  fileSize = 0;
  private signaledCorruption = false;
  /** Refcount blocks read on demand (at most 64 clean ones kept), by file offset. */
  private blocks = new Map<number, Uint8Array>();
  /** Refcount blocks read in bulk by preloadRefblocks (kept until the cache is dropped). */
  private pinned = new Map<number, Uint8Array>();
  private dirtyBlocks = new Set<number>();
  /** The last block found by the synchronous lookup (reftable index → block). */
  private lastRt = -1;
  private lastBlock: Uint8Array | null = null;
  /** By reftable index, after preloadRefblocks: the pinned block, or null for "no block" (all 0). */
  private rtBlocks: Array<Uint8Array | null | undefined> = [];

  private constructor(
    readonly io: ByteIO,
    readonly header: Qcow2Header,
    readonly writable: boolean,
    readonly log: CheckLog,
  ) {
    const h = header;
    this.clusterBits = h.clusterBits;
    this.cs = 2 ** h.clusterBits;
    this.refcountOrder = h.refcountOrder;
    this.rbBits = h.clusterBits + 3 - h.refcountOrder;
    this.rbSize = 2 ** this.rbBits;
    this.extL2 = (h.incompatibleFeatures & C.INCOMPAT_EXTL2) !== 0n;
    this.dataFile = (h.incompatibleFeatures & C.INCOMPAT_DATA_FILE) !== 0n;
    this.l2EntryBytes = this.extL2 ? 16 : 8;
    this.l2Size = this.cs / this.l2EntryBytes;
    this.refcountMax = h.refcountOrder >= 6 ? Number.POSITIVE_INFINITY : 2 ** (1 << h.refcountOrder) - 1;
    this.l1Offset = h.l1TableOffset;
    this.l1Size = h.l1Size;
    this.l1 = new Uint8Array(0);
    this.reftableOffset = h.refcountTableOffset;
    this.reftableSize = (h.refcountTableClusters * this.cs) / 8;
    this.reftable = new Uint8Array(0);
    this.nbSnapshots = h.nbSnapshots;
    this.snapshotsOffset = h.snapshotsOffset;
  }

  /**
   * Open for checking, like QEMU with BDRV_O_CHECK: the header must be valid, but a missing
   * refcount table, the dirty and corrupt bits, and a broken snapshot table are accepted (the
   * snapshot table is read by the check itself).
   */
  static async open(io: ByteIO, opts: { writable: boolean; log: CheckLog }): Promise<CheckImage> {
    const fileSize = await io.size();
    const head = new Uint8Array(Math.min(fileSize, C.V3_HEADER_LENGTH_WITH_COMPRESSION));
    await readInto(io, head, 0);
    const first = decodeHeader(head);
    const cluster0 = new Uint8Array(Math.min(fileSize, 2 ** first.clusterBits));
    await readInto(io, cluster0, 0);
    const header = decodeHeader(cluster0);
    decodeExtensions(header, cluster0);
    // The snapshot table is validated by the check itself, not at open.
    validateHeader({ ...header, nbSnapshots: 0, snapshotsOffset: 0 }, { readOnly: !opts.writable, forCheck: true });
    const img = new CheckImage(io, header, opts.writable, opts.log);
    img.fileSize = fileSize;
    img.l1 = await img.readPadded(img.l1Offset, img.l1Size * 8);
    img.reftable = await img.readPadded(img.reftableOffset, img.reftableSize * 8);
    if (header.bitmaps) {
      if (header.autoclearFeatures & C.AUTOCLEAR_BITMAPS) {
        img.bitmaps = {
          nbBitmaps: header.bitmaps.nbBitmaps,
          directoryOffset: header.bitmaps.directoryOffset,
          directorySize: header.bitmaps.directorySize,
        };
      } else {
        opts.log('warning: a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent', 'report');
        opts.log("Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.", 'partial');
      }
    }
    return img;
  }

  get version(): number {
    return this.header.version;
  }

  /** Virtual size as QEMU keeps it (whole 512-byte sectors). */
  get totalBytes(): number {
    return Math.floor(this.header.size / 512) * 512;
  }

  async refreshSize(): Promise<number> {
    this.fileSize = await this.io.size();
    return this.fileSize;
  }

  /** Read `length` bytes at `offset`; what lies past the end of the file reads as zeros (like QEMU). */
  async readPadded(offset: number | bigint, length: number): Promise<Uint8Array> {
    let buf: Uint8Array;
    try {
      buf = new Uint8Array(length);
    } catch {
      throw new CheckFailure('ENOMEM');
    }
    if (typeof offset === 'number' && offset < this.fileSize && length > 0) {
      await readInto(this.io, buf.subarray(0, Math.min(length, this.fileSize - offset)), offset);
    }
    return buf;
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    await this.io.write(buf, offset);
    if (offset + buf.length > this.fileSize) this.fileSize = offset + buf.length;
  }

  // ---------------------------------------------------------------------------------------------
  // Tables

  l1Entry(i: number): { hi: number; lo: number } {
    const b = this.l1;
    const p = i * 8;
    return {
      hi: ((b[p]! << 24) | (b[p + 1]! << 16) | (b[p + 2]! << 8) | b[p + 3]!) >>> 0,
      lo: ((b[p + 4]! << 24) | (b[p + 5]! << 16) | (b[p + 6]! << 8) | b[p + 7]!) >>> 0,
    };
  }

  setL1Entry(i: number, hi: number, lo: number): void {
    const dv = new DataView(this.l1.buffer, this.l1.byteOffset);
    dv.setUint32(i * 8, hi >>> 0);
    dv.setUint32(i * 8 + 4, lo >>> 0);
  }

  reftableEntry(i: number): { hi: number; lo: number } {
    return { hi: u32(this.reftable, i * 8), lo: u32(this.reftable, i * 8 + 4) };
  }

  /** Low 32 bits of reftable entry `i`. */
  reftableLo(i: number): number {
    return u32(this.reftable, i * 8 + 4);
  }

  /** Refcount block offset of reftable entry `i` (REFT_OFFSET_MASK, i.e. including the high bits). */
  refblockOffset(i: number): number | bigint {
    const b = this.reftable;
    const p = i * 8;
    const hi = u32(b, p);
    const lo = (u32(b, p + 4) & 0xfffffe00) >>> 0;
    if (hi < 0x200000) return hi * 0x100000000 + lo;
    return masked(hi, lo, 0xffffffff, 0xfffffe00);
  }

  /** Replace the reftable (after a rebuild). */
  setReftable(offset: number, raw: Uint8Array): void {
    this.reftableOffset = offset;
    this.reftable = raw;
    this.reftableSize = raw.length / 8;
    this.dropRefcountCache();
  }

  // ---------------------------------------------------------------------------------------------
  // Stored refcounts (QEMU's qcow2_get_refcount / update_refcount through its cache)

  /** qcow2_signal_corruption: report once; opened for writing, also set the corrupt bit. */
  private async corruptionEvent(message: string): Promise<void> {
    if (this.signaledCorruption) return;
    this.signaledCorruption = true;
    if (!this.writable) {
      this.log(`qcow2: Image is corrupt: ${message}; further non-fatal corruption events will be suppressed`);
      return;
    }
    this.log(`qcow2: Marking image as corrupt: ${message}; further corruption events will be suppressed`);
    await this.markCorrupt();
  }

  /** Set the corrupt bit (incompatible bit 1), durably. */
  async markCorrupt(): Promise<void> {
    if (this.header.version < 3) return;
    const cur = await this.readPadded(72, 8);
    const dv = new DataView(cur.buffer);
    const v = dv.getBigUint64(0) | C.INCOMPAT_CORRUPT;
    dv.setBigUint64(0, v);
    await this.io.flush();
    await this.write(cur, 72);
    await this.io.flush();
    this.header.incompatibleFeatures = v;
  }

  /** The refcount block holding `cluster`, undefined when there is none; throws EIO when its offset is invalid. */
  private async blockFor(cluster: number): Promise<{ block: Uint8Array; offset: number } | undefined> {
    const rt = Math.floor(cluster / this.rbSize);
    if (rt >= this.reftableSize) return undefined;
    const off = this.refblockOffset(rt);
    if (off === 0) return undefined;
    if (typeof off === 'bigint' ? off % BigInt(this.cs) !== 0n : off % this.cs !== 0) {
      await this.corruptionEvent(`Refblock offset ${hexAlt(off)} unaligned (reftable index: ${hexAlt(rt)})`);
      throw new CheckFailure('EIO');
    }
    if (typeof off === 'bigint') {
      // Past 2^63 the read itself fails; below it, past the end of the file, it reads zeros.
      if (off >= 1n << 63n) throw new CheckFailure('EIO');
      return { block: new Uint8Array(this.cs), offset: -1 };
    }
    let block = this.pinned.get(off) ?? this.blocks.get(off);
    if (!block) {
      block = await this.readPadded(off, this.cs);
      if (this.blocks.size >= 64) {
        for (const k of this.blocks.keys()) {
          if (this.dirtyBlocks.has(k)) continue;
          this.blocks.delete(k);
          break;
        }
      }
      this.blocks.set(off, block);
      this.lastRt = -1;
    }
    return { block, offset: off };
  }

  /**
   * The refcount block for reftable index `rt` when that needs no I/O and cannot fail: null when
   * there is none (all refcounts 0), undefined when it must go through the asynchronous path
   * (not cached, or an offset that is invalid or past 2^53).
   */
  private blockSync(rt: number): Uint8Array | null | undefined {
    if (rt === this.lastRt) return this.lastBlock;
    if (rt >= this.reftableSize) return null;
    const off = this.refblockOffset(rt);
    if (off === 0) return null;
    if (typeof off !== 'number' || off % this.cs !== 0) return undefined;
    const block = this.pinned.get(off) ?? this.blocks.get(off);
    if (block) {
      this.lastRt = rt;
      this.lastBlock = block;
    }
    return block;
  }

  /** The refcount block preloaded for reftable index `rt` (null: none, all 0; undefined: not preloaded). */
  preloadedRefblock(rt: number): Uint8Array | null | undefined {
    return this.rtBlocks[rt];
  }

  /** Stored refcount of `cluster` when known without I/O (see blockSync), else undefined. */
  cachedRefcount(cluster: number): number | undefined {
    if (cluster <= 0x7fffffff) {
      const b = this.rtBlocks[cluster >>> this.rbBits];
      if (b) {
        const i = cluster & (this.rbSize - 1);
        return this.refcountOrder === 4 ? (b[2 * i]! << 8) | b[2 * i + 1]! : getPacked(b, i, this.refcountOrder);
      }
      if (b === null) return 0;
    }
    const small = cluster <= 0x7fffffff;
    const rt = small ? cluster >>> this.rbBits : Math.floor(cluster / this.rbSize);
    const block = this.blockSync(rt);
    if (block === undefined) return undefined;
    if (block === null) return 0;
    const i = small ? cluster & (this.rbSize - 1) : cluster - rt * this.rbSize;
    if (this.refcountOrder === 4) return (block[2 * i]! << 8) | block[2 * i + 1]!;
    return getPacked(block, i, this.refcountOrder);
  }

  /** Stored refcount of `cluster`. Throws CheckFailure('EIO') when it cannot be read. */
  async getRefcount(cluster: number): Promise<number> {
    const known = this.cachedRefcount(cluster);
    if (known !== undefined) return known;
    const b = await this.blockFor(cluster);
    if (!b) return 0;
    return getPacked(b.block, cluster % this.rbSize, this.refcountOrder);
  }

  /**
   * Read, in a few large reads, the refcount blocks covering clusters [first, end) that lie inside
   * the file (at cluster-aligned offsets) and are not cached yet; they stay cached until the cache
   * is dropped. Memory: at most the file's own size in refcount blocks, i.e. what the in-memory
   * refcount array of the check takes. Blocks with invalid offsets are left to the normal path
   * (which reports them).
   */
  async preloadRefblocks(first: number, end: number): Promise<void> {
    const cs = this.cs;
    const rtFirst = Math.floor(first / this.rbSize);
    const rtEnd = Math.min(this.reftableSize, Math.ceil(end / this.rbSize));
    const offsets: number[] = [];
    const seen = new Set<number>();
    for (let rt = rtFirst; rt < rtEnd; rt++) {
      const off = this.refblockOffset(rt);
      if (typeof off !== 'number' || off === 0 || off % cs !== 0 || off >= this.fileSize) continue;
      if (seen.has(off) || this.pinned.has(off)) continue;
      seen.add(off);
      const cached = this.blocks.get(off);
      if (cached) {
        // Keep it (it may hold unwritten changes), pinned from now on.
        this.blocks.delete(off);
        this.pinned.set(off, cached);
      } else offsets.push(off);
    }
    if (offsets.length) {
      offsets.sort((a, b) => a - b);
      await readClusterRuns(this, offsets, (off, block) => this.pinned.set(off, block));
    }
    for (let rt = rtFirst; rt < rtEnd; rt++) {
      const off = this.refblockOffset(rt);
      if (off === 0) this.rtBlocks[rt] = null;
      else if (typeof off === 'number') {
        const block = this.pinned.get(off);
        if (block) this.rtBlocks[rt] = block;
      }
    }
    this.lastRt = -1;
  }

  /** The whole refcount block covering `cluster` (for sequential scans), undefined when none. */
  async refblockFor(cluster: number): Promise<Uint8Array | undefined> {
    return (await this.blockFor(cluster))?.block;
  }

  /** Set a stored refcount (the block must exist). Written by flushRefcounts(). */
  async setRefcount(cluster: number, value: number): Promise<boolean> {
    const b = await this.blockFor(cluster);
    if (!b || b.offset < 0) return false;
    setPacked(b.block, cluster % this.rbSize, this.refcountOrder, value);
    this.dirtyBlocks.add(b.offset);
    return true;
  }

  async flushRefcounts(): Promise<void> {
    const dirty = [...this.dirtyBlocks].sort((a, b) => a - b);
    this.dirtyBlocks.clear();
    for (const off of dirty) await this.write((this.pinned.get(off) ?? this.blocks.get(off))!, off);
    if (dirty.length) await this.io.flush();
  }

  dropRefcountCache(): void {
    this.blocks.clear();
    this.pinned.clear();
    this.dirtyBlocks.clear();
    this.lastRt = -1;
    this.lastBlock = null;
    this.rtBlocks = [];
  }

  // ---------------------------------------------------------------------------------------------
  // Header updates

  /** Clear the dirty and corrupt bits (QEMU's qcow2_mark_clean + qcow2_mark_consistent). */
  async markCleanAndConsistent(): Promise<void> {
    if (this.header.version < 3) return;
    const cur = await this.readPadded(72, 8);
    const dv = new DataView(cur.buffer);
    const v = dv.getBigUint64(0);
    const next = v & ~(C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT);
    if (next === v) return;
    await this.io.flush();
    dv.setBigUint64(0, next);
    await this.write(cur, 72);
    await this.io.flush();
    this.header.incompatibleFeatures = next;
  }

  /**
   * What a read/write open does to the header before anything else (qcow2_do_open): unknown
   * autoclear bits are cleared and a bitmaps extension whose autoclear bit is gone is dropped.
   */
  async updateHeaderForWrite(): Promise<void> {
    const h = this.header;
    if (h.version < 3) return;
    const staleBitmaps = h.bitmaps !== undefined && !(h.autoclearFeatures & C.AUTOCLEAR_BITMAPS);
    if (!(h.autoclearFeatures & ~C.AUTOCLEAR_MASK) && !staleBitmaps) return;
    const next: Qcow2Header = {
      ...h,
      autoclearFeatures: h.autoclearFeatures & C.AUTOCLEAR_MASK,
      featureNames: C.QEMU_FEATURE_NAMES.map((f) => ({ ...f })),
    };
    if (staleBitmaps) delete next.bitmaps;
    const bytes = encodeHeader(next);
    const cluster = new Uint8Array(Math.min(this.cs, Math.max(bytes.length, this.fileSize)));
    cluster.set(bytes);
    await this.write(cluster, 0);
    await this.io.flush();
    Object.assign(h, next);
  }
}

// ------------------------------------------------------------------------------------------------
// Bulk reads of whole clusters (L2 tables, refcount blocks)

/** Longest single read, and reads kept in flight, when fetching many clusters. */
const MAX_RUN_BYTES = 4 << 20;
const READS_IN_FLIGHT = 8;

/**
 * Read the clusters at `offsets` (sorted, unique, cluster-aligned, inside the file, below 2^53)
 * with one read per run of adjacent clusters (up to 4 MiB), several reads in flight, into `into`
 * (the k-th cluster at k * cluster size; a new buffer when absent); `onCluster` gets each cluster
 * as a view of it. What lies past the end of the file reads as zeros.
 */
export async function readClusterRuns(
  img: CheckImage,
  offsets: readonly number[],
  onCluster: (offset: number, cluster: Uint8Array) => void,
  into?: Uint8Array,
): Promise<void> {
  const cs = img.cs;
  const maxRun = Math.max(1, Math.floor(MAX_RUN_BYTES / cs));
  let buf = into;
  if (!buf || buf.length < offsets.length * cs) {
    try {
      buf = new Uint8Array(offsets.length * cs);
    } catch {
      throw new CheckFailure('ENOMEM');
    }
  }
  const dest = buf;
  const runs: Array<{ start: number; count: number; at: number }> = [];
  for (let k = 0; k < offsets.length; k++) {
    const off = offsets[k]!;
    const last = runs[runs.length - 1];
    if (last && last.start + last.count * cs === off && last.count < maxRun) last.count++;
    else runs.push({ start: off, count: 1, at: k * cs });
  }
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < runs.length) {
      const run = runs[next++]!;
      const view = dest.subarray(run.at, run.at + run.count * cs);
      try {
        await readInto(img.io, view, run.start);
      } catch (e) {
        next = runs.length; // no new reads
        throw e;
      }
      for (let k = 0; k < run.count; k++) onCluster(run.start + k * cs, view.subarray(k * cs, (k + 1) * cs));
    }
  };
  const workers: Promise<void>[] = [];
  for (let w = 0; w < Math.min(READS_IN_FLIGHT, runs.length); w++) workers.push(worker());
  // Every read has ended before this returns, even when one failed (the buffer may be reused).
  const done = await Promise.allSettled(workers);
  for (const d of done) if (d.status === 'rejected') throw d.reason;
}
