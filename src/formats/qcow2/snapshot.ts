/**
 * Internal snapshots: create, apply (revert to), delete. Each walks the L1/L2 tree of a state to
 * add or drop one reference per cluster, then recomputes the COPIED flags of the active state.
 *
 * Crash safety: on v3 images the dirty bit is set for the duration, so an interrupted operation
 * is repaired (refcounts rebuilt, COPIED flags fixed) on the next read-write open. On v2 images,
 * which have no dirty bit, references are only ever added before they are used and dropped after
 * they stop being used, so an interruption leaks clusters at worst.
 */
import { QcowError } from '../../core/errors.js';
import * as C from './constants.js';
import { corruption, entryOffset } from './cluster-map.js';
import type { Qcow2Driver } from './driver.js';
import { encodeSnapshotTable, type SnapshotEntry } from './snapshot-table.js';
import type { Entry, Qcow2Writer } from './writer.js';

const COPIED_HI = 0x80000000;
const COMPRESSED_HI = 0x40000000;

export interface SnapshotCreateOptions {
  name: string;
  /** Defaults to now. */
  dateSec?: number;
  dateNsec?: number;
  vmClockNsec?: number;
  icount?: number;
}

/** Find a snapshot the way qemu-img does: by ID first, then by name. */
export function findSnapshot(list: SnapshotEntry[], idOrName: string): SnapshotEntry | undefined {
  return list.find((s) => s.id === idOrName) ?? list.find((s) => s.name === idOrName);
}

export class SnapshotOps {
  constructor(
    private drv: Qcow2Driver,
    private w: Qcow2Writer,
  ) {}

  private get cs(): number {
    return this.drv.g.clusterSize;
  }

  private async readL1(offset: number, size: number): Promise<Uint8Array> {
    return this.drv.readMetadata(offset, size * 8, 'snapshot L1 table');
  }

