/**
 * Reference counts: the refcount table, refcount blocks (cached, dirty-tracked), cluster
 * allocation (first fit from a moving hint) and refcount-table growth.
 *
 * Crash safety: increments may reach the disk early (a crash then leaks), decrements are queued and
 * applied only after the references they drop are durable (see Qcow2Writer.flush).
 */
import { readInto, type ByteIO } from '../../core/byte-io.js';
import { QcowError } from '../../core/errors.js';
import { corruption, entryOffset } from './cluster-map.js';
import { QCOW_MAX_REFTABLE_SIZE } from './constants.js';

export interface RefcountHost {
  io: ByteIO;
  clusterBits: number;
  refcountOrder: number;
  /** Current reftable location; updated by growth through `onReftableMoved`. */
  reftableOffset: number;
  reftableClusters: number;
  /** Write the header fields that locate the refcount table (offset + clusters). */
  onReftableMoved(offset: number, clusters: number): Promise<void>;
}

export function getRefcount(block: Uint8Array, index: number, order: number): number {
  const bits = 1 << order;
  if (bits < 8) {
    const bitPos = index * bits;
    return (block[bitPos >> 3]! >> (bitPos & 7)) & ((1 << bits) - 1);
  }
  const bytes = bits >> 3;
  const dv = new DataView(block.buffer, block.byteOffset + index * bytes, bytes);
  switch (bytes) {
    case 1:
      return dv.getUint8(0);
    case 2:
      return dv.getUint16(0);
    case 4:
      return dv.getUint32(0);
    default:
      return dv.getUint32(0) * 0x100000000 + dv.getUint32(4);
  }
}

export function setRefcount(block: Uint8Array, index: number, order: number, value: number): void {
  const bits = 1 << order;
  if (bits < 8) {
    const bitPos = index * bits;
    const mask = ((1 << bits) - 1) << (bitPos & 7);
    block[bitPos >> 3] = (block[bitPos >> 3]! & ~mask) | ((value << (bitPos & 7)) & mask);
    return;
  }
  const bytes = bits >> 3;
  const dv = new DataView(block.buffer, block.byteOffset + index * bytes, bytes);
  switch (bytes) {
    case 1:
      dv.setUint8(0, value);
      break;
    case 2:
      dv.setUint16(0, value);
      break;
    case 4:
      dv.setUint32(0, value);
      break;
    default:
      dv.setUint32(0, Math.floor(value / 0x100000000));
      dv.setUint32(4, value >>> 0);
  }
}

export class Refcounts {
  readonly cs: number;
  readonly entriesPerBlock: number;
  readonly maxRefcount: number;
  /** Reftable entries (block offsets; 0 = none). */
  private table: number[];
  private tableDirty = new Set<number>();
  private blocks = new Map<number, Uint8Array>(); // block offset → content
  private dirtyBlocks = new Set<number>();
  private pendingFrees: Array<{ cluster: number; count: number }> = [];
  /** First cluster that may be free. */
  private freeHint = 0;
  /** Partly used cluster for compressed data (byte offset of the next free byte), 0 = none. */
  freeByteOffset = 0;

