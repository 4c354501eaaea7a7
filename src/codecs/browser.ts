/**
 * Codecs for runtimes without node:zlib (browsers, workers, Deno): decompression only, in pure
 * JavaScript. zlib raw inflate with fflate; zstd with fzstd. Compression (deflateRaw,
 * zstdCompress) is absent: images with compressed clusters read, `convert -c` needs Node.
 *
 * Why not DecompressionStream('deflate-raw'): QEMU reads a compressed cluster's sectors, so the
 * deflate stream is followed by up to 511 bytes of whatever comes next in the file; browsers fail
 * such a stream ("Junk found after end of compressed data") and drop the output. fflate stops at
 * the final block and ignores what follows, as zlib does for QEMU.
 *
 * The contract is node.ts's: exactly `outLen` bytes out, trailing input ignored (QEMU: output
 * beyond `outLen` is cut off), a bad or short stream throws QcowError('EIO', ...).
 */
import { inflateSync } from 'fflate';
import { Decompress } from 'fzstd';
import { QcowError } from '../core/errors.js';
import { setCodecs, type Codecs } from './registry.js';

const BAD_ZLIB = 'Input/output error (bad compressed cluster)';
const BAD_ZSTD = 'Input/output error (bad zstd compressed cluster)';

/** Raw deflate → exactly `outLen` bytes, written into `out` when it is given (and outLen long). */
export function inflateRawJs(input: Uint8Array, outLen: number, out?: Uint8Array): Uint8Array {
  const dst = out && out.length === outLen ? out : new Uint8Array(outLen);
  let got: Uint8Array;
  try {
    // With `out` given, fflate writes into it and stops there; the result is the part it filled.
    got = inflateSync(input, { out: dst });
  } catch {
    throw new QcowError('EIO', BAD_ZLIB);
  }
  if (got.length !== outLen) throw new QcowError('EIO', BAD_ZLIB);
  return dst;
}

/**
 * zstd frames → exactly `outLen` bytes, as QEMU decompresses: frame after frame until the output
 * is full; what follows (sector padding, the next cluster's bytes) is never looked at.
 */
export function zstdDecompressJs(input: Uint8Array, outLen: number): Uint8Array {
  const out = new Uint8Array(outLen);
  let produced = 0;
  const full = new Error('full');
  const d = new Decompress((chunk) => {
    const n = Math.min(chunk.length, outLen - produced);
    out.set(chunk.subarray(0, n), produced);
    produced += n;
    if (produced === outLen) throw full; // stop before the bytes after the last frame are parsed
  });
  try {
    d.push(input, true);
  } catch (e) {
    if (e !== full && produced !== outLen) throw new QcowError('EIO', BAD_ZSTD);
  }
  if (produced !== outLen) throw new QcowError('EIO', BAD_ZSTD);
  return out;
}

export const browserCodecs: Codecs = {
  inflateRaw: async (input, outLen, out?: Uint8Array) => inflateRawJs(input, outLen, out),
  zstdDecompress: async (input, outLen) => zstdDecompressJs(input, outLen),
};

export function registerBrowserCodecs(): void {
  setCodecs(browserCodecs);
}
