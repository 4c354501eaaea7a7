/**
 * Power-cut workloads: each drives the writer through one family of metadata updates, with guest
 * flushes at random points. All requests are 512-byte aligned (the data check works per sector).
 */
import { parseLayout, type Guest, type Workload } from './harness.js';

const K = 1024;
const M = 1024 * K;

/** Allocating writes of random sizes at random places; some land on clusters written before. */
async function allocatingWrites(g: Guest, n: number, maxLen: number, flushP: number): Promise<void> {
  const sizes = [512, 4 * K, 64 * K, 3 * 512, 96 * K, 128 * K + 512];
  for (let i = 0; i < n; i++) {
    const len = g.rng() < 0.5 ? g.pick(sizes) : g.int(1, maxLen / 512) * 512;
    await g.write(g.sectorOffset(Math.min(len, g.size)), g.bytes(Math.min(len, g.size)));
    if (g.rng() < flushP) await g.flush();
  }
}

/** Zero writes (both unmap modes, aligned and not), discards, and rewrites of what was zeroed. */
async function zeroAndDiscard(g: Guest, n: number, flushP: number): Promise<void> {
  const unit = g.unit;
  for (let i = 0; i < n; i++) {
    const r = g.rng();
    if (r < 0.35) {
      // Zero: sometimes whole units, sometimes ragged sector ranges.
      const len = g.rng() < 0.5 ? g.int(1, 6) * unit : g.int(1, (3 * unit) / 512) * 512;
      const off = g.rng() < 0.5 ? Math.floor(g.sectorOffset(len) / unit) * unit : g.sectorOffset(len);
      await g.writeZeroes(off, len, g.rng() < 0.5);
    } else if (r < 0.6) {
      const len = g.rng() < 0.7 ? g.int(1, 6) * unit : g.int(1, (3 * unit) / 512) * 512;
      const off = g.rng() < 0.7 ? Math.floor(g.sectorOffset(len) / unit) * unit : g.sectorOffset(len);
      await g.discard(off, len);
    } else {
      // Partial writes, often into zeroed/discarded clusters (in place into zero-alloc ones).
      const len = g.int(1, Math.min(64, (2 * unit) / 512)) * 512;
      await g.write(g.sectorOffset(len), g.bytes(len));
    }
    if (g.rng() < flushP) await g.flush();
  }
}

/** Fill `[from, to)` with data in big writes (allocates everything there). */
async function fill(g: Guest, from: number, to: number, chunk: number): Promise<void> {
  for (let off = from; off < to; off += chunk) await g.write(off, g.bytes(Math.min(chunk, to - off)));
}

export const allocating: Workload = {
  name: 'alloc-64k',
  image: { size: 16 * M, options: 'cluster_size=65536' },
  seed: 101,
  budget: 34,
  async run(g) {
    await allocatingWrites(g, 60, 256 * K, 0.2);
  },
};

export const cowOverBacking: Workload = {
  name: 'cow-backing',
  image: { size: 16 * M, options: 'cluster_size=65536', backing: { fmt: 'qcow2', size: 16 * M, seed: 7, options: 'cluster_size=65536' } },
  seed: 202,
  budget: 34,
  async run(g) {
    const cs = g.clusterSize;
    for (let i = 0; i < 70; i++) {
      // Partial-cluster writes: within one cluster, or straddling a cluster boundary.
      const len = g.int(1, (3 * cs) / 4 / 512) * 512;
      let off: number;
      if (g.rng() < 0.3) {
        const boundary = g.int(1, g.size / cs - 1) * cs;
        off = boundary - g.int(1, Math.min(len, cs) / 512) * 512;
      } else off = g.sectorOffset(len);
      if (off + len > g.size) off = g.size - len;
      await g.write(off, g.bytes(len));
      if (g.rng() < 0.25) await g.flush();
    }
  },
};

export const zeroDiscard: Workload = {
  name: 'zero-discard',
  image: { size: 16 * M, options: 'cluster_size=65536', backing: { fmt: 'raw', size: 12 * M, seed: 8 } },
  seed: 303,
  budget: 36,
  async run(g) {
    await fill(g, 0, 4 * M, 512 * K);
    await fill(g, 10 * M, 14 * M, 1 * M);
    await g.flush();
    await zeroAndDiscard(g, 90, 0.2);
  },
};