  /** Visit every cluster a tree references: L2 tables and data (compressed ranges per host cluster). */
  private async forEachCluster(l1: Uint8Array, fn: (cluster: number) => Promise<void>): Promise<void> {
    const { g } = this.drv;
    const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    for (let i = 0; i < l1.length / 8; i++) {
      const l2 = entryOffset(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4));
      if (!l2) continue;
      if (l2 % this.cs) throw corruption(`L2 table offset 0x${l2.toString(16)} unaligned (L1 index: 0x${i.toString(16)})`);
      await fn(l2 / this.cs);
      for (let k = 0; k < g.l2Entries; k++) {
        const e = await this.w.getEntry(l2, k);
        for (const c of this.entryClusters(e)) await fn(c);
      }
    }
  }

  private entryClusters(e: Entry): number[] {
    const { g } = this.drv;
    if (e.hi & COMPRESSED_HI) {
      const x = 70 - g.clusterBits;
      const coff = (e.hi & ((1 << (x - 32)) - 1)) * 0x100000000 + (e.lo >>> 0);
      const sectors = ((e.hi >>> (x - 32)) & ((1 << (g.clusterBits - 8)) - 1)) + 1;
      const start = coff - (coff % 512);
      const out: number[] = [];
      for (let c = Math.floor(start / this.cs); c <= Math.floor((start + sectors * 512 - 1) / this.cs); c++) out.push(c);
      return out;
    }
    const host = entryOffset(e.hi, e.lo);
    if (!host || g.dataFile) return [];
    return [host / this.cs];
  }

  private async adjustTree(l1: Uint8Array, delta: 1 | -1): Promise<void> {
    await this.forEachCluster(l1, (c) => this.w.refcounts.update(c, delta));
  }

  /** Make COPIED exact in the active L1 and every L2 table it references. */
  private async recomputeCopied(): Promise<void> {
    const { g } = this.drv;
    const rc = this.w.refcounts;
    const l1 = this.drv.activeL1;
    for (let i = 0; i < l1.length / 8; i++) {
      const { hi, lo } = this.w.l1Entry(i);
      const l2 = entryOffset(hi, lo);
      if (!l2) continue;
      const shared = (await rc.get(l2 / this.cs)) !== 1;
      if (shared === ((hi & COPIED_HI) !== 0)) this.w.setL1Entry(i, l2, !shared);
      for (let k = 0; k < g.l2Entries; k++) {
        const e = await this.w.getEntry(l2, k);
        if (e.hi & COMPRESSED_HI) continue;
        const host = entryOffset(e.hi, e.lo);
        if (!host && !(g.dataFile && e.hi & COPIED_HI)) continue;
        const want = g.dataFile ? true : (await rc.get(host / this.cs)) === 1;
        if (want !== ((e.hi & COPIED_HI) !== 0)) {
          await this.w.setEntry(l2, k, { ...e, hi: (want ? e.hi | COPIED_HI : e.hi & ~COPIED_HI) >>> 0 });
        }
      }
    }
  }

  private async markDirty(on: boolean): Promise<void> {
    const h = this.drv.header;
    if (h.version < 3) return;
    if (on) h.incompatibleFeatures |= C.INCOMPAT_DIRTY;
    else h.incompatibleFeatures &= ~C.INCOMPAT_DIRTY;
    await this.w.writeHeaderFeatures();
    await this.w.barrier();
  }

  /** Write a new snapshot table in fresh clusters, switch the header to it, free the old one. */
  private async writeTable(list: SnapshotEntry[]): Promise<void> {
    const h = this.drv.header;
    const bytes = encodeSnapshotTable(list);
    if (bytes.length > C.QCOW_MAX_SNAPSHOTS_SIZE) throw new QcowError('EFBIG', 'Snapshot table too large');
    let offset = 0;
    if (list.length) {
      offset = await this.w.refcounts.allocate(Math.ceil(bytes.length / this.cs));
      await this.w.refcounts.writeBlocks();
      await this.drv.rawWrite(bytes, offset);
      await this.w.barrier();
      await this.w.refcounts.writeTableEntries();
    }
    const oldOffset = h.snapshotsOffset;
    const oldBytes = encodeSnapshotTable(this.drv.snapshots).length;
    const b = new Uint8Array(12);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, list.length);
    dv.setBigUint64(4, BigInt(offset));
    await this.drv.rawWrite(b, 60);
    await this.w.barrier();
    h.nbSnapshots = list.length;
    h.snapshotsOffset = offset;
    if (oldOffset && this.drv.snapshots.length) this.w.refcounts.free(oldOffset / this.cs, Math.ceil(oldBytes / this.cs));
    this.drv.snapshots = list;
  }

  async create(opts: SnapshotCreateOptions): Promise<SnapshotEntry> {
    const drv = this.drv;
    if (drv.g.dataFile) throw new QcowError('ENOTSUP', 'Could not create snapshot: snapshots are not supported with an external data file');
    if (drv.snapshots.length >= C.QCOW_MAX_SNAPSHOTS) throw new QcowError('EFBIG', 'Too many snapshots');
    return this.w.exclusive(async () => {
      await this.w.start();
      await this.w.flushMetadata();
      await this.markDirty(true);
      const l1 = drv.activeL1.slice();
      const l1Clusters = Math.max(1, Math.ceil(l1.length / this.cs));
      const l1Offset = l1.length ? await this.w.refcounts.allocate(l1Clusters) : 0;
      await this.adjustTree(l1, 1);
      await this.w.refcounts.writeBlocks();
      if (l1.length) await drv.rawWrite(l1, l1Offset);
      await this.w.barrier();
      await this.w.refcounts.writeTableEntries();
      await this.recomputeCopied();
      await this.w.flushMetadata();
      const now = Date.now();
      const maxId = drv.snapshots.reduce((m, s) => Math.max(m, /^\d+$/.test(s.id) ? Number(s.id) : 0), 0);
      const entry: SnapshotEntry = {
        l1TableOffset: l1Offset,
        l1Size: l1.length / 8,
        id: String(maxId + 1),
        name: opts.name,
        dateSec: opts.dateSec ?? Math.floor(now / 1000),
        dateNsec: opts.dateNsec ?? (now % 1000) * 1e6,
        vmClockNsec: opts.vmClockNsec ?? 0,
        vmStateSize: 0,
        diskSize: drv.size,
        icount: opts.icount ?? 0,
        unknownExtra: new Uint8Array(0),
        extraDataSize: 24,
      };
      await this.writeTable([...drv.snapshots, entry]);
      await this.w.flushMetadata();
      await this.markDirty(false);
      return entry;
    });
  }

  async delete(idOrName: string): Promise<void> {
    const drv = this.drv;
    const sn = findSnapshot(drv.snapshots, idOrName);
    if (!sn) throw new QcowError('ENOENT', `Could not delete snapshot '${idOrName}': snapshot not found`);
    await this.w.exclusive(async () => {
      await this.w.start();
      await this.w.flushMetadata();
      await this.markDirty(true);
      const l1 = await this.readL1(sn.l1TableOffset, sn.l1Size);
      // Drop the entry first: from here the tree is unreferenced, so a crash only leaks.
      await this.writeTable(drv.snapshots.filter((s) => s !== sn));
      await this.w.flushMetadata();
      await this.adjustTree(l1, -1);
      if (sn.l1Size) this.w.refcounts.free(sn.l1TableOffset / this.cs, Math.ceil((sn.l1Size * 8) / this.cs));
      await this.w.refcounts.applyFrees();
      await this.recomputeCopied();
      await this.w.flushMetadata();
      await this.markDirty(false);
    });
  }

  async apply(idOrName: string): Promise<void> {
    const drv = this.drv;
    const sn = findSnapshot(drv.snapshots, idOrName);
    if (!sn) throw new QcowError('ENOENT', `Could not apply snapshot '${idOrName}': Failed to load snapshot: No such file or directory`);
    await this.w.exclusive(async () => {
      await this.w.start();
      await this.w.flushMetadata();
      await this.markDirty(true);
      const snL1 = await this.readL1(sn.l1TableOffset, sn.l1Size);
      const oldL1 = drv.activeL1.slice();
      await this.adjustTree(snL1, 1);
      await this.w.flushMetadata();
      const newSize = sn.diskSize ?? drv.header.size;
      await drv.replaceActiveL1(snL1, newSize);
      await this.adjustTree(oldL1, -1);
      await this.recomputeCopied();
      await this.w.flushMetadata();
      await this.markDirty(false);
    });
  }
}
