/**
 * Sector encryption as disk encryption does it: data is cut into 512-byte sectors, each encrypted
 * on its own with an IV derived from its sector number (plain, plain64 or essiv), in XTS, CBC or
 * ECB mode. Everything is built on a raw AES-ECB primitive so that a whole run of sectors costs a
 * few bulk AES calls plus word-wide XORs in JavaScript:
 *
 * - XTS: the per-sector tweaks are all encrypted in one ECB call, the per-block tweaks derived by
 *   doubling in GF(2^128), then one ECB call over (data XOR tweaks). The tweak passes run in a
 *   small WebAssembly function (xts-wasm.ts) on whole sectors, in JavaScript otherwise.
 * - Requests are processed in 64 KiB slices: the ECB output buffers stay small (recycled by the
 *   allocator instead of fresh pages per call) and in cache for the pass that follows.
 * - CBC decrypt: one ECB call, then XOR with the previous ciphertext block (or the sector's IV).
 * - CBC encrypt is sequential inside a sector, so the sectors are processed side by side: one ECB
 *   call per block position (32 calls for any number of sectors).
 *
 * A final partial sector (a multiple of 16 bytes) is processed as a shorter unit, which gives the
 * same bytes as the first part of a whole sector would (LUKS key material needs it).
 */
import { QcowError } from '../../core/errors.js';
import { HASH_LENGTH, type AesEcb, type CryptoBackend, type HashAlg } from '../../codecs/crypto-registry.js';
import { LITTLE_ENDIAN, putLe64, words, wordsBack } from './bytes.js';
import { XTS_WASM_SLICE, xtsWasm } from './xts-wasm.js';

export const SECTOR_SIZE = 512;
const BLOCK = 16;
const BLOCKS_PER_SECTOR = SECTOR_SIZE / BLOCK;
/** Bytes handled per bulk cipher call (a whole number of sectors). */
const SLICE_BYTES = XTS_WASM_SLICE;

export type CipherMode = 'ecb' | 'cbc' | 'xts' | 'ctr';
export type IvgenAlg = 'plain' | 'plain64' | 'essiv';

/** The cipher algorithms QEMU knows (QAPI QCryptoCipherAlgorithm names). */
export const CIPHER_ALGS = [
  'aes-128',
  'aes-192',
  'aes-256',
  'des',
  '3des',
  'cast5-128',
  'serpent-128',
  'serpent-192',
  'serpent-256',
  'twofish-128',
  'twofish-192',
  'twofish-256',
  'sm4',
] as const;
export const CIPHER_MODES: readonly CipherMode[] = ['ecb', 'cbc', 'xts', 'ctr'];
export const IVGEN_ALGS: readonly IvgenAlg[] = ['plain', 'plain64', 'essiv'];

export interface SectorCipherSpec {
  /** QAPI cipher algorithm name, e.g. 'aes-256'. */
  cipherAlg: string;
  mode: CipherMode;
  ivgen: IvgenAlg;
  /** Hash of the key giving the ESSIV key (essiv only). */
  ivgenHash?: HashAlg;
}

export interface SectorCipher {
  /** Encrypt in place; `buf.length` is a multiple of 16, sectors numbered from `firstSector`. */
  encrypt(buf: Uint8Array, firstSector: number): void;
  decrypt(buf: Uint8Array, firstSector: number): void;
}

/** Key size in bytes of a cipher algorithm (the cipher itself, before XTS doubles it). */
export function cipherKeyBytes(alg: string): number | undefined {
  const m = /-(\d+)$/.exec(alg);
  if (m) return Number(m[1]) / 8;
  if (alg === 'sm4') return 16;
  if (alg === 'des') return 8;
  if (alg === '3des') return 24;
  return undefined;
}

