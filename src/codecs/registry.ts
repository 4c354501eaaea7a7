/**
 * Compression codecs used by the formats, behind a small interface so the core runs where
 * node:zlib does not exist. The Node adapter registers itself from `codecs/node.ts`.
 */
import { QcowError } from '../core/errors.js';

export interface Codecs {
  /**
   * Raw deflate (RFC 1951) → exactly `outLen` bytes. Trailing input bytes are ignored; throws on
   * bad data. With `out` (outLen bytes) the result may be written there, and `out` returned.
   */
  inflateRaw(input: Uint8Array, outLen: number, out?: Uint8Array): Promise<Uint8Array>;
  /** Raw deflate with a 4 KiB window (what QEMU can inflate). Returns undefined if it does not shrink below `limit`. */
  deflateRaw?(input: Uint8Array, limit: number): Promise<Uint8Array | undefined>;
  /** zstd frames → exactly `outLen` bytes; trailing padding ignored. */
  zstdDecompress(input: Uint8Array, outLen: number): Promise<Uint8Array>;
  zstdCompress?(input: Uint8Array, limit: number): Promise<Uint8Array | undefined>;
}

let current: Codecs | undefined;

export function setCodecs(c: Codecs): void {
  current = c;
}

export function codecs(): Codecs {
  if (!current) throw new QcowError('ENOTSUP', 'No compression codecs registered');
  return current;
}
