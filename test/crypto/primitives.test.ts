/**
 * The pure crypto pieces against references: XTS/CBC/ECB sector modes vs node:crypto per sector,
 * IV generators, the anti-forensic splitter, LUKS header codec and QEMU's header checks, key-slot
 * unlock, PBKDF2 calibration, legacy AES, option parsing and `--object secret` parsing.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as nodeCrypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { nodeCryptoBackend } from '../../src/codecs/crypto-node.js';
import type { CryptoBackend, HashAlg } from '../../src/codecs/crypto-registry.js';
import { makeSectorCipher, type SectorCipherSpec } from '../../src/formats/crypto/sector-cipher.js';
import { afMerge, afSplit } from '../../src/formats/crypto/af.js';
import {
  LUKS_SLOT_ENABLED,
  decodeLuksHeader,
  encodeLuksHeader,
  luksParams,
  validateLuksHeader,
  type LuksHeader,
} from '../../src/formats/crypto/luks-header.js';
import { createLuksHeader, luksHeaderLength, unlockLuks } from '../../src/formats/crypto/luks.js';
import { legacyAesCipher, legacyAesKey } from '../../src/formats/crypto/legacy-aes.js';
import { parseEncryptCreateOptions } from '../../src/formats/crypto/options.js';
import { parseObjectArgs } from '../../src/cli/secrets.js';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { enc, registerAll } from './helpers.js';

const be = nodeCryptoBackend;
beforeAll(() => registerAll());

const rand = (n: number) => new Uint8Array(nodeCrypto.randomBytes(n));

function le64Iv(sector: number): Buffer {
  const iv = Buffer.alloc(16);
  iv.writeBigUInt64LE(BigInt(sector));
  return iv;
}

/** Reference: node:crypto with a fresh cipher per 512-byte sector. */
function referenceSectors(alg: string, key: Uint8Array, data: Uint8Array, first: number, encrypt: boolean, iv: (s: number) => Buffer): Uint8Array {
  const out = new Uint8Array(data.length);
  for (let off = 0, s = first; off < data.length; off += 512, s++) {
    const part = data.subarray(off, Math.min(off + 512, data.length));
    const c = encrypt ? nodeCrypto.createCipheriv(alg, key, iv(s)) : nodeCrypto.createDecipheriv(alg, key, iv(s));
    c.setAutoPadding(false);
    out.set(Buffer.concat([c.update(part), c.final()]), off);
  }
  return out;
}

