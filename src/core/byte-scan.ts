/**
 * Fast byte scans: equality, first difference, first and last non-zero byte. They use the host's
 * native Buffer (memcmp) when there is one, plain loops elsewhere (browsers); a range found to
 * differ is narrowed by halves with the same comparison, so no byte loop runs over a long range
 * (those are slow until V8 optimises them, and a short command never gets there).
 */

interface NativeBuffer {
  equals(other: NativeBuffer): boolean;
}
interface NativeBufferCtor {
  from(buf: ArrayBufferLike, byteOffset: number, length: number): NativeBuffer;
}

const Native: NativeBufferCtor | undefined = (globalThis as unknown as { Buffer?: NativeBufferCtor }).Buffer;
const BLOCK = 64 * 1024;
const ZEROS = new Uint8Array(BLOCK);
/** Below this, a byte loop. */
const SMALL = 32;

function view(a: Uint8Array, start: number, end: number): NativeBuffer {
  return Native!.from(a.buffer, a.byteOffset + start, end - start);
}

/** Whether `a[start, end)` equals `b[start, end)`. */
function rangeEqual(a: Uint8Array, b: Uint8Array, start: number, end: number): boolean {
  if (Native && end - start > SMALL) return view(a, start, end).equals(view(b, start, end));
  for (let i = start; i < end; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** Whether `a[start, end)` is all zeros (end - start at most BLOCK). */
function rangeZero(a: Uint8Array, start: number, end: number): boolean {
  if (Native && end - start > SMALL) return view(a, start, end).equals(view(ZEROS, 0, end - start));
  for (let i = start; i < end; i++) if (a[i] !== 0) return false;
  return true;
}

/**
 * In `[s, e)`, known to hold a position where `same` fails, the first such (or, `last`, the last
 * one): halves are tested with `same`, down to a short byte loop.
 */
function narrow(s: number, e: number, same: (s: number, e: number) => boolean, last: boolean): number {
  while (e - s > SMALL) {
    const mid = s + ((e - s) >>> 1);
    if (last) {
      if (same(mid, e)) e = mid;
      else s = mid;
    } else if (same(s, mid)) s = mid;
    else e = mid;
  }
  if (last) {
    for (let i = e - 1; i >= s; i--) if (!same(i, i + 1)) return i;
  } else {
    for (let i = s; i < e; i++) if (!same(i, i + 1)) return i;
  }
  return -1; // not reached when the range differs
}

/** The first position in `[0, length)` where `same` fails, block by block from the start, or -1. */
function firstFailing(length: number, same: (s: number, e: number) => boolean): number {
  for (let s = 0; s < length; s += BLOCK) {
    const e = Math.min(length, s + BLOCK);
    if (!same(s, e)) return narrow(s, e, same, false);
  }
  return -1;
}

/** Index of the first byte where `a` and `b` differ (over `length` bytes), or -1. */
export function firstDifference(a: Uint8Array, b: Uint8Array, length = Math.min(a.length, b.length)): number {
  return firstFailing(length, (s, e) => rangeEqual(a, b, s, e));
}

/** Index of the first non-zero byte of `buf[0, length)`, or -1. */
export function firstNonZero(buf: Uint8Array, length = buf.length): number {
  return firstFailing(length, (s, e) => rangeZero(buf, s, e));
}

/** Index of the last non-zero byte of `buf[0, length)`, or -1. */
export function lastNonZero(buf: Uint8Array, length = buf.length): number {
  const zero = (s: number, e: number) => rangeZero(buf, s, e);
  for (let e = length; e > 0; e -= BLOCK) {
    const s = Math.max(0, e - BLOCK);
    if (!zero(s, e)) return narrow(s, e, zero, true);
  }
  return -1;
}
