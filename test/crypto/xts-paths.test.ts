/**
 * The two implementations of the XTS tweak pass (WebAssembly, and the JavaScript fallback used for
 * partial sectors or where WebAssembly is missing) against node:crypto's own aes-xts, one fresh
 * cipher per 512-byte sector: same bytes for every length and sector number, and each other's
 * inverse.
 */
import { afterEach, describe, expect, it } from 'vitest';
import * as nodeCrypto from 'node:crypto';
import { nodeCryptoBackend } from '../../src/codecs/crypto-node.js';
import { makeSectorCipher } from '../../src/formats/crypto/sector-cipher.js';
import { setXtsWasmEnabled, xtsWasm } from '../../src/formats/crypto/xts-wasm.js';

const be = nodeCryptoBackend;

function reference(alg: string, key: Uint8Array, data: Uint8Array, first: number, encrypt: boolean): Uint8Array {
  const out = new Uint8Array(data.length);
  for (let off = 0, s = first; off < data.length; off += 512, s++) {
    const iv = Buffer.alloc(16);
    iv.writeUInt32LE(s % 2 ** 32, 0);
    iv.writeUInt32LE(Math.floor(s / 2 ** 32), 4);
    const c = encrypt ? nodeCrypto.createCipheriv(alg, key, iv) : nodeCrypto.createDecipheriv(alg, key, iv);
    const chunk = data.subarray(off, Math.min(data.length, off + 512));
    out.set(Buffer.concat([c.update(chunk), c.final()]), off);
  }
  return out;
}

afterEach(() => setXtsWasmEnabled(true));

describe('XTS tweak pass: WebAssembly and JavaScript', () => {
  it('WebAssembly is available here (so the fast path is what these tests exercise)', () => {
    setXtsWasmEnabled(true);
    expect(xtsWasm()).toBeDefined();
  });

  it.each([
    ['WebAssembly', true],
    ['JavaScript', false],
  ])('%s: equals node:crypto aes-xts per sector, over slices and sector numbers past 2^32', (_n, wasm) => {
    setXtsWasmEnabled(wasm);
    expect(xtsWasm() !== undefined).toBe(wasm);
    for (const [alg, spec, keyLen] of [
      ['aes-256-xts', 'aes-256', 64],
      ['aes-128-xts', 'aes-128', 32],
    ] as const) {
      const key = new Uint8Array(nodeCrypto.randomBytes(keyLen));
      const c = makeSectorCipher({ cipherAlg: spec, mode: 'xts', ivgen: 'plain64' }, key, be);
      for (const [len, first] of [
        [512, 0],
        [4096, 5],
        [65536, 2 ** 32 - 3],
        [65536 * 3 + 1024, 2 ** 40 + 7],
      ] as const) {
        const data = new Uint8Array(nodeCrypto.randomBytes(len));
        const buf = data.slice();
        c.encrypt(buf, first);
        expect(Buffer.from(buf).equals(Buffer.from(reference(alg, key, data, first, true)))).toBe(true);
        c.decrypt(buf, first);
        expect(Buffer.from(buf).equals(Buffer.from(data))).toBe(true);
      }
    }
  });

  it('data encrypted on one path decrypts on the other; a partial final sector takes the JavaScript path', () => {
    const key = new Uint8Array(nodeCrypto.randomBytes(64));
    const c = makeSectorCipher({ cipherAlg: 'aes-256', mode: 'xts', ivgen: 'plain64' }, key, be);
    const data = new Uint8Array(nodeCrypto.randomBytes(200 * 512));
    setXtsWasmEnabled(true);
    const a = data.slice();
    c.encrypt(a, 99);
    setXtsWasmEnabled(false);
    const b = data.slice();
    c.encrypt(b, 99);
    expect(Buffer.from(a).equals(Buffer.from(b))).toBe(true);
    c.decrypt(a, 99);
    expect(Buffer.from(a).equals(Buffer.from(data))).toBe(true);
    // 96000 bytes (an aes-192 cbc key's split material is like this): 187 sectors and a half.
    setXtsWasmEnabled(true);
    const part = data.slice(0, 96000);
    const whole = data.slice(0, 96256);
    c.encrypt(part, 3);
    c.encrypt(whole, 3);
    expect(Buffer.from(part).equals(Buffer.from(whole.subarray(0, 96000)))).toBe(true);
  });
});
