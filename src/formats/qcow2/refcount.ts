/**
 * Reference counts: the refcount table, refcount blocks (cached, dirty-tracked), cluster
 * allocation (first fit from a moving hint) and refcount-table growth.
 *
 * Crash safety: increments may reach the disk early (a crash then leaks), decrements are queued and
 * applied only after the references they drop are durable (see Qcow2Writer.flush).
 */
import { be32, setBe32 } from '../../core/be.js';
import { firstNonZero, lastNonZero } from '../../core/byte-scan.js';
import { readInto, type ByteIO } from '../../core/byte-io.js';
import { QcowError } from '../../core/errors.js';
import { corruption, entryOffset } from './cluster-map.js';
import { QCOW_MAX_REFTABLE_SIZE } from './constants.js';
import { planRefcountArea } from './refcount-area.js';

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

/** Refcount table entries (byte offsets) as stored: big-endian, in a buffer of `bytes` bytes. */
function encodeTable(entries: readonly number[], bytes: number): Uint8Array {
  const raw = new Uint8Array(bytes);
  const dv = new DataView(raw.buffer);
  for (let i = 0; i < entries.length; i++) {
    dv.setUint32(i * 8, Math.floor(entries[i]! / 0x100000000));
    dv.setUint32(i * 8 + 4, entries[i]! >>> 0);
  }
  return raw;
}

export function getRefcount(block: Uint8Array, index: number, order: number): number {
  const bits = 1 << order;
  if (bits < 8) {
    const bitPos = index * bits;
    return (block[bitPos >> 3]! >> (bitPos & 7)) & ((1 << bits) - 1);
  }
  // big-endian, 1 to 8 bytes (byte arithmetic: this runs per cluster, a DataView each time costs)
  const bytes = bits >> 3;
  const at = index * bytes;
  switch (bytes) {
    case 1:
      return block[at]!;
    case 2:
      return (block[at]! << 8) | block[at + 1]!;
    case 4:
      return be32(block, at);
    default:
      return be32(block, at) * 0x100000000 + be32(block, at + 4);
  }
}

/**
 * The first entry in `[from, to)` of a refcount block whose refcount is not 0, or `to`: for
 * whole-byte widths one scan of the bytes (memcmp where there is one), not a read per entry.
 */