/** Bytes of master key a spec needs (XTS takes two cipher keys). */
export function masterKeyBytes(spec: Pick<SectorCipherSpec, 'cipherAlg' | 'mode'>): number {
  const n = cipherKeyBytes(spec.cipherAlg) ?? 0;
  return spec.mode === 'xts' ? 2 * n : n;
}

/** Refuse what qcowkit cannot compute (QEMU has more ciphers: serpent, twofish, cast5 through its crypto libraries). */
export function checkSupported(spec: SectorCipherSpec): void {
  if (!/^aes-(128|192|256)$/.test(spec.cipherAlg)) {
    throw new QcowError('ENOTSUP', `Cipher algorithm '${spec.cipherAlg}' is not supported by qcowkit (supported: aes-128, aes-192, aes-256)`);
  }
  if (spec.mode === 'ctr') {
    throw new QcowError('ENOTSUP', `Cipher mode '${spec.mode}' is not supported by qcowkit (supported: xts, cbc, ecb)`);
  }
}

/** The AES key size the ESSIV cipher gets: the digest length of the IV hash. */
function essivKey(be: CryptoBackend, hash: HashAlg, key: Uint8Array): Uint8Array {
  const n = HASH_LENGTH[hash];
  if (n !== 16 && n !== 24 && n !== 32) throw new QcowError('EINVAL', `No AES cipher with key size ${n} available`);
  return be.hash(hash, key);
}

export function makeSectorCipher(spec: SectorCipherSpec, key: Uint8Array, be: CryptoBackend): SectorCipher {
  checkSupported(spec);
  const want = masterKeyBytes(spec);
  if (key.length !== want) throw new QcowError('EINVAL', `Key for ${spec.cipherAlg}-${spec.mode} must be ${want} bytes, got ${key.length}`);
  return new AesSectorCipher(spec, key, be);
}

class AesSectorCipher implements SectorCipher {
  private readonly data: AesEcb;
  private readonly tweak?: AesEcb;
  private readonly essiv?: AesEcb;

  constructor(
    private readonly spec: SectorCipherSpec,
    key: Uint8Array,
    be: CryptoBackend,
  ) {
    if (spec.mode === 'xts') {
      const half = key.length / 2;
      this.data = be.aesEcb(key.subarray(0, half));
      this.tweak = be.aesEcb(key.subarray(half));
    } else {
      this.data = be.aesEcb(key);
    }
    if (spec.ivgen === 'essiv') {
      const k = essivKey(be, spec.ivgenHash ?? 'sha256', key);
      this.essiv = be.aesEcb(k);
      k.fill(0);
    }
  }

  /** The IVs of `n` sectors from `first`, 16 bytes each. */
  private ivs(first: number, n: number): Uint8Array {
    const iv = new Uint8Array(n * BLOCK);
    if (this.spec.ivgen === 'plain') {
      for (let i = 0; i < n; i++) {
        const s = (first + i) % 0x100000000;
        iv[i * BLOCK] = s & 0xff;
        iv[i * BLOCK + 1] = (s >>> 8) & 0xff;
        iv[i * BLOCK + 2] = (s >>> 16) & 0xff;
        iv[i * BLOCK + 3] = (s >>> 24) & 0xff;
      }
      return iv;
    }
    for (let i = 0; i < n; i++) putLe64(iv, i * BLOCK, first + i);
    return this.essiv ? this.essiv.encrypt(iv) : iv;
  }

  encrypt(buf: Uint8Array, firstSector: number): void {
    this.run(buf, firstSector, true);
  }

  decrypt(buf: Uint8Array, firstSector: number): void {
    this.run(buf, firstSector, false);
  }

