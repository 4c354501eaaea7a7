/**
 * Big-endian 32-bit fields in byte arrays by plain byte arithmetic: for per-entry work (L2
 * entries, refcounts) where a DataView made per access would cost an allocation each time.
 */

/** Big-endian u32 at `at`. */
export function be32(b: Uint8Array, at: number): number {
  return ((b[at]! << 24) | (b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!) >>> 0;
}

/** Store `v` (taken modulo 2^32) big-endian at `at`. */
export function setBe32(b: Uint8Array, at: number, v: number): void {
  b[at] = v >>> 24;
  b[at + 1] = v >>> 16;
  b[at + 2] = v >>> 8;
  b[at + 3] = v;
}
