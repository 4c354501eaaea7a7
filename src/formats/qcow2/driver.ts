/**
 * The qcow2 BlockDriver: opens an image (header, extensions, L1, snapshots, backing, data file)
 * and serves reads and block status through the cluster map.
 */
import { pushExtent as push } from '../../core/extents.js';
import type { BlockDriver, DriverInfo, Extent, OpenOptions } from '../../core/block-driver.js';
import { readFully, readInto, type ByteIO, type IOProvider } from '../../core/byte-io.js';
import { QcowError } from '../../core/errors.js';
import { codecs } from '../../codecs/registry.js';
import * as C from './constants.js';
import { decodeExtensions, decodeHeader, encodeHeader, validateHeader, type Qcow2Header } from './header.js';
import { L2Cache } from './l2-cache.js';
import { ClusterMap, CorruptionError, corruption, geometry, type Geometry, type Mapping } from './cluster-map.js';
import { readSnapshotTable, type SnapshotEntry } from './snapshot-table.js';
import { Qcow2Writer } from './writer.js';
import { Refcounts } from './refcount.js';
import { CRYPT_SECTOR, type DataCipher } from './data-cipher.js';
import { encryptionLockedError, openDataCipher, qcow2EncryptInfo } from '../crypto/qcow2.js';
import { bitmapFlagNames, decodeBitmapDirectory, type BitmapDirectoryEntry } from './bitmap-directory.js';
import { AUTOCLEAR_BITMAPS } from './constants.js';
import { Bitmaps } from './bitmaps.js';
import { repairDirty } from './check.js';
import { resizeQcow2Image } from './resize.js';
import { moveActiveL1 } from './table-resize.js';

export interface Qcow2OpenOptions extends OpenOptions {
  readOnly: boolean;
  provider: IOProvider;
  openBacking: (name: string, format: string | undefined) => Promise<BlockDriver>;
}

/** Largest extent list blockStatus returns per call (callers loop). */
const MAX_EXTENTS_PER_CALL = 8192;
/** Compressed clusters of one read being inflated at once. */
const INFLATE_IN_FLIGHT = 4;

export class Qcow2Driver implements BlockDriver {
  readonly format = 'qcow2';
  readonly readOnly: boolean;
  size: number;
  backing?: BlockDriver;
  readonly header: Qcow2Header;
  readonly g: Geometry;
  snapshots: SnapshotEntry[];
  /** Set when reading an internal snapshot's content instead of the active state. */
  readonly activeSnapshot?: SnapshotEntry;
  protected map: ClusterMap;
  protected l2cache: L2Cache;
  protected io: ByteIO;
  protected dataIO: ByteIO;
  protected fileSize: number;

  protected constructor(init: {
    io: ByteIO;
    dataIO: ByteIO;
    header: Qcow2Header;
    g: Geometry;
    l1: Uint8Array;
    snapshots: SnapshotEntry[];
    size: number;
    readOnly: boolean;
    fileSize: number;
    activeSnapshot?: SnapshotEntry;
  }) {
    this.io = init.io;
    this.dataIO = init.dataIO;
    this.header = init.header;
    this.g = init.g;
    this.snapshots = init.snapshots;
    this.size = init.size;
    this.readOnly = init.readOnly;
    this.fileSize = init.fileSize;
    this.activeSnapshot = init.activeSnapshot;
    this.l2cache = new L2Cache((off, len) => this.loadMetadata(off, len, 'L2 table'), this.g.clusterSize);
    this.map = new ClusterMap(this.g, init.l1, this.l2cache);
  }