describe('sector modes', () => {
  const sectors = [0, 1, 7, 0xffffffff, 2 ** 40 + 3];
  it.each([
    ['aes-128-xts', 'aes-128', 32],
    ['aes-256-xts', 'aes-256', 64],
  ])('%s plain64 equals node:crypto per sector', (nodeAlg, cipherAlg, keyLen) => {
    const key = rand(keyLen);
    const c = makeSectorCipher({ cipherAlg, mode: 'xts', ivgen: 'plain64' }, key, be);
    for (const first of sectors) {
      for (const len of [512, 4096, 65536 + 512]) {
        const data = rand(len);
        const buf = data.slice();
        c.encrypt(buf, first);
        expect(Buffer.from(buf).equals(Buffer.from(referenceSectors(nodeAlg, key, data, first, true, le64Iv)))).toBe(true);
        c.decrypt(buf, first);
        expect(Buffer.from(buf).equals(Buffer.from(data))).toBe(true);
      }
    }
  });

  it.each([
    ['aes-128-cbc', 'aes-128', 16],
    ['aes-192-cbc', 'aes-192', 24],
    ['aes-256-cbc', 'aes-256', 32],
  ])('%s plain64 equals node:crypto per sector (both directions)', (nodeAlg, cipherAlg, keyLen) => {
    const key = rand(keyLen);
    const c = makeSectorCipher({ cipherAlg, mode: 'cbc', ivgen: 'plain64' }, key, be);
    for (const first of sectors) {
      const data = rand(512 * 37);
      const buf = data.slice();
      c.encrypt(buf, first);
      const ref = referenceSectors(nodeAlg, key, data, first, true, le64Iv);
      expect(Buffer.from(buf).equals(Buffer.from(ref))).toBe(true);
      const back = ref.slice();
      c.decrypt(back, first);
      expect(Buffer.from(back).equals(Buffer.from(data))).toBe(true);
    }
  });

  it('plain truncates the sector number to 32 bits; essiv encrypts it under H(key)', () => {
    const key = rand(32);
    const plain = makeSectorCipher({ cipherAlg: 'aes-256', mode: 'cbc', ivgen: 'plain' }, key, be);
    const data = rand(1024);
    const a = data.slice();
    plain.encrypt(a, 2 ** 32 + 5);
    expect(Buffer.from(a).equals(Buffer.from(referenceSectors('aes-256-cbc', key, data, 5, true, le64Iv)))).toBe(true);

    const essivKey = nodeCrypto.createHash('sha256').update(key).digest();
    const essivIv = (s: number) => {
      const e = nodeCrypto.createCipheriv('aes-256-ecb', essivKey, null).setAutoPadding(false);
      return e.update(le64Iv(s));
    };
    const essiv = makeSectorCipher({ cipherAlg: 'aes-256', mode: 'cbc', ivgen: 'essiv', ivgenHash: 'sha256' }, key, be);
    const b = data.slice();
    essiv.encrypt(b, 99);
    expect(Buffer.from(b).equals(Buffer.from(referenceSectors('aes-256-cbc', key, data, 99, true, essivIv)))).toBe(true);
  });

  it('a final partial sector gives the bytes a whole sector would', () => {
    for (const spec of [
      { cipherAlg: 'aes-256', mode: 'xts', ivgen: 'plain64' },
      { cipherAlg: 'aes-192', mode: 'cbc', ivgen: 'essiv', ivgenHash: 'sha256' },
    ] as SectorCipherSpec[]) {
      const key = rand(spec.mode === 'xts' ? 64 : 24);
      const c = makeSectorCipher(spec, key, be);
      const data = rand(1024);
      const whole = data.slice();
      c.encrypt(whole, 3);
      const part = data.slice(0, 768);
      c.encrypt(part, 3);
      expect(Buffer.from(part).equals(Buffer.from(whole.subarray(0, 768)))).toBe(true);
      c.decrypt(part, 3);
      expect(Buffer.from(part).equals(Buffer.from(data.subarray(0, 768)))).toBe(true);
    }
  });

  it('unaligned buffers (odd byteOffset) work in place', () => {
    const key = rand(64);
    const c = makeSectorCipher({ cipherAlg: 'aes-256', mode: 'xts', ivgen: 'plain64' }, key, be);
    const backing = rand(2048 + 3);
    const view = backing.subarray(3);
    const copy = view.slice();
    c.encrypt(view, 10);
    c.encrypt(copy, 10);
    expect(Buffer.from(view).equals(Buffer.from(copy))).toBe(true);
  });

  it('refuses ciphers qcowkit cannot compute, and ESSIV hashes with no AES key size', () => {
    expect(() => makeSectorCipher({ cipherAlg: 'twofish-256', mode: 'xts', ivgen: 'plain64' }, rand(64), be)).toThrow(
      "Cipher algorithm 'twofish-256' is not supported by qcowkit",
    );
    expect(() => makeSectorCipher({ cipherAlg: 'aes-256', mode: 'ctr', ivgen: 'plain64' }, rand(32), be)).toThrow("Cipher mode 'ctr'");
    expect(() => makeSectorCipher({ cipherAlg: 'aes-128', mode: 'cbc', ivgen: 'essiv', ivgenHash: 'sha1' }, rand(16), be)).toThrow(
      'No AES cipher with key size 20 available',
    );
  });
});

