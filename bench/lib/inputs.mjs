// Bench inputs, generated lazily (only what the selected cases need) and
// memoised per work dir. Generation time is never part of any figure.
import { randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { open, rename, rm, stat, writeFile, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { hashFile, prng, fmtBytes } from './util.mjs';

const execFileP = promisify(execFile);
const CLUSTER = 64 * 1024;
const MAX_EXTENT_CLUSTERS = 32; // extents of 64 KiB .. 2 MiB, ~1 MiB average

/**
 * ~8 MiB of log-like text. Deflates ~4-5x per 64 KiB cluster (zlib default
 * level), i.e. "compressible but not trivially so".
 */
function textPool(rand, bytes = 8 << 20) {
  const levels = ['INFO', 'INFO', 'INFO', 'DEBUG', 'WARN', 'ERROR'];
  const paths = ['/api/v1/users', '/api/v1/orders', '/api/v1/items', '/static/app.js',
    '/static/style.css', '/healthz', '/login', '/logout', '/search'];
  const methods = ['GET', 'GET', 'GET', 'POST', 'PUT', 'DELETE'];
  const status = [200, 200, 200, 200, 201, 204, 301, 304, 400, 404, 500];
  const pick = (a) => a[Math.floor(rand() * a.length)];
  let t = 1700000000000;
  const parts = [];
  let len = 0;
  while (len < bytes) {
    t += Math.floor(rand() * 50);
    const line = `${new Date(t).toISOString()} ${pick(levels)} worker-${Math.floor(rand() * 16)} ` +
      `${pick(methods)} ${pick(paths)} status=${pick(status)} bytes=${Math.floor(rand() * 65536)} ` +
      `ms=${Math.floor(rand() * 1000)} req=${Math.floor(rand() * 0xffffff).toString(16)}\n`;
    parts.push(line);
    len += line.length;
  }
  return Buffer.from(parts.join('')).subarray(0, bytes);
}

/**
 * Sparse raw image of `size` bytes: alternating data extent / hole of the same
 * random length (1..32 clusters), data extents alternating between random
 * bytes (incompressible) and log text (compressible). So ~1/2 of the clusters
 * are allocated, 1/4 random, 1/4 text; holes are never written.
 */
export async function makeHalfAllocatedRaw(path, size, seed = 0x9c0f) {
  const rand = prng(seed);
  const pool = textPool(rand);
  const fh = await open(path, 'w');
  const stats = { random: 0, text: 0, hole: 0, extents: 0 };
  try {
    let off = 0;
    let kind = 0;
    const pending = [];
    while (off < size) {
      const len = Math.min((1 + Math.floor(rand() * MAX_EXTENT_CLUSTERS)) * CLUSTER, size - off);
      let buf;
      if (kind === 0) {
        buf = randomBytes(len);
        stats.random += len;
      } else {
        buf = Buffer.allocUnsafe(len);
        let src = Math.floor(rand() * (pool.length - 1));
        for (let o = 0; o < len;) {
          const n = Math.min(len - o, pool.length - src);
          pool.copy(buf, o, src, src + n);
          o += n;
          src = 0;
        }
        stats.text += len;
      }
      pending.push(fh.write(buf, 0, len, off));
      if (pending.length >= 8) await Promise.all(pending.splice(0));
      stats.extents++;
      off += len;
      const hole = Math.min(len, size - off);
      stats.hole += hole;
      off += hole;
      kind ^= 1;
    }
    await Promise.all(pending);
    await fh.truncate(size);
  } finally {
    await fh.close();
  }
  return stats;
}

const abort = new AbortController();
/** Kill running input-generation commands (SIGINT cleanup). */
export function abortInputs() { abort.abort(); }

async function qemuImg(qemu, args) {
  try {
    await execFileP(qemu, args, { maxBuffer: 64 << 20, signal: abort.signal, killSignal: 'SIGKILL' });
  } catch (e) {
    throw new Error(`input generation failed: ${qemu} ${args.join(' ')}\n${e.stderr || e.message}`);
  }
}

/**
 * Input registry. `get(name)` returns {path, ...meta}, generating the file on
 * first use. Files are named with the size so a reused --workdir stays valid.
 */
export class Inputs {
  constructor({ dir, size, qemu, log }) {
    this.dir = dir;
    this.size = size;
    this.qemu = qemu;
    this.log = log;
    this.memo = new Map();
    this.tag = `${size}`;
  }

  get(name) {
    if (!this.memo.has(name)) {
      const gen = GENERATORS[name];
      if (!gen) throw new Error(`unknown bench input: ${name}`);
      this.memo.set(name, gen(this));
    }
    return this.memo.get(name);
  }

  /** Generate to a temporary name then rename, so a reused dir never holds half a file. */
  async produce(file, fn) {
    const path = join(this.dir, file);
    if (existsSync(path)) {
      this.log(`  reusing ${file}`);
      return path;
    }
    const tmp = `${path}.partial`;
    await rm(tmp, { force: true });
    const t0 = process.hrtime.bigint();
    await fn(tmp);
    await rename(tmp, path);
    const st = await stat(path);
    this.log(`  generated ${file}: ${fmtBytes(st.size)} virtual/file, ${fmtBytes(st.blocks * 512)} on disk ` +
      `(${(Number(process.hrtime.bigint() - t0) / 1e9).toFixed(1)} s)`);
    return path;
  }
}

/** name → async (inputs) => {path, ...} ; add new inputs here. */
export const GENERATORS = {
  /** Half-allocated sparse raw, plus the sha256 of its full contents. */
  async raw(inp) {
    const path = await inp.produce(`half-${inp.tag}.raw`, (p) => makeHalfAllocatedRaw(p, inp.size));
    const sumFile = `${path}.sha256`;
    let sum;
    if (existsSync(sumFile)) sum = JSON.parse(await readFile(sumFile, 'utf8'));
    else {
      sum = await hashFile(path);
      await writeFile(sumFile, JSON.stringify(sum));
    }
    return { path, sha256: sum.sha256, size: sum.size };
  },

  /** Plain qcow2 (default options: 64 KiB clusters, compat 1.1). */
  async qcow2(inp) {
    const raw = await inp.get('raw');
    const path = await inp.produce(`half-${inp.tag}.qcow2`,
      (p) => qemuImg(inp.qemu, ['convert', '-f', 'raw', '-O', 'qcow2', raw.path, p]));
    return { path, sha256: raw.sha256, size: raw.size };
  },

  /** zlib-compressed qcow2 (random clusters stay uncompressed: they don't shrink). */
  async qcow2zlib(inp) {
    const raw = await inp.get('raw');
    const path = await inp.produce(`half-${inp.tag}.zlib.qcow2`,
      (p) => qemuImg(inp.qemu, ['convert', '-c', '-f', 'raw', '-O', 'qcow2',
        '-o', 'compression_type=zlib', raw.path, p]));
    return { path, sha256: raw.sha256, size: raw.size };
  },

  /** Empty 64 TiB qcow2 (1 MiB L1 table, nothing allocated). */
  async empty64t(inp) {
    const path = await inp.produce('empty-64T.qcow2',
      (p) => qemuImg(inp.qemu, ['create', '-q', '-f', 'qcow2', p, '64T']));
    return { path };
  },
};
