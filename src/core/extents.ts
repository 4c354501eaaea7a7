import type { Extent } from './block-driver.js';

/** Append `e` to `out`, merging it into the last extent when they continue each other exactly. */
export function pushExtent(out: Extent[], e: Extent): void {
  const last = out[out.length - 1];
  if (
    last &&
    last.kind === e.kind &&
    last.depth === e.depth &&
    last.file === e.file &&
    last.zeroData === e.zeroData &&
    last.offset + last.length === e.offset &&
    (last.hostOffset === undefined) === (e.hostOffset === undefined) &&
    (last.hostOffset === undefined || last.hostOffset + last.length === e.hostOffset)
  ) {
    last.length += e.length;
    return;
  }
  out.push(e);
}
