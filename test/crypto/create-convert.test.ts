/**
 * `qcowkit create -f qcow2 -o encrypt.*` and `convert -O qcow2 -o encrypt.*` (needs a build),
 * against qemu-img 7.2:
 * - the file layout equals qemu-img's for the same options (every byte outside the LUKS header
 *   clusters, which hold random salts and keys), for several cluster sizes and preallocations;
 * - qemu-img reads what we write (LUKS with default and other ciphers, legacy AES) with the right
 *   content, `qemu-img check` is clean, `info` equals qemu-img's on the same file;
 * - no 512-byte sector of the file holds the plaintext we wrote; no secret is printed;
 * - missing/unknown secret, unsupported cipher, -c with encryption: qemu-img's words (or a clear
 *   one where qemu-img supports more), exit 1, no file left.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { must, qemuImg, qk, type RunResult } from '../helpers/proc.js';
import { PASSWORD, imageOpts, qemuRaw } from './helpers.js';

let dir: string;
const outputs: RunResult[] = [];
const SEC = ['--object', `secret,id=sec0,data=${PASSWORD}`];
const FAST = 'encrypt.iter-time=10';

async function ours(args: string[]): Promise<RunResult> {
  const r = await qk(args);
  outputs.push(r);
  return r;
}

/** qemu-img, retried when its PBKDF2 calibration gives up on a busy machine. */
async function qemuRetry(args: string[]): Promise<RunResult> {
  for (let attempt = 1; ; attempt++) {
    const r = await qemuImg(args);
    if (r.code !== 0 && attempt < 5 && r.stderr.includes('Unable to get accurate CPU usage')) continue;
    return r;
  }
}

/** The FDE extension's {offset, length} and the cluster size of a LUKS qcow2 file. */
function fde(file: Buffer): { offset: number; end: number } {
  const cs = 2 ** file.readUInt32BE(20);
  let p = file.readUInt32BE(4) === 3 ? file.readUInt32BE(100) : 72;
  for (;;) {
    const type = file.readUInt32BE(p);
    const len = file.readUInt32BE(p + 4);
    if (type === 0) throw new Error('no FDE extension');
    if (type === 0x0537be77) {
      const offset = Number(file.readBigUInt64BE(p + 8));
      const length = Number(file.readBigUInt64BE(p + 16));
      return { offset, end: offset + Math.ceil(length / cs) * cs };
    }
    p += 8 + Math.ceil(len / 8) * 8;
  }
}

/** Sectors of `file` that contain `needle` (a whole 512-byte sector of plaintext, or any 64 bytes of it). */
function sectorsContaining(file: Buffer, plain: Buffer): number[] {
  const found: number[] = [];
  const probes = new Set<string>();
  for (let off = 0; off + 64 <= plain.length; off += 512) probes.add(plain.subarray(off, off + 64).toString('hex'));
  for (let s = 0; s * 512 < file.length; s++) {
    const sec = file.subarray(s * 512, s * 512 + 512);
    for (let o = 0; o + 64 <= sec.length; o += 64) {
      if (probes.has(sec.subarray(o, o + 64).toString('hex'))) {
        found.push(s);
        break;
      }
    }
  }
  return found;
}

/** Plaintext that is easy to recognise and not all alike. */
function plaintext(len: number): Buffer {
  const b = Buffer.alloc(len);
  for (let off = 0; off < len; off += 64) b.write(`QCOWKIT-PLAINTEXT-${String(off).padStart(12, '0')}-`.padEnd(64, '#'), off, 'latin1');
  return b;
}

beforeAll(() => {
  dir = makeTmpDir('qk-crypto-create-');
});
afterAll(() => removeTmpDir(dir));

describe('create -o encrypt.format=luks: same layout as qemu-img', () => {
  it.each([
    ['64k, default cipher', 'cluster_size=64k', '16M'],
    ['512-byte clusters (many refcount blocks around the LUKS header)', 'cluster_size=512', '64M'],
    ['4k clusters, preallocation=metadata', 'cluster_size=4k,preallocation=metadata', '3M'],
    ['2M clusters, preallocation=full', 'cluster_size=2M,preallocation=full', '5M'],
    ['compat=0.10, aes-128-cbc-essiv', 'compat=0.10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv', '8M'],
  ])('%s', async (name, opts, size) => {
    const o = ['-o', `encrypt.format=luks,encrypt.key-secret=sec0,${FAST},${opts}`];
    const mine = path.join(dir, `layout-ours-${name.length}.qcow2`);
    const theirs = path.join(dir, `layout-qemu-${name.length}.qcow2`);
    const r = await ours(['create', '-f', 'qcow2', ...SEC, ...o, mine, size]);
    const q = await qemuRetry(['create', '-f', 'qcow2', ...SEC, ...o, theirs, size]);
    expect(q.code).toBe(0);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout.replace(mine, 'X')).toBe(q.stdout.replace(theirs, 'X'));
    const a = fs.readFileSync(mine);
    const b = fs.readFileSync(theirs);
    expect(a.length).toBe(b.length);
    const f = fde(b);
    expect(fde(a)).toEqual(f);
    expect(a.subarray(0, f.offset).equals(b.subarray(0, f.offset))).toBe(true);
    expect(a.subarray(f.end).equals(b.subarray(f.end))).toBe(true);
    const c = await must(qemuImg(['check', ...SEC, '--image-opts', imageOpts(mine)]));
    expect(c.stdout).toContain('No errors were found on the image.');
    // info on our file is what qemu-img says about it (text and JSON).
    for (const fmt of ['human', 'json']) {
      const qi = await must(qemuImg(['info', `--output=${fmt}`, mine]));
      const oi = await ours(['info', `--output=${fmt}`, mine]);
      expect(oi.code).toBe(0);
      expect(oi.stdout).toBe(qi.stdout);
    }
  });
});

