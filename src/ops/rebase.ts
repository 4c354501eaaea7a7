/**
 * `rebase`: change an image's backing file. Safe mode first copies into the image every range
 * where the old and the new backing chains differ (so the image's content stays the same); unsafe
 * mode (-u) only rewrites the backing name and format.
 */
import type { BlockDriver } from '../core/block-driver.js';
import { QcowError } from '../core/errors.js';
import { bytesEqual } from '../core/util.js';

/** What rebase needs from the image beyond BlockDriver. */
export interface Rebaseable extends BlockDriver {
  setBackingFile(name: string | undefined, format: string | undefined): Promise<void>;
}

export interface RebaseOptions {
  /** New backing file name as it will be stored ('' or undefined: no backing file). */
  backingName?: string;
  backingFormat?: string;
  /** The new backing image, opened read-only (undefined: none). Not needed with `unsafe`. */
  newBacking?: BlockDriver;
  unsafe?: boolean;
  onProgress?: (done: number, total: number) => void;
}

const CHUNK = 1 << 20;

function isRebaseable(d: BlockDriver): d is Rebaseable {
  return typeof (d as Partial<Rebaseable>).setBackingFile === 'function';
}

/** Read `len` bytes of a backing chain at `off`; past its end (or with no chain) reads zeros. */
async function readChain(b: BlockDriver | undefined, buf: Uint8Array, off: number): Promise<void> {
  buf.fill(0);
  if (!b || off >= b.size) return;
  const n = Math.min(buf.length, b.size - off);
  await b.readInto(buf.subarray(0, n), off);
}

export async function rebase(img: BlockDriver, opts: RebaseOptions): Promise<void> {
  if (!isRebaseable(img)) throw new QcowError('ENOTSUP', `Image format '${img.format}' does not support backing files`);
  const name = opts.backingName || undefined;
  if (!opts.unsafe) {
    const oldB = img.backing;
    const newB = name ? opts.newBacking : undefined;
    if (name && !newB) throw new QcowError('EINVAL', 'Safe rebase needs the new backing image opened');
    const a = new Uint8Array(CHUNK);
    const b = new Uint8Array(CHUNK);
    let pos = 0;
    while (pos < img.size) {
      const ext = await img.blockStatus(pos, Math.min(img.size - pos, 1 << 30));
      for (const e of ext) {
        // Ranges the image allocates itself keep their content whatever the backing is.
        if (e.depth === 0 && e.kind !== 'unallocated') continue;
        for (let off = e.offset; off < e.offset + e.length; off += CHUNK) {
          const n = Math.min(CHUNK, e.offset + e.length - off);
          const bufA = a.subarray(0, n);
          const bufB = b.subarray(0, n);
          await readChain(oldB, bufA, off);
          await readChain(newB, bufB, off);
          // Copy differing 512-byte sectors (merged into runs).
          for (let s = 0; s < n; ) {
            const end = Math.min(n, s + 512);
            if (bytesEqual(bufA.subarray(s, end), bufB.subarray(s, end))) {
              s = end;
              continue;
            }
            let t = end;
            while (t < n && !bytesEqual(bufA.subarray(t, Math.min(n, t + 512)), bufB.subarray(t, Math.min(n, t + 512)))) {
              t = Math.min(n, t + 512);
            }
            await img.write(off + s, bufA.slice(s, t));
            s = t;
          }
        }
        opts.onProgress?.(e.offset + e.length, img.size);
      }
      const last = ext[ext.length - 1]!;
      pos = last.offset + last.length;
    }
  }
  await img.flush();
  await img.setBackingFile(name, name ? opts.backingFormat : undefined);
  await img.flush();
}