describe('anti-forensic splitter', () => {
  it.each(['sha1', 'sha256', 'sha512', 'md5'] as HashAlg[])('split then merge gives the key back (%s)', (hash) => {
    for (const n of [16, 32, 64, 48]) {
      const key = rand(n);
      const split = afSplit(be, hash, key, 4000);
      expect(split.length).toBe(n * 4000);
      expect(Buffer.from(afMerge(be, hash, split, n, 4000)).equals(Buffer.from(key))).toBe(true);
      split[17] = split[17]! ^ 1;
      expect(Buffer.from(afMerge(be, hash, split, n, 4000)).equals(Buffer.from(key))).toBe(false);
    }
  });
});

describe('LUKS header', () => {
  let created: Awaited<ReturnType<typeof createLuksHeader>>;
  beforeAll(async () => {
    created = await createLuksHeader({ secret: enc('pw'), iterTime: 5, calibrationMs: 10 }, be);
  });

  it('has QEMU layout: 8 slots, 4000 stripes, key material at 4096 in 4096-aligned areas', () => {
    const h = created.header;
    expect(h.cipherName).toBe('aes');
    expect(h.cipherMode).toBe('xts-plain64');
    expect(h.hashSpec).toBe('sha256');
    expect(h.keyBytes).toBe(64);
    expect(h.slots.map((s) => s.keyMaterialOffset * 512)).toEqual([4096, 262144, 520192, 778240, 1036288, 1294336, 1552384, 1810432]);
    expect(h.payloadOffset * 512).toBe(2068480);
    expect(created.blob.length).toBe(2068480);
    expect(luksHeaderLength()).toBe(2068480);
    expect(luksHeaderLength({ cipherAlg: 'aes-128', cipherMode: 'cbc' })).toBe(528384);
    expect(h.slots.every((s) => s.stripes === 4000)).toBe(true);
    expect(h.slots[0]!.active).toBe(LUKS_SLOT_ENABLED);
    expect(h.slots.slice(1).every((s) => s.active === 0xdead && s.iterations === 0 && s.salt.every((x) => x === 0))).toBe(true);
    expect(h.slots[0]!.iterations).toBeGreaterThanOrEqual(1000);
    expect(h.mkDigestIterations).toBeGreaterThanOrEqual(1000);
    expect(h.uuid).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    // inactive areas stay zero
    expect(created.blob.subarray(262144, 2068480).every((x) => x === 0)).toBe(true);
  });

  it('encodes and decodes to the same fields', () => {
    const bytes = encodeLuksHeader(created.header);
    expect(bytes.length).toBe(592);
    expect(Buffer.from(bytes).equals(Buffer.from(created.blob.subarray(0, 592)))).toBe(true);
    expect(decodeLuksHeader(bytes)).toEqual(created.header);
  });

  it('unlocks with the password, refuses another', async () => {
    const read = async (off: number, len: number) => created.blob.slice(off, off + len);
    const h = decodeLuksHeader(created.blob);
    const mk = await unlockLuks(h, luksParams(h), read, enc('pw'), be);
    expect(Buffer.from(mk).equals(Buffer.from(created.masterKey))).toBe(true);
    await expect(unlockLuks(h, luksParams(h), read, enc('pW'), be)).rejects.toThrow('Invalid password, cannot unlock any keyslot');
  });

  /** Header fields poked, and what qemu-img 7.2 says (captured from qemu-img info). */
  const POKES: Array<[string, (h: LuksHeader) => void, string]> = [
    ['version', (h) => (h.version = 2), 'LUKS version 2 is not supported'],
    ['unknown cipher', (h) => (h.cipherName = 'blowfish'), "Algorithm 'blowfish' with key size 32 bytes not supported"],
    ['xts key of 16 bytes', (h) => (h.keyBytes = 16), "Algorithm 'aes' with key size 8 bytes not supported"],
    ['cbc with 64-byte key', (h) => (h.cipherMode = 'cbc-plain64'), "Algorithm 'aes' with key size 64 bytes not supported"],
    ['mode name', (h) => (h.cipherMode = 'xyz-plain64'), "Cipher mode 'xyz' not supported"],
    ['mode without ivgen', (h) => (h.cipherMode = 'xts'), "Unexpected cipher mode string format 'xts'"],
    ['ivgen', (h) => (h.cipherMode = 'xts-foo'), "IV generator 'foo' not supported"],
    ['essiv without hash', (h) => (h.cipherMode = 'xts-essiv'), 'Missing IV generator hash specification'],
    ['ivgen hash', (h) => (h.cipherMode = 'xts-essiv:foo'), "Hash algorithm 'foo' not supported"],
    ['hash', (h) => (h.hashSpec = 'sha3'), "Hash algorithm 'sha3' not supported"],
    ['payload in header', (h) => (h.payloadOffset = 1), 'LUKS payload is overlapping with the header'],
    ['slot state', (h) => (h.slots[0]!.active = 1), 'Keyslot 0 state (active/disable) is corrupted'],
    ['slot iterations', (h) => (h.slots[0]!.iterations = 0), 'Keyslot 0 iteration count is zero'],
    ['slot in header', (h) => (h.slots[0]!.keyMaterialOffset = 7), 'Keyslot 0 is overlapping with the LUKS header'],
    ['stripes', (h) => (h.slots[0]!.stripes = 4001), 'Keyslot 0 is corrupted (stripes 4001 != 4000)'],
    ['slots overlap', (h) => (h.slots[1]!.keyMaterialOffset = 8), 'Keyslots 0 and 1 are overlapping in the header'],
    ['slot in payload', (h) => (h.slots[0]!.keyMaterialOffset = 0xf00), 'Keyslot 0 is overlapping with the encrypted payload'],
    ['payload check first', (h) => ((h.payloadOffset = 1), (h.cipherName = 'blowfish')), 'LUKS payload is overlapping with the header'],
    ['stripes before state', (h) => ((h.slots[0]!.active = 1), (h.slots[0]!.stripes = 4001)), 'Keyslot 0 is corrupted (stripes 4001 != 4000)'],
    ['mode before cipher', (h) => ((h.cipherName = 'blowfish'), (h.cipherMode = 'xyz-plain64')), "Cipher mode 'xyz' not supported"],
    ['cipher before hash', (h) => ((h.cipherName = 'blowfish'), (h.hashSpec = 'foo')), "Algorithm 'blowfish' with key size 32 bytes not supported"],
  ];
  it.each(POKES)('check: %s', (_n, poke, message) => {
    const h = decodeLuksHeader(created.blob);
    poke(h);
    const check = () => {
      const d = decodeLuksHeader(encodeLuksHeader(h));
      validateLuksHeader(d);
      luksParams(d);
    };
    expect(check).toThrow(message);
  });

  it('bad magic', () => {
    const b = created.blob.slice(0, 592);
    b[0] = 0x58;
    expect(() => decodeLuksHeader(b)).toThrow('Volume is not in LUKS format');
  });
});