  private constructor(private host: RefcountHost, table: number[]) {
    this.cs = 2 ** host.clusterBits;
    this.entriesPerBlock = (this.cs * 8) >> host.refcountOrder;
    this.maxRefcount = host.refcountOrder >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << host.refcountOrder) - 1;
    this.table = table;
  }

  static async load(host: RefcountHost): Promise<Refcounts> {
    const cs = 2 ** host.clusterBits;
    const raw = new Uint8Array(host.reftableClusters * cs);
    await readInto(host.io, raw, host.reftableOffset);
    const dv = new DataView(raw.buffer);
    const table: number[] = [];
    for (let i = 0; i < raw.length / 8; i++) {
      const hi = dv.getUint32(i * 8);
      const lo = dv.getUint32(i * 8 + 4);
      const off = entryOffset(hi, lo) + (hi & 0xff000000) * 0x100000000; // keep reserved high bits visible
      if (off % cs !== 0) throw corruption(`refcount block ${i} is not cluster aligned`);
      table.push(off);
    }
    return new Refcounts(host, table);
  }

  get hasDirty(): boolean {
    return this.dirtyBlocks.size > 0 || this.tableDirty.size > 0;
  }
  get hasPendingFrees(): boolean {
    return this.pendingFrees.length > 0;
  }

  private async block(rtIndex: number): Promise<Uint8Array | undefined> {
    const off = this.table[rtIndex];
    if (!off) return undefined;
    let b = this.blocks.get(off);
    if (!b) {
      b = new Uint8Array(this.cs);
      await readInto(this.host.io, b, off);
      this.blocks.set(off, b);
      this.evict();
    }
    return b;
  }

  private evict(): void {
    // Keep at most 8 MiB of clean blocks.
    const max = Math.max(64, (8 << 20) / this.cs);
    if (this.blocks.size <= max) return;
    for (const k of this.blocks.keys()) {
      if (this.blocks.size <= max) break;
      if (!this.dirtyBlocks.has(k)) this.blocks.delete(k);
    }
  }

  async get(cluster: number): Promise<number> {
    const b = await this.block(Math.floor(cluster / this.entriesPerBlock));
    return b ? getRefcount(b, cluster % this.entriesPerBlock, this.host.refcountOrder) : 0;
  }

  /** Clusters in `[0, end)` with a non-zero refcount, counted up to `limit` (then `limit`). */
  async countInUse(end: number, limit: number): Promise<number> {
    const per = this.entriesPerBlock;
    const order = this.host.refcountOrder;
    let count = 0;
    for (let rt = 0; rt * per < end && count < limit; rt++) {
      const b = await this.block(rt);
      if (!b) continue;
      const n = Math.min(per, end - rt * per);
      for (let i = 0; i < n && count < limit; i++) if (getRefcount(b, i, order) > 0) count++;
    }
    return count;
  }

  /** Add `delta` to the refcount of `cluster`, creating the refcount block if needed. */
  async update(cluster: number, delta: number): Promise<void> {
    const rt = Math.floor(cluster / this.entriesPerBlock);
    let b = await this.block(rt);
    if (!b) {
      if (delta < 0) throw corruption(`freeing cluster ${cluster} with refcount 0`);
      await this.createBlock(rt);
      b = (await this.block(rt))!;
    }
    const i = cluster % this.entriesPerBlock;
    const v = getRefcount(b, i, this.host.refcountOrder) + delta;
    if (v < 0) throw corruption(`refcount of cluster ${cluster} would drop below 0`);
    if (v > this.maxRefcount) throw new QcowError('ERANGE', `Refcount overflow on cluster ${cluster} (maximum ${this.maxRefcount})`);
    setRefcount(b, i, this.host.refcountOrder, v);
    this.dirtyBlocks.add(this.table[rt]!);
    if (v === 0 && cluster < this.freeHint) this.freeHint = cluster;
  }

  /**
   * Create the refcount block for reftable index `rt`, placed so it is itself refcounted: in the
   * first free cluster (at or after `after` when given — QEMU puts the block a run of new clusters
   * needs right after that run).
   */
  private async createBlock(rt: number, after?: number): Promise<void> {
    if (rt >= this.table.length) await this.growTable(rt + 1);
    for (;;) {
      // Growing the table (or a nested call) may already have given this range its block.
      if (this.table[rt]) return;
      const c = await this.findFree(1, after === undefined ? this.freeHint : Math.max(after, this.freeHint));
      const selfRt = Math.floor(c / this.entriesPerBlock);
      if (selfRt !== rt && !this.table[selfRt]) {
        // The free cluster lies in a range that has no block either: give that range its block first.
        await this.createBlock(selfRt, after);
        continue;
      }
      const off = c * this.cs;
      const block = new Uint8Array(this.cs);
      this.table[rt] = off;
      this.blocks.set(off, block);
      this.dirtyBlocks.add(off);
      this.tableDirty.add(rt);
      if (selfRt === rt) setRefcount(block, c % this.entriesPerBlock, this.host.refcountOrder, 1);
      else await this.update(c, 1);
      return;
    }
  }

  /** Find `n` contiguous free clusters at or after `from` (clusters past every block are free). */
  private async findFree(n: number, from: number): Promise<number> {
    let start = from;
    let run = 0;
    let leadingUsed = from === this.freeHint;
    for (let c = from; ; c++) {
      const rt = Math.floor(c / this.entriesPerBlock);
      if (rt >= this.table.length || !this.table[rt]) {
        if (run === 0) start = c;
        const blockEnd = (rt + 1) * this.entriesPerBlock;
        const take = Math.min(n - run, blockEnd - c);
        run += take;
        c += take - 1;
      } else {
        const b = (await this.block(rt))!;
        if (getRefcount(b, c % this.entriesPerBlock, this.host.refcountOrder) === 0) {
          if (run === 0) start = c;
          run++;
        } else run = 0;
      }
      if (leadingUsed) {
        // Clusters before the first free one never need scanning again.
        if (run > 0) {
          this.freeHint = start;
          leadingUsed = false;
        } else this.freeHint = c + 1;
      }
      if (run >= n) return start;
    }
  }

  /**
   * Allocate `n` contiguous clusters (refcount 1 each). Returns the host byte offset. Refcount
   * blocks needed for them are created first, after the run (as QEMU places them), so they never
   * land inside it.
   */
  async allocate(n: number): Promise<number> {
    for (;;) {
      const start = await this.findFree(n, this.freeHint);
      // Make sure every refcount block covering the run exists; creating one (or growing the
      // table) may still take a cluster of the run, in which case search again.
      let moved = false;
      for (let rt = Math.floor(start / this.entriesPerBlock); rt <= Math.floor((start + n - 1) / this.entriesPerBlock); rt++) {
        if (rt >= this.table.length || !this.table[rt]) {
          await this.createBlock(rt, start + n);
          moved = true;
        }
      }
      if (moved) {
        let free = true;
        for (let c = start; c < start + n && free; c++) if ((await this.get(c)) !== 0) free = false;
        if (!free) continue;
      }
      for (let c = start; c < start + n; c++) await this.update(c, 1);
      if (start === this.freeHint) this.freeHint = start + n;
      return start * this.cs;
    }
  }

  /** Allocate `size` bytes for compressed data, packing into the current partly used cluster like QEMU. */
  async allocateBytes(size: number): Promise<number> {
    const cs = this.cs;
    let off = this.freeByteOffset;
    if (off === 0 || Math.floor(off / cs) !== Math.floor((off + size - 1) / cs)) {
      // Does not fit in the current cluster: get fresh clusters for the remainder.
      const needFrom = off && off % cs ? Math.ceil(off / cs) * cs : 0;
      const extra = needFrom ? Math.ceil((off + size - needFrom) / cs) : Math.ceil(size / cs);
      const fresh = await this.allocateNoFirst(extra);
      if (!needFrom || fresh !== needFrom) {
        off = fresh;
        // the first cluster of `fresh` already has refcount 1 from allocate(); the others too.
        this.freeByteOffset = off + size;
        if (this.freeByteOffset % cs === 0) this.freeByteOffset = 0;
        return off;
      }
      // Contiguous with the partly used cluster: the range spans it (+1 there) and the fresh ones.
      await this.update(Math.floor(off / cs), 1);
      this.freeByteOffset = off + size;
      if (this.freeByteOffset % cs === 0) this.freeByteOffset = 0;
      return off;
    }
    await this.update(Math.floor(off / cs), 1);
    this.freeByteOffset = off + size;
    if (this.freeByteOffset % cs === 0) this.freeByteOffset = 0;
    return off;
  }

  private async allocateNoFirst(n: number): Promise<number> {
    return this.allocate(n);
  }

  /** Queue a decrement, applied by applyFrees() once the dropped references are durable. */
  free(cluster: number, count = 1): void {
    for (let i = 0; i < count; i++) this.pendingFrees.push({ cluster: cluster + i, count: 1 });
  }

  async applyFrees(): Promise<void> {
    const frees = this.pendingFrees;
    this.pendingFrees = [];
    for (const f of frees) await this.update(f.cluster, -f.count);
  }

  /** Write dirty refcount blocks (step 1), then the reftable entries that point to new blocks (after a barrier). */
  async writeBlocks(): Promise<void> {
    const dirty = [...this.dirtyBlocks].sort((a, b) => a - b);
    this.dirtyBlocks.clear();
    for (const off of dirty) await this.host.io.write(this.blocks.get(off)!, off);
    this.evict();
  }

  async writeTableEntries(): Promise<void> {
    if (!this.tableDirty.size) return;
    const idx = [...this.tableDirty].sort((a, b) => a - b);
    this.tableDirty.clear();
    // Coalesce to whole 512-byte sectors of the table.
    const sectors = new Set(idx.map((i) => Math.floor((i * 8) / 512)));
    for (const s of sectors) {
      const buf = new Uint8Array(512);
      const dv = new DataView(buf.buffer);
      for (let j = 0; j < 64; j++) {
        const v = this.table[s * 64 + j] ?? 0;
        dv.setUint32(j * 8, Math.floor(v / 0x100000000));
        dv.setUint32(j * 8 + 4, v >>> 0);
      }
      await this.host.io.write(buf, this.host.reftableOffset + s * 512);
    }
    // Nothing may point into a new block's range before its table entry is durable.
    await this.host.io.flush();
  }

  /**
   * Grow the refcount table to at least `minEntries`: a new, larger table is placed in free
   * clusters, refcounted, written and made durable before the header points to it; the old one
   * is freed afterwards.
   */
  private async growTable(minEntries: number): Promise<void> {
    const cs = this.cs;
    const perCluster = cs / 8;
    let clusters = Math.max(this.host.reftableClusters + 1, Math.ceil((minEntries * 3) / 2 / perCluster));
    if (clusters * cs > QCOW_MAX_REFTABLE_SIZE && clusters > 1) {
      clusters = Math.max(Math.ceil(minEntries / perCluster), 1);
      if (clusters * cs > QCOW_MAX_REFTABLE_SIZE) throw new QcowError('EFBIG', 'Reference count table too large');
    }
    // Place the new table after every cluster any existing block describes, in a fresh area;
    // its refcount block(s), if missing, are created by allocate() through the normal path once
    // the in-memory table is large enough.
    const oldOffset = this.host.reftableOffset;
    const oldClusters = this.host.reftableClusters;
    while (this.table.length < clusters * perCluster) this.table.push(0);
    // Temporarily treat the table as bigger so allocation of blocks covering the new area works.
    const newOffset = await this.allocate(clusters);
    // Write the complete new table (entries may have changed during allocate()).
    const raw = new Uint8Array(clusters * cs);
    const dv = new DataView(raw.buffer);
    for (let i = 0; i < this.table.length; i++) {
      dv.setUint32(i * 8, Math.floor(this.table[i]! / 0x100000000));
      dv.setUint32(i * 8 + 4, this.table[i]! >>> 0);
    }
    await this.writeBlocks();
    await this.host.io.write(raw, newOffset);
    await this.host.io.flush();
    this.host.reftableOffset = newOffset;
    this.host.reftableClusters = clusters;
    await this.host.onReftableMoved(newOffset, clusters);
    await this.host.io.flush();
    this.tableDirty.clear();
    this.free(oldOffset / cs, oldClusters);
  }
}
