/**
 * The qcow (version 1) BlockDriver: two-level L1/L2 mapping, normal and compressed clusters,
 * unallocated clusters read from the backing file (whose format is probed: qcow v1 stores none).
 *
 * Writes append at the end of the file like QEMU (clusters and L2 tables at the end of the file
 * rounded up to the cluster size, compressed clusters at the end rounded up to 512 bytes); L1 entries
 * are updated in place. Metadata changes are kept in memory (dirty L2 tables never leave the cache)
 * and written by flush in crash-safe order: data, barrier, L2 tables, barrier, L1 entries, barrier.
 * A crash therefore loses at most the writes since the last flush and leaves only unreferenced
 * space behind (qcow has no refcounts, so that is harmless).
 *
 * Legacy AES encryption (crypt_method 1, src/formats/crypto/legacy-aes.ts): normal clusters hold
 * AES-128-CBC sectors keyed by the guest sector number; compressed clusters are never encrypted
 * (QEMU cannot make both). Opened with `encrypt.key-secret`; a read-only open without it works for
 * `info` and refuses data access.
 */
import { pushExtent as push } from '../../core/extents.js';
import type { BlockDriver, DriverInfo, Extent, OpenOptions } from '../../core/block-driver.js';
import { readFully, readInto, type ByteIO, type IOProvider } from '../../core/byte-io.js';
import { QcowError } from '../../core/errors.js';
import { alignUp } from '../../core/util.js';
import { codecs } from '../../codecs/registry.js';
import {
  QCOW_CRYPT_NONE,
  QCOW_HEADER_SIZE,
  decodeBackingName,
  decodeL2Entry,
  decodeQcowHeader,
  encodeCompressedEntry,
  encodeOffsetEntry,
  validateQcowHeader,
  type QcowGeometry,
  type QcowHeader,
} from './header.js';
import { QcowL2Cache } from './l2-cache.js';
import type { DataCipher } from '../qcow2/data-cipher.js';
import { openLegacyAes } from '../crypto/legacy-aes.js';
import { encryptionLockedError } from '../crypto/qcow2.js';

export interface QcowOpenOptions extends OpenOptions {
  readOnly: boolean;
  provider: IOProvider;
  /** Open the backing file; `format` is always undefined for qcow (probe it). */
  openBacking: (name: string, format: string | undefined) => Promise<BlockDriver>;
  /** Bound of the L2 table cache in bytes (default 16 MiB; at least 8 tables are kept). */
  l2CacheBytes?: number;
}

type Mapping =
  | { type: 'unallocated'; bytes: number }
  | { type: 'normal'; bytes: number; hostOffset: number }
  | { type: 'compressed'; bytes: number; coffset: number; clen: number };

/** Largest extent list blockStatus returns per call (callers loop). */
const MAX_EXTENTS_PER_CALL = 8192;
/** Largest single write request issued to the file when coalescing clusters. */
const MAX_WRITE_BYTES = 16 << 20;
/** Zero buffer reused by writeZeroes (never modified). */
const ZERO_CHUNK = 1 << 20;
/** Decompressed clusters kept for small sequential reads of one compressed cluster. */
const DECOMPRESSED_CACHE = 8;
const TWO32 = 0x100000000;
const SECTOR = 512;

function corruption(msg: string): QcowError {
  return new QcowError('EIO', `Image is corrupt: ${msg}`);
}

const hex = (n: number) => `0x${n.toString(16)}`;

export class QcowDriver implements BlockDriver {
  readonly format = 'qcow';
  readonly readOnly: boolean;
  readonly size: number;
  backing?: BlockDriver;
  readonly header: QcowHeader;
  readonly g: QcowGeometry;
  readonly backingFile?: string;
  private io: ByteIO;
  /** L1 table as raw big-endian bytes (kept current in memory). */
  private l1: Uint8Array;
  private l1dv: DataView;
  private l1Dirty = new Set<number>();
  private cache: QcowL2Cache;
  /** End of the file including space reserved for tables not written yet; allocations go here. */
  private eof: number;
  private lock: Promise<void> = Promise.resolve();
  private decompressed = new Map<number, Promise<Uint8Array>>();
  private closed = false;
  /** Legacy AES: set when the image is encrypted and was opened with its key. */
  private cipher?: DataCipher;

