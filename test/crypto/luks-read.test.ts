/**
 * LUKS and legacy-AES qcow2 images made by qemu-img/qemu-io read back through our library with the
 * same content qemu-img decrypts; info's encrypt block matches; wrong/missing keys fail clearly.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as path from 'node:path';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { must, qemuImg } from '../helpers/proc.js';
import { PASSWORD, firstDiff, openOurs, qemuCreateEncrypted, qemuIoEncrypted, qemuRaw, readAll, registerAll } from './helpers.js';

let dir: string;
beforeAll(() => {
  registerAll();
  dir = makeTmpDir('qk-luks-read-');
});
afterAll(() => removeTmpDir(dir));

/**
 * qemu-img spends ~1 s of CPU calibrating PBKDF2 per LUKS image even with iter-time=10, so each
 * configuration is made once (with the WRITES below) and shared by the tests.
 */
const fixtures = new Map<string, Promise<string>>();
function fixture(opts: string): Promise<string> {
  let f = fixtures.get(opts);
  if (!f) {
    f = (async () => {
      const file = path.join(dir, `fx${fixtures.size}.qcow2`);
      await qemuCreateEncrypted(file, '4M', opts);
      await qemuIoEncrypted(file, WRITES);
      return file;
    })();
    fixtures.set(opts, f);
  }
  return f;
}

/** Writes at odd places: sub-sector, across clusters, a whole cluster, near the end. */
const WRITES = [
  'write -P 0x11 0 64k',
  'write -P 0x22 65024 1536',
  'write -P 0x33 1m 4k',
  'write -P 0x44 2000k 130k',
  'write -P 0x55 3584k 512',
  'write -z 1m 512',
];

const CONFIGS: Array<[string, string]> = [
  ['default aes-256-xts-plain64 sha256', 'encrypt.format=luks'],
  ['aes-128-cbc-essiv:sha256 hash sha1', 'encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1'],
  ['aes-256-xts-essiv:sha256', 'encrypt.format=luks,encrypt.ivgen-alg=essiv'],
  // (aes-192-cbc would need partial key-material sectors: qemu-img 7.2 aborts on an assertion creating it.)
  ['aes-192-xts-plain sha512', 'encrypt.format=luks,encrypt.cipher-alg=aes-192,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512'],
  ['aes-128-ecb md5', 'encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=ecb,encrypt.hash-alg=md5'],
  ['aes-256-xts-plain64:sha256 ripemd160, 4k clusters', 'encrypt.format=luks,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=ripemd160,cluster_size=4096'],
  ['legacy aes', 'encrypt.format=aes'],
  ['legacy aes, v2, 512-byte clusters', 'encrypt.format=aes,compat=0.10,cluster_size=512'],
];

describe('reading qemu-made encrypted images', () => {
  it.each(CONFIGS)('%s', async (_name, opts) => {
    const file = await fixture(opts);
    const expected = await qemuRaw(file, dir);
    const d = await openOurs(file);
    try {
      const got = await readAll(d);
      expect(firstDiff(got, expected)).toBe(-1);
      // Unaligned small reads too.
      for (const [off, len] of [
        [65023, 3],
        [65100, 1000],
        [2000 * 1024 + 7, 70000],
      ] as const) {
        const part = await d.read(off, len);
        expect(firstDiff(part, expected.subarray(off, off + len))).toBe(-1);
      }
    } finally {
      await d.close();
    }
  });
});

describe('info encrypt block', () => {
  it.each(CONFIGS)('%s: same as qemu-img info', async (_name, opts) => {
    const file = await fixture(opts);
    const q = JSON.parse((await must(qemuImg(['info', '--output=json', file]))).stdout);
    // Without a key (as info opens).
    const d = await openOurs(file, { keySecret: null });
    try {
      const ours = d.info();
      expect(ours.encrypted).toBe(true);
      expect(ours.formatSpecific?.data.encrypt).toEqual(q['format-specific'].data.encrypt);
      expect(JSON.stringify(ours)).not.toContain(PASSWORD);
    } finally {
      await d.close();
    }
  });
});

