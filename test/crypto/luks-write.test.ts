/**
 * Writing encrypted images through our library: qemu-img/qemu-io read back what we wrote,
 * `qemu-img check` stays clean, and no plaintext sector reaches the file. Also a LUKS header made
 * by createLuksHeader, placed into a plain qcow2 by hand (as `create` will), is accepted by QEMU.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { must, qemuImg, run } from '../helpers/proc.js';
import { decodeExtensions, decodeHeader, encodeHeader } from '../../src/formats/qcow2/header.js';
import { buildQcow2LuksHeader } from '../../src/formats/crypto/qcow2.js';
import type { LuksCreateOptions } from '../../src/formats/crypto/luks.js';
import { cryptoBackend } from '../../src/codecs/crypto-registry.js';
import {
  PASSWORD,
  enc,
  firstDiff,
  imageOpts,
  openOurs,
  qemuCreateEncrypted,
  qemuIoEncrypted,
  qemuRaw,
  readAll,
  registerAll,
} from './helpers.js';

let dir: string;
beforeAll(() => {
  registerAll();
  dir = makeTmpDir('qk-luks-write-');
});
afterAll(() => removeTmpDir(dir));

/** A deterministic pseudo-random generator (xorshift32). */
function rng(seed: number) {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s;
  };
}

/** Plaintext sectors that are easy to recognise: a marker plus the sector's own index. */
function markedData(len: number, tag: number): Uint8Array {
  const b = new Uint8Array(len);
  const marker = enc('QCOWKIT-PLAINTEXT-MARKER-');
  for (let off = 0; off < len; off += 32) {
    b.set(marker.subarray(0, Math.min(marker.length, len - off)), off);
    if (off + 32 <= len) new DataView(b.buffer).setUint32(off + 28, (tag << 20) ^ off);
  }
  return b;
}

async function qemuCheckClean(file: string): Promise<void> {
  const r = await qemuImg(['check', '--object', `secret,id=sec0,data=${PASSWORD}`, '--image-opts', imageOpts(file)]);
  expect(r.stdout + r.stderr).toMatch(/No errors were found on the image/);
  expect(r.code).toBe(0);
}

/** Random writes, zero writes and discards through our driver, mirrored in a model. */
async function scribble(file: string, size: number, seed: number): Promise<Uint8Array> {
  const model = new Uint8Array(size);
  const next = rng(seed);
  const d = await openOurs(file, { readOnly: false });
  try {
    model.set(await readAll(d));
    for (let i = 0; i < 40; i++) {
      const kind = next() % 10;
      const off = next() % (size - 1);
      const len = Math.min(size - off, 1 + (next() % (kind < 2 ? 300_000 : 70_000)));
      if (kind === 0) {
        await d.writeZeroes(off, len);
        model.fill(0, off, off + len);
      } else {
        const data = markedData(len, i);
        await d.write(off, data);
        model.set(data, off);
      }
    }
    expect(firstDiff(await readAll(d), model)).toBe(-1);
  } finally {
    await d.close();
  }
  return model;
}

/** No 512-byte sector of the file holds a plaintext sector, and the marker text appears nowhere. */
function assertNoPlaintext(file: string, model: Uint8Array): void {
  const bytes = fs.readFileSync(file);
  const plain = new Set<string>();
  for (let off = 0; off + 512 <= model.length; off += 512) {
    const s = model.subarray(off, off + 512);
    if (s.some((x) => x !== 0)) plain.add(Buffer.from(s).toString('latin1'));
  }
  for (let off = 0; off + 512 <= bytes.length; off += 512) {
    expect(plain.has(bytes.subarray(off, off + 512).toString('latin1'))).toBe(false);
  }
  expect(bytes.indexOf('QCOWKIT-PLAINTEXT')).toBe(-1);
  expect(bytes.indexOf(PASSWORD)).toBe(-1);
}

