/** Byte helpers for the crypto code: word views for fast XOR, little-endian sector numbers, comparison. */

/** True on little-endian hosts (typed-array words are then the LE words of the bytes). */
export const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/**
 * An Int32Array over `b` when it is 4-byte aligned, else over an aligned copy (`copied` tells).
 * Int32 rather than Uint32: XOR and shifts then stay in V8's int32 fast paths.
 */
export function words(b: Uint8Array): { w: Int32Array; copied: boolean } {
  if (b.byteOffset % 4 === 0 && b.length % 4 === 0) return { w: new Int32Array(b.buffer, b.byteOffset, b.length / 4), copied: false };
  const c = new Uint8Array(b.length);
  c.set(b);
  return { w: new Int32Array(c.buffer, 0, Math.floor(b.length / 4)), copied: true };
}

/** Write the words back into `b` when `words()` had to copy. */
export function wordsBack(b: Uint8Array, v: { w: Int32Array; copied: boolean }): void {
  if (v.copied) b.set(new Uint8Array(v.w.buffer, 0, b.length));
}

/** `a ^= b` over whole buffers of equal length. */
export function xorInto(a: Uint8Array, b: Uint8Array): void {
  const va = words(a);
  const vb = words(b);
  const wa = va.w;
  const wb = vb.w;
  for (let i = 0; i < wa.length; i++) wa[i] = wa[i]! ^ wb[i]!;
  wordsBack(a, va);
  for (let i = wa.length * 4; i < a.length; i++) a[i] = a[i]! ^ b[i]!;
}

/** Write `n` (a safe integer ≥ 0) as a little-endian u64 at `off`. */
export function putLe64(b: Uint8Array, off: number, n: number): void {
  let lo = n % 0x100000000;
  let hi = Math.floor(n / 0x100000000);
  for (let i = 0; i < 4; i++) {
    b[off + i] = lo & 0xff;
    lo >>>= 8;
    b[off + 4 + i] = hi & 0xff;
    hi >>>= 8;
  }
}

/** Compare in time independent of where the first difference is. */
export function constantTimeEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a[i]! ^ b[i]!;
  return d === 0;
}

/** Fill with zeros (key material no longer needed). */
export function wipe(...bufs: Array<Uint8Array | undefined>): void {
  for (const b of bufs) b?.fill(0);
}
