/**
 * `convert -c`: every target cluster that holds data is read whole (zero-padded at the end of the
 * image), compressed off the main thread, and stored compressed — or as a normal cluster when
 * compression does not make it smaller. Clusters the sources report as zero are never read.
 * Compression runs ahead with a bounded number of clusters in flight; clusters are written in
 * order, so the file is laid out as qemu-img lays it out.
 */
import type { BlockDriver } from '../core/block-driver.js';
import { alignUp, isZero } from '../core/util.js';
import type { ProgressFn } from './progress.js';

export interface CompressedTarget {
  readonly clusterSize: number;
  /** Store an already compressed cluster at the (cluster-aligned) guest offset. */
  writeCompressed(offset: number, compressed: Uint8Array): Promise<void>;
  /** Store a cluster that did not compress. */
  write(offset: number, data: Uint8Array): Promise<void>;
  flush(): Promise<void>;
}

/** Compresses a cluster; undefined when the result would not be smaller than `limit`. */
export type Compressor = (data: Uint8Array, limit: number) => Promise<Uint8Array | undefined>;

export interface CompressedConvertOptions {
  /** Clusters compressing at once (the pool's size ×2 keeps every worker busy). */
  inFlight?: number;
  onProgress?: ProgressFn;
}

interface Piece {
  src: BlockDriver;
  /** Target offset where this source starts. */
  base: number;
}

/** Which target clusters hold data according to the sources' block status, in order. */
async function* dataClusters(pieces: Piece[], total: number, cs: number): AsyncGenerator<number> {
  let last = -1;
  for (const { src, base } of pieces) {
    for (let pos = 0; pos < src.size; ) {
      const ext = await src.blockStatus(pos, src.size - pos);
      for (const e of ext) {
        if (e.kind === 'data' && !e.zeroData) {
          const first = Math.floor((base + e.offset) / cs);
          const end = Math.ceil(Math.min(base + e.offset + e.length, total) / cs);
          for (let c = Math.max(first, last + 1); c < end; c++) {
            yield c;
            last = c;
          }
        }
      }
      const tail = ext[ext.length - 1]!;
      pos = tail.offset + tail.length;
    }
  }
}

/** Read target range [offset, offset+buf.length) from the concatenated sources (padding reads zero). */
async function readTarget(pieces: Piece[], buf: Uint8Array, offset: number): Promise<void> {
  buf.fill(0);
  for (const { src, base } of pieces) {
    const a = Math.max(offset, base);
    const b = Math.min(offset + buf.length, base + src.size);
    if (a < b) await src.readInto(buf.subarray(a - offset, b - offset), a - base);
  }
}

export async function convertCompressed(
  sources: readonly BlockDriver[],
  target: CompressedTarget,
  compress: Compressor,
  opts: CompressedConvertOptions = {},
): Promise<void> {
  const cs = target.clusterSize;
  const pieces: Piece[] = [];
  let total = 0;
  for (const src of sources) {
    pieces.push({ src, base: total });
    total += alignUp(src.size, 512);
  }
  const inFlight = Math.max(1, opts.inFlight ?? 4);
  const queue: Array<Promise<{ offset: number; data: Uint8Array; compressed?: Uint8Array } | undefined>> = [];
  let done = 0;
  const drainOne = async () => {
    const r = await queue.shift()!;
    if (r) {
      if (r.compressed) await target.writeCompressed(r.offset, r.compressed);
      else await target.write(r.offset, r.data);
    }
    done += cs;
    opts.onProgress?.(Math.min(done, total), total);
  };
  for await (const c of dataClusters(pieces, total, cs)) {
    const offset = c * cs;
    const data = new Uint8Array(cs);
    await readTarget(pieces, data.subarray(0, Math.min(cs, total - offset)), offset);
    queue.push(
      isZero(data)
        ? Promise.resolve(undefined)
        : compress(data, cs).then((compressed) => ({ offset, data: data.subarray(0, Math.min(cs, total - offset)), compressed })),
    );
    if (queue.length >= inFlight) await drainOne();
  }
  while (queue.length) await drainOne();
  await target.flush();
  opts.onProgress?.(total, total);
}