describe('PBKDF2 calibration', () => {
  /** A backend whose PBKDF2 "costs" 1 ms of CPU per `perMs` iterations (per output block). */
  function fakeClock(perMs: number): CryptoBackend {
    let now = 0;
    return {
      ...be,
      cpuTimeMs: () => now,
      pbkdf2Sync: (hash, pw, salt, iters, len) => {
        now += (iters / perMs) * Math.ceil(len / { sha256: 32, sha1: 20 }[hash as 'sha256' | 'sha1']);
        return new Uint8Array(len);
      },
      pbkdf2: async (_h, _p, _s, _i, len) => new Uint8Array(len),
    };
  }

  it('slot iterations = rate × iter-time; master-key digest 1/8 of that (per output block)', async () => {
    const fb = fakeClock(5000); // 5M iterations per second, one block
    const c = await createLuksHeader({ secret: enc('x'), iterTime: 200, calibrationMs: 50 }, fb);
    // sha256, 64-byte key = 2 blocks: 5e6/2 × 0.2 s
    expect(c.header.slots[0]!.iterations).toBe(500000);
    // 20-byte digest = 1 block: 5e6 × 0.2 / 8
    expect(c.header.mkDigestIterations).toBe(125000);
    const s = await createLuksHeader({ secret: enc('x'), iterTime: 100, hashAlg: 'sha1', cipherAlg: 'aes-128', cipherMode: 'cbc', calibrationMs: 50 }, fb);
    expect(s.header.slots[0]!.iterations).toBe(500000); // 16-byte key, 1 sha1 block
    expect(s.header.mkDigestIterations).toBe(62500);
  });

  it('never below 1000 iterations', async () => {
    const c = await createLuksHeader({ secret: enc('x'), iterTime: 0, calibrationMs: 5 }, fakeClock(100));
    expect(c.header.slots[0]!.iterations).toBe(1000);
    expect(c.header.mkDigestIterations).toBe(1000);
  });
});

