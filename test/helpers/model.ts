/**
 * Random qcow2 images for property tests: create options, qemu-io operation sequences, and an
 * in-memory model of the content those operations produce.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import fc from 'fast-check';
import { randomBytes } from './files.js';

export interface CreateChoice {
  clusterBits: number;
  compat: '0.10' | '1.1';
  extendedL2: boolean;
  refcountBits: number;
  zstd: boolean;
  size: number;
}

export function createArb(opts: { minClusters?: number; maxClusters?: number } = {}): fc.Arbitrary<CreateChoice> {
  return fc
    .record({
      clusterBits: fc.constantFrom(9, 10, 12, 14, 16, 17),
      v3: fc.boolean(),
      extendedL2: fc.boolean(),
      refcountBits: fc.constantFrom(1, 2, 8, 16, 64),
      zstd: fc.boolean(),
      clusters: fc.integer({ min: opts.minClusters ?? 4, max: opts.maxClusters ?? 40 }),
      tail: fc.constantFrom(0, 0, 0, 512, 1536),
    })
    .map((r) => {
      const v3 = r.v3;
      const cs = 2 ** r.clusterBits;
      return {
        clusterBits: r.clusterBits,
        compat: v3 ? '1.1' : '0.10',
        extendedL2: v3 && r.extendedL2 && r.clusterBits >= 14,
        refcountBits: v3 ? r.refcountBits : 16,
        zstd: v3 && r.zstd,
        // Mostly whole clusters; sometimes a partial last cluster (a 512-byte multiple).
        size: r.clusters * cs + (r.tail < cs ? r.tail : 0),
      } satisfies CreateChoice;
    });
}

export function createOptions(c: CreateChoice): string {
  const o = [`cluster_size=${2 ** c.clusterBits}`, `compat=${c.compat}`];
  if (c.compat === '1.1') {
    o.push(`refcount_bits=${c.refcountBits}`, `extended_l2=${c.extendedL2 ? 'on' : 'off'}`);
    o.push(`compression_type=${c.zstd ? 'zstd' : 'zlib'}`);
  }
  return o.join(',');
}

export type Op =
  | { t: 'write'; off: number; len: number; pat: number }
  | { t: 'wrand'; off: number; len: number; seed: number }
  | { t: 'zero'; off: number; len: number; unmap: boolean }
  | { t: 'discard'; cluster: number; count: number }
  | { t: 'compress'; cluster: number; count: number; pat: number };

/** Random operations on an image of `size` bytes with clusters of `cs` bytes. */
export function opsArb(size: number, cs: number, maxOps = 25): fc.Arbitrary<Op[]> {
  const clusters = Math.floor(size / cs);
  const clamp = (x: number) => Math.max(0, Math.min(size - 1, x));
  const off = fc.oneof(
    fc.integer({ min: 0, max: size - 1 }),
    // close to a cluster boundary, so writes straddle it
    fc
      .tuple(fc.integer({ min: 0, max: Math.max(0, clusters) }), fc.integer({ min: -700, max: 700 }))
      .map(([k, d]) => clamp(k * cs + d)),
    // cluster-aligned
    fc.integer({ min: 0, max: Math.max(0, clusters - 1) }).map((k) => k * cs),
  );
  const len = fc.oneof(fc.integer({ min: 1, max: 2048 }), fc.integer({ min: 1, max: 3 * cs }), fc.constant(cs));
  const range = fc.tuple(off, len).map(([o, l]) => ({ off: o, len: Math.max(1, Math.min(l, size - o)) }));
  const clusterRange = fc
    .tuple(fc.integer({ min: 0, max: Math.max(0, clusters - 1) }), fc.integer({ min: 1, max: 4 }))
    .map(([k, n]) => ({ cluster: k, count: Math.max(1, Math.min(n, clusters - k)) }));
  const op: fc.Arbitrary<Op> = fc.oneof(
    { weight: 5, arbitrary: fc.tuple(range, fc.integer({ min: 1, max: 255 })).map(([r, pat]) => ({ t: 'write' as const, ...r, pat })) },
    { weight: 3, arbitrary: fc.tuple(range, fc.integer({ min: 1, max: 1e9 })).map(([r, seed]) => ({ t: 'wrand' as const, ...r, seed })) },
    { weight: 2, arbitrary: fc.tuple(range, fc.boolean()).map(([r, unmap]) => ({ t: 'zero' as const, ...r, unmap })) },
    { weight: 1, arbitrary: clusterRange.map((r) => ({ t: 'discard' as const, ...r })) },
    {
      weight: 2,
      arbitrary: fc
        .tuple(clusterRange, fc.integer({ min: 0, max: 255 }))
        .map(([r, pat]) => ({ t: 'compress' as const, ...r, count: Math.min(r.count, 2), pat })),
    },
  );
  return fc.array(op, { minLength: 1, maxLength: maxOps });
}