  private constructor(init: {
    io: ByteIO;
    header: QcowHeader;
    g: QcowGeometry;
    l1: Uint8Array;
    backingFile?: string;
    readOnly: boolean;
    fileSize: number;
    l2CacheBytes?: number;
  }) {
    this.io = init.io;
    this.header = init.header;
    this.g = init.g;
    this.l1 = init.l1;
    this.l1dv = new DataView(init.l1.buffer, init.l1.byteOffset, init.l1.byteLength);
    this.backingFile = init.backingFile;
    this.readOnly = init.readOnly;
    this.size = init.g.size;
    this.eof = init.fileSize;
    this.cache = new QcowL2Cache((off) => this.loadTable(off), init.g.l2TableBytes, init.l2CacheBytes);
  }

  static async open(io: ByteIO, opts: QcowOpenOptions): Promise<QcowDriver> {
    if (opts.snapshot) {
      throw new QcowError(
        'ENOTSUP',
        "Failed to load snapshot: Block format 'qcow' used by device '' does not support temporarily loading internal snapshots",
      );
    }
    const fileSize = await io.size();
    const header = decodeQcowHeader(await readFully(io, 0, QCOW_HEADER_SIZE));
    const g = validateQcowHeader(header, fileSize);
    let backingFile: string | undefined;
    if (g.backingFileOffset && g.backingFileSize && g.backingFileOffset < fileSize) {
      backingFile = decodeBackingName(await readFully(io, g.backingFileOffset, g.backingFileSize));
    }
    // Legacy AES: the key from encrypt.key-secret (a writable open needs it, like QEMU).
    const cipher =
      g.cryptMethod !== QCOW_CRYPT_NONE
        ? openLegacyAes({
            readOnly: opts.readOnly,
            ...(opts.secrets ? { secrets: opts.secrets } : {}),
            ...(opts.keySecret !== undefined ? { keySecret: opts.keySecret } : {}),
          })
        : undefined;
    const l1 = await readFully(io, g.l1TableOffset, g.l1Size * 8);
    const drv = new QcowDriver({ io, header, g, l1, backingFile, readOnly: opts.readOnly, fileSize, l2CacheBytes: opts.l2CacheBytes });
    if (cipher) drv.cipher = cipher;
    if (backingFile !== undefined && !opts.noBacking) {
      const name = opts.provider.resolve(io.name, backingFile);
      try {
        drv.backing = await opts.openBacking(name, undefined);
      } catch (e) {
        const msg = e instanceof Error ? e.message : String(e);
        throw new QcowError(e instanceof QcowError ? e.code : 'EIO', `Could not open backing file: ${msg}`);
      }
    }
    return drv;
  }

  get filename(): string {
    return this.io.name;
  }

  get encrypted(): boolean {
    return this.g.cryptMethod !== QCOW_CRYPT_NONE;
  }

  /** Encrypted and opened without its key: data cannot be read. */
  get locked(): boolean {
    return this.encrypted && !this.cipher;
  }

  // ----------------------------------------------------------------------------------------------
  // Mapping

  private async loadTable(offset: number): Promise<Uint8Array> {
    return readFully(this.io, offset, this.g.l2TableBytes);
  }