describe('legacy AES', () => {
  it('is AES-128-CBC per sector with the guest sector number, key = password padded to 16', async () => {
    expect([...legacyAesKey(enc('abc'))]).toEqual([0x61, 0x62, 0x63, ...new Array(13).fill(0)]);
    expect(legacyAesKey(enc('0123456789abcdefXYZ')).length).toBe(16);
    const c = legacyAesCipher(enc('abc'), be);
    const data = rand(2048);
    const buf = data.slice();
    await c.encrypt(buf, 999 * 512 /* host: ignored */, 4096);
    expect(Buffer.from(buf).equals(Buffer.from(referenceSectors('aes-128-cbc', legacyAesKey(enc('abc')), data, 8, true, le64Iv)))).toBe(true);
    await c.decrypt(buf, 0, 4096);
    expect(Buffer.from(buf).equals(Buffer.from(data))).toBe(true);
  });
});

describe('encrypt.* creation options', () => {
  const secrets = new Map([['sec0', enc('pw')]]);
  const parse = (o: Record<string, string>) => parseEncryptCreateOptions((k) => o[k], secrets);
  it.each([
    [{ 'encrypt.format': 'luks' }, "Parameter 'encrypt.key-secret' is required for cipher"],
    [{ 'encrypt.format': 'luks', 'encrypt.key-secret': 'nosuch' }, "No secret with id 'nosuch'"],
    [{ 'encrypt.format': 'luks', 'encrypt.cipher-alg': 'foo' }, "Parameter 'cipher-alg' does not accept value 'foo'"],
    [{ 'encrypt.format': 'luks', 'encrypt.cipher-mode': 'foo', 'encrypt.key-secret': 'sec0' }, "Parameter 'cipher-mode' does not accept value 'foo'"],
    [{ 'encrypt.format': 'luks', 'encrypt.ivgen-alg': 'foo' }, "Parameter 'ivgen-alg' does not accept value 'foo'"],
    [{ 'encrypt.format': 'luks', 'encrypt.ivgen-hash-alg': 'foo' }, "Parameter 'ivgen-hash-alg' does not accept value 'foo'"],
    [{ 'encrypt.format': 'luks', 'encrypt.hash-alg': 'foo' }, "Parameter 'hash-alg' does not accept value 'foo'"],
    [{ 'encrypt.format': 'luks', 'encrypt.iter-time': 'foo' }, "Parameter 'encrypt.iter-time' expects a number"],
    [{ 'encrypt.format': 'aes' }, "Parameter 'encrypt.key-secret' is required for cipher"],
    [{ 'encrypt.format': 'aes', 'encrypt.hash-alg': 'foo', 'encrypt.cipher-alg': 'bar' }, "Parameter 'encrypt.cipher-alg' is unexpected"],
    [{ 'encrypt.format': 'aes', 'encrypt.iter-time': '10' }, "Parameter 'encrypt.iter-time' is unexpected"],
    [{ 'encrypt.format': 'xx' }, "Parameter 'format' does not accept value 'xx'"],
  ])('%o → %s', (o, message) => {
    expect(() => parse(o)).toThrow(message);
  });

  it('gives the LUKS options and the password', () => {
    const r = parse({
      'encrypt.format': 'luks',
      'encrypt.key-secret': 'sec0',
      'encrypt.cipher-alg': 'aes-128',
      'encrypt.cipher-mode': 'cbc',
      'encrypt.ivgen-alg': 'essiv',
      'encrypt.ivgen-hash-alg': 'sha256',
      'encrypt.hash-alg': 'sha1',
      'encrypt.iter-time': '10',
    });
    expect(r).toEqual({
      format: 'luks',
      luks: { secret: enc('pw'), cipherAlg: 'aes-128', cipherMode: 'cbc', ivgenAlg: 'essiv', ivgenHashAlg: 'sha256', hashAlg: 'sha1', iterTime: 10 },
    });
    expect(parseEncryptCreateOptions((k) => (k === 'encrypt.key-secret' ? 'sec0' : undefined), secrets, true)).toEqual({ format: 'aes', secret: enc('pw') });
    expect(parseEncryptCreateOptions(() => undefined, secrets)).toBeUndefined();
  });
});

