/**
 * The active L1 and L2 tables as the write engine changes them: reading and setting L2 entries
 * (through the L2 slice cache, marking slices dirty), making an L2 table writable in place
 * (allocated, or copied when shared with a snapshot), and releasing the host clusters a replaced
 * entry referenced (the refcount decrement is applied after the new entry is durable).
 */
import { be32, setBe32 } from '../../core/be.js';
import { firstNonZero } from '../../core/byte-scan.js';
import { corruption, entryOffset } from './cluster-map.js';
import type { Refcounts } from './refcount.js';
import type { WriterHost } from './writer.js';

export const COPIED_HI = 0x80000000;
export const COMPRESSED_HI = 0x40000000;

/** An L2 entry as two 32-bit halves, plus the extended-L2 bitmap words (0 without extended L2). */
export interface Entry {
  hi: number;
  lo: number;
  bhi: number; // bitmap high word (zero bits)
  blo: number; // bitmap low word (alloc bits)
}

/** An all-zero entry (unallocated, no flags, no subclusters): shared, never changed. */
export const UNALLOCATED: Readonly<Entry> = Object.freeze({ hi: 0, lo: 0, bhi: 0, blo: 0 });

export class L2Tables {
  /** L1 indexes changed in memory and not yet written. */
  readonly l1Dirty = new Set<number>();

  constructor(
    private readonly h: WriterHost,
    private readonly refcounts: () => Refcounts,
  ) {}

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
  async writableL2(i: number): Promise<number> {
    const { hi, lo } = this.l1Entry(i);
    const off = entryOffset(hi, lo);
    if (off % this.h.g.clusterSize) throw corruption(`L2 table offset 0x${off.toString(16)} unaligned (L1 index: 0x${i.toString(16)})`);
    if (off && hi & COPIED_HI) return off;
    const cache = this.h.l2cache;
    const fresh = await this.refcounts().allocate(1);
    const sb = cache.sliceBytes;
    for (let s = 0; s < this.h.g.clusterSize; s += sb) {
      const content = off ? (await cache.get(off + s)).slice() : new Uint8Array(sb);
      cache.insert(fresh + s, content);
      cache.markDirty(fresh + s);
    }
    this.setL1Entry(i, fresh, true);
    if (off) this.refcounts().free(off / this.h.g.clusterSize);
    return fresh;
  }

  /** Where entry `index` of the L2 table at `l2` lies: its slice's offset and the byte within. */
  private place(l2: number, index: number): { sliceOff: number; at: number } {
    const sb = this.h.l2cache.sliceBytes;
    const byte = index * this.h.g.entryBytes;
    const at = byte % sb;
    return { sliceOff: l2 + byte - at, at };
  }

  private decode(buf: Uint8Array, at: number): Entry {
    return this.h.g.extendedL2
      ? { hi: be32(buf, at), lo: be32(buf, at + 4), bhi: be32(buf, at + 8), blo: be32(buf, at + 12) }
      : { hi: be32(buf, at), lo: be32(buf, at + 4), bhi: 0, blo: 0 };
  }

  private encode(buf: Uint8Array, at: number, e: Entry): void {
    setBe32(buf, at, e.hi);
    setBe32(buf, at + 4, e.lo);
    if (this.h.g.extendedL2) {
      setBe32(buf, at + 8, e.bhi);
      setBe32(buf, at + 12, e.blo);
    }
  }

  /**
   * Entry `index` of the L2 table at `l2` when its slice is cached, else undefined: walks over
   * many entries take this path and wait (`getEntry`) only on a miss.
   */
  entryNow(l2: number, index: number): Entry | undefined {
    const { sliceOff, at } = this.place(l2, index);
    const buf = this.h.l2cache.getNow(sliceOff);
    return buf && this.decode(buf, at);
  }

  /**
   * How many entries from `index` on (at most `max`, within the table) are all zero — unallocated,
   * as in a new image — looking only at cached slices: it stops at the first other entry or at an
   * uncached slice. One scan per slice instead of a decode per entry.
   */
  unallocatedRunNow(l2: number, index: number, max: number): number {
    const eb = this.h.g.entryBytes;
    const sb = this.h.l2cache.sliceBytes;
    let n = 0;
    while (n < max) {
      const byte = (index + n) * eb;
      const at = byte % sb;
      const buf = this.h.l2cache.getNow(l2 + byte - at);
      if (!buf) break;
      const span = Math.min(sb - at, (max - n) * eb);
      const nz = firstNonZero(buf.subarray(at, at + span));
      if (nz >= 0) return n + Math.floor(nz / eb);
      n += span / eb;
    }
    return n;
  }