  private run(buf: Uint8Array, first: number, enc: boolean): void {
    if (buf.length % BLOCK) throw new QcowError('EINVAL', 'Encrypted data must be a whole number of 16-byte blocks');
    if (!buf.length) return;
    // Large requests go in slices: the cipher's output buffers stay small enough to be recycled by
    // the allocator (no fresh pages per call) and hot in the cache for the XOR pass that follows.
    if (buf.length > SLICE_BYTES) {
      for (let off = 0; off < buf.length; off += SLICE_BYTES) {
        this.run(buf.subarray(off, Math.min(buf.length, off + SLICE_BYTES)), first + off / SECTOR_SIZE, enc);
      }
      return;
    }
    switch (this.spec.mode) {
      case 'ecb':
        buf.set(enc ? this.data.encrypt(buf) : this.data.decrypt(buf));
        return;
      case 'xts':
        this.xts(buf, first, enc);
        return;
      case 'cbc':
        if (enc) this.cbcEncrypt(buf, first);
        else this.cbcDecrypt(buf, first);
        return;
      default:
        throw new QcowError('ENOTSUP', `Cipher mode '${this.spec.mode}' is not supported by qcowkit`);
    }
  }

  /**
   * In place: buf ^= tweaks, one ECB call, result ^ tweaks. The tweaks are generated twice (cheaper
   * than storing and re-reading them).
   */
  private xts(buf: Uint8Array, first: number, enc: boolean): void {
    const n = Math.ceil(buf.length / SECTOR_SIZE);
    const w = buf.length % SECTOR_SIZE === 0 && LITTLE_ENDIAN ? xtsWasm() : undefined;
    if (w) {
      // The same steps with the tweak passes in WebAssembly (whole sectors, one slice at most).
      const len = buf.length;
      w.heap.set(this.tweak!.encrypt(this.ivs(first, n)), w.tweaksAt);
      w.heap.set(buf, 0);
      w.xor(n);
      const data = w.heap.subarray(0, len);
      w.heap.set(enc ? this.data.encrypt(data) : this.data.decrypt(data), 0);
      w.xor(n);
      buf.set(w.heap.subarray(0, len));
      return;
    }
    const t0 = words(this.tweak!.encrypt(this.ivs(first, n))).w;
    const vb = words(buf);
    const b = vb.w;
    xorTweaks(b, b, t0, n);
    const yb = new Uint8Array(b.buffer, b.byteOffset, b.length * 4);
    const y = words(enc ? this.data.encrypt(yb) : this.data.decrypt(yb)).w;
    xorTweaks(b, y, t0, n);
    wordsBack(buf, vb);
  }

  private cbcDecrypt(buf: Uint8Array, first: number): void {
    const n = Math.ceil(buf.length / SECTOR_SIZE);
    const iv = words(this.ivs(first, n)).w;
    const vb = words(buf);
    const c = vb.w;
    const y = words(this.data.decrypt(buf)).w;
    const sw = SECTOR_SIZE / 4;
    for (let s = 0; s < n; s++) {
      const base = s * sw;
      const end = Math.min(base + sw, c.length);
      y[base] = y[base]! ^ iv[s * 4]!;
      y[base + 1] = y[base + 1]! ^ iv[s * 4 + 1]!;
      y[base + 2] = y[base + 2]! ^ iv[s * 4 + 2]!;
      y[base + 3] = y[base + 3]! ^ iv[s * 4 + 3]!;
      for (let i = base + 4; i < end; i++) y[i] = y[i]! ^ c[i - 4]!;
    }
    c.set(y);
    wordsBack(buf, vb);
  }

