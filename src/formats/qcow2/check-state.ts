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
import { CheckFailure, getPacked, hexAlt, masked, setPacked, type CheckLog } from './check-base.js';
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
  private blocks = new Map<number, Uint8Array>();
  private dirtyBlocks = new Set<number>();

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
    const dv = new DataView(this.reftable.buffer, this.reftable.byteOffset);
    return { hi: dv.getUint32(i * 8), lo: dv.getUint32(i * 8 + 4) };
  }

  /** Refcount block offset of reftable entry `i` (REFT_OFFSET_MASK, i.e. including the high bits). */
  refblockOffset(i: number): number | bigint {
    const { hi, lo } = this.reftableEntry(i);
    return masked(hi, lo, 0xffffffff, 0xfffffe00);
  }

  /** Replace the reftable (after a rebuild). */
  setReftable(offset: number, raw: Uint8Array): void {
    this.reftableOffset = offset;
    this.reftable = raw;
    this.reftableSize = raw.length / 8;
    this.blocks.clear();
    this.dirtyBlocks.clear();
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
    let block = this.blocks.get(off);
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
    }
    return { block, offset: off };
  }

  /** Stored refcount of `cluster`. Throws CheckFailure('EIO') when it cannot be read. */
  async getRefcount(cluster: number): Promise<number> {
    const b = await this.blockFor(cluster);
    if (!b) return 0;
    return getPacked(b.block, cluster % this.rbSize, this.refcountOrder);
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
    for (const off of dirty) await this.write(this.blocks.get(off)!, off);
    if (dirty.length) await this.io.flush();
  }

  dropRefcountCache(): void {
    this.blocks.clear();
    this.dirtyBlocks.clear();
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
