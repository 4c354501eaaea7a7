/**
 * Shadow refcount structures: a new refcount table and new refcount blocks (of any width) are
 * built in clusters free in both the old and the new state, so the old state stays valid until the
 * header switches to the new one in a single write. Used by `amend -o refcount_bits=` and by the
 * snapshot operations on v2 images (which have no dirty bit to cover a multi-step update).
 *
 * Crash safety: before the header write, the new clusters are unreferenced and have refcount 0 in
 * the old structures (unused garbage at worst); after it, the new structures describe the new
 * state exactly (the replaced old structures have refcount 0 in them, free for reuse).
 */
import { QcowError } from '../../core/errors.js';
import { corruption, entryOffset } from './cluster-map.js';
import { QCOW_MAX_REFTABLE_SIZE } from './constants.js';
import type { Qcow2Driver } from './driver.js';
import { getRefcount, setRefcount } from './refcount.js';

export class ShadowRefcounts {
  readonly cs: number;
  private readonly oldPer: number;
  readonly per: number;
  readonly max: number;
  /** Old reftable: block offsets. */
  private oldTable: number[] = [];
  private oldBlocks = new Map<number, Uint8Array>();
  /** New blocks that differ from (or do not exist in) the old structures, by reftable index. */
  private blocks = new Map<number, Uint8Array>();
  /** Every cluster from here on is free in both structures. */
  private next = 0;
  /** Where each new block goes. */
  private placed = new Map<number, number>();

  private constructor(
    private readonly drv: Qcow2Driver,
    readonly order: number,
  ) {
    this.cs = drv.g.clusterSize;
    this.oldPer = (this.cs * 8) >> drv.header.refcountOrder;
    this.per = (this.cs * 8) >> order;
    this.max = order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
  }

