/**
 * LUKS anti-forensic information splitter (LUKS1 on-disk format specification, "AF-Splitter"):
 * a key of n bytes is stored as `stripes` stripes of n bytes, all but the last random, such that
 * folding them with XOR and a hash-based diffusion gives back the key. Destroying any stripe
 * destroys the key.
 */
import { HASH_LENGTH, type CryptoBackend, type HashAlg } from '../../codecs/crypto-registry.js';
import { xorInto } from './bytes.js';

/**
 * Diffusion: the block is cut into digest-sized pieces; piece i becomes H(be32(i) ‖ piece),
 * truncated to the piece's length (the last piece may be shorter).
 */
function diffuse(be: CryptoBackend, hash: HashAlg, block: Uint8Array, scratch: Uint8Array): void {
  const dl = HASH_LENGTH[hash];
  for (let i = 0, off = 0; off < block.length; i++, off += dl) {
    const len = Math.min(dl, block.length - off);
    // One input buffer (counter ‖ piece): thousands of hashes per key, one native call each.
    scratch[0] = (i >>> 24) & 0xff;
    scratch[1] = (i >>> 16) & 0xff;
    scratch[2] = (i >>> 8) & 0xff;
    scratch[3] = i & 0xff;
    for (let k = 0; k < len; k++) scratch[4 + k] = block[off + k]!;
    const d = be.hash(hash, scratch.subarray(0, 4 + len));
    for (let k = 0; k < len; k++) block[off + k] = d[k]!;
  }
}

/** XOR-and-diffuse over the first stripes-1 stripes. */
function fold(be: CryptoBackend, hash: HashAlg, material: Uint8Array, n: number, stripes: number): Uint8Array {
  const d = new Uint8Array(n);
  const scratch = new Uint8Array(4 + HASH_LENGTH[hash]);
  for (let s = 0; s < stripes - 1; s++) {
    const base = s * n;
    for (let k = 0; k < n; k++) d[k] = d[k]! ^ material[base + k]!;
    diffuse(be, hash, d, scratch);
  }
  scratch.fill(0);
  return d;
}

/** Recover the key from split material (`stripes * keyLen` bytes). */
export function afMerge(be: CryptoBackend, hash: HashAlg, material: Uint8Array, keyLen: number, stripes: number): Uint8Array {
  const d = fold(be, hash, material, keyLen, stripes);
  xorInto(d, material.subarray((stripes - 1) * keyLen, stripes * keyLen));
  return d;
}

/** Split a key into `stripes` stripes: random ones, then the one that makes the fold give the key. */
export function afSplit(be: CryptoBackend, hash: HashAlg, key: Uint8Array, stripes: number): Uint8Array {
  const n = key.length;
  const out = new Uint8Array(n * stripes);
  out.set(be.randomBytes(n * (stripes - 1)));
  const d = fold(be, hash, out, n, stripes);
  xorInto(d, key);
  out.set(d, (stripes - 1) * n);
  d.fill(0);
  return out;
}
