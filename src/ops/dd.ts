/**
 * `dd`: copy a byte range of an image into the start of a freshly created one, with qemu-img
 * 7.2's arithmetic for bs/count/skip — including its quirk that `count` limits the input end
 * (count*bs from the start of the input) before `skip` is applied, so with skip the copy covers
 * [skip*bs, min(count*bs, input length)).
 */
import type { BlockDriver } from '../core/block-driver.js';
import { isZero } from '../core/util.js';

export interface DdParams {
  /** Input length as the block layer reports it (raw files: whole sectors). */
  inputLength: number;
  /** Block size (1 .. 2^31-1). */
  bs: bigint;
  count?: bigint;
  skip?: bigint;
}

export interface DdPlan {
  /** Size of the image to create. */
  outSize: number;
  /** Input range to copy to output offset 0. */
  from: number;
  to: number;
  /** skip points past the end: qemu-img warns and creates an empty image. */
  skipBeyondEnd: boolean;
}

const INT64_MAX = (1n << 63n) - 1n;

export function planDd(p: DdParams): DdPlan {
  let size = BigInt(p.inputLength);
  if (p.count !== undefined && p.count <= INT64_MAX / p.bs && p.count * p.bs < size) size = p.count * p.bs;
  const skipBeyondEnd = p.skip !== undefined && (p.skip > INT64_MAX / p.bs || size < p.skip * p.bs);
  const start = skipBeyondEnd ? size : (p.skip ?? 0n) * p.bs;
  return {
    outSize: Number(skipBeyondEnd ? 0n : size - start),
    from: Number(start),
    to: Number(size),
    skipBeyondEnd,
  };
}

const CHUNK = 4 << 20;

/**
 * Copy `[from, to)` of `src` to offset 0 of `dst`, which must read as zeros (freshly created):
 * ranges `src` knows to be zero are skipped, as are all-zero chunks. Bytes past the end of `src`
 * (a raw file's last partial sector) read as zeros.
 */
export async function ddCopy(
  src: BlockDriver,
  dst: BlockDriver,
  from: number,
  to: number,
  onProgress?: (done: number, total: number) => void,
): Promise<void> {
  const end = Math.min(to, src.size);
  const buf = new Uint8Array(CHUNK);
  let pos = from;
  while (pos < end) {
    const ext = await src.blockStatus(pos, Math.min(end - pos, 1 << 30));
    for (const e of ext) {
      const eEnd = e.offset + e.length;
      if (e.kind === 'data' && !e.zeroData) {
        for (let off = e.offset; off < eEnd; ) {
          const n = Math.min(CHUNK, eEnd - off);
          const b = buf.subarray(0, n);
          await src.readInto(b, off);
          if (!isZero(b)) await dst.write(off - from, b);
          off += n;
        }
      }
      onProgress?.(eEnd - from, to - from);
    }
    const last = ext[ext.length - 1]!;
    pos = last.offset + last.length;
  }
  await dst.flush();
}
