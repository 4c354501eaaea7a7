/**
 * `qemu:dirty-bitmap:NAME` contexts: a qcow2 persistent dirty bitmap exported as qemu-nbd -B does.
 * The bitmap is found in the exported image or, as QEMU searches, further down its backing chain;
 * it is loaded once, kept in memory, and — when it is enabled and lives in the image the clients
 * write to — marked by their writes, so BLOCK_STATUS shows the bitmap as it is now (the driver
 * persists the same marks when the image is closed).
 */
import type { BlockDriver } from '../core/block-driver.js';
import { QcowError } from '../core/errors.js';
import { BME_FLAG_AUTO, BME_FLAG_IN_USE } from '../formats/qcow2/bitmap-directory.js';
import { Qcow2Driver } from '../formats/qcow2/driver.js';
import * as C from './constants.js';
import type { NbdExtent } from './extents.js';

export class DirtyBitmapView {
  constructor(
    readonly name: string,
    /** Flat little-endian bit array: bit i covers [i*granularity, (i+1)*granularity). */
    private readonly bits: Uint8Array,
    readonly granularity: number,
    /** Bytes the bitmap covers (the virtual size of the image it belongs to). */
    readonly size: number,
    /** Marked by writes through the export (enabled bitmap of the exported, writable image). */
    readonly live: boolean,
  ) {}

  private get(bit: number): boolean {
    return ((this.bits[bit >> 3] ?? 0) & (1 << (bit & 7))) !== 0;
  }

  /** Mark `[offset, offset+length)` dirty (clipped to the bitmap). */
  mark(offset: number, length: number): void {
    const end = Math.min(offset + length, this.size);
    if (length <= 0 || offset >= end) return;
    let bit = Math.floor(offset / this.granularity);
    const last = Math.floor((end - 1) / this.granularity);
    for (; bit <= last && bit & 7; bit++) this.bits[bit >> 3]! |= 1 << (bit & 7);
    const wholeEnd = (last + 1) & ~7;
    if (bit < wholeEnd) {
      this.bits.fill(0xff, bit >> 3, wholeEnd >> 3);
      bit = wholeEnd;
    }
    for (; bit <= last; bit++) this.bits[bit >> 3]! |= 1 << (bit & 7);
  }

  /** First bit >= `from` and < `limit` whose state is `dirty`, or `limit`. */
  private next(from: number, limit: number, dirty: boolean): number {
    let bit = from;
    const skip = dirty ? 0x00 : 0xff;
    while (bit < limit) {
      if ((bit & 7) === 0) {
        // Whole bytes that cannot hold the bit sought.
        let byte = bit >> 3;
        const lastByte = limit >> 3;
        while (byte < lastByte && this.bits[byte] === skip) byte++;
        bit = Math.max(bit, byte << 3);
        if (bit >= limit) return limit;
      }
      if (this.get(bit) === dirty) return bit;
      bit++;
    }
    return limit;
  }

  /**
   * NBD descriptors for `[offset, offset+length)`: DIRTY (1) or clean (0), starting exactly at
   * `offset`, at most `max` of them (the last may end early); anything past the bitmap is clean.
   */
  extents(offset: number, length: number, max: number): NbdExtent[] {
    const out: NbdExtent[] = [];
    const end = offset + length;
    const g = this.granularity;
    const covered = Math.min(end, this.size);
    const bitLimit = Math.ceil(this.size / g);
    let pos = offset;
    while (pos < covered && out.length < max) {
      const bit = Math.floor(pos / g);
      const dirty = this.get(bit);
      const stop = this.next(bit + 1, bitLimit, !dirty);
      const t = Math.min(stop * g, covered);
      out.push({ length: t - pos, flags: dirty ? C.STATE_DIRTY : 0 });
      pos = t;
    }
    if (pos >= covered && pos < end) {
      // Past the bitmap: clean, merged into a clean last descriptor.
      const last = out[out.length - 1];
      if (last && last.flags === 0) last.length += end - pos;
      else if (out.length < max) out.push({ length: end - pos, flags: 0 });
    }
    return out;
  }
}

/**
 * Find bitmap `name` for the export of `top` as qemu-nbd does (the image, then down the backing
 * chain; an offset window hides it) and load it. Errors are worded as qemu-nbd's.
 */
export async function loadExportBitmap(
  top: BlockDriver,
  name: string,
  opts: { writable: boolean; behindOffset: boolean },
): Promise<DirtyBitmapView> {
  let layer: BlockDriver | undefined = opts.behindOffset ? undefined : top;
  for (; layer; layer = layer.backing) {
    if (!(layer instanceof Qcow2Driver)) continue;
    const entry = layer.bitmaps.find((b) => b.name === name);
    if (!entry) continue;
    if (entry.flags & BME_FLAG_IN_USE) throw new QcowError('EINVAL', `Bitmap '${name}' is inconsistent and cannot be used`);
    const { bits, granularity } = await layer.bitmapOps().readBits(name);
    const live = opts.writable && layer === top && !layer.readOnly && (entry.flags & BME_FLAG_AUTO) !== 0;
    return new DirtyBitmapView(name, bits, granularity, layer.size, live);
  }
  throw new QcowError('ENOENT', `Bitmap '${name}' is not found`);
}
