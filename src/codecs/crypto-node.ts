/**
 * Node adapter for the crypto primitives (node:crypto): raw AES-ECB objects kept open per key,
 * PBKDF2 (async in libuv's pool, sync for calibration), hashes, random bytes, process CPU time.
 */
import * as nodeCrypto from 'node:crypto';
import { QcowError } from '../core/errors.js';
import { setCryptoBackend, type AesEcb, type CryptoBackend, type HashAlg } from './crypto-registry.js';

function aesName(keyLen: number, mode: 'ecb' | 'cbc'): string {
  if (keyLen !== 16 && keyLen !== 24 && keyLen !== 32) {
    throw new QcowError('EINVAL', `No AES cipher with key size ${keyLen} available`);
  }
  return `aes-${keyLen * 8}-${mode}`;
}

function view(b: Buffer): Uint8Array {
  return new Uint8Array(b.buffer, b.byteOffset, b.length);
}

/**
 * ECB with padding off: `update` returns exactly the input's length and keeps no state between
 * calls, so one cipher and one decipher object serve every request for a key.
 */
function aesEcb(key: Uint8Array): AesEcb {
  const name = aesName(key.length, 'ecb');
  const enc = nodeCrypto.createCipheriv(name, key, null).setAutoPadding(false);
  const dec = nodeCrypto.createDecipheriv(name, key, null).setAutoPadding(false);
  const run = (c: nodeCrypto.Cipher | nodeCrypto.Decipher, data: Uint8Array): Uint8Array => {
    if (data.length % 16) throw new QcowError('EINVAL', 'AES-ECB input is not a whole number of blocks');
    const out = c.update(data);
    if (out.length !== data.length) throw new QcowError('EIO', 'AES-ECB returned a short result');
    return view(out);
  };
  return { encrypt: (d) => run(enc, d), decrypt: (d) => run(dec, d) };
}

function aesCbc(key: Uint8Array, iv: Uint8Array, data: Uint8Array, encrypt: boolean): Uint8Array {
  const name = aesName(key.length, 'cbc');
  const c = encrypt ? nodeCrypto.createCipheriv(name, key, iv) : nodeCrypto.createDecipheriv(name, key, iv);
  c.setAutoPadding(false);
  const a = c.update(data);
  const b = c.final();
  return view(b.length ? Buffer.concat([a, b]) : a);
}

function pbkdf2(hash: HashAlg, password: Uint8Array, salt: Uint8Array, iterations: number, length: number): Promise<Uint8Array> {
  return new Promise((resolve, reject) => {
    nodeCrypto.pbkdf2(password, salt, iterations, length, hash, (err, key) => {
      if (err) reject(new QcowError('EIO', `PBKDF2 failed: ${err.message}`));
      else resolve(view(key));
    });
  });
}

function pbkdf2Sync(hash: HashAlg, password: Uint8Array, salt: Uint8Array, iterations: number, length: number): Uint8Array {
  return view(nodeCrypto.pbkdf2Sync(password, salt, iterations, length, hash));
}

/** One-shot hashing (Node >= 20.12) costs about half of createHash per call: the AF merge makes thousands. */
const oneShot = (nodeCrypto as { hash?: (alg: string, data: Uint8Array, enc: 'buffer') => Buffer }).hash;

function hash(alg: HashAlg, ...parts: Uint8Array[]): Uint8Array {
  if (oneShot) {
    let data: Uint8Array;
    if (parts.length === 1) data = parts[0]!;
    else {
      data = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
      let o = 0;
      for (const p of parts) {
        data.set(p, o);
        o += p.length;
      }
    }
    return view(oneShot(alg, data, 'buffer'));
  }
  const h = nodeCrypto.createHash(alg);
  for (const p of parts) h.update(p);
  return view(h.digest());
}

function cpuTimeMs(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
}

export const nodeCryptoBackend: CryptoBackend = {
  aesEcb,
  aesCbc,
  pbkdf2,
  pbkdf2Sync,
  hash,
  randomBytes: (n) => view(nodeCrypto.randomBytes(n)),
  cpuTimeMs,
};

export function registerNodeCrypto(): void {
  setCryptoBackend(nodeCryptoBackend);
}
