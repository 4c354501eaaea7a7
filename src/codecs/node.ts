/** Node adapter: zlib from node:zlib (runs in libuv's thread pool), zstd from zstd-napi. */
import { loadNativeAddon } from '../io/native-addon.js';
import * as zlib from 'node:zlib';
import { createRequire } from 'node:module';
import { QcowError } from '../core/errors.js';
import { setCodecs, type Codecs } from './registry.js';

type ZstdBinding = {
  DCtx: new () => { decompressStream(dst: Uint8Array, src: Uint8Array): [number, number, number] };
  CCtx: new () => { compress(dst: Uint8Array, src: Uint8Array, level: number): number };
};

let zstdBinding: ZstdBinding | undefined | null;
function zstd(): ZstdBinding {
  if (zstdBinding === undefined) {
    try {
      const require = createRequire(import.meta.url);
      zstdBinding = require('zstd-napi/binding') as ZstdBinding;
    } catch {
      zstdBinding = null;
    }
  }
  if (!zstdBinding) throw new QcowError('ENOTSUP', 'zstd support is not available (zstd-napi failed to load)');
  return zstdBinding;
}

/** Inflate synchronously into one output chunk: for 4 KiB–2 MiB clusters this is cheaper than zlib's stream-based async path. */
export function inflateRawSync(input: Uint8Array, outLen: number): Uint8Array {
  let out: Buffer;
  try {
    out = zlib.inflateRawSync(input, {
      finishFlush: zlib.constants.Z_SYNC_FLUSH,
      chunkSize: Math.max(outLen, 64),
      maxOutputLength: Math.max(outLen, 1),
    });
  } catch {
    throw new QcowError('EIO', 'Input/output error (bad compressed cluster)');
  }
  if (out.length !== outLen) throw new QcowError('EIO', 'Input/output error (bad compressed cluster)');
  return out;
}

/** native/zlib.c: inflate on libuv's thread pool (undefined when the addon was not built). */
type ZlibAddon = { inflateRaw(input: Uint8Array, output: Uint8Array): Promise<number> };
let zlibAddon: ZlibAddon | null | undefined;
function nativeZlib(): ZlibAddon | null {
  if (zlibAddon === undefined) {
    zlibAddon = null;
    const mod = loadNativeAddon<ZlibAddon>('qcowkit_zlib'); // (undefined: not built; node:zlib on the main thread)
    if (mod && typeof mod.inflateRaw === 'function') zlibAddon = mod as ZlibAddon;
  }
  return zlibAddon;
}

/**
 * Inflate one cluster: on the thread pool when the addon is there (clusters of a read then
 * decompress on every core, as in QEMU), else synchronously with node:zlib.
 */
async function inflateRaw(input: Uint8Array, outLen: number, out?: Uint8Array): Promise<Uint8Array> {
  const addon = nativeZlib();
  if (!addon) return inflateRawSync(input, outLen);
  const dst = out && out.length === outLen ? out : new Uint8Array(outLen);
  const n = await addon.inflateRaw(input, dst).catch(() => -1);
  if (n !== outLen) throw new QcowError('EIO', 'Input/output error (bad compressed cluster)');
  return dst;
}

function deflateRaw(input: Uint8Array, limit: number): Promise<Uint8Array | undefined> {
  return new Promise((resolve, reject) => {
    zlib.deflateRaw(input, { windowBits: 12, memLevel: 9, level: 6 }, (err, out) => {
      if (err) reject(new QcowError('EIO', `Compression failed: ${err.message}`));
      else resolve(out.length < limit ? out : undefined);
    });
  });
}

/** Streaming decompression like QEMU's: frames until `outLen` bytes; padding after the last frame is ignored. */
export function zstdDecompressSync(input: Uint8Array, outLen: number): Uint8Array {
  const { DCtx } = zstd();
  const dctx = new DCtx();
  const out = new Uint8Array(outLen);
  let produced = 0;
  let consumed = 0;
  let ret = 0;
  while (produced < outLen) {
    if (consumed >= input.length) break;
    let r: [number, number, number];
    try {
      r = dctx.decompressStream(out.subarray(produced), input.subarray(consumed));
    } catch {
      throw new QcowError('EIO', 'Input/output error (bad zstd compressed cluster)');
    }
    ret = r[0];
    produced += r[1];
    consumed += r[2];
    if (r[1] === 0 && r[2] === 0) break;
  }
  if (produced !== outLen || ret > 0 && consumed >= input.length) {
    if (produced !== outLen) throw new QcowError('EIO', 'Input/output error (bad zstd compressed cluster)');
  }
  return out;
}

export function zstdCompressSync(input: Uint8Array, limit: number): Uint8Array | undefined {
  const { CCtx } = zstd();
  const cctx = new CCtx();
  const dst = new Uint8Array(limit);
  try {
    const n = cctx.compress(dst, input, 3);
    return n < limit ? dst.subarray(0, n) : undefined;
  } catch {
    return undefined; // does not fit
  }
}

export const nodeCodecs: Codecs = {
  inflateRaw,
  deflateRaw,
  zstdDecompress: async (input, outLen) => zstdDecompressSync(input, outLen),
  zstdCompress: async (input, limit) => zstdCompressSync(input, limit),
};

export function registerNodeCodecs(): void {
  setCodecs(nodeCodecs);
}