  static async open(io: ByteIO, opts: Qcow2OpenOptions): Promise<Qcow2Driver> {
    if (!opts.readOnly && (await isDirtyV3(io))) {
      // Like QEMU: a read-write open of an image left dirty (lazy refcounts, interrupted
      // metadata update) first rebuilds its refcounts and COPIED flags.
      await repairDirty(io, {});
    }
    const fileSize = await io.size();
    // Bytes past the end of a short file read as zeros, as QEMU reads them.
    if (fileSize < 8) throw new QcowError('ECORRUPT', 'Image is not in qcow2 format');
    const head = new Uint8Array(C.V3_HEADER_LENGTH_WITH_COMPRESSION);
    await readInto(io, head, 0);
    let header = decodeHeader(head);
    const clusterSize = 2 ** header.clusterBits;
    const cluster0 = new Uint8Array(clusterSize);
    await readInto(io, cluster0, 0);
    header = decodeHeader(cluster0);
    decodeExtensions(header, cluster0);
    validateHeader(header, { readOnly: opts.readOnly });
    // Encryption (src/formats/crypto): parse the LUKS header / legacy AES, unlock with encrypt.key-secret.
    const cipher = await openDataCipher(header, io, opts);
    const hasDataFile = (header.incompatibleFeatures & C.INCOMPAT_DATA_FILE) !== 0n;
    const g = geometry(header.clusterBits, (header.incompatibleFeatures & C.INCOMPAT_EXTL2) !== 0n, hasDataFile);

    // Tables must lie inside the file.
    const inFile = (off: number, len: number) => off + len <= fileSize;
    if (!inFile(header.l1TableOffset, header.l1Size * 8)) throw new QcowError('ECORRUPT', 'Active L1 table is past the end of the file');
    if (!inFile(header.refcountTableOffset, header.refcountTableClusters * clusterSize)) {
      throw new QcowError('ECORRUPT', 'Reference count table is past the end of the file');
    }
    if (header.nbSnapshots && !inFile(header.snapshotsOffset, header.nbSnapshots * 40)) {
      throw new QcowError('ECORRUPT', 'Snapshot table is past the end of the file');
    }
    const snapshots = await readSnapshotTable(
      (off, len) => readFully(io, off, len),
      header.snapshotsOffset,
      header.nbSnapshots,
      { version: header.version, fileSize },
    );

    let l1Offset = header.l1TableOffset;
    let l1Size = header.l1Size;
    let size = header.size;
    let activeSnapshot: SnapshotEntry | undefined;
    if (opts.snapshot) {
      const want = opts.snapshot;
      activeSnapshot =
        (want.id !== undefined ? snapshots.find((s) => s.id === want.id && (want.name === undefined || s.name === want.name)) : undefined) ??
        (want.id === undefined && want.name !== undefined ? snapshots.find((s) => s.id === want.name) ?? snapshots.find((s) => s.name === want.name) : undefined);
      if (!activeSnapshot) {
        throw new QcowError('ENOENT', `Failed to load snapshot: Can't find snapshot`);
      }
      if (activeSnapshot.l1Size > C.QCOW_MAX_L1_SIZE / 8) throw new QcowError('ECORRUPT', 'Snapshot L1 table too large');
      if (activeSnapshot.l1TableOffset % clusterSize !== 0) throw new QcowError('ECORRUPT', 'Snapshot L1 table offset invalid');
      if (!inFile(activeSnapshot.l1TableOffset, activeSnapshot.l1Size * 8)) {
        throw new QcowError('ECORRUPT', 'Snapshot L1 table is past the end of the file');
      }
      l1Offset = activeSnapshot.l1TableOffset;
      l1Size = activeSnapshot.l1Size;
      // Like QEMU's temporary snapshot load, the virtual size stays the image's current size;
      // ranges past the snapshot's L1 table read as unallocated.
      size = header.size;
    }
    const l1 = await readFully(io, l1Offset, l1Size * 8);
    let bitmaps: BitmapDirectoryEntry[] = [];
    if (header.bitmaps && header.autoclearFeatures & AUTOCLEAR_BITMAPS) {
      const b = header.bitmaps;
      if (!inFile(b.directoryOffset, b.directorySize)) throw new QcowError('ECORRUPT', 'Bitmap directory is past the end of the file');
      bitmaps = decodeBitmapDirectory(await readFully(io, b.directoryOffset, b.directorySize), b.nbBitmaps, clusterSize);
    }

    let dataIO = io;
    let dataFileOpened = false;
    if (hasDataFile) {
      const name = opts.dataFile ?? header.dataFile;
      if (name !== undefined) {
        try {
          dataIO = await opts.provider.open(opts.dataFile ? name : opts.provider.resolve(io.name, name), { readOnly: opts.readOnly });
          dataFileOpened = true;
        } catch (e) {
          // Metadata-only opens (info, like qemu-img's no-I/O open) work without the data file.
          if (!opts.noBacking || !opts.readOnly) throw e;
        }
      } else if (!opts.readOnly) {
        throw new QcowError('EINVAL', "'data-file' is required for this image");
      }
    }

    const drv = new Qcow2Driver({
      io,
      dataIO,
      header,
      g,
      l1,
      snapshots,
      size,
      readOnly: opts.readOnly || activeSnapshot !== undefined,
      fileSize,
      activeSnapshot,
    });
    drv.dataFileMissing = hasDataFile && !dataFileOpened;
    drv.bitmaps = bitmaps;
    drv.cipher = cipher; // encryption: set before the writer is created
    try {
      if (!drv.readOnly) {
        drv.writer = await Qcow2Writer.create({
          io,
          dataIO,
          header,
          g,
          map: drv.map,
          l2cache: drv.l2cache,
          get hasBacking() {
            return header.backingFile !== undefined;
          },
          get cipher() {
            return drv.cipher;
          },
          onGuestWrite: async (off, len) => {
            if (drv.bitmaps.length) await drv.bitmapOps().markDirty(off, len);
          },
          beforeClose: async () => {
            if (drv.bitmapTracker) await drv.bitmapTracker.saveDirty();
          },
          readGuest: async (buf, off) => {
            // Copy-on-write may cover the tail of the last cluster, past the virtual size.
            const n = Math.max(0, Math.min(buf.length, drv.size - off));
            if (n) await drv.readInto(buf.subarray(0, n), off);
            buf.fill(0, n);
          },
        });
      }
      if (header.backingFile !== undefined && !opts.noBacking) {
        const name = opts.provider.resolve(io.name, header.backingFile);
        try {
          drv.backing = await opts.openBacking(name, header.backingFormat);
        } catch (e) {
          const msg = e instanceof Error ? e.message : String(e);
          throw new QcowError(e instanceof QcowError ? e.code : 'EIO', `Could not open backing file: ${msg}`);
        }
      }
    } catch (e) {
      if (dataFileOpened) await dataIO.close().catch(() => {});
      throw e;
    }
    return drv;
  }