  /** Open over the image's current (flushed) refcount structures, new entries `order` wide. */
  static async open(drv: Qcow2Driver, order = drv.header.refcountOrder): Promise<ShadowRefcounts> {
    const s = new ShadowRefcounts(drv, order);
    const h = drv.header;
    const raw = await drv.readMetadata(h.refcountTableOffset, h.refcountTableClusters * s.cs, 'refcount table');
    const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    let end = Math.ceil((await drv.fileLength()) / s.cs);
    for (let i = 0; i < raw.length / 8; i++) {
      const off = entryOffset(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4));
      if (off % s.cs) throw corruption(`refcount block ${i} is not cluster aligned`);
      s.oldTable.push(off);
      if (!off) continue;
      end = Math.max(end, off / s.cs + 1);
      const b = await drv.readMetadata(off, s.cs, 'refcount block');
      s.oldBlocks.set(i, b);
      for (let k = s.oldPer - 1; k >= 0; k--) {
        if (getRefcount(b, k, h.refcountOrder)) {
          end = Math.max(end, i * s.oldPer + k + 1);
          break;
        }
      }
    }
    end = Math.max(end, h.refcountTableOffset / s.cs + h.refcountTableClusters);
    s.next = end;
    s.oldEnd = end;
    return s;
  }

  /** The refcount of `cluster` in the old structures. */
  oldGet(cluster: number): number {
    const b = this.oldBlocks.get(Math.floor(cluster / this.oldPer));
    return b ? getRefcount(b, cluster % this.oldPer, this.drv.header.refcountOrder) : 0;
  }

  /** One past the last cluster in use (or in the file) before any allocation here. */
  oldEnd = 0;

  private materialize(index: number): Uint8Array {
    let b = this.blocks.get(index);
    if (b) return b;
    b = new Uint8Array(this.cs);
    if (this.order === this.drv.header.refcountOrder) {
      const old = this.oldBlocks.get(index);
      if (old) b.set(old);
    } else {
      for (let k = 0; k < this.per; k++) {
        const v = this.oldGet(index * this.per + k);
        if (v > this.max) {
          throw new QcowError('EINVAL', `Cluster at offset 0x${((index * this.per + k) * this.cs).toString(16)} has a refcount of ${v}`);
        }
        if (v) setRefcount(b, k, this.order, v);
      }
    }
    this.blocks.set(index, b);
    return b;
  }

  /** The refcount of `cluster` in the new structures. */
  get(cluster: number): number {
    const i = Math.floor(cluster / this.per);
    const b = this.blocks.get(i);
    if (b) return getRefcount(b, cluster % this.per, this.order);
    return this.oldGet(cluster);
  }

  add(cluster: number, delta: number): void {
    const v = this.get(cluster) + delta;
    if (v < 0) throw corruption(`refcount of cluster ${cluster} would drop below 0`);
    if (v > this.max) throw new QcowError('ERANGE', `Refcount overflow on cluster ${cluster} (maximum ${this.max})`);
    setRefcount(this.materialize(Math.floor(cluster / this.per)), cluster % this.per, this.order, v);
  }

  /** First cluster that may be free in both structures. */
  private hint = 1;

  /**
   * `n` contiguous fresh clusters (refcount 1 in the new structures), first fit among clusters
   * free in both the old and the new structures; returns the byte offset.
   */
  allocate(n: number): number {
    let start = this.hint;
    let run = 0;
    let c = this.hint;
    let leading = true;
    while (run < n) {
      if (c >= this.next || (this.oldGet(c) === 0 && this.get(c) === 0)) {
        if (!run) start = c;
        run++;
      } else {
        run = 0;
        if (leading) this.hint = c + 1;
      }
      if (run) leading = false;
      c++;
    }
    this.next = Math.max(this.next, start + n);
    for (let i = 0; i < n; i++) this.add(start + i, 1);
    return start * this.cs;
  }

  /** Materialize every block the old structures have (a width change rewrites them all). */
  materializeAll(): void {
    for (let i = 0; i < this.oldTable.length; i++) {
      if (this.oldTable[i]) {
        // Only ranges with clusters in use matter; empty old blocks are dropped.
        const first = i * this.oldPer;
        for (let j = Math.floor(first / this.per); j <= Math.floor((first + this.oldPer - 1) / this.per); j++) this.materialize(j);
      }
    }
  }

  /**
   * Place and write the new blocks and the new reftable (old reftable and replaced old blocks get
   * refcount 0 in the new structures). Returns where the table is; nothing points to it yet.
   */
  async finish(): Promise<{ offset: number; clusters: number }> {
    const h = this.drv.header;
    const sameWidth = this.order === h.refcountOrder;
    for (let c = 0; c < h.refcountTableClusters; c++) this.add(h.refcountTableOffset / this.cs + c, -1);
    const released = new Set<number>();
    let rtOffset = 0;
    let rtClusters = 0;
    for (;;) {
      let changed = false;
      if (sameWidth) {
        for (const i of [...this.blocks.keys()]) {
          if (this.oldTable[i] && !released.has(i)) {
            released.add(i);
            this.add(this.oldTable[i]! / this.cs, -1);
            changed = true;
          }
        }
      } else {
        for (let i = 0; i < this.oldTable.length; i++) {
          if (this.oldTable[i] && !released.has(i)) {
            released.add(i);
            this.add(this.oldTable[i]! / this.cs, -1);
            changed = true;
          }
        }
      }
      for (const i of [...this.blocks.keys()]) {
        if (!this.placed.has(i)) {
          this.placed.set(i, this.allocate(1));
          changed = true;
        }
      }
      let entries = sameWidth ? this.oldTable.length : 0;
      for (const i of this.blocks.keys()) entries = Math.max(entries, i + 1);
      const need = Math.max(1, Math.ceil((entries * 8) / this.cs));
      if (need > rtClusters) {
        if (rtClusters) for (let c = 0; c < rtClusters; c++) this.add(rtOffset / this.cs + c, -1);
        // Some room to spare, so the table's own blocks rarely force another round.
        rtClusters = need + (need > 1 ? 1 : 0);
        if (rtClusters * this.cs > QCOW_MAX_REFTABLE_SIZE) throw new QcowError('EFBIG', 'Reference count table too large');
        rtOffset = this.allocate(rtClusters);
        changed = true;
      }
      if (!changed) break;
    }
    const table = new Uint8Array(rtClusters * this.cs);
    const dv = new DataView(table.buffer);
    const entry = (i: number): number => this.placed.get(i) ?? (sameWidth ? this.oldTable[i] ?? 0 : 0);
    for (let i = 0; i < table.length / 8; i++) {
      const off = entry(i);
      if (off) dv.setBigUint64(i * 8, BigInt(off));
    }
    for (const [i, b] of [...this.blocks].sort((a, b2) => a[0] - b2[0])) await this.drv.rawWrite(b, this.placed.get(i)!);
    await this.drv.rawWrite(table, rtOffset);
    return { offset: rtOffset, clusters: rtClusters };
  }
}