  /**
   * Point entries `[index, index+n)` at the host clusters `host`, `host + cs`, ... (standard L2
   * entries, COPIED set) if all their slices are cached; false (nothing done) if not.
   */
  setRunNow(l2: number, index: number, n: number, host: number): boolean {
    const { entryBytes: eb, clusterSize: cs, extendedL2 } = this.h.g;
    if (extendedL2) return false;
    const cache = this.h.l2cache;
    const sb = cache.sliceBytes;
    const firstSlice = l2 + Math.floor((index * eb) / sb) * sb;
    const lastSlice = l2 + Math.floor(((index + n - 1) * eb) / sb) * sb;
    for (let s = firstSlice; s <= lastSlice; s += sb) if (!cache.peek(s)) return false;
    let k = 0;
    while (k < n) {
      const byte = (index + k) * eb;
      const at = byte % sb;
      const sliceOff = l2 + byte - at;
      const buf = cache.getNow(sliceOff)!;
      const stop = Math.min(sb, at + (n - k) * eb);
      for (let p = at; p < stop; p += 8, k++) {
        // big-endian bytes written here: this runs per cluster, cold (a call each costs more)
        const off = host + k * cs;
        const hi = Math.floor(off / 0x100000000) | COPIED_HI;
        const lo = off >>> 0;
        buf[p] = hi >>> 24;
        buf[p + 1] = hi >>> 16;
        buf[p + 2] = hi >>> 8;
        buf[p + 3] = hi;
        buf[p + 4] = lo >>> 24;
        buf[p + 5] = lo >>> 16;
        buf[p + 6] = lo >>> 8;
        buf[p + 7] = lo;
      }
      cache.markDirty(sliceOff);
    }
    return true;
  }

  async getEntry(l2: number, index: number): Promise<Entry> {
    const { sliceOff, at } = this.place(l2, index);
    return this.decode(this.h.l2cache.getNow(sliceOff) ?? (await this.h.l2cache.get(sliceOff)), at);
  }

  /** Set entry `index` of the L2 table at `l2` if its slice is cached; false (nothing done) if not. */
  setEntryNow(l2: number, index: number, e: Entry): boolean {
    const { sliceOff, at } = this.place(l2, index);
    const buf = this.h.l2cache.getNow(sliceOff);
    if (!buf) return false;
    this.encode(buf, at, e);
    this.h.l2cache.markDirty(sliceOff);
    return true;
  }

  async setEntry(l2: number, index: number, e: Entry): Promise<void> {
    const { sliceOff, at } = this.place(l2, index);
    this.encode(this.h.l2cache.getNow(sliceOff) ?? (await this.h.l2cache.get(sliceOff)), at, e);
    this.h.l2cache.markDirty(sliceOff);
  }

  /**
   * Queue the release of whatever host storage `e` references (after the new entry is durable);
   * `discard`: what it frees is discarded in the file too.
   */
  releaseOld(e: Entry, discard = false): void {
    if (e.hi & COMPRESSED_HI) {
      const cb = this.h.g.clusterBits;
      const x = 70 - cb;
      const coff = (e.hi & ((1 << (x - 32)) - 1)) * 0x100000000 + (e.lo >>> 0);
      const sectors = ((e.hi >>> (x - 32)) & ((1 << (cb - 8)) - 1)) + 1;
      const start = coff - (coff % 512);
      const first = Math.floor(start / this.h.g.clusterSize);
      const last = Math.floor((start + sectors * 512 - 1) / this.h.g.clusterSize);
      for (let c = first; c <= last; c++) this.refcounts().free(c, 1, discard);
      return;
    }
    const host = entryOffset(e.hi, e.lo);
    if (host && !this.h.g.dataFile) this.refcounts().free(host / this.h.g.clusterSize, 1, discard);
  }

  hostOf(e: Entry): number {
    return e.hi & COMPRESSED_HI ? 0 : entryOffset(e.hi, e.lo);
  }

  /** Entry owns a host cluster that may be written in place. */
  inPlace(e: Entry): boolean {
    if (e.hi & COMPRESSED_HI) return false;
    const host = entryOffset(e.hi, e.lo);
    if (this.h.g.dataFile) return host !== 0 || (e.hi & COPIED_HI) !== 0;
    return host !== 0 && (e.hi & COPIED_HI) !== 0;
  }
}