  dataFileMissing = false;
  /** Set when the image is encrypted and unlocked: data clusters pass through it. */
  cipher?: DataCipher;
  /** Persistent dirty bitmaps (empty when the bitmaps extension is absent or not consistent). */
  bitmaps: BitmapDirectoryEntry[] = [];
  bitmapTracker?: Bitmaps;

  /** Bitmap management (add/remove/clear/enable/disable/merge) and write tracking. */
  bitmapOps(): Bitmaps {
    this.bitmapTracker ??= new Bitmaps(this);
    return this.bitmapTracker;
  }

  get filename(): string {
    return this.io.name;
  }

  /** Read metadata that must lie inside the image file. */
  protected async loadMetadata(offset: number, length: number, what: string): Promise<Uint8Array> {
    if (offset + length > this.fileSize) {
      const end = await this.io.size();
      this.fileSize = end;
      if (offset + length > end) throw corruption(`${what} at offset 0x${offset.toString(16)} is past the end of the file`);
    }
    return readFully(this.io, offset, length);
  }

  private checkRange(offset: number, length: number) {
    if (!Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new QcowError('EINVAL', `Request [${offset}, +${length}) is past the end of '${this.filename}' (${this.size} bytes)`);
    }
  }

  private checkDataAccess() {
    if (this.header.cryptMethod !== C.CRYPT_NONE && !this.cipher) {
      throw encryptionLockedError(this.filename); // encrypted, opened without a key
    }
    if (this.dataFileMissing) throw new QcowError('EINVAL', "'data-file' is required for this image");
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const buf = new Uint8Array(length);
    await this.readInto(buf, offset);
    return buf;
  }

