/**
 * `commit`: write the data an image holds above BASE (by default its backing file) into BASE,
 * growing BASE when it is smaller, then — unless asked to keep it (-d, or -b given) — empty the
 * image so it reads through to its backing file again.
 */
import type { BlockDriver } from '../core/block-driver.js';
import { QcowError } from '../core/errors.js';

export interface Emptiable extends BlockDriver {
  makeEmpty(): Promise<void>;
}

export interface Resizable extends BlockDriver {
  resize(size: number): Promise<void>;
}

export interface CommitOptions {
  /** Chain depth of the base (1 = the direct backing file). */
  baseDepth: number;
  /** Keep the top image's content (qemu-img -d; implied by -b). */
  keep?: boolean;
  onProgress?: (done: number, total: number) => void;
}

const CHUNK = 4 << 20;

/**
 * `top` is opened read-write with its chain; `base` is the base image opened read-write on its own.
 * Only ranges supplied by layers above the base are read (never the base through the chain).
 */
export async function commit(top: BlockDriver, base: BlockDriver, opts: CommitOptions): Promise<void> {
  if (!top.backing) throw new QcowError('EINVAL', 'Image does not have a backing file');
  if (base.size < top.size) {
    const r = base as Partial<Resizable>;
    if (typeof r.resize !== 'function') throw new QcowError('ENOTSUP', 'Backing image is too small and cannot be resized');
    await r.resize!(top.size);
  }
  let pos = 0;
  const buf = new Uint8Array(CHUNK);
  while (pos < top.size) {
    const ext = await top.blockStatus(pos, Math.min(top.size - pos, 1 << 30));
    for (const e of ext) {
      if (e.depth >= opts.baseDepth) continue;
      if (e.kind === 'zero') {
        // as qemu-img's commit job: zeros may be unmapped (the base's clusters there are freed)
        await base.writeZeroes(e.offset, e.length, { mayUnmap: true });
      } else if (e.kind === 'data') {
        for (let off = e.offset; off < e.offset + e.length; off += CHUNK) {
          const n = Math.min(CHUNK, e.offset + e.length - off);
          const b = buf.subarray(0, n);
          await top.readInto(b, off);
          await base.write(off, b);
        }
      }
      opts.onProgress?.(e.offset + e.length, top.size);
    }
    const last = ext[ext.length - 1]!;
    pos = last.offset + last.length;
  }
  await base.flush();
  if (!opts.keep) {
    const t = top as Partial<Emptiable>;
    if (typeof t.makeEmpty !== 'function') throw new QcowError('ENOTSUP', `Image format '${top.format}' cannot be emptied`);
    await t.makeEmpty!();
  }
  await top.flush();
}