export const reftableGrowth: Workload = {
  name: 'reftable-growth-512',
  image: { size: 32 * M, options: 'cluster_size=512' },
  seed: 404,
  budget: 40,
  async run(g) {
    // 512-byte clusters: a refcount block covers 128 KiB and the 1-cluster reftable 8 MiB of file,
    // so ~9.5 MiB of scattered writes need many new refcount blocks and a bigger reftable.
    let written = 0;
    for (let i = 0; written < 9.5 * M; i++) {
      const len = g.rng() < 0.5 ? 4 * K : g.int(16, 64) * 512;
      await g.write(g.sectorOffset(len), g.bytes(len));
      written += len;
      if (g.rng() < 0.1) await g.flush();
    }
  },
  after(rec) {
    const before = parseLayout(rec.initial).reftableOffset;
    const after = parseLayout(rec.replay(rec.ops.length)).reftableOffset;
    if (before === after) return `the refcount table did not move (still at 0x${after.toString(16)}): the workload does not exercise growth`;
    return undefined;
  },
};

export const v2Variant: Workload = {
  name: 'compat-0.10',
  image: { size: 16 * M, options: 'compat=0.10,cluster_size=65536' },
  seed: 505,
  budget: 34,
  async run(g) {
    await allocatingWrites(g, 30, 256 * K, 0.2);
    await g.flush();
    await zeroAndDiscard(g, 50, 0.2);
  },
};

export const lazyRefcounts: Workload = {
  name: 'lazy-refcounts',
  image: { size: 16 * M, options: 'lazy_refcounts=on,cluster_size=65536' },
  seed: 606,
  budget: 34,
  async run(g) {
    await allocatingWrites(g, 30, 256 * K, 0.2);
    await zeroAndDiscard(g, 40, 0.2);
  },
};

export const extendedL2: Workload = {
  name: 'extended-l2',
  image: { size: 16 * M, options: 'extended_l2=on,cluster_size=65536', backing: { fmt: 'qcow2', size: 16 * M, seed: 9 } },
  seed: 707,
  budget: 36,
  async run(g) {
    // Subcluster-sized and smaller writes (partial subclusters pad from the backing file).
    for (let i = 0; i < 50; i++) {
      const len = g.rng() < 0.5 ? g.int(1, 4) * 512 : g.int(1, 40) * 2 * K;
      await g.write(g.sectorOffset(len), g.bytes(len));
      if (g.rng() < 0.2) await g.flush();
    }
    await zeroAndDiscard(g, 50, 0.2);
  },
};

export const resizeMovesL1: Workload = {
  name: 'resize-l1-move',
  image: { size: 1 * M, options: 'cluster_size=512' },
  seed: 808,
  budget: 34,
  async run(g) {
    // 512-byte clusters: one L1 entry covers 32 KiB; 1 MiB needs 32 entries (256 bytes, one
    // cluster), 4 MiB needs 1 KiB (two clusters), 40 MiB 10 KiB: the table moves twice.
    await allocatingWrites(g, 20, 16 * K, 0.2);
    await g.flush();
    await g.resize(4 * M);
    for (let i = 0; i < 20; i++) {
      const len = g.int(1, 16) * 512;
      await g.write(g.sectorOffset(len, 1 * M - 8 * K), g.bytes(len));
      if (g.rng() < 0.2) await g.flush();
    }
    await g.resize(40 * M);
    for (let i = 0; i < 20; i++) {
      const len = g.int(1, 16) * 512;
      await g.write(g.sectorOffset(len, 3 * M), g.bytes(len));
      if (g.rng() < 0.2) await g.flush();
    }
  },
  after(rec) {
    const offsets = new Set<number>();
    const rep = rec.replayer();
    for (let c = 0; c <= rec.ops.length; c += Math.max(1, Math.floor(rec.ops.length / 200))) offsets.add(parseLayout(rep.at(c)).l1Offset);
    offsets.add(parseLayout(rep.at(rec.ops.length)).l1Offset);
    if (offsets.size < 3) return `the L1 table moved ${offsets.size - 1} times, expected 2`;
    return undefined;
  },
};

export const ALL: Workload[] = [allocating, cowOverBacking, zeroDiscard, reftableGrowth, v2Variant, lazyRefcounts, extendedL2, resizeMovesL1];