describe('keys', () => {
  let file: string;
  beforeAll(async () => {
    file = await fixture(CONFIGS[0]![1]);
  });

  it('a wrong password fails with QEMU message', async () => {
    await expect(openOurs(file, { password: 'wrong' })).rejects.toThrow(/^Invalid password, cannot unlock any keyslot$/);
    await expect(openOurs(file, { password: 'wrong', readOnly: false })).rejects.toThrow(/^Invalid password, cannot unlock any keyslot$/);
    // A read-only open with the right key: messages of later failures never carry the password.
    const d = await openOurs(file);
    try {
      const e = await d.read(d.size, 1).catch((x: Error) => x);
      expect(String(e)).not.toContain(PASSWORD);
    } finally {
      await d.close();
    }
  });

  it('an unknown secret id fails', async () => {
    await expect(openOurs(file, { keySecret: 'nosuch' })).rejects.toThrow("No secret with id 'nosuch'");
  });

  it('a secret that is not UTF-8 fails like QEMU', async () => {
    const { openImage } = await import('../../src/block/open.js');
    const { fileProvider } = await import('../../src/io/file.js');
    const bad = new Uint8Array([0x61, 0xff, 0xfe]);
    await expect(openImage(file, { io: fileProvider, secrets: new Map([['sec0', bad]]), keySecret: 'sec0' })).rejects.toThrow(
      'Data from secret sec0 is not valid UTF-8',
    );
  });

  it('without a key: read-only open works, reads fail clearly, writable open fails', async () => {
    const d = await openOurs(file, { keySecret: null });
    try {
      await expect(d.read(0, 512)).rejects.toThrow(/encrypt\.key-secret/);
    } finally {
      await d.close();
    }
    await expect(openOurs(file, { keySecret: null, readOnly: false })).rejects.toThrow("Parameter 'encrypt.key-secret' is required for cipher");
  });

  it('a damaged FDE extension or LUKS header fails like qemu-img', async () => {
    const fs = await import('node:fs');
    // qemu-img puts the FDE extension first: offset u64 at 0x78, length u64 at 0x80.
    const poke = (name: string, at: number, bytes: number[]) => {
      const b = fs.readFileSync(file);
      b.set(bytes, at);
      const f = path.join(dir, `${name}.qcow2`);
      fs.writeFileSync(f, b);
      return f;
    };
    const fde = new DataView(fs.readFileSync(file).buffer.slice(0x70, 0x88));
    expect(fde.getUint32(0)).toBe(0x0537be77);
    const luksAt = Number(fde.getBigUint64(8));
    const cases: Array<[string, number, number[], string]> = [
      ['short-fde', 0x80, [0, 0, 0, 0, 0, 0, 1, 0], 'Request for data outside of extension header'],
      ['fde-past-eof', 0x78, [0, 0, 0, 0, 0x10, 0, 0, 0], 'Volume is not in LUKS format'],
      ['luks-v2', luksAt + 6, [0, 2], 'LUKS version 2 is not supported'],
      ['stripes', luksAt + 252, [0, 0, 0x0f, 0xa1], 'Keyslot 0 is corrupted (stripes 4001 != 4000)'],
    ];
    for (const [name, at, bytes, msg] of cases) {
      const f = poke(name, at, bytes);
      await expect(openOurs(f, { keySecret: null })).rejects.toThrow(msg);
      const q = await qemuImg(['info', f]);
      expect(q.stderr).toContain(msg);
    }
  });

  it('unsupported ciphers are named in the error, info still works', async () => {
    const tf = path.join(dir, 'twofish.qcow2');
    await qemuCreateEncrypted(tf, '1M', 'encrypt.format=luks,encrypt.cipher-alg=twofish-256');
    await expect(openOurs(tf)).rejects.toThrow("Cipher algorithm 'twofish-256' is not supported by qcowkit");
    const d = await openOurs(tf, { keySecret: null });
    try {
      expect((d.info().formatSpecific?.data.encrypt as { 'cipher-alg': string })['cipher-alg']).toBe('twofish-256');
    } finally {
      await d.close();
    }
  });
});
