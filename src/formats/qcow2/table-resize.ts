/**
 * Table-level changes of the active state, run by the writer under its exclusive lock: emptying it
 * (every L1 entry 0, so the image reads from its backing file: `commit`), and changing the virtual
 * size (growing may move the L1 table to a larger one, written and made durable before the header
 * points to it; shrinking drops every cluster past the new end).
 */
import { writeZeroRange } from '../../core/byte-io.js';
import { entryOffset } from './cluster-map.js';
import * as C from './constants.js';
import { COPIED_HI } from './l2-tables.js';
import type { Qcow2Writer } from './writer.js';

/**
 * Empty the active state as QEMU's make_empty does: an image that holds nothing but its active
 * state (v3, no snapshots, bitmaps, LUKS header or data file) is rebuilt from scratch — header,
 * refcount table, one refcount block and a zeroed L1 table in its first clusters, the file cut
 * after them (the image is marked dirty meanwhile, so a crash leaves refcounts that are rebuilt
 * on the next open); any other image has every active cluster dropped and discarded.
 */
export async function emptyActiveState(w: Qcow2Writer): Promise<void> {
  const { header, g } = w.host;
  const cs = g.clusterSize;
  const l1Clusters = Math.ceil((w.host.map.l1Size * 8) / cs);
  const perBlock = (cs * 8) / 2 ** header.refcountOrder;
  const whole =
    header.version >= 3 &&
    header.nbSnapshots === 0 &&
    !header.bitmaps &&
    3 + l1Clusters <= perBlock &&
    header.cryptMethod !== C.CRYPT_LUKS &&
    !g.dataFile;
  if (!whole) {
    await w.discardingFreed(() => dropActiveState(w));
    return;
  }
  const io = w.host.io;
  await w.flushMetadata();
  w.host.l2cache.clear();
  header.incompatibleFeatures |= C.INCOMPAT_DIRTY;
  await w.writeHeaderFeatures();
  await io.flush();
  await writeZeroRange(io, header.l1TableOffset, l1Clusters * cs);
  w.host.map.l1.fill(0);
  await writeZeroRange(io, cs, (2 + l1Clusters) * cs);
  const ptrs = new Uint8Array(20);
  const dv = new DataView(ptrs.buffer);
  dv.setBigUint64(0, BigInt(3 * cs));
  dv.setBigUint64(8, BigInt(cs));
  dv.setUint32(16, 1);
  await io.write(ptrs, 40);
  await io.flush();
  header.l1TableOffset = 3 * cs;
  header.refcountTableOffset = cs;
  header.refcountTableClusters = 1;
  const entry = new Uint8Array(8);
  new DataView(entry.buffer).setBigUint64(0, BigInt(2 * cs));
  await io.write(entry, cs);
  await io.flush();
  // header, refcount table, this refcount block and the L1 table: refcount 1 each
  await w.reloadRefcounts();
  await w.refcounts.allocateAt(0, 3 + l1Clusters);
  await w.refcounts.writeBlocks();
  await io.flush();
  header.incompatibleFeatures &= ~C.INCOMPAT_DIRTY;
  await w.writeHeaderFeatures();
  await io.flush();
  await io.truncate((3 + l1Clusters) * cs);
}

/**
 * Discard every cluster of the active state, as QEMU's fallback: each L2 entry becomes 0 and its
 * cluster is released (once the caller flushes); the L2 tables themselves stay.
 */
export async function dropActiveState(w: Qcow2Writer): Promise<void> {
  const { g } = w.host;
  for (let i = 0; i < w.host.map.l1Size; i++) {
    const { hi, lo } = w.tables.l1Entry(i);
    if (!entryOffset(hi, lo)) continue;
    const l2 = await w.tables.writableL2(i);
    for (let k = 0; k < g.l2Entries; k++) {
      const e = await w.tables.getEntry(l2, k);
      if (!(e.hi || e.lo || e.bhi || e.blo)) continue;
      await w.tables.setEntry(l2, k, { hi: 0, lo: 0, bhi: 0, blo: 0 });
      w.tables.releaseOld(e);
    }
  }
}

/**
 * Make `l1` (the whole new table, larger than the current one) the active L1 table: written to
 * fresh clusters and made durable (with the refcounts of those clusters) before the header points
 * to it; then the old table's clusters are freed.
 */
export async function moveActiveL1(w: Qcow2Writer, l1: Uint8Array): Promise<void> {
  const { header } = w.host;
  const cs = w.host.g.clusterSize;
  const at = await w.refcounts.allocate(Math.ceil(l1.length / cs));
  await w.refcounts.writeBlocks();
  await w.host.io.write(l1, at);
  await w.barrier();
  await w.refcounts.writeTableEntries();
  const b = new Uint8Array(12);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, l1.length / 8);
  dv.setBigUint64(4, BigInt(at));
  await w.host.io.write(b, 36);
  await w.barrier();
  const oldClusters = Math.ceil((header.l1Size * 8) / cs);
  if (oldClusters) w.refcounts.free(header.l1TableOffset / cs, oldClusters);
  header.l1Size = l1.length / 8;
  header.l1TableOffset = at;
  w.host.map.l1 = l1;
}

