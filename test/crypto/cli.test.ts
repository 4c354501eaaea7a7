/**
 * Encrypted images through bin/qcowkit (needs a build): content equals qemu-img's, a wrong password
 * fails with QEMU's message and exit 1 leaving the image untouched, info matches, and the password
 * never shows up in any output; an image `create -o encrypt.format=luks` makes is read by qemu-img.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { must, qemuImg, qk, type RunResult } from '../helpers/proc.js';
import { PASSWORD, imageOpts, qemuCreateEncrypted, qemuIoEncrypted, qemuRaw, registerAll } from './helpers.js';

let dir: string;
let luks: string;
let aes: string;
const outputs: RunResult[] = [];
const SEC = ['--object', `secret,id=sec0,data=${PASSWORD}`];

async function ours(args: string[]): Promise<RunResult> {
  const r = await qk(args);
  outputs.push(r);
  return r;
}

beforeAll(async () => {
  registerAll();
  dir = makeTmpDir('qk-crypto-cli-');
  luks = path.join(dir, 'luks.qcow2');
  aes = path.join(dir, 'aes.qcow2');
  await qemuCreateEncrypted(luks, '8M', 'encrypt.format=luks');
  await qemuIoEncrypted(luks, ['write -P 0x61 0 100k', 'write -P 0x62 5m 4097']);
  await qemuCreateEncrypted(aes, '8M', 'encrypt.format=aes');
  await qemuIoEncrypted(aes, ['write -P 0x63 512 70k']);
});
afterAll(() => removeTmpDir(dir));

describe('qcowkit on encrypted images', () => {
  it.each([
    ['luks', () => luks],
    ['aes', () => aes],
  ])('%s: convert -O raw gives what qemu-img gives', async (_n, file) => {
    const out = path.join(dir, `${_n}.raw`);
    const r = await ours(['convert', ...SEC, '--image-opts', imageOpts(file()), '-O', 'raw', out]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(fs.readFileSync(out).equals(await qemuRaw(file(), dir))).toBe(true);
  });

  const BAD = ['--object', 'secret,id=sec0,data=not-the-password'];
  it.each([
    ['convert', () => ['convert', ...BAD, '--image-opts', imageOpts(luks), '-O', 'raw', path.join(dir, 'bad.raw')]],
    ['check', () => ['check', ...BAD, '--image-opts', imageOpts(luks)]],
  ])('a wrong password (%s): QEMU message, exit 1, image untouched', async (_n, args) => {
    const before = fs.readFileSync(luks);
    const q = await qemuImg(['convert', ...BAD, '--image-opts', imageOpts(luks), '-O', 'raw', path.join(dir, 'q.raw')]);
    const r = await ours(args());
    expect(r.stderr).toMatch(/: Invalid password, cannot unlock any keyslot\n$/);
    expect(r.stderr.replace(/^\S+: /, '')).toBe(q.stderr.replace(/^\S+: /, ''));
    expect(r.code).toBe(1);
    expect(fs.readFileSync(luks).equals(before)).toBe(true);
  });

  it('info does not unlock (like qemu-img): a wrong password or unknown secret id still shows the image', async () => {
    for (const args of [
      ['info', ...BAD, '--image-opts', imageOpts(luks)],
      ['info', '--image-opts', imageOpts(luks).replace('sec0', 'nosuch')],
    ]) {
      const q = await qemuImg(args);
      expect(q.code).toBe(0);
      const r = await ours(args);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
    }
  });

  it('no key: I/O commands refuse like qemu-img', async () => {
    const q = await qemuImg(['convert', '-O', 'raw', luks, path.join(dir, 'q2.raw')]);
    const r = await ours(['convert', '-O', 'raw', luks, path.join(dir, 'nokey.raw')]);
    expect(r.code).toBe(1);
    expect(r.stderr.replace(/^\S+: /, '')).toBe(q.stderr.replace(/^\S+: /, ''));
  });

  it('info --output=json: same encrypt block as qemu-img', async () => {
    for (const f of [luks, aes]) {
      const q = JSON.parse((await must(qemuImg(['info', '--output=json', f]))).stdout);
      const r = await ours(['info', '--output=json', f]);
      expect(r.code).toBe(0);
      const o = JSON.parse(r.stdout);
      expect(o['format-specific']).toEqual(q['format-specific']);
      expect(o.encrypted).toBe(true);
    }
  });

  it('create -o encrypt.format=luks: qemu-img reads what we write', async () => {
    const made = path.join(dir, 'made.qcow2');
    const r = await ours(['create', '-q', '-f', 'qcow2', ...SEC, '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10', made, '4M']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    await must(qemuImg(['check', ...SEC, '--image-opts', imageOpts(made)]));
    await qemuIoEncrypted(made, ['write -P 0x71 4096 8192']);
    const w = await ours(['convert', ...SEC, '--image-opts', imageOpts(made), '-O', 'raw', path.join(dir, 'made.raw')]);
    expect(w.code).toBe(0);
    expect(fs.readFileSync(path.join(dir, 'made.raw')).equals(await qemuRaw(made, dir))).toBe(true);
  });
});

afterAll(() => {
  // Nothing we ran printed the password (outputs of every qcowkit run above).
  for (const r of outputs) {
    expect(r.stdout.includes(PASSWORD)).toBe(false);
    expect(r.stderr.includes(PASSWORD)).toBe(false);
  }
});
