/**
 * The metadata overlap check QEMU runs before repair writes (qcow2_pre_write_overlap_check,
 * "constant" structures plus refcount blocks and inactive L1 tables): a repair must never write an
 * L2 table over the header, an L1 table, the refcount table or blocks, the snapshot table or the
 * bitmap directory. On a hit QEMU marks the image corrupt and the check fails.
 */
import * as C from './constants.js';
import type { CheckImage } from './check-state.js';

export type WriteKind = 'active-l2' | 'inactive-l2';

function overlaps(a: number, alen: number, b: number | bigint, blen: number): boolean {
  if (typeof b === 'bigint' || blen <= 0) return false;
  return a < b + blen && b < a + alen;
}

/** undefined when the write is safe; else a handle to report it like QEMU. */
export function checkOverlap(img: CheckImage, offset: number, size: number, _kind: WriteKind): { signal(): Promise<void> } | undefined {
  const cs = img.cs;
  let what: string | undefined;
  if (overlaps(offset, size, 0, cs)) what = 'qcow2_header';
  else if (overlaps(offset, size, img.l1Offset, img.l1Size * 8)) what = 'active L1 table';
  else if (overlaps(offset, size, img.reftableOffset, img.reftableSize * 8)) what = 'refcount table';
  else if (overlaps(offset, size, img.snapshotsOffset, img.snapshotsSize)) what = 'snapshot table';
  else if (img.bitmaps && overlaps(offset, size, img.bitmaps.directoryOffset, img.bitmaps.directorySize)) what = 'bitmap directory';
  else {
    for (let i = 0; i < img.reftableSize && !what; i++) {
      const rb = img.refblockOffset(i);
      if (rb !== 0 && overlaps(offset, size, rb, cs)) what = 'refcount block';
    }
    for (const sn of img.snapshots) {
      if (what) break;
      if (overlaps(offset, size, sn.l1TableOffset, Math.min(sn.l1Size, C.QCOW_MAX_L1_SIZE / 8) * 8)) what = 'inactive L1 table';
    }
  }
  if (!what) return undefined;
  const name = what;
  return {
    async signal() {
      img.log(`qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with ${name}); further corruption events will be suppressed`);
      await img.markCorrupt();
    },
  };
}