  /** L2 table offset for L1 index `i` (0 = none), validated. */
  private l2Offset(i: number): number {
    const hi = this.l1dv.getUint32(i * 8);
    const lo = this.l1dv.getUint32(i * 8 + 4);
    if (hi === 0 && lo === 0) return 0;
    if (hi >= 0x200000) throw corruption(`L2 table offset 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} invalid (L1 index: ${i})`);
    const off = hi * TWO32 + lo;
    if (off % SECTOR !== 0) throw corruption(`L2 table offset ${hex(off)} unaligned (L1 index: ${i})`);
    if (off + this.g.l2TableBytes > this.eof) {
      throw corruption(`L2 table at offset ${hex(off)} (L1 index: ${i}) is past the end of the file`);
    }
    return off;
  }

  private async table(l1i: number): Promise<Uint8Array | undefined> {
    const off = this.l2Offset(l1i);
    return off ? this.cache.get(off) : undefined;
  }

  /** The mapping of `[offset, offset+length)` from `offset`, stopping at the end of its L2 table. */
  private async lookup(offset: number, length: number): Promise<Mapping> {
    const { clusterSize: cs, clusterBits, l1Coverage, l2Entries } = this.g;
    const l1i = Math.floor(offset / l1Coverage);
    const max = Math.min(length, (l1i + 1) * l1Coverage - offset);
    const t = await this.table(l1i);
    if (!t) return { type: 'unallocated', bytes: max };
    const dv = new DataView(t.buffer, t.byteOffset, t.byteLength);
    const ci = Math.floor(offset / cs);
    const inCluster = offset - ci * cs;
    let l2i = ci % l2Entries;
    const first = decodeL2Entry(dv.getUint32(l2i * 8), dv.getUint32(l2i * 8 + 4), clusterBits);
    let bytes = Math.min(cs - inCluster, max);
    switch (first.type) {
      case 'compressed':
        return { type: 'compressed', bytes, coffset: first.offset, clen: first.length };
      case 'unallocated':
        while (bytes < max) {
          l2i++;
          if (dv.getUint32(l2i * 8) !== 0 || dv.getUint32(l2i * 8 + 4) !== 0) break;
          bytes = Math.min(bytes + cs, max);
        }
        return { type: 'unallocated', bytes };
      case 'normal': {
        this.checkDataOffset(first.offset, ci);
        let next = first.offset + cs;
        while (bytes < max) {
          l2i++;
          const hi = dv.getUint32(l2i * 8);
          const lo = dv.getUint32(l2i * 8 + 4);
          if (hi & 0x80000000 || hi * TWO32 + lo !== next) break;
          bytes = Math.min(bytes + cs, max);
          next += cs;
        }
        return { type: 'normal', bytes, hostOffset: first.offset + inCluster };
      }
    }
  }

  private checkDataOffset(off: number, ci: number): void {
    if (off >= 2 ** 53 || off % SECTOR !== 0) {
      throw corruption(`cluster offset ${hex(off)} unaligned (guest offset: ${hex(ci * this.g.clusterSize)})`);
    }
    if (off >= this.eof) {
      throw corruption(`cluster offset ${hex(off)} (guest offset: ${hex(ci * this.g.clusterSize)}) is past the end of the file`);
    }
  }

  // ----------------------------------------------------------------------------------------------
  // Reads

  private checkRange(offset: number, length: number) {
    if (!Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new QcowError('EINVAL', `Request [${offset}, +${length}) is past the end of '${this.filename}' (${this.size} bytes)`);
    }
  }

  private checkDataAccess() {
    if (this.encrypted && !this.cipher) throw encryptionLockedError(this.filename);
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
    let pos = 0;
    while (pos < buf.length) {
      const m = await this.lookup(offset + pos, buf.length - pos);
      pending.push(this.readMapped(m, buf.subarray(pos, pos + m.bytes), offset + pos));
      pos += m.bytes;
    }
    await Promise.all(pending);
  }

  private async readMapped(m: Mapping, sub: Uint8Array, guestOffset: number): Promise<void> {
    switch (m.type) {
      case 'normal':
        if (this.cipher) await this.readEncrypted(sub, m.hostOffset, guestOffset);
        else await readInto(this.io, sub, m.hostOffset);
        return;
      case 'unallocated':
        await this.readBacking(sub, guestOffset);
        return;
      case 'compressed': {
        const cluster = await this.decompress(m.coffset, m.clen);
        const inCluster = guestOffset % this.g.clusterSize;
        sub.set(cluster.subarray(inCluster, inCluster + sub.length));
        return;
      }
    }
  }

