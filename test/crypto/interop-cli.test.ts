/**
 * Encrypted images qemu-img makes, through bin/qcowkit (needs a build):
 * - LUKS qcow2 with the default and other ciphers, legacy AES qcow2 and legacy AES qcow v1 (with a
 *   backing file too) read with the right content (`convert -O raw`, `compare`);
 * - qcow v1 AES written by us (`convert -n`, unaligned writes through the library) read right by
 *   qemu-img;
 * - wrong password, missing secret, unknown secret id, ciphers qcowkit does not compute: one clear
 *   line, exit 1, the image byte-for-byte untouched; no secret in any output.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTmpDir, removeTmpDir, sha256File } from '../helpers/files.js';
import { must, mustIo, qemuImg, qk, type RunResult } from '../helpers/proc.js';
import { openImage } from '../../src/block/open.js';
import { fileProvider } from '../../src/io/file.js';
import { PASSWORD, enc, imageOpts, qemuCreateEncrypted, qemuIoEncrypted, qemuRaw, registerAll } from './helpers.js';

let dir: string;
const outputs: RunResult[] = [];
const SEC = ['--object', `secret,id=sec0,data=${PASSWORD}`];
const BAD = ['--object', 'secret,id=sec0,data=not-the-password'];

async function ours(args: string[]): Promise<RunResult> {
  const r = await qk(args);
  outputs.push(r);
  return r;
}

const qcowOpts = (file: string) => `driver=qcow,file.filename=${file},encrypt.key-secret=sec0`;

beforeAll(() => {
  registerAll();
  dir = makeTmpDir('qk-crypto-interop-');
});
afterAll(() => removeTmpDir(dir));

describe('qemu-made images read through the CLI', () => {
  it.each([
    ['luks default (aes-256-xts-plain64)', 'encrypt.format=luks'],
    ['luks aes-128-cbc-plain64', 'encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64'],
    ['luks aes-128-cbc-essiv:sha256, 4k clusters', 'encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,cluster_size=4k'],
    ['luks aes-256-xts-plain64, hash sha1, compat=0.10', 'encrypt.format=luks,encrypt.hash-alg=sha1,compat=0.10'],
    ['legacy aes qcow2', 'encrypt.format=aes'],
  ])('%s', async (name, opts) => {
    const file = path.join(dir, `r-${name.replace(/\W+/g, '-')}.qcow2`);
    await qemuCreateEncrypted(file, '6M', opts);
    await qemuIoEncrypted(file, ['write -P 0x5a 0 70k', 'write -P 0xa5 1536k 3000', 'write -z 2M 64k', 'write -P 0x33 4095k 2k']);
    const out = path.join(dir, `${path.basename(file)}.raw`);
    const r = await ours(['convert', ...SEC, '--image-opts', imageOpts(file), '-O', 'raw', out]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const want = await qemuRaw(file, dir);
    expect(fs.readFileSync(out).equals(want)).toBe(true);
    expect(want.includes(Buffer.alloc(512, 0x5a))).toBe(true); // the content is really there
    const c = await ours(['compare', ...SEC, '--image-opts', imageOpts(file), `driver=raw,file.filename=${out}`]);
    expect(c.stdout).toBe('Images are identical.\n');
    expect(c.code).toBe(0);
  });

  it('qcow v1 with legacy AES (and an encrypted qcow v1 over a plain backing file)', async () => {
    const base = path.join(dir, 'base.raw');
    fs.writeFileSync(base, Buffer.alloc(2 << 20, 0x77));
    const top = path.join(dir, 'top.qcow');
    const solo = path.join(dir, 'solo.qcow');
    await must(qemuImg(['create', '-q', '-f', 'qcow', ...SEC, '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', solo, '3M']));
    await must(qemuImg(['create', '-q', '-f', 'qcow', ...SEC, '-b', base, '-F', 'raw', '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', top]));
    for (const f of [solo, top]) {
      await mustIo([...SEC, '--image-opts', qcowOpts(f), '-c', 'write -P 0x42 1000 70000', '-c', 'write -P 0x43 1M 4k']);
      const want = path.join(dir, `${path.basename(f)}.q.raw`);
      const got = path.join(dir, `${path.basename(f)}.u.raw`);
      await must(qemuImg(['convert', ...SEC, '--image-opts', qcowOpts(f), '-O', 'raw', want]));
      const r = await ours(['convert', ...SEC, '--image-opts', qcowOpts(f), '-O', 'raw', got]);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      expect(fs.readFileSync(got).equals(fs.readFileSync(want))).toBe(true);
      const qi = await must(qemuImg(['info', '--output=json', f]));
      const ui = await ours(['info', '--output=json', f]);
      expect(ui.stdout).toBe(qi.stdout);
    }
    // The backing file shows through where the encrypted top has nothing.
    expect(fs.readFileSync(path.join(dir, 'top.qcow.u.raw')).subarray(1536 * 1024, 1537 * 1024).every((b) => b === 0x77)).toBe(true);
  });
});

describe('qcow v1 with legacy AES written by us, read by qemu-img', () => {
  it('convert -n into it, then unaligned writes through the library', async () => {
    const f = path.join(dir, 'w.qcow');
    await must(qemuImg(['create', '-q', '-f', 'qcow', ...SEC, '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', f, '4M']));
    const src = path.join(dir, 'w-src.raw');
    const data = Buffer.alloc(4 << 20);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
    data.fill(0, 1 << 20, 2 << 20);
    fs.writeFileSync(src, data);
    const r = await ours(['convert', '-n', ...SEC, '--target-image-opts', src, qcowOpts(f)]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const d = await openImage(f, { io: fileProvider, readOnly: false, secrets: new Map([['sec0', enc(PASSWORD)]]), keySecret: 'sec0' });
    const patch = Buffer.alloc(5000, 0xee);
    await d.write(777, patch); // unaligned both ends, across a cluster boundary
    await d.write((1 << 20) + 100, patch.subarray(0, 10)); // inside a cluster of zeros
    await d.close();
    patch.copy(data, 777);
    patch.copy(data, (1 << 20) + 100, 0, 10);
    const want = path.join(dir, 'w-q.raw');
    await must(qemuImg(['convert', ...SEC, '--image-opts', qcowOpts(f), '-O', 'raw', want]));
    expect(fs.readFileSync(want).equals(data)).toBe(true);
    // And the file holds no plaintext sector of the random-looking data.
    const file = fs.readFileSync(f);
    expect(file.includes(data.subarray(3 << 20, (3 << 20) + 512))).toBe(false);
    expect(data.includes(data.subarray(3 << 20, (3 << 20) + 512))).toBe(true);
  });
});

describe('refusals leave the image untouched', () => {
  let luks: string;
  let aesQcow: string;
  let twofish: string | undefined;
  beforeAll(async () => {
    luks = path.join(dir, 'keep.qcow2');
    await qemuCreateEncrypted(luks, '4M', 'encrypt.format=luks');
    await qemuIoEncrypted(luks, ['write -P 0x61 0 64k']);
    aesQcow = path.join(dir, 'keep.qcow');
    await must(qemuImg(['create', '-q', '-f', 'qcow', ...SEC, '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', aesQcow, '1M']));
    // qemu-img 7.2 (with its crypto library) makes twofish/serpent LUKS images; qcowkit reads AES only.
    const t = path.join(dir, 'twofish.qcow2');
    try {
      await qemuCreateEncrypted(t, '1M', 'encrypt.format=luks,encrypt.cipher-alg=twofish-256');
      await qemuIoEncrypted(t, ['write -P 0x62 0 4k']);
      twofish = t;
    } catch {
      twofish = undefined; // this qemu build lacks twofish: nothing to refuse
    }
  });

  const cases: Array<[string, () => string[], RegExp]> = [
    ['wrong password: convert', () => ['convert', ...BAD, '--image-opts', imageOpts(luks), '-O', 'raw', path.join(dir, 'x.raw')], /: Invalid password, cannot unlock any keyslot$/],
    ['wrong password: amend', () => ['amend', ...BAD, '--image-opts', '-o', 'encrypt.state=active,encrypt.new-secret=sec0', imageOpts(luks)], /: Invalid password, cannot unlock any keyslot$/],
    ['wrong password: map', () => ['map', ...BAD, '--image-opts', imageOpts(luks)], /: Invalid password, cannot unlock any keyslot$/],
    ['missing secret: convert', () => ['convert', '--image-opts', imageOpts(luks), '-O', 'raw', path.join(dir, 'x.raw')], /: No secret with id 'sec0'$/],
    ['no key-secret: map', () => ['map', '--output=json', luks], /: Parameter 'encrypt.key-secret' is required for cipher$/],
    ['no key-secret: resize', () => ['resize', luks, '8M'], /: Parameter 'encrypt.key-secret' is required for cipher$/],
    ['qcow v1, no key-secret: convert', () => ['convert', '-O', 'raw', aesQcow, path.join(dir, 'x.raw')], /: Parameter 'encrypt.key-secret' is required for cipher$/],
    ['qcow v1, unknown secret', () => ['convert', '--image-opts', qcowOpts(aesQcow), '-O', 'raw', path.join(dir, 'x.raw')], /: No secret with id 'sec0'$/],
  ];
  it.each(cases)('%s', async (_n, args, msg) => {
    const target = _n.startsWith('qcow v1') ? aesQcow : luks;
    const before = await sha256File(target);
    const r = await ours(args());
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/^qcowkit: [^\n]+\n$/); // one line, no stack
    expect(r.stderr.trimEnd()).toMatch(msg);
    expect(await sha256File(target)).toBe(before);
    expect(fs.existsSync(path.join(dir, 'x.raw'))).toBe(false);
  });

  it('a LUKS cipher qcowkit does not compute (twofish): named in a clear error, exit 1, untouched', async (ctx) => {
    if (!twofish) ctx.skip();
    const f = twofish!;
    const before = await sha256File(f);
    for (const args of [
      ['convert', ...SEC, '--image-opts', imageOpts(f), '-O', 'raw', path.join(dir, 'x.raw')],
      ['amend', ...SEC, '--image-opts', '-o', 'encrypt.state=active,encrypt.new-secret=sec0,encrypt.iter-time=10', imageOpts(f)],
    ]) {
      const r = await ours(args);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/^qcowkit: [^\n]*Cipher algorithm 'twofish-256' is not supported by qcowkit[^\n]*\n$/);
    }
    // info still shows the image like qemu-img does.
    const qi = await must(qemuImg(['info', '--output=json', f]));
    expect((await ours(['info', '--output=json', f])).stdout).toBe(qi.stdout);
    expect(await sha256File(f)).toBe(before);
  });
});

afterAll(() => {
  expect(outputs.length).toBeGreaterThan(0);
  for (const r of outputs) {
    expect(r.stdout.includes(PASSWORD)).toBe(false);
    expect(r.stderr.includes(PASSWORD)).toBe(false);
    expect(r.stderr.includes('not-the-password')).toBe(false);
  }
});

describe('create -f qcow / convert -O qcow with legacy AES: what qemu-img makes', () => {
  it.each([
    ['encrypt.format=aes', ['-o', 'encrypt.format=aes,encrypt.key-secret=sec0'], '3M'],
    ['encryption=on (deprecated alias)', ['-o', 'encryption=on,encrypt.key-secret=sec0'], '1M'],
    ['over a backing file', ['-b', 'base.raw', '-F', 'raw', '-o', 'encrypt.format=aes,encrypt.key-secret=sec0'], undefined],
  ])('create %s: byte-identical file, same Formatting line', async (name, args, size) => {
    const sub = path.join(dir, `cq-${name.replace(/\W+/g, '-')}`);
    fs.mkdirSync(sub);
    fs.writeFileSync(path.join(sub, 'base.raw'), Buffer.alloc(2 << 20, 9));
    const tail = size ? [size] : [];
    const q = await must(qemuImg(['create', '-f', 'qcow', ...SEC, ...args, 'q.qcow', ...tail], { cwd: sub }));
    const u = await qk(['create', '-f', 'qcow', ...SEC, ...args, 'u.qcow', ...tail], { cwd: sub });
    outputs.push(u);
    expect(u.stderr).toBe('');
    expect(u.code).toBe(0);
    expect(u.stdout.replace("'u.qcow'", 'X')).toBe(q.stdout.replace("'q.qcow'", 'X'));
    expect(fs.readFileSync(path.join(sub, 'u.qcow')).equals(fs.readFileSync(path.join(sub, 'q.qcow')))).toBe(true);
    expect(fs.readFileSync(path.join(sub, 'u.qcow')).readUInt32BE(36)).toBe(1); // crypt_method AES
  });

  it.each([
    ['no key-secret', ['-o', 'encryption=on']],
    ['unknown secret', ['-o', 'encrypt.format=aes,encrypt.key-secret=nosuch']],
    ['luks is qcow2-only', ['-o', 'encrypt.format=luks,encrypt.key-secret=sec0']],
    ['both spellings', ['-o', 'encrypt.format=aes,encryption=on']],
  ])('create refusal (%s): same message, exit 1, same file left as qemu-img leaves', async (name, args) => {
    const sub = path.join(dir, `cqr-${name.replace(/\W+/g, '-')}`);
    fs.mkdirSync(sub);
    const q = await qemuImg(['create', '-f', 'qcow', ...SEC, ...args, 'x.qcow', '1M'], { cwd: sub });
    const qLeft = fs.existsSync(path.join(sub, 'x.qcow')) ? fs.readFileSync(path.join(sub, 'x.qcow')).length : -1;
    fs.rmSync(path.join(sub, 'x.qcow'), { force: true });
    const u = await qk(['create', '-f', 'qcow', ...SEC, ...args, 'x.qcow', '1M'], { cwd: sub });
    outputs.push(u);
    const uLeft = fs.existsSync(path.join(sub, 'x.qcow')) ? fs.readFileSync(path.join(sub, 'x.qcow')).length : -1;
    expect(q.code).toBe(1);
    expect(u.code).toBe(1);
    expect(u.stderr.replace(/^qcowkit: /, '')).toBe(q.stderr.replace(/^qemu-img: /, ''));
    expect(uLeft).toBe(qLeft);
  });

  it('convert -O qcow -o encrypt.format=aes: qemu-img reads the content; -c with it is refused', async () => {
    const src = path.join(dir, 'cq-src.raw');
    const data = Buffer.alloc(3 << 20);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2246822519) >>> 0, i);
    fs.writeFileSync(src, data);
    const out = path.join(dir, 'cq-out.qcow');
    const r = await ours(['convert', ...SEC, '-O', 'qcow', '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', src, out]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const cmp = await qemuImg(['compare', ...SEC, '--image-opts', qcowOpts(out), `driver=raw,file.filename=${src}`]);
    expect(cmp.stdout).toBe('Images are identical.\n');
    expect(fs.readFileSync(out).includes(data.subarray(1 << 20, (1 << 20) + 512))).toBe(false);
    const c = await ours(['convert', '-c', ...SEC, '-O', 'qcow', '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', src, `${out}.c`]);
    expect(c.code).toBe(1);
    expect(c.stderr).toBe('qcowkit: Compression and encryption not supported at the same time\n');
    expect(fs.existsSync(`${out}.c`)).toBe(false);
  });
});
