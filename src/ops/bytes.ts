/**
 * Fast byte scans for compare/convert: equality, first difference, zero detection by 512-byte
 * sector. Uses the host's native Buffer (memcmp) when there is one, plain loops elsewhere.
 */

export const SECTOR = 512;

interface NativeBuffer {
  equals(other: NativeBuffer): boolean;
}
interface NativeBufferCtor {
  from(buf: ArrayBufferLike, byteOffset: number, length: number): NativeBuffer;
}

const Native: NativeBufferCtor | undefined = (globalThis as unknown as { Buffer?: NativeBufferCtor }).Buffer;
const BLOCK = 64 * 1024;
const ZEROS = new Uint8Array(BLOCK);

function view(a: Uint8Array, start: number, end: number): NativeBuffer {
  return Native!.from(a.buffer, a.byteOffset + start, end - start);
}

function rangeEqual(a: Uint8Array, b: Uint8Array, start: number, end: number): boolean {
  if (Native) return view(a, start, end).equals(view(b, start, end));
  for (let i = start; i < end; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** Index of the first byte where `a` and `b` differ (over `length` bytes), or -1. */
export function firstDifference(a: Uint8Array, b: Uint8Array, length = Math.min(a.length, b.length)): number {
  for (let s = 0; s < length; s += BLOCK) {
    const e = Math.min(length, s + BLOCK);
    if (rangeEqual(a, b, s, e)) continue;
    for (let i = s; i < e; i++) if (a[i] !== b[i]) return i;
  }
  return -1;
}

/** Index of the first non-zero byte of `buf[0, length)`, or -1. */
export function firstNonZero(buf: Uint8Array, length = buf.length): number {
  for (let s = 0; s < length; s += BLOCK) {
    const e = Math.min(length, s + BLOCK);
    if (Native ? view(buf, s, e).equals(view(ZEROS, 0, e - s)) : isZeroLoop(buf, s, e)) continue;
    for (let i = s; i < e; i++) if (buf[i] !== 0) return i;
  }
  return -1;
}

function isZeroLoop(buf: Uint8Array, s: number, e: number): boolean {
  for (let i = s; i < e; i++) if (buf[i] !== 0) return false;
  return true;
}

/**
 * Per-sector zero test over a buffer, cheap for data: most data sectors have a non-zero first
 * word, so only sectors starting with zeros are scanned fully.
 */
export class SectorScanner {
  private words: Uint32Array | undefined;
  constructor(private readonly buf: Uint8Array) {
    if (buf.byteOffset % 4 === 0) this.words = new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2);
  }

  /** Whether sector `i` (bytes [512i, 512i+512) clipped to the buffer) is all zeros. */
  isZero(i: number): boolean {
    const start = i * SECTOR;
    const end = Math.min(start + SECTOR, this.buf.length);
    const w = this.words;
    if (w && end - start === SECTOR) {
      let k = start >>> 2;
      const kEnd = k + SECTOR / 4;
      if (w[k] !== 0) return false;
      for (; k < kEnd; k++) if (w[k] !== 0) return false;
      return true;
    }
    for (let j = start; j < end; j++) if (this.buf[j] !== 0) return false;
    return true;
  }
}

const WASM_PAGE = 64 * 1024;

/**
 * A zeroed buffer whose memory starts on a page boundary (WebAssembly memory is mmap'd), else a
 * plain one. The kernel copies page-cache data to and from page-aligned buffers several times
 * faster than to malloc'd ones (which are offset by a few bytes): this is most of the system
 * time of a convert or compare.
 */
export function allocIoBuffer(size: number): Uint8Array {
  const Memory = (globalThis as unknown as { WebAssembly?: { Memory: new (d: { initial: number }) => { buffer: ArrayBuffer } } })
    .WebAssembly?.Memory;
  if (Memory && size >= WASM_PAGE) {
    try {
      return new Uint8Array(new Memory({ initial: Math.ceil(size / WASM_PAGE) }).buffer, 0, size);
    } catch {
      // no memory for it this way: fall through
    }
  }
  return new Uint8Array(size);
}