/** Returns the new L1 bytes when the table moved. */
export async function resizeTables(w: Qcow2Writer, newSize: number): Promise<Uint8Array | undefined> {
  const { g, header } = w.host;
  const cs = w.host.g.clusterSize;
  const needed = Math.ceil(newSize / g.l1Coverage);
  let newL1: Uint8Array | undefined;
  if (newSize < header.size) {
    // Drop clusters past the end (whole L2 tables beyond the new end, and entries in the last
    // one), then refcount blocks that count nothing any more; all freed clusters are discarded.
    await w.discardingFreed(async () => {
      const firstGone = Math.ceil(newSize / cs);
      const lastCluster = Math.ceil(header.size / cs);
      for (let c = firstGone; c < lastCluster; ) {
        const l1i = Math.floor((c * cs) / g.l1Coverage);
        const { hi, lo } = w.tables.l1Entry(l1i);
        const l2 = entryOffset(hi, lo);
        const tableFirst = (l1i * g.l1Coverage) / cs;
        const tableEnd = tableFirst + g.l2Entries;
        if (l2 && c === tableFirst) {
          // Whole table goes: release every cluster it references, then the table.
          for (let k = 0; k < g.l2Entries; k++) w.tables.releaseOld(await w.tables.getEntry(l2, k));
          w.tables.setL1Entry(l1i, 0, false);
          w.host.l2cache.dropTable(l2, cs);
          w.refcounts.free(l2 / cs);
        } else if (l2) {
          const table = await w.tables.writableL2(l1i);
          for (let k = c - tableFirst; k < g.l2Entries; k++) {
            const e = await w.tables.getEntry(table, k);
            if (e.hi || e.lo || e.bhi || e.blo) {
              await w.tables.setEntry(table, k, { hi: 0, lo: 0, bhi: 0, blo: 0 });
              w.tables.releaseOld(e);
            }
          }
        }
        c = tableEnd;
      }
      await w.flushMetadata();
      await w.refcounts.dropUnusedBlocks();
    });
    await cutFileTail(w);
  } else if (needed > header.l1Size) {
    await w.flushMetadata();
    newL1 = new Uint8Array(needed * 8);
    newL1.set(w.host.map.l1);
    await moveActiveL1(w, newL1);
  }
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(newSize));
  await w.host.io.write(b, 24);
  header.size = newSize;
  await w.flushMetadata();
  return newL1;
}

/** After shrinking, as QEMU does: the file is cut after its last used cluster. */
async function cutFileTail(w: Qcow2Writer): Promise<void> {
  const rc = w.refcounts;
  const io = w.host.io;
  const cs = w.host.g.clusterSize;
  const fileSize = await io.size();
  const last = await rc.lastUsedCluster(Math.ceil(fileSize / cs));
  if ((last + 1) * cs < fileSize) await io.truncate((last + 1) * cs);
}

/**
 * Preallocate the clusters of a grown image's new area (`[oldSize, newSize)`, `oldSize` a
 * multiple of the cluster size) as QEMU's truncate does for falloc/full: new refcount structures
 * after the last used cluster, sized for the data and the L2 tables that may come, then every
 * data cluster in one contiguous area after them (the file grown over it by fallocate, or by
 * writing zeros for `full`), then the L2 entries pointing to them (new L2 tables wherever the
 * allocator puts them).
 */
export async function preallocateGrowth(w: Qcow2Writer, oldSize: number, newSize: number, mode: 'falloc' | 'full'): Promise<void> {
  const { g } = w.host;
  const cs = g.clusterSize;
  const rc = w.refcounts;
  const io = w.host.io;
  await w.flushMetadata();
  const firstC = oldSize / cs;
  const nbData = Math.ceil(newSize / cs) - firstC;
  if (nbData <= 0) return;
  const nbL2 = Math.ceil(nbData / g.l2Entries) + 1;
  const oldFileC = (await rc.lastUsedCluster(Math.ceil((await io.size()) / cs))) + 1;
  const start = await rc.refcountArea(oldFileC, nbData + nbL2, true);
  await rc.allocateAt(start, nbData);
  const end = (start + nbData) * cs;
  const cur = await io.size();
  if (end > cur) {
    if (mode === 'full' || !io.allocate || !(await io.allocate(cur, end - cur))) await writeZeroRange(io, cur, end - cur);
  }
  for (let k = 0; k < nbData; ) {
    const gc = firstC + k;
    const l1i = Math.floor(gc / g.l2Entries);
    const l2 = await w.tables.writableL2(l1i);
    const n = Math.min(nbData - k, g.l2Entries - (gc % g.l2Entries));
    for (let j = 0; j < n; j++) {
      const host = (start + k + j) * cs;
      const idx = (gc + j) % g.l2Entries;
      const old = await w.tables.getEntry(l2, idx);
      await w.tables.setEntry(l2, idx, { hi: (Math.floor(host / 0x100000000) | COPIED_HI) >>> 0, lo: host >>> 0, bhi: 0, blo: 0 });
      w.tables.releaseOld(old);
    }
    k += n;
  }
  await w.flushMetadata();
}