  /** Read the whole sectors around a stored range, decrypt them, copy out the part asked for. */
  private async readEncrypted(sub: Uint8Array, host: number, guest: number): Promise<void> {
    const head = guest % SECTOR;
    const len = alignUp(head + sub.length, SECTOR);
    if (head === 0 && len === sub.length) {
      await readInto(this.io, sub, host);
      await this.cipher!.decrypt(sub, host, guest);
      return;
    }
    const buf = new Uint8Array(len);
    await readInto(this.io, buf, host - head);
    await this.cipher!.decrypt(buf, host - head, guest - head);
    sub.set(buf.subarray(head, head + sub.length));
  }

  private async readBacking(sub: Uint8Array, guestOffset: number): Promise<void> {
    const b = this.backing;
    if (!b || guestOffset >= b.size) {
      sub.fill(0);
      return;
    }
    const n = Math.min(sub.length, b.size - guestOffset);
    await b.readInto(n === sub.length ? sub : sub.subarray(0, n), guestOffset);
    if (n < sub.length) sub.fill(0, n);
  }

  /** Inflate the compressed cluster at `coffset` (exactly one cluster must come out). */
  private decompress(coffset: number, clen: number): Promise<Uint8Array> {
    const hit = this.decompressed.get(coffset);
    if (hit) return hit;
    const p = this.inflate(coffset, clen);
    this.decompressed.set(coffset, p);
    p.catch(() => this.decompressed.delete(coffset));
    if (this.decompressed.size > DECOMPRESSED_CACHE) {
      const oldest = this.decompressed.keys().next().value as number;
      this.decompressed.delete(oldest);
    }
    return p;
  }

  private async inflate(coffset: number, clen: number): Promise<Uint8Array> {
    const bad = (why: string) =>
      new QcowError('EIO', `Input/output error: could not decompress the cluster at host offset ${hex(coffset)} (${why})`);
    if (clen === 0) throw bad('empty compressed cluster');
    if (coffset >= this.eof) throw corruption(`compressed cluster at offset ${hex(coffset)} is past the end of the file`);
    const input = await readFully(this.io, coffset, Math.min(clen, this.eof - coffset));
    try {
      return await codecs().inflateRaw(input, this.g.clusterSize);
    } catch (e) {
      if (e instanceof QcowError && e.code === 'ENOTSUP') throw e;
      throw bad('bad compressed data');
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.checkRange(offset, length);
    const out: Extent[] = [];
    const file = this.io.name;
    let pos = offset;
    const end = offset + length;
    while (pos < end && out.length < MAX_EXTENTS_PER_CALL) {
      const m = await this.lookup(pos, end - pos);
      switch (m.type) {
        case 'normal':
          push(out, {
            offset: pos,
            length: m.bytes,
            kind: 'data',
            depth: 0,
            ...(this.encrypted ? {} : { hostOffset: m.hostOffset, file }),
          });
          break;
        case 'compressed':
          push(out, { offset: pos, length: m.bytes, kind: 'data', depth: 0 });
          break;
        case 'unallocated':
          for (const e of await this.backingStatus(pos, m.bytes)) push(out, e);
          break;
      }
      pos += m.bytes;
    }
    return out;
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
      if (ext.length === 0) throw new QcowError('EIO', `Backing file '${b.filename}' returned no block status at ${pos}`);
      for (const e of ext) out.push({ ...e, depth: e.depth + 1 });
      const last = ext[ext.length - 1]!;
      pos = last.offset + last.length;
    }
    if (inBacking < length) out.push({ offset: offset + inBacking, length: length - inBacking, kind: 'unallocated', depth: 0 });
    return out;
  }