describe('writes through our library', () => {
  it.each([
    ['luks default', 'encrypt.format=luks'],
    ['luks aes-128-cbc-essiv sha1', 'encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1'],
    ['legacy aes', 'encrypt.format=aes'],
    ['luks 4k clusters, v2', 'encrypt.format=luks,cluster_size=4096,compat=0.10'],
  ])('%s: qemu reads back what we wrote; check clean; no plaintext in the file', async (name, opts) => {
    const file = path.join(dir, `w-${name.replace(/\W+/g, '_')}.qcow2`);
    const size = 3 * 1024 * 1024;
    await qemuCreateEncrypted(file, String(size), opts);
    await qemuIoEncrypted(file, ['write -P 0x5a 100k 200k']);
    const model = await scribble(file, size, name.length * 7919);
    expect(firstDiff(await qemuRaw(file, dir), model)).toBe(-1);
    await qemuCheckClean(file);
    assertNoPlaintext(file, model);
    // And qemu writes on top of ours are read back by us.
    await qemuIoEncrypted(file, ['write -P 0x66 65000 2000']);
    model.fill(0x66, 65000, 67000);
    const d = await openOurs(file);
    try {
      expect(firstDiff(await readAll(d), model)).toBe(-1);
    } finally {
      await d.close();
    }
  });

  it('a wrong password leaves the image untouched', async () => {
    const file = path.join(dir, 'untouched.qcow2');
    await handBuiltLuks(file, '1M', { iterTime: 10 });
    const before = fs.readFileSync(file);
    await expect(openOurs(file, { password: 'nope', readOnly: false })).rejects.toThrow('Invalid password, cannot unlock any keyslot');
    expect(fs.readFileSync(file).equals(before)).toBe(true);
  });
});

/**
 * Build a LUKS qcow2 the way `create` is meant to: a plain qcow2 from qemu-img, the LUKS blob in
 * fresh clusters at the end (refcounted), crypt_method 2 and the FDE extension in the header.
 */
async function handBuiltLuks(file: string, size: string, o: Omit<LuksCreateOptions, 'secret'>): Promise<void> {
  await must(qemuImg(['create', '-q', '-f', 'qcow2', file, size]));
  const bytes = new Uint8Array(fs.readFileSync(file));
  const h = decodeHeader(bytes);
  decodeExtensions(h, bytes.subarray(0, 2 ** h.clusterBits));
  const cs = 2 ** h.clusterBits;
  const luks = await buildQcow2LuksHeader(cs, { ...o, secret: enc(PASSWORD), calibrationMs: 20 }, cryptoBackend());
  expect(luks.blob.length).toBe(luks.clusters * cs);
  const at = Math.ceil(bytes.length / cs) * cs;
  // Refcount 1 for the new clusters (16-bit refcounts; the first refcount block covers them).
  const dv = new DataView(bytes.buffer);
  const refblock = Number(dv.getBigUint64(h.refcountTableOffset));
  const out = new Uint8Array(at + luks.blob.length);
  out.set(bytes);
  const odv = new DataView(out.buffer);
  for (let c = at / cs; c < at / cs + luks.clusters; c++) odv.setUint16(refblock + 2 * c, 1);
  h.cryptMethod = 2;
  h.cryptoHeader = { offset: at, length: luks.length };
  const head = encodeHeader(h);
  out.fill(0, 0, cs);
  out.set(head, 0);
  out.set(luks.blob, at);
  fs.writeFileSync(file, out);
}

describe('LUKS headers we create', () => {
  it.each([
    ['default', {}],
    ['aes-128-cbc-essiv sha1', { cipherAlg: 'aes-128', cipherMode: 'cbc', ivgenAlg: 'essiv', ivgenHashAlg: 'sha256', hashAlg: 'sha1' }],
    ['aes-192-xts-plain sha512', { cipherAlg: 'aes-192', cipherMode: 'xts', ivgenAlg: 'plain', hashAlg: 'sha512' }],
  ] as Array<[string, Omit<LuksCreateOptions, 'secret'>]>)('%s: qemu-img opens it with the password and agrees on content', async (name, o) => {
    const file = path.join(dir, `made-${name.replace(/\W+/g, '_')}.qcow2`);
    await handBuiltLuks(file, '2M', { iterTime: 10, ...o });
    await qemuCheckClean(file);
    await qemuIoEncrypted(file, ['write -P 0x42 0 70k', 'write -P 0x43 1m 3000']);
    const expected = await qemuRaw(file, dir);
    expect(expected[0]).toBe(0x42);
    const d = await openOurs(file);
    try {
      expect(firstDiff(await readAll(d), expected)).toBe(-1);
    } finally {
      await d.close();
    }
    // A wrong password is refused by QEMU too.
    const r = await run('qemu-io', ['--object', 'secret,id=sec0,data=wrong', '--image-opts', imageOpts(file), '-c', 'read 0 512']);
    expect(r.stderr).toContain('Invalid password, cannot unlock any keyslot');
    // info: what qemu-img shows equals ours.
    const q = JSON.parse((await must(qemuImg(['info', '--output=json', file]))).stdout);
    const ours = await openOurs(file, { keySecret: null });
    try {
      expect(ours.info().formatSpecific?.data.encrypt).toEqual(q['format-specific'].data.encrypt);
    } finally {
      await ours.close();
    }
  });
});