  async readInto(buf: Uint8Array, offset: number): Promise<void> {
    this.checkRange(offset, buf.length);
    this.checkDataAccess();
    const pending: Promise<void>[] = [];
    const compressed: Array<{ m: Mapping; sub: Uint8Array; guest: number }> = [];
    let pos = 0;
    while (pos < buf.length) {
      const m = await this.map.lookup(offset + pos, buf.length - pos);
      const sub = buf.subarray(pos, pos + m.bytes);
      if (m.type === 'compressed') compressed.push({ m, sub, guest: offset + pos });
      else pending.push(this.readMapped(m, sub, offset + pos));
      pos += m.bytes;
    }
    if (compressed.length) pending.push(this.readCompressedBatch(compressed));
    await Promise.all(pending);
  }

  /**
   * Compressed clusters written together lie together in the file: read neighbouring ones with one
   * request, then inflate each.
   */
  private async readCompressedBatch(items: Array<{ m: Mapping; sub: Uint8Array; guest: number }>): Promise<void> {
    const sorted = [...items].sort((a, b) => a.m.compressed!.offset - b.m.compressed!.offset);
    const MAX_GROUP = 4 << 20;
    const GAP = 64 << 10;
    for (let i = 0; i < sorted.length; ) {
      const start = sorted[i]!.m.compressed!.offset;
      let end = start + sorted[i]!.m.compressed!.length;
      let j = i + 1;
      while (j < sorted.length) {
        const c = sorted[j]!.m.compressed!;
        if (c.offset > end + GAP || c.offset + c.length - start > MAX_GROUP) break;
        end = Math.max(end, c.offset + c.length);
        j++;
      }
      if (start >= this.fileSize) this.fileSize = await this.io.size();
      if (start >= this.fileSize) throw corruption(`compressed cluster at offset 0x${start.toString(16)} is past the end of the file`);
      const chunk = new Uint8Array(Math.min(end, this.fileSize) - start);
      await readInto(this.io, chunk, start);
      // Inflate a few at a time (the codec may run them on other threads); a whole cluster
      // asked for is inflated straight into the caller's buffer.
      const first = i;
      let next = i;
      const one = async (): Promise<void> => {
        for (let k = next++; k < j; k = next++) {
          const { m, sub, guest } = sorted[k]!;
          const c = m.compressed!;
          const input = chunk.subarray(c.offset - start, Math.min(c.offset - start + c.length, chunk.length));
          const inCluster = guest % this.g.clusterSize;
          const whole = inCluster === 0 && sub.length === this.g.clusterSize;
          const cluster = await this.decompress(input, c.offset, whole ? sub : undefined);
          if (cluster !== sub) sub.set(cluster.subarray(inCluster, inCluster + sub.length));
        }
      };
      await Promise.all(Array.from({ length: Math.min(INFLATE_IN_FLIGHT, j - first) }, one));
      i = j;
    }
  }

  private async readMapped(m: Mapping, sub: Uint8Array, guestOffset: number): Promise<void> {
    switch (m.type) {
      case 'normal':
        if (this.cipher) await this.readEncrypted(sub, m.hostOffset!, guestOffset);
        else await readInto(this.dataIO, sub, m.hostOffset!);
        return;
      case 'zero-plain':
      case 'zero-alloc':
        sub.fill(0);
        return;
      case 'unallocated':
      case 'unallocated-alloc':
        await this.readBacking(sub, guestOffset);
        return;
      case 'compressed':
        await this.readCompressedBatch([{ m, sub, guest: guestOffset }]);
        return;
      case 'invalid':
        throw corruption(m.problem ?? 'invalid cluster entry');
    }
  }

