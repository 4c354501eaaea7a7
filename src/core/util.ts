/** Small helpers every layer may use. No imports. */

export function alignDown(x: number, a: number): number {
  return x - (x % a);
}
export function alignUp(x: number, a: number): number {
  const r = x % a;
  return r === 0 ? x : x + (a - r);
}
export function isPowerOfTwo(x: number): boolean {
  return x > 0 && Number.isInteger(x) && (x & (x - 1)) === 0 && x <= 2 ** 31;
}
export function isZero(buf: Uint8Array): boolean {
  // Check 4 bytes at a time where aligned.
  const len = buf.length;
  let i = 0;
  if ((buf.byteOffset & 7) === 0) {
    const u32 = new Uint32Array(buf.buffer, buf.byteOffset, len >>> 2);
    for (let j = 0; j < u32.length; j++) if (u32[j] !== 0) return false;
    i = u32.length << 2;
  }
  for (; i < len; i++) if (buf[i] !== 0) return false;
  return true;
}

/** Path helpers that do not depend on node:path (the core runs in browsers). */
export function dirname(p: string): string {
  const i = p.lastIndexOf('/');
  if (i < 0) return '.';
  if (i === 0) return '/';
  return p.slice(0, i);
}
export function joinPath(dir: string, name: string): string {
  if (name.startsWith('/')) return name;
  if (dir === '.' || dir === '') return name;
  return dir.endsWith('/') ? dir + name : `${dir}/${name}`;
}

const SUFFIXES = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
/** qemu's size_to_str: binary units chosen so the value stays below 1000, printed with "%0.3g". */
export function sizeToStr(bytes: number): string {
  const scaled = bytes / (1000 / 1024);
  let i = scaled < 1 ? 0 : Math.floor((Math.floor(Math.log2(scaled)) + 1 - 1) / 10);
  if (i > 6) i = 6;
  const div = 2 ** (i * 10);
  return `${formatG(bytes / div, 3)} ${SUFFIXES[i]}B`;
}

/** C printf "%.Pg". */
export function formatG(v: number, precision: number): string {
  if (v === 0) return '0';
  const exp = Math.floor(Math.log10(Math.abs(v)));
  let e = Number(v.toExponential(precision - 1).split('e')[1]);
  if (!Number.isFinite(e)) e = exp;
  if (e < -4 || e >= precision) {
    const [mant, ex] = v.toExponential(precision - 1).split('e');
    const m = mant!.includes('.') ? mant!.replace(/\.?0+$/, '') : mant!;
    const n = Number(ex);
    return `${m}e${n < 0 ? '-' : '+'}${String(Math.abs(n)).padStart(2, '0')}`;
  }
  const s = v.toFixed(Math.max(0, precision - 1 - e));
  return s.includes('.') ? s.replace(/\.?0+$/, '') : s;
}
/** Parse a size like qemu-img: bytes without suffix, k/K M G T P E (1024-based), optional trailing 'b'/'B' for bytes. */
export function parseSize(text: string): number | undefined {
  const m = /^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtTpPeEbB]?)\s*$/.exec(text);
  if (!m) return undefined;
  const num = Number(m[1]);
  const shift: Record<string, number> = { '': 0, b: 0, k: 10, m: 20, g: 30, t: 40, p: 50, e: 60 };
  const s = shift[m[2]!.toLowerCase()]!;
  if (m[1]!.includes('.') && s === 0) return undefined;
  const v = num * 2 ** s;
  if (!Number.isFinite(v) || v > Number.MAX_SAFE_INTEGER) return undefined;
  return Math.round(v);
}

/** Byte-wise equality (no Node Buffer, so the core runs in browsers). */
export function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  const n = a.length;
  let i = 0;
  if ((a.byteOffset & 3) === 0 && (b.byteOffset & 3) === 0) {
    const a32 = new Uint32Array(a.buffer, a.byteOffset, n >>> 2);
    const b32 = new Uint32Array(b.buffer, b.byteOffset, n >>> 2);
    for (let j = 0; j < a32.length; j++) if (a32[j] !== b32[j]) return false;
    i = a32.length << 2;
  }
  for (; i < n; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** The parts, one after the other, in a new array. */
export function concatBytes(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}