describe('--object secret', () => {
  let dir: string;
  beforeAll(() => {
    dir = makeTmpDir('qk-secrets-');
  });
  afterAll(() => removeTmpDir(dir));

  it('data=, file=, format=base64, JSON, keyid+iv', () => {
    const f = path.join(dir, 'pw');
    fs.writeFileSync(f, 'from-file\n');
    const key = nodeCrypto.randomBytes(32);
    const iv = nodeCrypto.randomBytes(16);
    const c = nodeCrypto.createCipheriv('aes-256-cbc', key, iv);
    const ct = Buffer.concat([c.update('hidden'), c.final()]).toString('base64');
    const { secrets, others } = parseObjectArgs([
      'secret,id=a,data=x,,y',
      `secret,id=b,file=${f}`,
      'secret,id=c,data=YWJj,format=base64',
      '{"qom-type":"secret","id":"d","data":"json"}',
      `secret,id=master,data=${key.toString('base64')},format=base64`,
      `secret,id=e,data=${ct},format=base64,keyid=master,iv=${iv.toString('base64')}`,
      'tls-creds-x509,id=tls0,dir=/x,endpoint=server',
    ]);
    const text = (id: string) => new TextDecoder().decode(secrets.get(id));
    expect(text('a')).toBe('x,y');
    expect(text('b')).toBe('from-file\n');
    expect(text('c')).toBe('abc');
    expect(text('d')).toBe('json');
    expect(text('e')).toBe('hidden');
    expect(others.map((o) => [o.type, o.id])).toEqual([['tls-creds-x509', 'tls0']]);
  });

  it.each([
    ['secret,id=s,data=a,format=foo', "Parameter 'format' does not accept value 'foo'"],
    ['secret,id=s,data=a,file=/x', "'file' and 'data' are mutually exclusive"],
    ['secret,id=s', "Either 'file' or 'data' must be provided"],
    ['secret,data=a', "Parameter 'id' is missing"],
    ['secret,id=s,data=a,foo=bar', "Parameter 'foo' is unexpected"],
    ['secret,id=0s,data=a', "Parameter 'id' expects an identifier"],
    ['secret,id=s,data=%%%,format=base64', 'Base64 data contains invalid characters'],
    ['secret,id=s,file=/nonexistent/pw', 'Unable to read /nonexistent/pw: Failed to open file \u201c/nonexistent/pw\u201d: No such file or directory'],
    ['secret,id=s,data=YWJj,format=base64,keyid=nomaster,iv=AAAAAAAAAAAAAAAAAAAAAA==', "No secret with id 'nomaster'"],
    ['{"qom-type":"secret","id":"s","data":topsecret}', 'Invalid JSON object given to --object'],
  ])('%s → %s', (arg, message) => {
    let err: Error | undefined;
    try {
      parseObjectArgs([arg]);
    } catch (e) {
      err = e as Error;
    }
    expect(err?.message).toContain(message);
    expect(err?.message).not.toContain('topsecret');
  });

  it('duplicate ids are refused', () => {
    expect(() => parseObjectArgs(['secret,id=s,data=a', 'secret,id=s,data=b'])).toThrow("attempt to add duplicate property 's' to object (type 'container')");
  });
});
