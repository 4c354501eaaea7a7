/**
 * Cryptographic primitives used by the encryption code (src/formats/crypto), behind a small
 * interface so that code stays free of Node imports. The Node adapter registers itself from
 * `codecs/crypto-node.ts` (`registerNodeCrypto()`).
 *
 * Only primitives live here: raw AES blocks (ECB), PBKDF2, hashes, random bytes and a CPU clock.
 * The block-cipher modes (XTS, CBC), IV generators, anti-forensic split and LUKS are built on them.
 */
import { QcowError } from '../core/errors.js';

/** Hash algorithms LUKS names and QEMU accepts. */
export type HashAlg = 'md5' | 'sha1' | 'sha224' | 'sha256' | 'sha384' | 'sha512' | 'ripemd160';

export const HASH_ALGS: readonly HashAlg[] = ['md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha512', 'ripemd160'];

/** Digest length in bytes of each hash. */
export const HASH_LENGTH: Readonly<Record<HashAlg, number>> = {
  md5: 16,
  sha1: 20,
  sha224: 28,
  sha256: 32,
  sha384: 48,
  sha512: 64,
  ripemd160: 20,
};

/**
 * AES with one key in ECB mode, no padding: every 16-byte block transformed independently.
 * Inputs are whole blocks; the result is a new buffer of the same length. Objects are reusable
 * (no state between calls).
 */
export interface AesEcb {
  encrypt(data: Uint8Array): Uint8Array;
  decrypt(data: Uint8Array): Uint8Array;
}

export interface CryptoBackend {
  /** Raw AES (key of 16, 24 or 32 bytes) in ECB mode: the primitive the sector modes build on. */
  aesEcb(key: Uint8Array): AesEcb;
  /** One-shot AES-CBC over whole blocks, no padding (reference path and benchmarks). */
  aesCbc(key: Uint8Array, iv: Uint8Array, data: Uint8Array, encrypt: boolean): Uint8Array;
  /** PBKDF2-HMAC (RFC 8018), off the main thread where the platform allows. */
  pbkdf2(hash: HashAlg, password: Uint8Array, salt: Uint8Array, iterations: number, length: number): Promise<Uint8Array>;
  /** The same, synchronously (used to time iterations). */
  pbkdf2Sync(hash: HashAlg, password: Uint8Array, salt: Uint8Array, iterations: number, length: number): Uint8Array;
  /** Digest of the concatenation of `parts`. */
  hash(alg: HashAlg, ...parts: Uint8Array[]): Uint8Array;
  /** Cryptographically strong random bytes. */
  randomBytes(n: number): Uint8Array;
  /** CPU time used by this process, in milliseconds (PBKDF2 calibration, like QEMU's thread CPU time). */
  cpuTimeMs(): number;
}

let current: CryptoBackend | undefined;

export function setCryptoBackend(b: CryptoBackend): void {
  current = b;
}

export function cryptoBackend(): CryptoBackend {
  if (!current) throw new QcowError('ENOTSUP', 'No cryptographic backend registered (call registerNodeCrypto())');
  return current;
}

/** Whether a backend is registered (lets callers give a clearer error first). */
export function hasCryptoBackend(): boolean {
  return current !== undefined;
}
