/** Temporary folders, streaming hashes and file comparison, deterministic data, header patching. */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createHash } from 'node:crypto';

/** A fresh folder under the OS temp dir (one per test file or fixture). */
export function makeTmpDir(prefix = 'qk-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function removeTmpDir(dir: string | undefined): void {
  if (dir && dir.startsWith(os.tmpdir())) fs.rmSync(dir, { recursive: true, force: true });
}

/** sha256 of a file, streamed. */
export function sha256File(file: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash('sha256');
    fs.createReadStream(file, { highWaterMark: 1 << 20 })
      .on('data', (c) => h.update(c))
      .on('error', reject)
      .on('end', () => resolve(h.digest('hex')));
  });
}

export function sha256(buf: Uint8Array): string {
  return createHash('sha256').update(buf).digest('hex');
}

/** First differing byte offset of two files (or -1), streamed in 1 MiB chunks; for failure messages. */
export function firstDifference(a: string, b: string): number {
  const fa = fs.openSync(a, 'r');
  const fb = fs.openSync(b, 'r');
  try {
    const ba = Buffer.alloc(1 << 20);
    const bb = Buffer.alloc(1 << 20);
    let pos = 0;
    for (;;) {
      const na = fs.readSync(fa, ba, 0, ba.length, pos);
      const nb = fs.readSync(fb, bb, 0, bb.length, pos);
      const n = Math.min(na, nb);
      for (let i = 0; i < n; i++) if (ba[i] !== bb[i]) return pos + i;
      if (na !== nb) return pos + n;
      if (na === 0) return -1;
      pos += n;
    }
  } finally {
    fs.closeSync(fa);
    fs.closeSync(fb);
  }
}

/** Compare two files by size and streaming hash; returns a message describing the difference, or '' when equal. */
export async function fileDifference(ours: string, expected: string): Promise<string> {
  if (!fs.existsSync(ours)) return `${ours} was not created`;
  if (!fs.existsSync(expected)) return `${expected} was not created`;
  const sa = fs.statSync(ours).size;
  const sb = fs.statSync(expected).size;
  if (sa !== sb) return `size ${sa} != expected ${sb}`;
  const [ha, hb] = await Promise.all([sha256File(ours), sha256File(expected)]);
  if (ha === hb) return '';
  return `content differs (sha256 ${ha.slice(0, 12)} != ${hb.slice(0, 12)}), first difference at byte ${firstDifference(ours, expected)}`;
}

/** Compare a file against an in-memory expected content. */
export async function fileVsBuffer(file: string, expected: Uint8Array): Promise<string> {
  if (!fs.existsSync(file)) return `${file} was not created`;
  const size = fs.statSync(file).size;
  if (size !== expected.length) return `size ${size} != expected ${expected.length}`;
  const h = await sha256File(file);
  if (h === sha256(expected)) return '';
  const got = fs.readFileSync(file);
  return `content differs, first difference at byte ${firstDiffBuf(got, expected)}`;
}

export function firstDiffBuf(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

// ------------------------------------------------------------------------------------------------
// Deterministic pseudo-random data (xorshift128+ style; no Math.random so fixtures are reproducible)

export function prng(seed: number): () => number {
  let s0 = (seed ^ 0x9e3779b9) >>> 0 || 1;
  let s1 = (Math.imul(seed, 0x85ebca6b) ^ 0xc2b2ae35) >>> 0 || 2;
  return () => {
    let x = s0;
    const y = s1;
    s0 = y;
    x ^= x << 23;
    x ^= x >>> 17;
    x ^= y ^ (y >>> 26);
    s1 = x >>> 0;
    return (s0 + s1) >>> 0;
  };
}

export function randomBytes(seed: number, length: number): Buffer {
  const r = prng(seed);
  const buf = Buffer.alloc(length);
  let i = 0;
  for (; i + 4 <= length; i += 4) buf.writeUInt32LE(r(), i);
  for (; i < length; i++) buf[i] = r() & 0xff;
  return buf;
}

/** Bytes that compress well but are not a single repeated byte (so offset mistakes show). */
export function textishBytes(seed: number, length: number): Buffer {
  const words = ['qcow2 ', 'cluster ', 'L2 ', 'refcount ', 'snapshot ', 'backing ', `seed${seed} `, '\n'];
  const r = prng(seed);
  const parts: string[] = [];
  let n = 0;
  while (n < length) {
    const w = words[r() % words.length]!;
    parts.push(w);
    n += w.length;
  }
  return Buffer.from(parts.join('').slice(0, length), 'latin1');
}

/** Write `data` at `offset` of an existing (or new) file without truncating it. */
export function writeAt(file: string, offset: number, data: Uint8Array): void {
  const fd = fs.openSync(file, fs.existsSync(file) ? 'r+' : 'w+');
  try {
    fs.writeSync(fd, data, 0, data.length, offset);
  } finally {
    fs.closeSync(fd);
  }
}

export function readAt(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    fs.readSync(fd, buf, 0, length, offset);
    return buf;
  } finally {
    fs.closeSync(fd);
  }
}

// Big-endian header field access (qcow2 is big-endian throughout).
export function readU32(file: string, off: number): number {
  return readAt(file, off, 4).readUInt32BE(0);
}
export function readU64(file: string, off: number): bigint {
  return readAt(file, off, 8).readBigUInt64BE(0);
}
export function patchU32(file: string, off: number, value: number): void {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value >>> 0, 0);
  writeAt(file, off, b);
}
export function patchU64(file: string, off: number, value: bigint): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt.asUintN(64, value), 0);
  writeAt(file, off, b);
}