/** After the header switched to new refcount structures (and maybe a new active L1). */
export function reloadAfterSwitch(drv: Qcow2Driver, l1?: Uint8Array): Promise<void> {
  return drv.reloadMetadata(l1);
}

/** Read a whole L2 table (for copying). */
export function readL2(drv: Qcow2Driver, offset: number): Promise<Uint8Array> {
  return drv.readMetadata(offset, drv.g.clusterSize, 'L2 table');
}

/**
 * `amend -o refcount_bits=N`: every refcount rewritten at the new width into new blocks and a new
 * table, made durable, then one header write switches table and width; the old structures are
 * left unreferenced with refcount 0.
 */
export async function amendRefcountBits(drv: Qcow2Driver, bits: number): Promise<void> {
  const order = Math.log2(bits);
  if (!Number.isInteger(order) || order < 0 || order > 6) throw new QcowError('EINVAL', 'Refcount width must be a power of two and may not exceed 64 bits');
  const h = drv.header;
  if (order === h.refcountOrder) return;
  if (h.version < 3) throw new QcowError('EINVAL', 'Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)');
  const w = drv.writer;
  if (!w) throw new QcowError('EPERM', `Image '${drv.filename}' is opened read-only`);
  await w.exclusive(async () => {
    await w.start();
    await w.flushMetadata();
    const sh = await ShadowRefcounts.open(drv, order);
    // A narrower width must still hold every refcount (checked in cluster order, as QEMU reports).
    if (order < h.refcountOrder) {
      const newMax = sh.max;
      for (let c = 0; c < sh.oldEnd; c++) {
        const v = sh.oldGet(c);
        if (v > newMax) {
          throw new QcowError('EINVAL', `Cannot decrease refcount entry width to ${bits} bits: Cluster at offset 0x${(c * sh.cs).toString(16)} has a refcount of ${v}`);
        }
      }
    }
    sh.materializeAll();
    const rt = await sh.finish();
    await w.barrier();
    // One write: reftable offset + clusters (48..60) through refcount_order (96..100).
    const b = new Uint8Array(52);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, BigInt(rt.offset));
    dv.setUint32(8, rt.clusters);
    dv.setUint32(12, h.nbSnapshots);
    dv.setBigUint64(16, BigInt(h.snapshotsOffset));
    dv.setBigUint64(24, h.incompatibleFeatures);
    dv.setBigUint64(32, h.compatibleFeatures);
    dv.setBigUint64(40, h.autoclearFeatures);
    dv.setUint32(48, order);
    const cur = await drv.readImageBytes(48, 52);
    if (!sameBytes(cur.subarray(12, 48), b.subarray(12, 48))) throw new QcowError('EIO', 'header changed under amend');
    await drv.rawWrite(b, 48);
    await w.barrier();
    h.refcountTableOffset = rt.offset;
    h.refcountTableClusters = rt.clusters;
    h.refcountOrder = order;
    await reloadAfterSwitch(drv);
  });
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}
