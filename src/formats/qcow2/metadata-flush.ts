/**
 * Writing dirty metadata in the order that keeps an image consistent across a crash (a crash at
 * any point leaves at worst leaked clusters):
 *  1. refcount increments: new refcount blocks, a barrier, then the reftable entries to them;
 *  2. L2 tables (the data and refcounts of the clusters they point to are durable by now);
 *  3. L1 entries pointing to the (now durable) L2 tables;
 *  4. refcount decrements for the references dropped in 2 and 3, once those are durable.
 */
import { concatBytes } from '../../core/util.js';
import type { L2Tables } from './l2-tables.js';
import type { Refcounts } from './refcount.js';
import type { WriterHost } from './writer.js';

/** Make everything written so far durable: the external data file first, then the image. */
export async function durableBarrier(h: WriterHost): Promise<void> {
  if (h.dataIO !== h.io) await h.dataIO.flush();
  await h.io.flush();
}

export async function flushDirtyMetadata(h: WriterHost, rc: Refcounts, tables: L2Tables): Promise<void> {
  const cache = h.l2cache;
  if (!rc.hasDirty && !cache.dirty.size && !tables.l1Dirty.size && !rc.hasPendingFrees) {
    await durableBarrier(h);
    return;
  }
  // 1. refcount increments (new blocks first, then table entries pointing to them)
  await rc.writeBlocks();
  await durableBarrier(h);
  await rc.writeTableEntries();
  // 2. L2 tables (data and refcounts of the clusters they point to are durable now)
  // (adjacent slices, as a table written whole, go out as one write; the writes in parallel)
  const slices = [...cache.dirty].sort((a, b) => a - b);
  const runs: Array<{ at: number; parts: Uint8Array[] }> = [];
  for (const s of slices) {
    const data = cache.peek(s)!;
    const last = runs[runs.length - 1];
    const end = last ? last.at + last.parts.reduce((n, p) => n + p.length, 0) : -1;
    if (last && end === s) last.parts.push(data);
    else runs.push({ at: s, parts: [data] });
  }
  await Promise.all(runs.map((r) => h.io.write(r.parts.length === 1 ? r.parts[0]! : concatBytes(r.parts), r.at)));
  cache.dirty.clear();
  await durableBarrier(h);
  // 3. L1 entries pointing to the (now durable) L2 tables
  if (tables.l1Dirty.size) {
    const l1 = h.map.l1;
    const sectors = new Set([...tables.l1Dirty].map((i) => Math.floor((i * 8) / 512)));
    tables.l1Dirty.clear();
    for (const s of [...sectors].sort((a, b) => a - b)) {
      const from = s * 512;
      const to = Math.min(l1.length, from + 512);
      await h.io.write(l1.subarray(from, to), h.header.l1TableOffset + from);
    }
    await durableBarrier(h);
  }
  // 4. decrements for references dropped above
  if (rc.hasPendingFrees) {
    await rc.applyFrees();
    await rc.writeBlocks();
    await durableBarrier(h);
    // 5. clusters freed for discard requests are discarded in the file
    await rc.discardReleased();
  }
}
