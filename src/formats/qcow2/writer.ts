/**
 * The qcow2 write engine: allocating writes with copy-on-write, zero writes, discard, compressed
 * cluster writes, and the ordered flush that keeps the image consistent across a crash.
 *
 * Ordering (a crash at any point leaves at worst leaked clusters):
 *  1. new clusters get their refcount before anything references them (refcount blocks written,
 *     then a barrier, before the L2/L1 entries that point to them);
 *  2. guest data is written before the L2 entry that points to it (same barrier);
 *  3. L2 tables are durable before a new L1 entry points to them;
 *  4. refcount decrements are applied only after the entries that dropped the reference are durable.
 */
import type { ByteIO } from '../../core/byte-io.js';
import { QcowError } from '../../core/errors.js';
import * as C from './constants.js';
import { corruption, entryOffset, type ClusterMap, type Geometry } from './cluster-map.js';
import type { L2Cache } from './l2-cache.js';
import { Refcounts } from './refcount.js';
import type { Qcow2Header } from './header.js';
import { CRYPT_SECTOR, giveCryptBuffer, takeCryptBuffer, type DataCipher } from './data-cipher.js';

const COPIED_HI = 0x80000000;
const COMPRESSED_HI = 0x40000000;
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

export interface Entry {
  hi: number;
  lo: number;
  bhi: number; // bitmap high word (zero bits)
  blo: number; // bitmap low word (alloc bits)
}

/** A data write whose host clusters are chosen but whose L2 entries are not updated yet. */
interface InflightRun {
  /** Guest clusters [first, end). */
  first: number;
  end: number;
  settled: Promise<void>;
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
}

export class Qcow2Writer {
  /** Replaced only by reloadRefcounts(). */
  refcounts: Refcounts;
  private l1Dirty = new Set<number>();
  private started = false;
  private lock: Promise<void> = Promise.resolve();
  /** Guest data writes between planning and commit (their clusters are off limits to others). */
  private readonly inflight = new Set<InflightRun>();
  private exclusiveWaiting = 0;
  private readonly lazy: boolean;

  private constructor(private h: WriterHost, refcounts: Refcounts) {
    this.refcounts = refcounts;
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
        const b = new Uint8Array(12);
        const dv = new DataView(b.buffer);
        dv.setBigUint64(0, BigInt(offset));
        dv.setUint32(8, clusters);
        await h.io.write(b, 48);
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
  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    this.exclusiveWaiting++;
    let release!: () => void;
    try {
      for (;;) {
        while (this.inflight.size) await Promise.all([...this.inflight].map((r) => r.settled));
        release = await this.acquire();
        if (!this.inflight.size) break;
        release();
      }
    } finally {
      if (--this.exclusiveWaiting === 0) this.openGate();
    }
    try {
      return await fn();
    } finally {
      release();
    }
  }

  /** The metadata lock itself (FIFO). */
  private async acquire(): Promise<() => void> {
    const prev = this.lock;
    let release!: () => void;
    this.lock = new Promise((r) => (release = r));
    await prev;
    return release;
  }

  private gate?: { promise: Promise<void>; open: () => void };
  private waitGate(): Promise<void> {
    if (!this.gate) {
      let open!: () => void;
      const promise = new Promise<void>((r) => (open = r));
      this.gate = { promise, open };
    }
    return this.gate.promise;
  }
  private openGate(): void {
    this.gate?.open();
    this.gate = undefined;
  }