export function freeRunEnd(block: Uint8Array, from: number, to: number, order: number): number {
  if (order >= 3) {
    const bytes = 1 << (order - 3);
    const nz = firstNonZero(block.subarray(from * bytes, to * bytes));
    return nz < 0 ? to : from + Math.floor(nz / bytes);
  }
  for (let i = from; i < to; i++) if (getRefcount(block, i, order) !== 0) return i;
  return to;
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
  const at = index * bytes;
  switch (bytes) {
    case 1:
      block[at] = value;
      break;
    case 2:
      block[at] = value >>> 8;
      block[at + 1] = value;
      break;
    case 4:
      setBe32(block, at, value);
      break;
    default:
      setBe32(block, at, Math.floor(value / 0x100000000));
      setBe32(block, at + 4, value >>> 0);
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
  private pendingFrees: Array<{ cluster: number; count: number; discard?: boolean }> = [];
  /** Clusters freed by frees marked for discard, to discard in the file once that is durable. */
  private toDiscard: number[] = [];
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
    const table: number[] = new Array<number>(raw.length / 8).fill(0);
    // entries past the last non-zero byte are 0 (most of a table, which has room to grow)
    const used = Math.ceil((lastNonZero(raw) + 1) / 8);
    for (let i = 0; i < used; i++) {
      const hi = be32(raw, i * 8);
      const lo = be32(raw, i * 8 + 4);
      const off = entryOffset(hi, lo) + (hi & 0xff000000) * 0x100000000; // keep reserved high bits visible
      if (off % cs !== 0) throw corruption(`refcount block ${i} is not cluster aligned`);
      table[i] = off;
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
    const now = this.getNow(cluster);
    if (now !== undefined) return now;
    const b = await this.block(Math.floor(cluster / this.entriesPerBlock));
    return b ? getRefcount(b, cluster % this.entriesPerBlock, this.host.refcountOrder) : 0;
  }

  /** The refcount of `cluster` if its block is cached (or there is none), else undefined. */
  private getNow(cluster: number): number | undefined {
    const off = this.table[Math.floor(cluster / this.entriesPerBlock)];
    if (!off) return 0;
    const b = this.blocks.get(off);
    return b && getRefcount(b, cluster % this.entriesPerBlock, this.host.refcountOrder);
  }

  /**
   * How many clusters from `cluster` on (at most `n`) are free, as far as the cached blocks tell
   * (clusters without a block are free): stops at a cluster in use or in an uncached block.
   */
  private freeRunNow(cluster: number, n: number): number {
    const per = this.entriesPerBlock;
    const order = this.host.refcountOrder;
    let k = 0;
    while (k < n) {
      const rt = Math.floor((cluster + k) / per);
      const end = Math.min(n, (rt + 1) * per - cluster);
      const off = this.table[rt];
      if (!off) {
        k = end;
        continue;
      }
      const b = this.blocks.get(off);
      if (!b) return k;
      const base = rt * per;
      const stop = freeRunEnd(b, cluster + k - base, cluster + end - base, order) + base - cluster;
      if (stop < end) return stop;
      k = end;
    }
    return k;
  }

  /** The refcount block of table index `rt` if it is cached, else undefined (none, or not loaded). */
  private cachedBlock(rt: number): Uint8Array | undefined {
    const off = this.table[rt];
    return off ? this.blocks.get(off) : undefined;
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
    let b = this.cachedBlock(rt) ?? (await this.block(rt));
    if (!b) {
      if (delta < 0) throw corruption(`freeing cluster ${cluster} with refcount 0`);
      await this.createBlock(rt);
      b = (await this.block(rt))!;
    }
    this.bump(b, rt, cluster, delta);
  }

  /** Add `delta` to the refcount of `cluster`, in its block `b` (table index `rt`). */
  private bump(b: Uint8Array, rt: number, cluster: number, delta: number): void {
    const i = cluster % this.entriesPerBlock;
    const v = getRefcount(b, i, this.host.refcountOrder) + delta;
    if (v < 0) throw corruption(`refcount of cluster ${cluster} would drop below 0`);
    if (v > this.maxRefcount) throw new QcowError('ERANGE', `Refcount overflow on cluster ${cluster} (maximum ${this.maxRefcount})`);
    setRefcount(b, i, this.host.refcountOrder, v);
    this.dirtyBlocks.add(this.table[rt]!);
    if (v === 0 && cluster < this.freeHint) this.freeHint = cluster;
    if (v === 0) this.freedClusters?.push(cluster);
  }

  /** Refcount +1 for clusters `[from, to)`, all in block `b` (table index `rt`): bump() for a run. */
  private increment(b: Uint8Array, rt: number, from: number, to: number): void {
    const order = this.host.refcountOrder;
    const per = this.entriesPerBlock;
    const base = rt * per;
    if (order === 4) {
      // the default width (16 bits), written here: this runs per cluster, cold (calls cost more)
      for (let c = from; c < to; c++) {
        const at = (c - base) * 2;
        const v = ((b[at]! << 8) | b[at + 1]!) + 1;
        if (v > 0xffff) throw new QcowError('ERANGE', `Refcount overflow on cluster ${c} (maximum ${this.maxRefcount})`);
        b[at] = v >>> 8;
        b[at + 1] = v;
      }
    } else {
      for (let c = from; c < to; c++) {
        const i = c - base;
        const v = getRefcount(b, i, order) + 1;
        if (v > this.maxRefcount) throw new QcowError('ERANGE', `Refcount overflow on cluster ${c} (maximum ${this.maxRefcount})`);
        setRefcount(b, i, order, v);
      }
    }
    if (to > from) this.dirtyBlocks.add(this.table[rt]!);
  }

  /** Clusters whose refcount dropped to 0 since startCollectingFreed() (shrinking discards them). */
  private freedClusters?: number[];

  startCollectingFreed(): void {
    this.freedClusters = [];
  }

  stopCollectingFreed(): number[] {
    const out = this.freedClusters ?? [];
    this.freedClusters = undefined;
    return out;
  }

  /**
   * Stop collecting, and discard in the file the clusters freed since startCollectingFreed() that
   * are still free (QEMU passes such frees on as discards after snapshot operations and shrinking,
   * so they read as zeros). Call once the frees are durable.
   */
  async discardFreed(): Promise<void> {
    await this.punchFree(this.stopCollectingFreed());
  }

  /** Discard in the file the clusters freed for discard requests that are still free (call once durable). */
  async discardReleased(): Promise<void> {
    if (!this.toDiscard.length) return;
    const list = this.toDiscard;
    this.toDiscard = [];
    await this.punchFree(list);
  }

  /** Discard (punch) those of `clusters` whose refcount is 0, in runs. */
  private async punchFree(clusters: number[]): Promise<void> {
    const punch = this.host.io.punchHole?.bind(this.host.io);
    if (!punch) return;
    const still: number[] = [];
    for (const c of [...new Set(clusters)].sort((a, b) => a - b)) if ((await this.get(c)) === 0) still.push(c);
    for (let i = 0; i < still.length; ) {
      let j = i + 1;
      while (j < still.length && still[j] === still[j - 1]! + 1) j++;
      await punch(still[i]! * this.cs, (j - i) * this.cs);
      i = j;
    }
  }

  /**
   * Drop refcount blocks that count nothing but (perhaps) themselves, as QEMU does after
   * shrinking an image: their table entries are cleared (the table written whole, durably), then
   * their clusters freed.
   */
  async dropUnusedBlocks(): Promise<void> {
    const order = this.host.refcountOrder;
    const per = this.entriesPerBlock;
    const unused: number[] = [];
    for (let rt = 0; rt < this.table.length; rt++) {
      const b = await this.block(rt);
      if (!b) continue;
      const own = this.table[rt]! / this.cs;
      const self = Math.floor(own / per) === rt ? own % per : -1;
      let empty = true;
      for (let i = 0; i < per && empty; i++) if (i !== self && getRefcount(b, i, order) !== 0) empty = false;
      if (empty) unused.push(rt);
    }
    if (!unused.length) return;
    const drop = new Set(unused);
    const raw = encodeTable(
      this.table.map((off, i) => (drop.has(i) ? 0 : off)),
      this.host.reftableClusters * this.cs,
    );
    await this.writeBlocks();
    await this.host.io.write(raw, this.host.reftableOffset);
    await this.host.io.flush();
    for (const rt of unused) {
      const off = this.table[rt]!;
      await this.update(off / this.cs, -1);
      this.table[rt] = 0;
      this.tableDirty.delete(rt);
    }
  }

  /** The last cluster with a non-zero refcount below `clusters` (-1 when none). */
  async lastUsedCluster(clusters: number): Promise<number> {
    const per = this.entriesPerBlock;
    for (let c = clusters - 1; c >= 0; ) {
      const rt = Math.floor(c / per);
      const b = await this.block(rt);
      if (!b) {
        c = rt * per - 1;
        continue;
      }
      for (; c >= rt * per; c--) if (getRefcount(b, c % per, this.host.refcountOrder) !== 0) return c;
    }
    return -1;
  }

  /**
   * Create the refcount block for reftable index `rt`, placed as QEMU places it: in the next free
   * cluster from the free-cluster index (so after a run being allocated, whose search moved the
   * index past it). When the table has no entry `rt`, the table grows (refcountArea).
   */
  private async createBlock(rt: number): Promise<void> {
    for (;;) {
      // A nested call may already have given this range its block.
      if (rt < this.table.length && this.table[rt]) return;
      const c = await this.findFree(1);
      const selfRt = Math.floor(c / this.entriesPerBlock);
      if (selfRt !== rt && !(selfRt < this.table.length && this.table[selfRt])) {
        // The free cluster lies in a range that has no block either: give that range its block
        // first (after this cluster, as the index has passed it), then try this cluster again.
        await this.createBlock(selfRt);
        this.freeHint = Math.min(this.freeHint, c);
        continue;
      }
      const off = c * this.cs;
      const block = new Uint8Array(this.cs);
      this.blocks.set(off, block);
      this.dirtyBlocks.add(off);
      if (selfRt === rt) setRefcount(block, c % this.entriesPerBlock, this.host.refcountOrder, 1);
      else await this.update(c, 1);
      if (rt < this.table.length) {
        this.table[rt] = off;
        this.tableDirty.add(rt);
        return;
      }
      // No room in the table for the block: new refcount structures past everything described
      // so far (and past the new block), the block taken into the new table.
      const blocksUsed = Math.max(rt + 1, Math.ceil((c + 1) / this.entriesPerBlock));
      await this.refcountArea(blocksUsed * this.entriesPerBlock, 0, false, rt, c);
      return;
    }
  }

  /**
   * Find `n` contiguous free clusters from the free-cluster index, first fit, and move the index
   * past them, as QEMU does: the index only moves forward (clusters it passed are not looked at
   * again) until a refcount drops to 0 behind it. Clusters past every block are free.
   */
  private async findFree(n: number): Promise<number> {
    const per = this.entriesPerBlock;
    const order = this.host.refcountOrder;
    let start = this.freeHint;
    let run = 0;
    for (let c = this.freeHint; ; ) {
      const rt = Math.floor(c / per);
      const blockEnd = (rt + 1) * per;
      if (rt >= this.table.length || !this.table[rt]) {
        // no block: all free
        if (run === 0) start = c;
        run += blockEnd - c;
        c = blockEnd;
      } else {
        // one block: its free runs found by scans (freeRunEnd), not a lookup per cluster
        const b = this.cachedBlock(rt) ?? (await this.block(rt))!;
        const base = rt * per;
        while (c < blockEnd && run < n) {
          const used = base + freeRunEnd(b, c - base, per, order);
          if (used > c) {
            if (run === 0) start = c;
            run += used - c;
            c = used;
          }
          if (run < n && c < blockEnd) {
            run = 0; // c is in use
            c++;
          }
        }
      }
      if (run >= n) {
        this.freeHint = start + n;
        return start;
      }
    }
  }

  /**
   * Allocate `n` contiguous clusters (refcount 1 each). Returns the host byte offset. As in QEMU,
   * a refcount block the run needs is created at the free-cluster index (after the run); then
   * what was counted is undone and the search starts again at the run (the new structures may
   * have taken clusters of it; growing the table frees the old one, which moves the index back).
   */
  async allocate(n: number): Promise<number> {
    for (;;) {
      const start = await this.findFree(n);
      if (await this.countRun(start, n)) return start * this.cs;
    }
  }

  /**
   * Refcount +1 for clusters `[start, start+n)`, in order, as QEMU's update_refcount: at the first
   * one whose refcount block is missing, the block is made (at the free-cluster index, so past
   * the clusters counted so far), what was counted is undone, the index goes back to `start` (the
   * clusters are likely still free) and false is returned: the caller searches again.
   */
  private async countRun(start: number, n: number): Promise<boolean> {
    let c = start;
    while (c < start + n) {
      const rt = Math.floor(c / this.entriesPerBlock);
      if (!(rt < this.table.length && this.table[rt])) break;
      const segEnd = Math.min(start + n, (rt + 1) * this.entriesPerBlock);
      const b = this.cachedBlock(rt) ?? (await this.block(rt))!;
      this.increment(b, rt, c, segEnd);
      c = segEnd;
    }
    if (c === start + n) return true;
    await this.createBlock(Math.floor(c / this.entriesPerBlock));
    for (let k = start; k < c; k++) await this.update(k, -1);
    this.freeHint = Math.min(this.freeHint, start);
    return false;
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

  /**
   * Queue a decrement, applied by applyFrees() once the dropped references are durable. `discard`:
   * a cluster it frees is then discarded in the file (QEMU's pass-discard-request), see
   * discardReleased().
   */
  free(cluster: number, count = 1, discard = false): void {
    for (let i = 0; i < count; i++) this.pendingFrees.push(discard ? { cluster: cluster + i, count: 1, discard } : { cluster: cluster + i, count: 1 });
  }

  async applyFrees(): Promise<void> {
    const frees = this.pendingFrees;
    this.pendingFrees = [];
    for (const f of frees) {
      await this.update(f.cluster, -f.count);
      if (f.discard) this.toDiscard.push(f.cluster);
    }
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
   * Grow the refcount table (QEMU's refcount area, see refcount-area.ts): at cluster `start`, the
   * missing refcount blocks that describe the new structures (and `additional` clusters more),
   * then the new table holding the old entries and `newBlock` at `newIndex`. Blocks and table are
   * written and made durable before the header points to the new table; the old table is freed
   * afterwards. Returns the first cluster after the new structures.
   */
  async refcountArea(start: number, additional: number, exact: boolean, newIndex = 0, newBlock = 0): Promise<number> {
    const cs = this.cs;
    const per = this.entriesPerBlock;
    const area = planRefcountArea(
      this.table.map((o) => o / cs),
      per,
      cs / 8,
      start,
      additional,
      exact,
      newIndex,
      newBlock,
    );
    if (area.table.length * 8 > QCOW_MAX_REFTABLE_SIZE) throw new QcowError('EFBIG', 'Reference count table too large');
    // The current table gets the blocks hooked up since the last flush first (QEMU writes each
    // entry as it hooks the block up), so it is complete when it is left behind.
    await this.writeBlocks();
    await this.writeTableEntries();
    const oldOffset = this.host.reftableOffset;
    const oldClusters = this.host.reftableClusters;
    this.table = area.table.map((c) => c * cs);
    for (const [, c] of area.created) {
      this.blocks.set(c * cs, new Uint8Array(cs));
      this.dirtyBlocks.add(c * cs);
    }
    for (let i = area.areaIndex; i < area.total; i++) {
      const first = i * per;
      if (first >= area.endCluster) continue;
      const off = this.table[i]!;
      const b = (await this.block(i))!;
      for (let c = Math.max(first, start); c < Math.min(area.endCluster, first + per); c++) {
        if (getRefcount(b, c - first, this.host.refcountOrder) !== 0) throw corruption(`cluster ${c} of the new refcount structures is in use`);
        setRefcount(b, c - first, this.host.refcountOrder, 1);
      }
      this.dirtyBlocks.add(off);
    }
    const raw = encodeTable(this.table, area.tableClusters * cs);
    const newOffset = area.tableCluster * cs;
    await this.writeBlocks();
    await this.host.io.write(raw, newOffset);
    await this.host.io.flush();
    this.host.reftableOffset = newOffset;
    this.host.reftableClusters = area.tableClusters;
    await this.host.onReftableMoved(newOffset, area.tableClusters);
    await this.host.io.flush();
    this.tableDirty.clear();
    // Nothing refers to the old table any more (the header switch is durable): free it now, which
    // moves the free-cluster index back to it, as in QEMU.
    for (let i = 0; i < oldClusters; i++) await this.update(oldOffset / cs + i, -1);
    return area.endCluster;
  }

  /**
   * Take as many free clusters from `cluster` on as there are, up to `n` (QEMU's allocation at a
   * given offset); returns how many.
   */
  async allocateAtMost(cluster: number, n: number): Promise<number> {
    for (;;) {
      let k = this.freeRunNow(cluster, n);
      while (k < n && (this.getNow(cluster + k) ?? (await this.get(cluster + k))) === 0) k++;
      if (k === 0) return 0;
      if (await this.countRun(cluster, k)) return k;
    }
  }

  /** Take `n` free clusters from `cluster` on (refcount 1 each; their blocks must exist). */
  async allocateAt(cluster: number, n: number): Promise<void> {
    for (let c = cluster; c < cluster + n; c++) {
      if ((await this.get(c)) !== 0) throw corruption(`cluster ${c} to preallocate is in use`);
      await this.update(c, 1);
    }
  }
}