  // ----------------------------------------------------------------------------------------------
  // Writes

  private async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.lock;
    let release!: () => void;
    this.lock = new Promise((r) => (release = r));
    await prev;
    try {
      return await fn();
    } finally {
      release();
    }
  }

  private checkWritable(offset: number, length: number) {
    this.checkRange(offset, length);
    if (this.readOnly) throw new QcowError('EPERM', `Image '${this.filename}' is opened read-only`);
    if (this.closed) throw new QcowError('EINVAL', `Image '${this.filename}' is closed`);
    this.checkDataAccess();
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.checkWritable(offset, data.length);
    if (data.length) await this.exclusive(() => this.writeLocked(offset, data));
  }

  /**
   * Write `data` at guest `offset`: in place into normal clusters; anything else gets a new cluster
   * at the end of the file, filled from the old content (compressed cluster, backing file or zeros)
   * where the write does not cover it. Data first, then the in-memory L2/L1 updates.
   */
  private async writeLocked(offset: number, data: Uint8Array): Promise<void> {
    if (this.cipher && (offset % SECTOR || data.length % SECTOR)) {
      // Encryption works on whole sectors: complete the edges with the current content.
      const start = offset - (offset % SECTOR);
      const end = Math.min(alignUp(offset + data.length, SECTOR), this.size);
      const buf = new Uint8Array(alignUp(end - start, SECTOR));
      await this.readInto(buf.subarray(0, end - start), start);
      buf.set(data, offset - start);
      offset = start;
      data = buf.subarray(0, end - start);
    }
    const cs = this.g.clusterSize;
    const { l1Coverage, l2Entries } = this.g;
    const pieces: Array<{ host: number; buf: Uint8Array; guest: number }> = [];
    const installs: Array<{ l1i: number; l2i: number; hi: number; lo: number }> = [];
    const newTables = new Map<number, number>(); // l1 index -> table offset
    const end = offset + data.length;
    let pos = offset;
    while (pos < end) {
      const l1i = Math.floor(pos / l1Coverage);
      const tableEnd = Math.min(end, (l1i + 1) * l1Coverage);
      const t = newTables.has(l1i) ? undefined : await this.table(l1i);
      const dv = t ? new DataView(t.buffer, t.byteOffset, t.byteLength) : undefined;
      while (pos < tableEnd) {
        const ci = Math.floor(pos / cs);
        const a = pos - ci * cs;
        const n = Math.min(cs - a, tableEnd - pos);
        const src = data.subarray(pos - offset, pos - offset + n);
        const l2i = ci % l2Entries;
        const e = dv
          ? decodeL2Entry(dv.getUint32(l2i * 8), dv.getUint32(l2i * 8 + 4), this.g.clusterBits)
          : ({ type: 'unallocated' } as const);
        if (e.type === 'normal') {
          this.checkDataOffset(e.offset, ci);
          pieces.push({ host: e.offset + a, buf: src, guest: pos });
        } else {
          let buf: Uint8Array;
          if (n === cs) buf = src;
          else {
            buf = new Uint8Array(cs);
            if (e.type === 'compressed') buf.set(await this.decompress(e.offset, e.length));
            else {
              const base = ci * cs;
              const inImage = Math.min(cs, this.size - base);
              await this.readBacking(buf.subarray(0, inImage), base);
            }
            buf.set(src, a);
          }
          if (!t && !newTables.has(l1i)) {
            const tOff = alignUp(this.eof, cs);
            this.eof = tOff + this.g.l2TableBytes;
            newTables.set(l1i, tOff);
          }
          const host = alignUp(this.eof, cs);
          this.eof = host + cs;
          pieces.push({ host, buf, guest: ci * cs });
          installs.push({ l1i, l2i, hi: Math.floor(host / TWO32), lo: host % TWO32 });
        }
        pos += n;
      }
    }
    await this.writePieces(pieces);
    await this.install(newTables, installs);
  }

  /** Write host pieces (encrypted first, on copies, when the image is), merging neighbours into larger requests. */
  private async writePieces(pieces: Array<{ host: number; buf: Uint8Array; guest: number }>): Promise<void> {
    if (this.cipher) {
      for (const p of pieces) {
        const c = new Uint8Array(alignUp(p.buf.length, SECTOR));
        c.set(p.buf);
        await this.cipher.encrypt(c, p.host, p.guest);
        p.buf = c.subarray(0, p.buf.length);
      }
    }
    let i = 0;
    while (i < pieces.length) {
      const group = [pieces[i]!];
      let len = pieces[i]!.buf.length;
      let j = i + 1;
      while (j < pieces.length && len < MAX_WRITE_BYTES) {
        const prev = group[group.length - 1]!;
        const cur = pieces[j]!;
        if (prev.host + prev.buf.length !== cur.host) break;
        group.push(cur);
        len += cur.buf.length;
        j++;
      }
      await this.io.write(joinViews(group.map((p) => p.buf), len), group[0]!.host);
      i = j;
    }
  }

  /** Make new tables and entries visible (in memory; flush writes them out in order). */
  private async install(newTables: Map<number, number>, entries: Array<{ l1i: number; l2i: number; hi: number; lo: number }>): Promise<void> {
    for (const [l1i, tOff] of newTables) {
      this.cache.markDirty(tOff);
      this.cache.insert(tOff, new Uint8Array(this.g.l2TableBytes));
      const [hi, lo] = encodeOffsetEntry(tOff);
      this.l1dv.setUint32(l1i * 8, hi);
      this.l1dv.setUint32(l1i * 8 + 4, lo);
      this.l1Dirty.add(l1i);
    }
    let i = 0;
    while (i < entries.length) {
      const l1i = entries[i]!.l1i;
      const tOff = this.l2Offset(l1i);
      const t = await this.cache.get(tOff);
      this.cache.markDirty(tOff);
      const dv = new DataView(t.buffer, t.byteOffset, t.byteLength);
      for (; i < entries.length && entries[i]!.l1i === l1i; i++) {
        const e = entries[i]!;
        dv.setUint32(e.l2i * 8, e.hi);
        dv.setUint32(e.l2i * 8 + 4, e.lo);
      }
    }
    if (this.cache.pressure) await this.flushMetadata();
  }

  async writeZeroes(offset: number, length: number, _opts?: { mayUnmap?: boolean }): Promise<void> {
    this.checkWritable(offset, length);
    if (!length) return;
    await this.exclusive(async () => {
      // qcow has no zero flag: write zeros, except where the image already reads as zeros because
      // nothing is allocated here and no backing file lies underneath.
      const end = offset + length;
      const backingEnd = this.backing ? this.backing.size : 0;
      let pos = offset;
      while (pos < end) {
        const m = await this.lookup(pos, end - pos);
        let writeEnd = pos + m.bytes;
        if (m.type === 'unallocated') writeEnd = Math.min(writeEnd, Math.max(pos, backingEnd));
        for (let p = pos; p < writeEnd; ) {
          const n = Math.min(ZERO_CHUNK, writeEnd - p);
          await this.writeLocked(p, ZEROS.subarray(0, n));
          p += n;
        }
        pos += m.bytes;
      }
    });
  }

  /** qcow cannot deallocate: a no-op, like QEMU's qcow driver. */
  async discard(offset: number, length: number): Promise<void> {
    this.checkWritable(offset, length);
  }

  /**
   * Store one compressed cluster at cluster-aligned guest `offset` (raw deflate, 4 KiB window, of
   * the whole cluster, zero-padded at the end of the image). The compressed bytes go at the end of
   * the file rounded up to 512 bytes; the L2 entry holds their length in bytes.
   */
  async writeCompressed(offset: number, compressed: Uint8Array): Promise<void> {
    const cs = this.g.clusterSize;
    if (this.encrypted) throw new QcowError('ENOTSUP', 'Compression and encryption not supported at the same time');
    if (offset % cs) throw new QcowError('EINVAL', 'Compressed writes must be cluster aligned');
    this.checkWritable(offset, Math.min(cs, this.size - offset));
    if (compressed.length === 0 || compressed.length >= cs) {
      throw new QcowError('EINVAL', `Compressed cluster must be 1..${cs - 1} bytes, got ${compressed.length}`);
    }
    await this.exclusive(async () => {
      const l1i = Math.floor(offset / this.g.l1Coverage);
      const l2i = (offset / cs) % this.g.l2Entries;
      const newTables = new Map<number, number>();
      if (!this.l2Offset(l1i)) {
        const tOff = alignUp(this.eof, cs);
        this.eof = tOff + this.g.l2TableBytes;
        newTables.set(l1i, tOff);
      }
      const host = alignUp(this.eof, SECTOR);
      this.eof = host + compressed.length;
      await this.io.write(compressed, host);
      const [hi, lo] = encodeCompressedEntry(host, compressed.length, this.g.clusterBits);
      await this.install(newTables, [{ l1i, l2i, hi, lo }]);
    });
  }

  /** Write dirty L2 tables, then dirty L1 entries, each after a barrier. Caller holds the lock. */
  private async flushMetadata(): Promise<void> {
    if (this.cache.dirty.size === 0 && this.l1Dirty.size === 0) return;
    await this.io.flush(); // data before the entries that point to it
    const tables = [...this.cache.dirty].sort((a, b) => a - b);
    for (const off of tables) {
      const t = this.cache.peek(off);
      if (!t) throw new QcowError('EIO', `internal error: dirty L2 table ${hex(off)} not cached`);
      await this.io.write(t, off);
    }
    if (this.l1Dirty.size) {
      await this.io.flush(); // tables before the L1 entries that point to them
      const idx = [...this.l1Dirty].sort((a, b) => a - b);
      for (let i = 0; i < idx.length; ) {
        let j = i + 1;
        while (j < idx.length && idx[j] === idx[j - 1]! + 1) j++;
        const from = idx[i]! * 8;
        const to = (idx[j - 1]! + 1) * 8;
        await this.io.write(this.l1.subarray(from, to), this.g.l1TableOffset + from);
        i = j;
      }
    }
    this.cache.dirty.clear();
    this.l1Dirty.clear();
  }

  async flush(): Promise<void> {
    if (this.readOnly || this.closed) return;
    await this.exclusive(async () => {
      await this.flushMetadata();
      await this.io.flush();
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (!this.readOnly) await this.flush();
    } finally {
      this.closed = true;
      try {
        if (this.backing) await this.backing.close();
      } finally {
        await this.io.close();
      }
    }
  }

  info(): DriverInfo {
    return {
      clusterSize: this.g.clusterSize,
      dirty: false,
      encrypted: this.encrypted || undefined,
      backingFilename: this.backingFile,
    };
  }

  async actualSize(): Promise<number | undefined> {
    return this.io.allocatedSize ? this.io.allocatedSize() : undefined;
  }
}

const ZEROS = new Uint8Array(ZERO_CHUNK);

/** One buffer for consecutive views: the shared backing view when they are contiguous, else a copy. */
function joinViews(views: Uint8Array[], len: number): Uint8Array {
  if (views.length === 1) return views[0]!;
  const f = views[0]!;
  let contiguous = true;
  let next = f.byteOffset + f.length;
  for (let i = 1; i < views.length && contiguous; i++) {
    const v = views[i]!;
    contiguous = v.buffer === f.buffer && v.byteOffset === next;
    next += v.length;
  }
  if (contiguous) return new Uint8Array(f.buffer, f.byteOffset, len);
  const out = new Uint8Array(len);
  let o = 0;
  for (const v of views) {
    out.set(v, o);
    o += v.length;
  }
  return out;
}