  /** An in-flight run overlapping guest clusters [first, end), if any. */
  private overlapping(first: number, end: number): InflightRun | undefined {
    for (const r of this.inflight) if (r.first < end && first < r.end) return r;
    return undefined;
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

  // ---- L1 / L2 access -------------------------------------------------------------------

  l1Entry(i: number): { hi: number; lo: number } {
    const dv = new DataView(this.h.map.l1.buffer, this.h.map.l1.byteOffset + i * 8, 8);
    return { hi: dv.getUint32(0), lo: dv.getUint32(4) };
  }

  setL1Entry(i: number, off: number, copied: boolean): void {
    const dv = new DataView(this.h.map.l1.buffer, this.h.map.l1.byteOffset + i * 8, 8);
    dv.setUint32(0, Math.floor(off / 0x100000000) | (copied ? COPIED_HI : 0));
    dv.setUint32(4, off >>> 0);
    this.l1Dirty.add(i);
  }

  /** The L2 table for L1 index `i`, allocated or copied so that it may be modified in place. */
  private async writableL2(i: number): Promise<number> {
    const { hi, lo } = this.l1Entry(i);
    const off = entryOffset(hi, lo);
    if (off % this.cs) throw corruption(`L2 table offset 0x${off.toString(16)} unaligned (L1 index: 0x${i.toString(16)})`);
    if (off && hi & COPIED_HI) return off;
    const cache = this.h.l2cache;
    const fresh = await this.refcounts.allocate(1);
    const sb = cache.sliceBytes;
    for (let s = 0; s < this.cs; s += sb) {
      const content = off ? (await cache.get(off + s)).slice() : new Uint8Array(sb);
      cache.insert(fresh + s, content);
      cache.markDirty(fresh + s);
    }
    this.setL1Entry(i, fresh, true);
    if (off) this.refcounts.free(off / this.cs);
    return fresh;
  }

  private async slice(l2: number, index: number): Promise<{ buf: Uint8Array; at: number; sliceOff: number }> {
    const cache = this.h.l2cache;
    const eb = this.h.g.entryBytes;
    const byte = index * eb;
    const sliceOff = l2 + byte - (byte % cache.sliceBytes);
    const buf = await cache.get(sliceOff);
    return { buf, at: byte % cache.sliceBytes, sliceOff };
  }

  async getEntry(l2: number, index: number): Promise<Entry> {
    const { buf, at } = await this.slice(l2, index);
    const dv = new DataView(buf.buffer, buf.byteOffset + at);
    return this.h.g.extendedL2
      ? { hi: dv.getUint32(0), lo: dv.getUint32(4), bhi: dv.getUint32(8), blo: dv.getUint32(12) }
      : { hi: dv.getUint32(0), lo: dv.getUint32(4), bhi: 0, blo: 0 };
  }

  async setEntry(l2: number, index: number, e: Entry): Promise<void> {
    const { buf, at, sliceOff } = await this.slice(l2, index);
    const dv = new DataView(buf.buffer, buf.byteOffset + at);
    dv.setUint32(0, e.hi >>> 0);
    dv.setUint32(4, e.lo >>> 0);
    if (this.h.g.extendedL2) {
      dv.setUint32(8, e.bhi >>> 0);
      dv.setUint32(12, e.blo >>> 0);
    }
    this.h.l2cache.markDirty(sliceOff);
  }

  /** Queue the release of whatever host storage `e` references (after the new entry is durable). */
  private releaseOld(e: Entry): void {
    if (e.hi & COMPRESSED_HI) {
      const cb = this.h.g.clusterBits;
      const x = 70 - cb;
      const coff = (e.hi & ((1 << (x - 32)) - 1)) * 0x100000000 + (e.lo >>> 0);
      const sectors = ((e.hi >>> (x - 32)) & ((1 << (cb - 8)) - 1)) + 1;
      const start = coff - (coff % 512);
      const first = Math.floor(start / this.cs);
      const last = Math.floor((start + sectors * 512 - 1) / this.cs);
      for (let c = first; c <= last; c++) this.refcounts.free(c);
      return;
    }
    const host = entryOffset(e.hi, e.lo);
    if (host && !this.dataFile) this.refcounts.free(host / this.cs);
  }

  private hostOf(e: Entry): number {
    return e.hi & COMPRESSED_HI ? 0 : entryOffset(e.hi, e.lo);
  }

  /** Entry owns a host cluster that may be written in place. */
  private inPlace(e: Entry): boolean {
    if (e.hi & COMPRESSED_HI) return false;
    const host = entryOffset(e.hi, e.lo);
    if (this.dataFile) return host !== 0 || (e.hi & COPIED_HI) !== 0;
    return host !== 0 && (e.hi & COPIED_HI) !== 0;
  }

  // ---- writes ---------------------------------------------------------------------------

  /**
   * Write guest data. Each run (within one L2 table) is planned under the metadata lock (host
   * clusters chosen, copy-on-write done), its data written without the lock so that concurrent
   * requests overlap, then its L2 entries updated under the lock again. Data is thus written
   * before anything points to it; clusters of a run in flight are off limits to other requests.
   */
  async write(offset: number, data: Uint8Array): Promise<void> {
    let pos = 0;
    while (pos < data.length) {
      const { plan, run, done } = await this.planWrite(offset + pos, data.subarray(pos));
      let failure: unknown;
      try {
        await this.writeData(plan.buf, plan.host, plan.guest);
      } catch (e) {
        failure = e;
      }
      const release = await this.acquire();
      try {
        if (failure === undefined) await this.commitRun(plan);
        else if (!plan.inPlace && !this.dataFile) this.refcounts.free(plan.host / this.cs, plan.n);
      } finally {
        this.inflight.delete(run);
        done();
        try {
          if (failure === undefined) await this.maybeFlushMetadata();
        } finally {
          release();
        }
      }
      if (failure !== undefined) throw failure;
      pos += plan.consumed;
    }
  }

  /** Phase 1 of a write: wait for a free path, then plan one run and register it in flight. */
  private async planWrite(offset: number, data: Uint8Array): Promise<{ plan: RunPlan; run: InflightRun; done: () => void }> {
    const { g } = this.h;
    const cs = this.cs;
    const tableEnd = (Math.floor(offset / g.l1Coverage) + 1) * g.l1Coverage;
    const first = Math.floor(offset / cs);
    const end = Math.ceil((offset + Math.min(data.length, tableEnd - offset, MAX_BATCH_BYTES)) / cs);
    for (;;) {
      while (this.exclusiveWaiting) await this.waitGate();
      const release = await this.acquire();
      let blocker: InflightRun | undefined;
      try {
        if (this.exclusiveWaiting) continue;
        blocker = this.overlapping(first, end);
        if (!blocker) {
          await this.start();
          const plan = await this.planRun(offset, data);
          await this.h.onGuestWrite?.(offset, plan.consumed);
          let done!: () => void;
          const run: InflightRun = {
            first: plan.firstCluster,
            end: plan.firstCluster + plan.n,
            settled: new Promise<void>((r) => (done = r)),
          };
          this.inflight.add(run);
          return { plan, run, done };
        }
      } finally {
        release();
      }
      await blocker.settled;
    }
  }

  /** Write a prefix of `data` that stays within one L2 table, caller holding the lock; returns bytes written. */
  private async writeRun(offset: number, data: Uint8Array): Promise<number> {
    const plan = await this.planRun(offset, data);
    await this.writeData(plan.buf, plan.host, plan.guest);
    await this.commitRun(plan);
    return plan.consumed;
  }

  /** Choose where a prefix of `data` (within one L2 table) goes; copy-on-write if needed. */
  private async planRun(offset: number, data: Uint8Array): Promise<RunPlan> {
    const { g } = this.h;
    const cs = this.cs;
    const l1i = Math.floor(offset / g.l1Coverage);
    const tableEnd = (l1i + 1) * g.l1Coverage;
    const len = Math.min(data.length, tableEnd - offset, MAX_BATCH_BYTES);
    const l2 = await this.writableL2(l1i);
    const firstCluster = Math.floor(offset / cs);
    const idx0 = firstCluster % g.l2Entries;
    const e0 = await this.getEntry(l2, idx0);

    if (this.inPlace(e0)) {
      // Extend over clusters that are writable in place and contiguous on the host.
      const host0 = this.dataFile ? firstCluster * cs : this.hostOf(e0);
      let n = 1;
      while ((firstCluster + n) * cs < offset + len) {
        const e = await this.getEntry(l2, idx0 + n);
        if (!this.inPlace(e) || (this.dataFile ? false : this.hostOf(e) !== host0 + n * cs)) break;
        n++;
      }
      const end = Math.min(offset + len, (firstCluster + n) * cs);
      const buf = await this.padInPlace(l2, idx0, n, offset, data.subarray(0, end - offset));
      return {
        consumed: end - offset, buf: buf.data, host: host0 + (buf.start - firstCluster * cs), guest: buf.start,
        l2, idx0, firstCluster, n, inPlace: true, from: buf.start, to: buf.start + buf.data.length, olds: [],
      };
    }

    // Clusters that need a new host cluster: batch consecutive ones.
    const olds: Entry[] = [e0];
    while ((firstCluster + olds.length) * cs < offset + len) {
      const e = await this.getEntry(l2, idx0 + olds.length);
      if (this.inPlace(e)) break;
      olds.push(e);
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
    const host = this.dataFile ? runStart : await this.refcounts.allocate(n);
    return { consumed: end - offset, buf, host, guest: runStart, l2, idx0, firstCluster, n, inPlace: false, from: offset, to: end, olds };
  }

  /** Phase 3 of a write (data is written): point the L2 entries at it. */
  private async commitRun(p: RunPlan): Promise<void> {
    const { g } = this.h;
    const cs = this.cs;
    if (p.inPlace) {
      for (let k = 0; k < p.n; k++) await this.markWritten(p.l2, p.idx0 + k, p.firstCluster + k, p.from, p.to, true);
      return;
    }
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
      await this.setEntry(p.l2, p.idx0 + k, e);
      this.releaseOld(old);
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
      const oldAlloc = this.hostOf(old) !== 0 && !(old.hi & COMPRESSED_HI) && ((old.blo >>> s) & 1) === 1;
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
    const oldHost = this.hostOf(old) !== 0;
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
      const e0 = await this.getEntry(l2, idx0);
      const eN = n > 1 ? await this.getEntry(l2, idx0 + n - 1) : e0;
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
    const e = await this.getEntry(l2, idx);
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
    if (changed) await this.setEntry(l2, idx, e);
  }

  /**
   * Zero `[offset, offset+length)`. Whole clusters (subclusters with extended L2) become zero
   * entries on v3 images; the rest is written as zeros.
   */
  async writeZeroes(offset: number, length: number, mayUnmap: boolean): Promise<void> {
    const { g, header } = this.h;
    const unit = g.subclusterSize;
    const canFlag = header.version >= 3 && !(header.autoclearFeatures & C.AUTOCLEAR_DATA_FILE_RAW);
    const a = Math.ceil(offset / unit) * unit;
    const b = Math.floor((offset + length) / unit) * unit;
    if (!canFlag || a >= b) {
      await this.writeZeroBytes(offset, length);
      return;
    }
    if (a > offset) await this.writeZeroBytes(offset, a - offset);
    await this.exclusive(async () => {
      await this.start();
      await this.h.onGuestWrite?.(a, b - a);
      await this.zeroUnits(a, b - a, mayUnmap, false);
      await this.maybeFlushMetadata();
    });
    if (offset + length > b) await this.writeZeroBytes(b, offset + length - b);
  }

  private async writeZeroBytes(offset: number, length: number): Promise<void> {
    const chunk = new Uint8Array(Math.min(length, 4 << 20));
    for (let done = 0; done < length; ) {
      const n = Math.min(chunk.length, length - done);
      await this.write(offset + done, chunk.subarray(0, n));
      done += n;
    }
  }

  /** Discard whole clusters (partial ones are ignored, as QEMU does). */
  async discard(offset: number, length: number): Promise<void> {
    const unit = this.h.g.subclusterSize;
    const a = Math.ceil(offset / unit) * unit;
    const b = Math.floor((offset + length) / unit) * unit;
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
      const { hi, lo } = this.l1Entry(l1i);
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
        const cur = await this.getEntry(entryOffset(hi, lo), cluster % g.l2Entries);
        if (!cur.hi && !cur.lo && !cur.blo && !cur.bhi) {
          pos = cEnd;
          continue;
        }
      }
      const l2 = await this.writableL2(l1i);
      const idx = cluster % g.l2Entries;
      const old = await this.getEntry(l2, idx);
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
        } else if (whole && (unmap || compressed || !this.inPlace(old))) {
          await this.setEntry(l2, idx, { hi: 0, lo: 0, bhi: 0xffffffff, blo: 0 });
          this.releaseOld(old);
        } else {
          const e = { ...old };
          e.bhi = (e.bhi | mask) >>> 0;
          e.blo = (e.blo & ~mask) >>> 0;
          await this.setEntry(l2, idx, e);
        }
      } else if (!v3) {
        // v2 discard: the cluster becomes unallocated.
        await this.setEntry(l2, idx, { hi: 0, lo: 0, bhi: 0, blo: 0 });
        this.releaseOld(old);
      } else if (!unmap && this.inPlace(old)) {
        await this.setEntry(l2, idx, { ...old, lo: (old.lo | 1) >>> 0 });
      } else {
        await this.setEntry(l2, idx, { hi: 0, lo: 1, bhi: 0, blo: 0 });
        this.releaseOld(old);
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
      const l2 = await this.writableL2(l1i);
      const idx = Math.floor(offset / cs) % g.l2Entries;
      const old = await this.getEntry(l2, idx);
      const host = await this.refcounts.allocateBytes(compressed.length);
      await this.h.io.write(compressed, host);
      const x = 70 - g.clusterBits;
      const nbAdditional = Math.floor((host + compressed.length - 1) / 512) - Math.floor(host / 512);
      const hi = COMPRESSED_HI | (nbAdditional << (x - 32)) | Math.floor(host / 0x100000000);
      await this.setEntry(l2, idx, { hi: hi >>> 0, lo: host >>> 0, bhi: 0, blo: 0 });
      this.releaseOld(old);
      await this.maybeFlushMetadata();
    });
  }

  // ---- flush ----------------------------------------------------------------------------

  private async maybeFlushMetadata(): Promise<void> {
    if (this.h.l2cache.pressure) await this.flushMetadata();
  }

  async barrier(): Promise<void> {
    if (this.h.dataIO !== this.h.io) await this.h.dataIO.flush();
    await this.h.io.flush();
  }

  /** Write all dirty metadata in crash-safe order. Caller holds the lock. */
  async flushMetadata(): Promise<void> {
    const cache = this.h.l2cache;
    const rc = this.refcounts;
    if (!rc.hasDirty && !cache.dirty.size && !this.l1Dirty.size && !rc.hasPendingFrees) {
      await this.barrier();
      return;
    }
    // 1. refcount increments (new blocks first, then table entries pointing to them)
    await rc.writeBlocks();
    await this.barrier();
    await rc.writeTableEntries();
    // 2. L2 tables (data and refcounts of the clusters they point to are durable now)
    const slices = [...cache.dirty].sort((a, b) => a - b);
    for (const s of slices) await this.h.io.write(cache.peek(s)!, s);
    cache.dirty.clear();
    await this.barrier();
    // 3. L1 entries pointing to the (now durable) L2 tables
    if (this.l1Dirty.size) {
      const l1 = this.h.map.l1;
      const sectors = new Set([...this.l1Dirty].map((i) => Math.floor((i * 8) / 512)));
      this.l1Dirty.clear();
      for (const s of [...sectors].sort((a, b) => a - b)) {
        const from = s * 512;
        const to = Math.min(l1.length, from + 512);
        await this.h.io.write(l1.subarray(from, to), this.h.header.l1TableOffset + from);
      }
      await this.barrier();
    }
    // 4. decrements for references dropped above
    if (rc.hasPendingFrees) {
      await rc.applyFrees();
      await rc.writeBlocks();
      await this.barrier();
    }
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
  async makeEmpty(): Promise<void> {
    await this.exclusive(async () => {
      await this.start();
      const { g } = this.h;
      const cs = this.cs;
      for (let i = 0; i < this.h.map.l1Size; i++) {
        const { hi, lo } = this.l1Entry(i);
        const l2 = entryOffset(hi, lo);
        if (!l2) continue;
        // The active state's reference to every cluster under this table goes, shared or not.
        for (let k = 0; k < g.l2Entries; k++) this.releaseOld(await this.getEntry(l2, k));
        this.setL1Entry(i, 0, false);
        this.refcounts.free(l2 / cs);
      }
      await this.flushMetadata();
      this.h.l2cache.clear();
    });
  }

  /**
   * Change the virtual size. Growing may move the L1 table to a larger one (written and made
   * durable before the header points to it); shrinking drops every cluster past the new end.
   * Returns the new L1 bytes when the table moved.
   */
  async resize(newSize: number): Promise<Uint8Array | undefined> {
    return this.exclusive(async () => {
      await this.start();
      const { g, header } = this.h;
      const cs = this.cs;
      const needed = Math.ceil(newSize / g.l1Coverage);
      let newL1: Uint8Array | undefined;
      if (newSize < header.size) {
        // Drop clusters past the end: whole L2 tables beyond the new end, and entries in the last one.
        const firstGone = Math.ceil(newSize / cs);
        const lastCluster = Math.ceil(header.size / cs);
        for (let c = firstGone; c < lastCluster; ) {
          const l1i = Math.floor((c * cs) / g.l1Coverage);
          const { hi, lo } = this.l1Entry(l1i);
          const l2 = entryOffset(hi, lo);
          const tableFirst = (l1i * g.l1Coverage) / cs;
          const tableEnd = tableFirst + g.l2Entries;
          if (l2 && c === tableFirst) {
            // Whole table goes: release every cluster it references, then the table.
            for (let k = 0; k < g.l2Entries; k++) this.releaseOld(await this.getEntry(l2, k));
            this.setL1Entry(l1i, 0, false);
            this.h.l2cache.dropTable(l2, cs);
            this.refcounts.free(l2 / cs);
          } else if (l2) {
            const w = await this.writableL2(l1i);
            for (let k = c - tableFirst; k < g.l2Entries; k++) {
              const e = await this.getEntry(w, k);
              if (e.hi || e.lo || e.bhi || e.blo) {
                await this.setEntry(w, k, { hi: 0, lo: 0, bhi: 0, blo: 0 });
                this.releaseOld(e);
              }
            }
          }
          c = tableEnd;
        }
        await this.flushMetadata();
      } else if (needed > header.l1Size) {
        await this.flushMetadata();
        const bytes = needed * 8;
        const clusters = Math.ceil(bytes / cs);
        const at = await this.refcounts.allocate(clusters);
        newL1 = new Uint8Array(bytes);
        newL1.set(this.h.map.l1);
        await this.refcounts.writeBlocks();
        await this.h.io.write(newL1, at);
        await this.barrier();
        await this.refcounts.writeTableEntries();
        const b = new Uint8Array(12);
        const dv = new DataView(b.buffer);
        dv.setUint32(0, needed);
        dv.setBigUint64(4, BigInt(at));
        const oldOffset = header.l1TableOffset;
        const oldClusters = Math.ceil((header.l1Size * 8) / cs);
        await this.h.io.write(b, 36);
        await this.barrier();
        header.l1Size = needed;
        header.l1TableOffset = at;
        this.h.map.l1 = newL1;
        if (oldClusters) this.refcounts.free(oldOffset / cs, oldClusters);
      }
      const b = new Uint8Array(8);
      new DataView(b.buffer).setBigUint64(0, BigInt(newSize));
      await this.h.io.write(b, 24);
      header.size = newSize;
      await this.flushMetadata();
      return newL1;
    });
  }
}