  /** Read whole sectors around the range, decrypt them, copy out the part asked for. */
  private async readEncrypted(sub: Uint8Array, host: number, guest: number): Promise<void> {
    const head = host % CRYPT_SECTOR;
    const len = Math.ceil((head + sub.length) / CRYPT_SECTOR) * CRYPT_SECTOR;
    const buf = head === 0 && len === sub.length ? sub : new Uint8Array(len);
    await readInto(this.dataIO, buf, host - head);
    await this.cipher!.decrypt(buf, host - head, guest - head);
    if (buf !== sub) sub.set(buf.subarray(head, head + sub.length));
  }

  protected async readBacking(sub: Uint8Array, guestOffset: number): Promise<void> {
    const b = this.backing;
    if (!b || guestOffset >= b.size) {
      sub.fill(0);
      return;
    }
    const n = Math.min(sub.length, b.size - guestOffset);
    await b.readInto(n === sub.length ? sub : sub.subarray(0, n), guestOffset);
    if (n < sub.length) sub.fill(0, n);
  }

  /** One compressed cluster's bytes; `out` (a cluster long) may receive them (and is then returned). */
  protected async decompress(input: Uint8Array, coffset: number, out?: Uint8Array): Promise<Uint8Array> {
    const cs = this.g.clusterSize;
    try {
      return this.header.compressionType === C.COMPRESSION_ZSTD
        ? await codecs().zstdDecompress(input, cs)
        : await codecs().inflateRaw(input, cs, out);
    } catch (e) {
      if (e instanceof QcowError && e.code === 'ENOTSUP') throw e;
      throw new QcowError('EIO', `Input/output error: could not decompress the cluster at host offset 0x${coffset.toString(16)}`);
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.checkRange(offset, length);
    const out: Extent[] = [];
    const file = this.dataIO.name;
    const encrypted = this.header.cryptMethod !== C.CRYPT_NONE;
    let pos = offset;
    const end = offset + length;
    while (pos < end && out.length < MAX_EXTENTS_PER_CALL) {
      const m = await this.map.lookup(pos, end - pos);
      const plainHost = !encrypted && m.hostOffset !== undefined ? { hostOffset: m.hostOffset, file } : {};
      switch (m.type) {
        case 'normal':
          if (!encrypted && (await this.detectMetadataPreallocation())) {
            for (const e of await this.splitByHostHoles(pos, m.bytes, m.hostOffset!)) push(out, e);
          } else push(out, { offset: pos, length: m.bytes, kind: 'data', depth: 0, ...plainHost });
          break;
        case 'compressed':
          push(out, { offset: pos, length: m.bytes, kind: 'data', depth: 0 });
          break;
        case 'zero-plain':
        case 'zero-alloc':
          push(out, { offset: pos, length: m.bytes, kind: 'zero', depth: 0, ...plainHost });
          break;
        case 'unallocated':
        case 'unallocated-alloc':
          for (const e of await this.backingStatus(pos, m.bytes)) {
            push(out, e.depth === 0 && m.hostOffset !== undefined && !encrypted ? { ...e, hostOffset: m.hostOffset + (e.offset - pos), file } : e);
          }
          break;
        case 'invalid':
          throw corruption(m.problem ?? 'invalid cluster entry');
      }
      pos += m.bytes;
    }
    return out;
  }

  private metadataPrealloc?: Promise<boolean>;

  /**
   * Like QEMU: when far more clusters are refcounted than the file really stores, the image was
   * preallocated with metadata only, and data extents are checked against the file's holes
   * (which then read as zeros).
   */
  private detectMetadataPreallocation(): Promise<boolean> {
    if (!this.metadataPrealloc) {
      this.metadataPrealloc = (async () => {
        const io = this.io;
        if (!io.allocatedSize || !this.dataIO.dataRuns) return false;
        const cs = this.g.clusterSize;
        const fileLength = await io.size();
        const realClusters = Math.floor((await io.allocatedSize()) / cs);
        const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
        const endCluster = Math.ceil(fileLength / cs);
        const rc = await Refcounts.load({
          io,
          clusterBits: this.header.clusterBits,
          refcountOrder: this.header.refcountOrder,
          reftableOffset: this.header.refcountTableOffset,
          reftableClusters: this.header.refcountTableClusters,
          onReftableMoved: async () => {},
        });
        return (await rc.countInUse(endCluster, threshold)) >= threshold;
      })().catch(() => false);
    }
    return this.metadataPrealloc;
  }

  /** Split a plain data run by the holes of the file holding it (holes and past-EOF read as zeros). */
  private async splitByHostHoles(offset: number, length: number, host: number): Promise<Extent[]> {
    const file = this.dataIO.name;
    const runs = await this.dataIO.dataRuns!(host, length);
    if (!runs) return [{ offset, length, kind: 'data', depth: 0, hostOffset: host, file }];
    return runs.map((r) => ({
      offset: offset + (r.offset - host),
      length: r.length,
      kind: 'data' as const,
      depth: 0,
      hostOffset: r.offset,
      file,
      ...(r.data ? {} : { zeroData: true }),
    }));
  }

  /** Status of a range this image does not allocate: from the backing chain, or unallocated here. */
  private async backingStatus(offset: number, length: number): Promise<Extent[]> {
    const b = this.backing;
    if (!b || offset >= b.size) return [{ offset, length, kind: 'unallocated', depth: 0 }];
    const out: Extent[] = [];
    const inBacking = Math.min(length, b.size - offset);
    let pos = offset;
    while (pos < offset + inBacking) {
      const ext = await b.blockStatus(pos, offset + inBacking - pos);
      for (const e of ext) out.push({ ...e, depth: e.depth + 1 });
      pos = ext[ext.length - 1]!.offset + ext[ext.length - 1]!.length;
    }
    if (inBacking < length) out.push({ offset: offset + inBacking, length: length - inBacking, kind: 'unallocated', depth: 0 });
    return out;
  }

  writer?: Qcow2Writer;

  private writable(offset: number, length: number): Qcow2Writer {
    this.checkRange(offset, length);
    if (!this.writer) throw new QcowError('EPERM', `Image '${this.filename}' is opened read-only`);
    this.checkDataAccess();
    return this.writer;
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    if (data.length) await this.guard(this.writable(offset, data.length).write(offset, data));
  }
  async writeZeroes(offset: number, length: number, opts?: { mayUnmap?: boolean }): Promise<void> {
    if (length) await this.guard(this.writable(offset, length).writeZeroes(offset, length, opts?.mayUnmap ?? false));
  }
  async discard(offset: number, length: number): Promise<void> {
    if (length) await this.guard(this.writable(offset, length).discard(offset, length));
  }

  /**
   * A corruption found while writing marks the image corrupt (incompatible bit 1) and stops
   * further writes, as QEMU does; `check -r all` repairs it.
   */
  private async guard(p: Promise<void>): Promise<void> {
    try {
      await p;
    } catch (e) {
      if (e instanceof CorruptionError && this.writer) {
        const w = this.writer;
        this.writer = undefined;
        this.header.incompatibleFeatures |= C.INCOMPAT_CORRUPT;
        await w.writeHeaderFeatures().catch(() => {});
        await this.io.flush().catch(() => {});
        throw new QcowError(
          'EIO',
          `Marking image as corrupt: ${e.detail}; further writes are refused. Repair it with 'qcowkit check -r all ${this.filename}'`,
        );
      }
      throw e;
    }
  }

  /** Make the image empty: every cluster is released and reads fall through to the backing file. */
  async makeEmpty(): Promise<void> {
    if (!this.writer) throw new QcowError('EPERM', `Image '${this.filename}' is opened read-only`);
    await this.writer.makeEmpty();
  }

  /**
   * Point the image at a new backing file (or none): the header cluster is rewritten in one write
   * (header, extensions, name), as `rebase -u` and `commit` need.
   */
  async setBackingFile(name: string | undefined, format: string | undefined): Promise<void> {
    if (name !== undefined && new TextEncoder().encode(name).length > C.MAX_BACKING_FILE_NAME) {
      throw new QcowError('EINVAL', 'Backing file name too long');
    }
    await this.rewriteHeader({ ...this.header, backingFile: name || undefined, backingFormat: name ? format : undefined });
  }

  /**
   * Replace the header (fixed fields, extensions, backing name) with `next`, written in one
   * request after everything else is durable. Used by rebase, amend and bitmap changes.
   */
  async rewriteHeader(next: Qcow2Header): Promise<void> {
    if (!this.writer) throw new QcowError('EPERM', `Image '${this.filename}' is opened read-only`);
    await this.writer.exclusive(() => this.rewriteHeaderLocked(next));
  }

  /** rewriteHeader for callers already holding the writer's lock. */
  async rewriteHeaderLocked(next: Qcow2Header): Promise<void> {
    if (!this.writer) throw new QcowError('EPERM', `Image '${this.filename}' is opened read-only`);
    const bytes = encodeHeader({ ...next });
    await this.writer.flushMetadata();
    // Zero what the old header occupied beyond the new one (stale extension bytes).
    const oldLen = encodeHeader({ ...this.header }).length;
    const out = oldLen > bytes.length ? new Uint8Array(oldLen) : bytes;
    if (out !== bytes) out.set(bytes);
    await this.rawWrite(out, 0);
    await this.writer.barrier();
    Object.assign(this.header, next);
    // encodeHeader placed the backing name: keep the in-memory offsets in step.
    encodeHeader(this.header);
  }

  /** Store a compressed cluster (data already compressed with the image's compression type). */
  /**
   * Store a compressed cluster at `offset`. An empty one (QEMU's end of a compressed copy) only
   * rounds the file's length up to whole 512-byte sectors, as QEMU does.
   */
  async writeCompressed(offset: number, compressed: Uint8Array): Promise<void> {
    if (compressed.length === 0) return this.writable(0, 0).alignFileEnd();
    if (this.header.cryptMethod !== C.CRYPT_NONE) throw new QcowError('ENOTSUP', 'Compression and encryption not supported at the same time');
    if (offset % this.g.clusterSize) throw new QcowError('EINVAL', 'Compressed writes must be cluster aligned');
    await this.writable(offset, Math.min(this.g.clusterSize, this.size - offset)).writeCompressed(offset, compressed);
  }
  async flush(): Promise<void> {
    if (this.writer) await this.writer.flush();
  }

  /** The active L1 table bytes (big-endian entries). */
  get activeL1(): Uint8Array {
    return this.map.l1;
  }

  /** Read metadata that must lie inside the file (for structure walkers such as snapshots). */
  readMetadata(offset: number, length: number, what: string): Promise<Uint8Array> {
    return this.loadMetadata(offset, length, what);
  }

  /** Bytes of the image file as they are on disk (metadata writers checking before a switch). */
  readImageBytes(offset: number, length: number): Promise<Uint8Array> {
    return readFully(this.io, offset, length);
  }

  /** With a raw external data file (data_file_raw), the data file grows with the virtual size. */
  async growRawDataFile(size: number): Promise<void> {
    if (!this.g.dataFile || this.dataIO === this.io || !(this.header.autoclearFeatures & C.AUTOCLEAR_DATA_FILE_RAW)) return;
    if ((await this.dataIO.size()) < size) await this.dataIO.truncate(size);
  }

  /** Current length of the image file. */
  fileLength(): Promise<number> {
    return this.io.size();
  }

  /**
   * After a header write switched to metadata built beside the old (amend refcount_bits, v2
   * snapshot operations): load the new refcount structures, take the new active L1 table if
   * given, and forget every cached L2 slice (their clusters may hold other tables now).
   */
  async reloadMetadata(l1?: Uint8Array): Promise<void> {
    await this.writer?.reloadRefcounts();
    if (l1) this.map.l1 = l1;
    this.l2cache.clear();
  }

  /** Write raw bytes into the image file (metadata writers only). */
  async rawWrite(data: Uint8Array, offset: number): Promise<void> {
    await this.io.write(data, offset);
    if (offset + data.length > this.fileSize) this.fileSize = offset + data.length;
  }

  /**
   * Replace the active L1 table's content (snapshot apply) and the virtual size. A larger table is
   * written to new clusters before the header points to it. Entries are written durably before
   * returning. COPIED flags are the caller's to recompute.
   */
  async replaceActiveL1(entries: Uint8Array, newSize: number): Promise<void> {
    const w = this.writer!;
    const h = this.header;
    const needed = Math.max(entries.length / 8, Math.ceil(newSize / this.g.l1Coverage));
    if (needed > h.l1Size) {
      const l1 = new Uint8Array(needed * 8);
      l1.set(entries);
      await moveActiveL1(w, l1);
    } else {
      const l1 = new Uint8Array(h.l1Size * 8);
      l1.set(entries);
      await this.rawWrite(l1, h.l1TableOffset);
      await w.barrier();
      this.map.l1 = l1;
    }
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(newSize));
    await this.rawWrite(b, 24);
    await w.barrier();
    h.size = newSize;
    this.size = newSize;
  }