export interface ModelOptions {
  size: number;
  clusterSize: number;
  /** Content of the backing file as seen through this image (already cut/zero-extended to size). */
  backing?: Uint8Array;
  v3: boolean;
  /** Compressed writes allowed at all (refcount width large enough, qcow2 target). */
  allowCompress: boolean;
  allowDiscard: boolean;
  /** Start from this content instead of zeros/backing (continuing an earlier sequence). */
  initial?: Uint8Array;
  /** Clusters touched by an earlier sequence (never compressed into). */
  touched?: Uint8Array;
  /** Prefix for the random source files written into `dir`. */
  tag?: string;
  /** Carried over from an earlier sequence: no further compressed writes (see applyOps). */
  noMoreCompress?: boolean;
}

/**
 * Keep only operations that are legal and whose effect is well defined, translate them to qemu-io
 * commands (writing random source files into `dir`), and compute the expected content.
 */
export function applyOps(
  dir: string,
  ops: Op[],
  m: ModelOptions,
): { cmds: string[]; model: Uint8Array; kept: Op[]; touched: Uint8Array; noMoreCompress: boolean } {
  const model = new Uint8Array(m.size);
  if (m.initial) model.set(m.initial.subarray(0, m.size));
  else if (m.backing) model.set(m.backing.subarray(0, m.size));
  const touched = m.touched ? Uint8Array.from(m.touched) : new Uint8Array(Math.ceil(m.size / m.clusterSize));
  // QEMU 7.2 bug worked around here: once a compressed cluster is rewritten, zeroed or discarded, its
  // host cluster may be freed and reused for data while qcow2's compressed-byte allocator still points
  // into it; a later compressed write then lands inside that data cluster (qemu-img check: "ERROR
  // OFLAG_COPIED data cluster ... refcount=2", content corrupted). So: no compressed write after a
  // compressed cluster has been touched.
  const compressed = new Uint8Array(touched.length);
  let noMoreCompress = m.noMoreCompress ?? false;
  const touch = (off: number, len: number) => {
    for (let c = Math.floor(off / m.clusterSize); c <= Math.floor((off + len - 1) / m.clusterSize); c++) {
      touched[c] = 1;
      if (compressed[c]) noMoreCompress = true;
    }
  };
  const cmds: string[] = [];
  const kept: Op[] = [];
  const cs = m.clusterSize;
  ops.forEach((op, i) => {
    switch (op.t) {
      case 'write':
        cmds.push(`write -q -P ${op.pat} ${op.off} ${op.len}`);
        model.fill(op.pat, op.off, op.off + op.len);
        touch(op.off, op.len);
        break;
      case 'wrand': {
        const name = `${m.tag ?? 'src'}-${i}.bin`;
        const data = randomBytes(op.seed, op.len);
        fs.writeFileSync(path.join(dir, name), data);
        cmds.push(`write -q -s ${name} ${op.off} ${op.len}`);
        model.set(data, op.off);
        touch(op.off, op.len);
        break;
      }
      case 'zero':
        cmds.push(`write -q -z${op.unmap ? ' -u' : ''} ${op.off} ${op.len}`);
        model.fill(0, op.off, op.off + op.len);
        touch(op.off, op.len);
        break;
      case 'discard': {
        if (!m.allowDiscard) return;
        // Only whole clusters inside the image: partial-cluster discards are no-ops in QEMU.
        const start = op.cluster * cs;
        const end = Math.min((op.cluster + op.count) * cs, Math.floor(m.size / cs) * cs);
        if (end <= start) return;
        cmds.push(`discard -q ${start} ${end - start}`);
        // Discarded clusters read as zeros, except that QEMU refuses (silently ignores) discards in
        // v2 images with a backing file, which would expose the backing data.
        if (!(m.backing && !m.v3)) model.fill(0, start, end);
        touch(start, end - start);
        break;
      }
      case 'compress': {
        if (!m.allowCompress || noMoreCompress) return;
        const start = op.cluster * cs;
        const end = (op.cluster + op.count) * cs;
        // Whole clusters inside the image, never written before (QEMU can't compress over allocations).
        if (end > m.size) return;
        for (let c = op.cluster; c < op.cluster + op.count; c++) if (touched[c]) return;
        cmds.push(`write -q -c -P ${op.pat} ${start} ${end - start}`);
        model.fill(op.pat, start, end);
        touch(start, end - start);
        for (let c = op.cluster; c < op.cluster + op.count; c++) compressed[c] = 1;
        break;
      }
    }
    kept.push(op);
  });
  return { cmds, model, kept, touched, noMoreCompress };
}

/** qemu-io argument list for many commands in one invocation. */
export function ioArgs(fmt: string, file: string, cmds: string[]): string[] {
  const args = ['-f', fmt];
  for (const c of cmds) args.push('-c', c);
  args.push(file);
  return args;
}
