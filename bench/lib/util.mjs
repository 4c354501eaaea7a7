// Small helpers shared by the bench harness: size parsing, formatting,
// hashing, a seeded PRNG.
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';

const UNITS = { '': 1, B: 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4, P: 1024 ** 5 };

/** Parse '1G', '256M', '64T', '65536' (binary units, qemu-img style). */
export function parseSize(text) {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$/i.exec(String(text));
  if (!m) throw new Error(`bad size: ${text}`);
  const n = Number(m[1]) * UNITS[m[2].toUpperCase()];
  if (!Number.isFinite(n) || n <= 0) throw new Error(`bad size: ${text}`);
  return Math.round(n);
}

export function fmtBytes(n) {
  if (n == null) return '—';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return `${v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)} ${u[i]}`;
}

/** Peak RSS is reported in MB (10^6 bytes), as in the targets of the issue. */
export function fmtMB(kib) {
  if (kib == null) return '—';
  return `${((kib * 1024) / 1e6).toFixed(1)} MB`;
}

export function fmtSec(ns) {
  if (ns == null) return '—';
  const s = Number(ns) / 1e9;
  return s < 10 ? s.toFixed(3) : s.toFixed(2);
}

/** sha256 of a whole file (holes read as zeros), plus its size. */
export async function hashFile(path) {
  const h = createHash('sha256');
  const st = await stat(path);
  await new Promise((resolve, reject) => {
    createReadStream(path, { highWaterMark: 4 << 20 })
      .on('data', (c) => h.update(c))
      .on('error', reject)
      .on('end', resolve);
  });
  return { sha256: h.digest('hex'), size: st.size, allocated: st.blocks * 512 };
}

/** mulberry32: small deterministic PRNG so layouts are reproducible. */
export function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function median(xs) {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  return s[Math.floor((s.length - 1) / 2)];
}

export function minOf(xs) {
  return xs.length ? xs.reduce((a, b) => (b < a ? b : a)) : null;
}

export function maxOf(xs) {
  const v = xs.filter((x) => x != null);
  return v.length ? v.reduce((a, b) => (b > a ? b : a)) : null;
}
