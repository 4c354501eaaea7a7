/**
 * Internal snapshots: create, apply (revert to), delete. Each walks the L1/L2 tree of a state to
 * add or drop one reference per cluster, then recomputes the COPIED flags of the active state.
 *
 * Crash safety: on v3 images the dirty bit is set for the duration, so an interrupted operation
 * is repaired (refcounts rebuilt, COPIED flags fixed) on the next read-write open. v2 images have
 * no dirty bit, and refcounts and COPIED flags live in different clusters, so no order of in-place
 * writes avoids a window where they disagree: there the new state (active L2 copies, active L1,
 * snapshot table, refcount blocks and table) is written beside the old one and a single header
 * write switches over (see amend-refcount.ts).
 *
 * Creating a snapshot first checks that no refcount would overflow (refcount_bits=1 or 2 with
 * shared clusters): the image is then left exactly as it was.
 */
import { QcowError } from '../../core/errors.js';
import * as C from './constants.js';
import { corruption, entryOffset } from './cluster-map.js';
import type { Qcow2Driver } from './driver.js';
import { readL2, reloadAfterSwitch, ShadowRefcounts } from './amend-refcount.js';
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

/** Bytes a snapshot table occupies on disk (as QEMU counts them: up to the end of its last entry). */
export function tableBytesOnDisk(list: SnapshotEntry[]): number {
  const enc = new TextEncoder();
  // each entry starts at a multiple of 8 bytes; the table ends where its last entry does
  return list.reduce((n, e) => ((n + 7) & ~7) + 40 + e.extraDataSize + enc.encode(e.id).length + enc.encode(e.name).length, 0);
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
        const e = await this.w.tables.getEntry(l2, k);
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
      const { hi, lo } = this.w.tables.l1Entry(i);
      const l2 = entryOffset(hi, lo);
      if (!l2) continue;
      const shared = (await rc.get(l2 / this.cs)) !== 1;
      if (shared === ((hi & COPIED_HI) !== 0)) this.w.tables.setL1Entry(i, l2, !shared);
      for (let k = 0; k < g.l2Entries; k++) {
        const e = await this.w.tables.getEntry(l2, k);
        if (e.hi & COMPRESSED_HI) continue;
        const host = entryOffset(e.hi, e.lo);
        if (!host && !(g.dataFile && e.hi & COPIED_HI)) continue;
        const want = g.dataFile ? true : (await rc.get(host / this.cs)) === 1;
        if (want !== ((e.hi & COPIED_HI) !== 0)) {
          await this.w.tables.setEntry(l2, k, { ...e, hi: (want ? e.hi | COPIED_HI : e.hi & ~COPIED_HI) >>> 0 });
        }
      }
    }
  }

  /** Set COPIED in `l1` (not the active table) exactly where the L2 table's refcount is 1; true if any changed. */
  private async refreshL1Copied(l1: Uint8Array): Promise<boolean> {
    const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    let changed = false;
    for (let i = 0; i < l1.length / 8; i++) {
      const hi = dv.getUint32(i * 8);
      const l2 = entryOffset(hi, dv.getUint32(i * 8 + 4));
      if (!l2) continue;
      const want = (await this.w.refcounts.get(l2 / this.cs)) === 1;
      if (want !== ((hi & COPIED_HI) !== 0)) {
        dv.setUint32(i * 8, (want ? hi | COPIED_HI : hi & ~COPIED_HI) >>> 0);
        changed = true;
      }
    }
    return changed;
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
    const oldBytes = tableBytesOnDisk(this.drv.snapshots);
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
      // Before anything changes: one more reference must fit in every refcount.
      await this.checkOverflow();
      if (drv.header.version < 3) return this.createV2(opts);
      return this.w.discardingFreed(async () => {
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
        const entry = this.newEntry(opts, l1Offset, l1.length / 8);
        await this.writeTable([...drv.snapshots, entry]);
        await this.w.flushMetadata();
        await this.markDirty(false);
        return entry;
      });
    });
  }

  private newEntry(opts: SnapshotCreateOptions, l1TableOffset: number, l1Size: number): SnapshotEntry {
    const drv = this.drv;
    const now = Date.now();
    const maxId = drv.snapshots.reduce((m, s) => Math.max(m, /^\d+$/.test(s.id) ? Number(s.id) : 0), 0);
    return {
      l1TableOffset,
      l1Size,
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
  }

  /**
   * Refuse (ERANGE, before any write) a snapshot that would push a refcount past the image's
   * width: it adds one reference to every L2 table and data cluster of the active state.
   */
  private async checkOverflow(): Promise<void> {
    const bits = 2 ** this.drv.header.refcountOrder;
    if (bits >= 32) return;
    const max = 2 ** bits - 1;
    const adds = new Map<number, number>();
    await this.forEachCluster(this.drv.activeL1, async (c) => {
      adds.set(c, (adds.get(c) ?? 0) + 1);
    });
    for (const [c, n] of adds) {
      if ((await this.w.refcounts.get(c)) + n > max) {
        throw new QcowError('ERANGE', `Refcount overflow on cluster ${c} (maximum ${max}): the snapshot would add ${n} reference(s)`);
      }
    }
  }

  // ---- v2: the new state written beside the old one, switched by one header write ---------

  /** Clusters an L2 entry (raw table bytes) references. */
  private rawEntryClusters(t: Uint8Array, k: number): number[] {
    const dv = new DataView(t.buffer, t.byteOffset, t.byteLength);
    return this.entryClusters({ hi: dv.getUint32(k * 8), lo: dv.getUint32(k * 8 + 4), bhi: 0, blo: 0 });
  }

  /** Add `delta` to every cluster of a tree (L2 tables once per L1 entry unless `dataOnly`, data per L2 entry). */
  private async shadowTree(sh: ShadowRefcounts, l1: Uint8Array, delta: number, dataOnly = false): Promise<void> {
    const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    for (let i = 0; i < l1.length / 8; i++) {
      const l2 = entryOffset(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4));
      if (!l2) continue;
      if (l2 % this.cs) throw corruption(`L2 table offset 0x${l2.toString(16)} unaligned (L1 index: 0x${i.toString(16)})`);
      if (!dataOnly) sh.add(l2 / this.cs, delta);
      const t = await readL2(this.drv, l2);
      for (let k = 0; k < this.drv.g.l2Entries; k++) for (const c of this.rawEntryClusters(t, k)) sh.add(c, delta);
    }
  }

  /**
   * A copy of L2 table `t` with COPIED exact for the new refcounts, or undefined when `t` is
   * already exact.
   */
  private fixCopied(sh: ShadowRefcounts, t: Uint8Array): Uint8Array | undefined {
    let out: Uint8Array | undefined;
    const dv = new DataView(t.buffer, t.byteOffset, t.byteLength);
    for (let k = 0; k < this.drv.g.l2Entries; k++) {
      const hi = dv.getUint32(k * 8);
      const lo = dv.getUint32(k * 8 + 4);
      if (hi & COMPRESSED_HI) continue;
      const host = entryOffset(hi, lo);
      if (!host) continue;
      const want = sh.get(host / this.cs) === 1;
      if (want === ((hi & COPIED_HI) !== 0)) continue;
      out ??= t.slice();
      new DataView(out.buffer).setUint32(k * 8, (want ? hi | COPIED_HI : hi & ~COPIED_HI) >>> 0);
    }
    return out;
  }

  private setL1(l1: Uint8Array, i: number, off: number, copied: boolean): void {
    const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    dv.setUint32(i * 8, (Math.floor(off / 0x100000000) | (copied ? COPIED_HI : 0)) >>> 0);
    dv.setUint32(i * 8 + 4, off >>> 0);
  }

  /** Write everything pending and the new refcount structures, then switch the header (bytes 24..72) in one write. */
  private async switchV2(
    sh: ShadowRefcounts,
    pending: Array<[Uint8Array, number]>,
    next: { size: number; l1Size: number; l1Offset: number; nbSnapshots: number; snapshotsOffset: number },
  ): Promise<{ offset: number; clusters: number }> {
    const drv = this.drv;
    const h = drv.header;
    const rt = await sh.finish();
    for (const [bytes, at] of pending) await drv.rawWrite(bytes, at);
    await this.w.barrier();
    const b = new Uint8Array(48);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, BigInt(next.size));
    dv.setUint32(8, h.cryptMethod);
    dv.setUint32(12, next.l1Size);
    dv.setBigUint64(16, BigInt(next.l1Offset));
    dv.setBigUint64(24, BigInt(rt.offset));
    dv.setUint32(32, rt.clusters);
    dv.setUint32(36, next.nbSnapshots);
    dv.setBigUint64(40, BigInt(next.snapshotsOffset));
    await drv.rawWrite(b, 24);
    await this.w.barrier();
    h.size = next.size;
    drv.size = next.size;
    h.l1Size = next.l1Size;
    h.l1TableOffset = next.l1Offset;
    h.refcountTableOffset = rt.offset;
    h.refcountTableClusters = rt.clusters;
    h.nbSnapshots = next.nbSnapshots;
    h.snapshotsOffset = next.snapshotsOffset;
    return rt;
  }

  /** New snapshot table in fresh clusters (old one released in the new refcounts). */
  private shadowTable(sh: ShadowRefcounts, list: SnapshotEntry[], pending: Array<[Uint8Array, number]>): number {
    const h = this.drv.header;
    if (h.nbSnapshots && h.snapshotsOffset) {
      const n = Math.ceil(tableBytesOnDisk(this.drv.snapshots) / this.cs);
      for (let c = 0; c < n; c++) sh.add(h.snapshotsOffset / this.cs + c, -1);
    }
    if (!list.length) return 0;
    const bytes = encodeSnapshotTable(list);
    if (bytes.length > C.QCOW_MAX_SNAPSHOTS_SIZE) throw new QcowError('EFBIG', 'Snapshot table too large');
    const at = sh.allocate(Math.ceil(bytes.length / this.cs));
    pending.push([bytes, at]);
    return at;
  }

  private async createV2(opts: SnapshotCreateOptions): Promise<SnapshotEntry> {
    const drv = this.drv;
    const h = drv.header;
    const sh = await ShadowRefcounts.open(drv);
    const pending: Array<[Uint8Array, number]> = [];
    // The old active L1 (as it is on disk) becomes the snapshot's; the active state gets copies
    // of its L2 tables, which are then its own (COPIED in the L1) while every data cluster gains
    // a reference (COPIED cleared in the copies).
    const oldL1 = drv.activeL1.slice();
    const newL1 = new Uint8Array(oldL1.length);
    const dv = new DataView(oldL1.buffer);
    for (let i = 0; i < oldL1.length / 8; i++) {
      const l2 = entryOffset(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4));
      if (!l2) continue;
      if (l2 % this.cs) throw corruption(`L2 table offset 0x${l2.toString(16)} unaligned (L1 index: 0x${i.toString(16)})`);
      const t = (await readL2(drv, l2)).slice();
      const tdv = new DataView(t.buffer);
      for (let k = 0; k < drv.g.l2Entries; k++) {
        for (const c of this.rawEntryClusters(t, k)) sh.add(c, 1);
        const hi = tdv.getUint32(k * 8);
        if (!(hi & COMPRESSED_HI)) tdv.setUint32(k * 8, (hi & ~COPIED_HI) >>> 0);
      }
      const at = sh.allocate(1);
      pending.push([t, at]);
      this.setL1(newL1, i, at, true);
    }
    const l1Offset = oldL1.length ? sh.allocate(Math.ceil(oldL1.length / this.cs)) : 0;
    if (oldL1.length) pending.push([newL1, l1Offset]);
    const entry = this.newEntry(opts, oldL1.length ? h.l1TableOffset : 0, oldL1.length / 8);
    const list = [...drv.snapshots, entry];
    const tableAt = this.shadowTable(sh, list, pending);
    await this.switchV2(sh, pending, { size: h.size, l1Size: h.l1Size, l1Offset, nbSnapshots: list.length, snapshotsOffset: tableAt });
    drv.snapshots = list;
    await reloadAfterSwitch(drv, newL1);
    return entry;
  }

  /** v2 delete or apply: `list` is the new snapshot table, `active` the new active L1 source. */
  private async replaceV2(sn: SnapshotEntry, mode: 'delete' | 'apply'): Promise<void> {
    const drv = this.drv;
    const h = drv.header;
    await this.w.flushMetadata();
    const sh = await ShadowRefcounts.open(drv);
    const pending: Array<[Uint8Array, number]> = [];
    const snL1 = await this.readL1(sn.l1TableOffset, sn.l1Size);
    const oldL1 = drv.activeL1.slice();
    let list = drv.snapshots;
    let src: Uint8Array;
    let size = h.size;
    let l1Entries: number;
    let moveL1: boolean;
    if (mode === 'delete') {
      await this.shadowTree(sh, snL1, -1);
      if (sn.l1Size) for (let c = 0; c < Math.ceil((sn.l1Size * 8) / this.cs); c++) sh.add(sn.l1TableOffset / this.cs + c, -1);
      list = drv.snapshots.filter((s) => s !== sn);
      src = oldL1;
      l1Entries = h.l1Size;
      moveL1 = false;
    } else {
      await this.shadowTree(sh, oldL1, -1);
      // The snapshot's tables: shared or copied below, once the data refcounts are known.
      await this.shadowTree(sh, snL1, 1, true);
      size = sn.diskSize ?? h.size;
      l1Entries = Math.max(sn.l1Size, Math.ceil(size / drv.g.l1Coverage));
      src = snL1;
      moveL1 = true;
    }
    // The active tables under the new refcounts: a table whose COPIED flags change is replaced
    // by a corrected copy (the active state's own); the L1 follows.
    const newL1 = new Uint8Array(l1Entries * 8);
    newL1.set(src.subarray(0, Math.min(src.length, newL1.length)));
    const sdv = new DataView(newL1.buffer);
    const decisions: Array<{ i: number; l2: number; copy?: Uint8Array }> = [];
    for (let i = 0; i < l1Entries; i++) {
      const hi = sdv.getUint32(i * 8);
      const l2 = entryOffset(hi, sdv.getUint32(i * 8 + 4));
      if (!l2) {
        if (hi || sdv.getUint32(i * 8 + 4)) this.setL1(newL1, i, 0, false);
        continue;
      }
      if (l2 % this.cs) throw corruption(`L2 table offset 0x${l2.toString(16)} unaligned (L1 index: 0x${i.toString(16)})`);
      decisions.push({ i, l2, copy: this.fixCopied(sh, await readL2(drv, l2)) });
    }
    for (const d of decisions) {
      if (d.copy) {
        const at = sh.allocate(1);
        pending.push([d.copy, at]);
        // The active state stops using the table itself (delete: it was its own; apply: the snapshot keeps it).
        if (mode === 'delete') sh.add(d.l2 / this.cs, -1);
        this.setL1(newL1, d.i, at, true);
      } else {
        if (mode === 'apply') sh.add(d.l2 / this.cs, 1);
        this.setL1(newL1, d.i, d.l2, sh.get(d.l2 / this.cs) === 1);
      }
    }
    let l1Offset = h.l1TableOffset;
    const l1Changed = moveL1 || newL1.length !== oldL1.length || newL1.some((b, k) => b !== oldL1[k]);
    if (l1Changed) {
      if (h.l1Size) for (let c = 0; c < Math.ceil((h.l1Size * 8) / this.cs); c++) sh.add(h.l1TableOffset / this.cs + c, -1);
      l1Offset = newL1.length ? sh.allocate(Math.ceil(newL1.length / this.cs)) : 0;
      if (newL1.length) pending.push([newL1, l1Offset]);
    }
    const tableAt = mode === 'delete' ? this.shadowTable(sh, list, pending) : h.snapshotsOffset;
    await this.switchV2(sh, pending, { size, l1Size: l1Entries, l1Offset, nbSnapshots: list.length, snapshotsOffset: tableAt });
    drv.snapshots = list;
    await reloadAfterSwitch(drv, newL1);
  }

  async delete(idOrName: string): Promise<void> {
    const drv = this.drv;
    const sn = findSnapshot(drv.snapshots, idOrName);
    if (!sn) throw new QcowError('ENOENT', `Could not delete snapshot '${idOrName}': snapshot not found`);
    await this.w.exclusive(async () => {
      await this.w.start();
      await this.w.flushMetadata();
      if (drv.header.version < 3) return this.replaceV2(sn, 'delete');
      await this.w.discardingFreed(async () => {
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
    });
  }

  async apply(idOrName: string): Promise<void> {
    const drv = this.drv;
    const sn = findSnapshot(drv.snapshots, idOrName);
    if (!sn) throw new QcowError('ENOENT', `Could not apply snapshot '${idOrName}': Failed to load snapshot: No such file or directory`);
    await this.w.exclusive(async () => {
      await this.w.start();
      await this.w.flushMetadata();
      if (drv.header.version < 3) return this.replaceV2(sn, 'apply');
      await this.w.discardingFreed(async () => {
        await this.markDirty(true);
        const snL1 = await this.readL1(sn.l1TableOffset, sn.l1Size);
        const oldL1 = drv.activeL1.slice();
        await this.adjustTree(snL1, 1);
        await this.w.flushMetadata();
        // As QEMU, the snapshot's own L1 table gets COPIED flags that match the new refcounts.
        if (await this.refreshL1Copied(snL1)) {
          await drv.rawWrite(snL1, sn.l1TableOffset);
          await this.w.barrier();
        }
        const newSize = sn.diskSize ?? drv.header.size;
        await drv.replaceActiveL1(snL1, newSize);
        await this.adjustTree(oldL1, -1);
        await this.recomputeCopied();
        await this.w.flushMetadata();
        await this.markDirty(false);
      });
    });
  }
}