  /** Sectors side by side: block j of every sector in one ECB call, chained on block j-1. */
  private cbcEncrypt(buf: Uint8Array, first: number): void {
    const n = Math.ceil(buf.length / SECTOR_SIZE);
    const totalBlocks = buf.length / BLOCK;
    const lastBlocks = totalBlocks - (n - 1) * BLOCKS_PER_SECTOR;
    let prev = words(this.ivs(first, n)).w;
    const vb = words(buf);
    const b = vb.w;
    const tmp = new Int32Array(n * 4);
    const sw = SECTOR_SIZE / 4;
    for (let j = 0; j < BLOCKS_PER_SECTOR; j++) {
      const count = j < lastBlocks ? n : n - 1;
      if (count === 0) break;
      for (let s = 0; s < count; s++) {
        const src = s * sw + j * 4;
        const p = s * 4;
        tmp[p] = b[src]! ^ prev[p]!;
        tmp[p + 1] = b[src + 1]! ^ prev[p + 1]!;
        tmp[p + 2] = b[src + 2]! ^ prev[p + 2]!;
        tmp[p + 3] = b[src + 3]! ^ prev[p + 3]!;
      }
      const out = words(this.data.encrypt(new Uint8Array(tmp.buffer, 0, count * BLOCK))).w;
      for (let s = 0; s < count; s++) {
        const dst = s * sw + j * 4;
        const p = s * 4;
        b[dst] = out[p]!;
        b[dst + 1] = out[p + 1]!;
        b[dst + 2] = out[p + 2]!;
        b[dst + 3] = out[p + 3]!;
      }
      prev = out;
    }
    wordsBack(buf, vb);
  }
}

/**
 * dst = src XOR the per-block XTS tweaks: block 0 of sector s gets the encrypted IV `t0[s]`, each
 * next block the previous tweak multiplied by x in GF(2^128) (little-endian bit order, reduction
 * 0x87). Words are host order; on big-endian hosts they are swapped around the arithmetic.
 */
function xorTweaks(dst: Int32Array, src: Int32Array, t0: Int32Array, n: number): void {
  if (!LITTLE_ENDIAN) {
    xorTweaksBE(dst, src, t0, n);
    return;
  }
  const sw = SECTOR_SIZE / 4;
  const len = dst.length;
  for (let s = 0; s < n; s++) {
    let w0 = t0[s * 4]!;
    let w1 = t0[s * 4 + 1]!;
    let w2 = t0[s * 4 + 2]!;
    let w3 = t0[s * 4 + 3]!;
    const base = s * sw;
    const end = Math.min(base + sw, len);
    for (let i = base; i < end; i += 4) {
      dst[i] = src[i]! ^ w0;
      dst[i + 1] = src[i + 1]! ^ w1;
      dst[i + 2] = src[i + 2]! ^ w2;
      dst[i + 3] = src[i + 3]! ^ w3;
      const carry = w3 >> 31; // 0 or -1
      w3 = (w3 << 1) | (w2 >>> 31);
      w2 = (w2 << 1) | (w1 >>> 31);
      w1 = (w1 << 1) | (w0 >>> 31);
      w0 = (w0 << 1) ^ (carry & 0x87);
    }
  }
}

function xorTweaksBE(dst: Int32Array, src: Int32Array, t0: Int32Array, n: number): void {
  const sw = SECTOR_SIZE / 4;
  for (let s = 0; s < n; s++) {
    let w0 = bswap(t0[s * 4]!);
    let w1 = bswap(t0[s * 4 + 1]!);
    let w2 = bswap(t0[s * 4 + 2]!);
    let w3 = bswap(t0[s * 4 + 3]!);
    const base = s * sw;
    const end = Math.min(base + sw, dst.length);
    for (let i = base; i < end; i += 4) {
      dst[i] = src[i]! ^ bswap(w0);
      dst[i + 1] = src[i + 1]! ^ bswap(w1);
      dst[i + 2] = src[i + 2]! ^ bswap(w2);
      dst[i + 3] = src[i + 3]! ^ bswap(w3);
      const carry = w3 >> 31;
      w3 = (w3 << 1) | (w2 >>> 31);
      w2 = (w2 << 1) | (w1 >>> 31);
      w1 = (w1 << 1) | (w0 >>> 31);
      w0 = (w0 << 1) ^ (carry & 0x87);
    }
  }
}

function bswap(x: number): number {
  return ((x & 0xff) << 24) | ((x & 0xff00) << 8) | ((x >>> 8) & 0xff00) | (x >>> 24);
}