describe('convert -O qcow2 -o encrypt.*: qemu-img reads what we write', () => {
  let src: string;
  let plain: Buffer;
  beforeAll(() => {
    src = path.join(dir, 'src.raw');
    plain = plaintext(3 << 20);
    const img = Buffer.alloc(8 << 20);
    plain.copy(img, 0);
    plain.subarray(0, 700_000).copy(img, 5 * 1048576 + 1234); // an unaligned run too
    fs.writeFileSync(src, img);
  });

  it.each([
    ['luks, defaults (aes-256-xts-plain64, sha256)', ''],
    ['luks aes-128-cbc-plain64 sha1', 'encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,encrypt.hash-alg=sha1'],
    ['luks aes-256-cbc-essiv:sha256', 'encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256'],
    ['luks aes-192-xts-plain sha512', 'encrypt.cipher-alg=aes-192,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512'],
    ['legacy aes', 'aes'],
  ])('%s', async (_n, extra) => {
    const out = path.join(dir, `conv-${_n.length}.qcow2`);
    const opts =
      extra === 'aes'
        ? 'encrypt.format=aes,encrypt.key-secret=sec0'
        : `encrypt.format=luks,encrypt.key-secret=sec0,${FAST}${extra ? `,${extra}` : ''}`;
    const r = await ours(['convert', ...SEC, '-O', 'qcow2', '-o', opts, src, out]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const cmp = await qemuImg(['compare', ...SEC, '--image-opts', imageOpts(out), `driver=raw,file.filename=${src}`]);
    expect(cmp.stdout).toBe('Images are identical.\n');
    expect(cmp.code).toBe(0);
    const c = await qemuImg(['check', ...SEC, '--image-opts', imageOpts(out)]);
    expect(c.stdout).toContain('No errors were found on the image.');
    expect(c.code).toBe(0);
    const info = JSON.parse((await must(qemuImg(['info', '--output=json', out]))).stdout);
    expect(info.encrypted).toBe(true);
    if (extra !== 'aes') expect(info['format-specific'].data.encrypt.format).toBe('luks');
    // No sector of the file holds any 64-byte piece of the plaintext.
    expect(sectorsContaining(fs.readFileSync(out), plain)).toEqual([]);
    // The plaintext probe does find it in the source (the probe is not blind).
    expect(sectorsContaining(fs.readFileSync(src), plain).length).toBeGreaterThan(1000);
  });

  it('convert from a LUKS image we made to raw gives the source back; -n --target-image-opts writes into one', async () => {
    const made = path.join(dir, 'made.qcow2');
    expect((await ours(['create', '-q', '-f', 'qcow2', ...SEC, '-o', `encrypt.format=luks,encrypt.key-secret=sec0,${FAST}`, made, '8M'])).code).toBe(0);
    const r = await ours(['convert', '-n', ...SEC, '--target-image-opts', src, imageOpts(made)]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect((await qemuRaw(made, dir)).equals(fs.readFileSync(src))).toBe(true);
    const back = path.join(dir, 'back.raw');
    expect((await ours(['convert', ...SEC, '--image-opts', imageOpts(made), '-O', 'raw', back])).code).toBe(0);
    expect(fs.readFileSync(back).equals(fs.readFileSync(src))).toBe(true);
    // Without the key the target does not open, as in qemu-img.
    const q = await qemuImg(['convert', '-n', '--target-image-opts', src, `driver=qcow2,file.filename=${made}`]);
    const u = await ours(['convert', '-n', '--target-image-opts', src, `driver=qcow2,file.filename=${made}`]);
    expect(u.code).toBe(1);
    expect(u.stderr.replace(/^\S+: /, '')).toBe(q.stderr.replace(/^\S+: /, ''));
  });
});

describe('measure -O qcow2 -o encrypt.format=luks', () => {
  it.each([
    ['default cipher, --size', ['--size', '1G'], ''],
    ['aes-128-xts, 4k clusters', ['--size', '1G'], ',encrypt.cipher-alg=aes-128,cluster_size=4k'],
    ['preallocation=full, json', ['--output=json', '--size', '100M'], ',preallocation=full'],
    ['legacy aes (no header)', ['--size', '1G'], 'aes'],
    ['unknown secret', ['--size', '1G'], ',encrypt.key-secret=nosuch'],
  ])('%s: same as qemu-img', async (_n, args, extra) => {
    const o = extra === 'aes' ? 'encrypt.format=aes,encrypt.key-secret=sec0' : `encrypt.format=luks,encrypt.key-secret=sec0${extra}`;
    const q = await qemuRetry(['measure', ...SEC, '-O', 'qcow2', '-o', o, ...args]);
    const u = await ours(['measure', ...SEC, '-O', 'qcow2', '-o', o, ...args]);
    expect(u.stdout).toBe(q.stdout);
    expect(u.code).toBe(q.code);
    expect(u.stderr.replace(/^qcowkit: /, '')).toBe(q.stderr.replace(/^qemu-img: /, ''));
  });
});

describe('refusals: qemu-img words, exit 1, nothing left behind', () => {
  it.each([
    ['no key-secret', `encrypt.format=luks,${FAST}`],
    ['unknown secret id', `encrypt.format=luks,encrypt.key-secret=nosuch,${FAST}`],
    ['bad cipher name', `encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-512,${FAST}`],
    ['essiv hash with no matching AES key size', `encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha1,${FAST}`],
    ['luks-only option with aes', 'encrypt.format=aes,encrypt.key-secret=sec0,encrypt.iter-time=10'],
    ['no key-secret (legacy aes)', 'encryption=on'],
  ])('%s', async (name, opts) => {
    const sub = path.join(dir, `ref-${name.replace(/\W+/g, '-')}`);
    fs.mkdirSync(sub);
    const q = await qemuRetry(['create', '-f', 'qcow2', ...SEC, '-o', opts, path.join(sub, 'q.qcow2'), '1M']);
    const u = await ours(['create', '-f', 'qcow2', ...SEC, '-o', opts, path.join(sub, 'u.qcow2'), '1M']);
    expect(q.code).toBe(1);
    expect(u.code).toBe(1);
    expect(u.stderr.split('\n').length).toBe(2); // one line
    expect(u.stderr.replace(/^\S+: \S+: /, '')).toBe(q.stderr.replace(/^\S+: \S+: /, ''));
    expect(u.stdout.replace('u.qcow2', 'X')).toBe(q.stdout.replace('q.qcow2', 'X'));
    expect(fs.readdirSync(sub)).toEqual([]);
  });

  it('ciphers qcowkit does not compute (twofish, serpent, cast5, ctr mode) are refused clearly', async () => {
    for (const extra of ['encrypt.cipher-alg=twofish-128', 'encrypt.cipher-alg=serpent-256', 'encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc', 'encrypt.cipher-mode=ctr']) {
      const out = path.join(dir, 'unsup.qcow2');
      const u = await ours(['create', '-f', 'qcow2', ...SEC, '-o', `encrypt.format=luks,encrypt.key-secret=sec0,${FAST},${extra}`, out, '1M']);
      expect(u.code).toBe(1);
      expect(u.stderr).toMatch(/^qcowkit: \S+: Cipher (algorithm|mode) '[\w-]+' is not supported by qcowkit \(supported: [^)]+\)\n$/);
      expect(fs.existsSync(out)).toBe(false);
    }
  });

  it('aes-192 in cbc mode (key material not whole sectors: qemu-img 7.2 aborts on it) is refused clearly', async () => {
    const out = path.join(dir, 'a192.qcow2');
    const u = await ours(['create', '-f', 'qcow2', ...SEC, '-o', `encrypt.format=luks,encrypt.key-secret=sec0,${FAST},encrypt.cipher-alg=aes-192,encrypt.cipher-mode=cbc`, out, '1M']);
    expect(u.code).toBe(1);
    expect(u.stderr).toMatch(/^qcowkit: \S+: Cipher aes-192-cbc is not supported for LUKS images: its key material \(96000 bytes\) is not a whole number of 512-byte sectors[^\n]*\n$/);
    expect(fs.existsSync(out)).toBe(false);
  });

  it('convert -c to an encrypted target: refused before anything is created', async () => {
    const src = path.join(dir, 'c-src.raw');
    fs.writeFileSync(src, Buffer.alloc(1 << 20, 1));
    const out = path.join(dir, 'c.qcow2');
    const q = await qemuImg(['convert', '-c', ...SEC, '-O', 'qcow2', '-o', `encrypt.format=luks,encrypt.key-secret=sec0,${FAST}`, src, out]);
    const u = await ours(['convert', '-c', ...SEC, '-O', 'qcow2', '-o', `encrypt.format=luks,encrypt.key-secret=sec0,${FAST}`, src, out]);
    expect(u.code).toBe(1);
    expect(u.stderr.replace(/^\S+: /, '')).toBe(q.stderr.replace(/^\S+: /, ''));
    expect(fs.existsSync(out)).toBe(false);
  });
});

afterAll(() => {
  // No run printed the password, not even in a "Formatting ..." line or an error.
  expect(outputs.length).toBeGreaterThan(0);
  for (const r of outputs) {
    expect(r.stdout.includes(PASSWORD)).toBe(false);
    expect(r.stderr.includes(PASSWORD)).toBe(false);
  }
});