  /** Change the virtual size (qemu-img resize): see resize.ts. */
  async resize(newSize: number): Promise<void> {
    return resizeQcow2Image(this, newSize);
  }

  async close(): Promise<void> {
    if (this.writer) await this.writer.close();
    if (this.backing) await this.backing.close();
    if (this.dataIO !== this.io) await this.dataIO.close();
    await this.io.close();
  }

  info(): DriverInfo {
    const h = this.header;
    const v3 = h.version === 3;
    const data: Record<string, unknown> = {
      compat: v3 ? '1.1' : '0.10',
      'compression-type': h.compressionType === C.COMPRESSION_ZSTD ? 'zstd' : 'zlib',
    };
    if (v3) data['lazy-refcounts'] = (h.compatibleFeatures & C.COMPAT_LAZY_REFCOUNTS) !== 0n;
    if (this.bitmaps.length) {
      data.bitmaps = this.bitmaps.map((b) => ({ flags: bitmapFlagNames(b.flags), name: b.name, granularity: 2 ** b.granularityBits }));
    }
    data['refcount-bits'] = 2 ** h.refcountOrder;
    if (v3) {
      data.corrupt = (h.incompatibleFeatures & C.INCOMPAT_CORRUPT) !== 0n;
      data['extended-l2'] = this.g.extendedL2;
      if (h.dataFile !== undefined) data['data-file'] = h.dataFile;
      if (h.incompatibleFeatures & C.INCOMPAT_DATA_FILE) data['data-file-raw'] = (h.autoclearFeatures & C.AUTOCLEAR_DATA_FILE_RAW) !== 0n;
    }
    const encrypt = qcow2EncryptInfo(h); // encryption: format aes, or the LUKS header details
    if (encrypt) data.encrypt = encrypt;
    return {
      clusterSize: this.g.clusterSize,
      dirty: (h.incompatibleFeatures & C.INCOMPAT_DIRTY) !== 0n,
      encrypted: h.cryptMethod !== C.CRYPT_NONE || undefined,
      backingFilename: h.backingFile,
      backingFormat: h.backingFormat,
      snapshots: this.snapshots.map((s) => ({
        id: s.id,
        name: s.name,
        vmStateSize: s.vmStateSize,
        dateSec: s.dateSec,
        dateNsec: s.dateNsec,
        vmClockNsec: s.vmClockNsec,
        icount: s.icount < 0 ? undefined : s.icount,
        diskSize: s.diskSize,
      })),
      formatSpecific: { type: 'qcow2', data },
    };
  }

  async actualSize(): Promise<number | undefined> {
    // qemu-img 7.2 counts the qcow2 file only, not an external data file.
    return this.io.allocatedSize ? this.io.allocatedSize() : undefined;
  }
}

/** Whether the file is a v3 qcow2 image with the dirty bit set (read before full parsing). */
async function isDirtyV3(io: ByteIO): Promise<boolean> {
  const head = new Uint8Array(80);
  await readInto(io, head, 0);
  const dv = new DataView(head.buffer);
  return dv.getUint32(0) === C.QCOW_MAGIC && dv.getUint32(4) === 3 && (dv.getBigUint64(72) & C.INCOMPAT_DIRTY) !== 0n;
}
