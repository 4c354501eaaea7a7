/**
 * `amend -o encrypt.state=...` (LUKS key slots) against qemu-img 7.2 (needs a build): the same
 * sequence of operations on twin images gives the same messages, exit codes and slot states; qemu
 * opens our amended images with the new passwords and refuses erased ones; refusals leave the file
 * untouched. Also the write order that keeps a crash harmless (key material before the header that
 * activates it; header deactivation before the material is destroyed).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTmpDir, removeTmpDir, sha256File } from '../helpers/files.js';
import { must, qemuImg, qk, type RunResult } from '../helpers/proc.js';
import { cryptoBackend } from '../../src/codecs/crypto-registry.js';
import { createLuksHeader } from '../../src/formats/crypto/luks.js';
import { decodeLuksHeader, LUKS_SLOT_ENABLED } from '../../src/formats/crypto/luks-header.js';
import { prepareLuksAmend, type LuksArea } from '../../src/formats/crypto/luks-amend.js';
import { luksParams } from '../../src/formats/crypto/luks-header.js';
import { unlockLuks } from '../../src/formats/crypto/luks.js';
import { enc, qemuCreateEncrypted, qemuIoEncrypted, registerAll } from './helpers.js';

let dir: string;
const outputs: RunResult[] = [];
const PW = { s: 'first-pass', s2: 'second-pass', s3: 'third-pass' };
const OBJ = Object.entries(PW).flatMap(([id, pw]) => ['--object', `secret,id=${id},data=${pw}`]);

const opts = (file: string, key: string) => `driver=qcow2,file.filename=${file},encrypt.key-secret=${key}`;

async function activeSlots(file: string): Promise<boolean[]> {
  const j = JSON.parse((await must(qemuImg(['info', '--output=json', file]))).stdout);
  return (j['format-specific'].data.encrypt.slots as Array<{ active: boolean }>).map((s) => s.active);
}

/** Whether qemu-img opens the image with this password (and reads the data written at creation). */
async function qemuOpens(file: string, key: keyof typeof PW): Promise<boolean> {
  const out = path.join(dir, `open-${Math.random().toString(36).slice(2)}.raw`);
  const c = await qemuImg(['convert', ...OBJ, '--image-opts', opts(file, key), '-O', 'raw', out]);
  if (c.code !== 0) {
    expect(c.stderr).toContain('Invalid password, cannot unlock any keyslot');
    return false;
  }
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b.subarray(0, 65536).every((x) => x === 0x5c);
}

beforeAll(() => {
  registerAll();
  dir = makeTmpDir('qk-crypto-amend-');
});
afterAll(() => removeTmpDir(dir));

describe('amend key slots: twin runs with qemu-img', () => {
  let q: string;
  let u: string;
  beforeAll(async () => {
    q = path.join(dir, 'q.qcow2');
    u = path.join(dir, 'u.qcow2');
    await qemuCreateEncrypted(q, '4M', 'encrypt.format=luks', PW.s);
    await qemuIoEncrypted(q, ['write -P 0x5c 0 64k'], PW.s);
    fs.copyFileSync(q, u);
  });

  // [key-secret the image is opened with, -o options, extra flags]
  const steps: Array<[keyof typeof PW, string, string[]]> = [
    ['s', 'encrypt.new-secret=s2', []],
    ['s', 'encrypt.state=bogus,encrypt.new-secret=s2', []],
    ['s', 'encrypt.state=active', []],
    ['s', 'encrypt.state=active,encrypt.new-secret=s2,encrypt.old-secret=s', []],
    ['s', 'encrypt.state=active,encrypt.new-secret=nosuch,encrypt.iter-time=10', []],
    ['s', 'encrypt.state=active,encrypt.new-secret=s2,encrypt.iter-time=10', []],
    ['s', 'encrypt.state=active,encrypt.new-secret=s3,encrypt.keyslot=5,encrypt.iter-time=10', []],
    ['s', 'encrypt.state=active,encrypt.new-secret=s3,encrypt.keyslot=5,encrypt.iter-time=10', []],
    ['s', 'encrypt.state=active,encrypt.new-secret=s3,encrypt.keyslot=8', []],
    ['s', 'encrypt.state=active,encrypt.new-secret=s3,encrypt.keyslot=-1', []],
    ['s', 'encrypt.state=inactive,encrypt.new-secret=s2', []],
    ['s', 'encrypt.state=inactive,encrypt.iter-time=10', []],
    ['s', 'encrypt.state=inactive', []],
    ['s', 'encrypt.state=inactive,encrypt.keyslot=3', []],
    ['s', 'encrypt.state=inactive,encrypt.keyslot=-1', []],
    ['s', 'encrypt.state=inactive,encrypt.keyslot=0,encrypt.old-secret=s2', []],
    ['s', 'encrypt.state=inactive,encrypt.old-secret=nosuch', []],
    ['s3', 'encrypt.state=inactive,encrypt.old-secret=s3', []],
    ['s3', 'encrypt.state=active,encrypt.new-secret=s,encrypt.iter-time=10', []],
    ['s2', 'encrypt.state=inactive,encrypt.keyslot=0', []],
    ['s2', 'encrypt.state=inactive,encrypt.old-secret=s', []],
    ['s2', 'encrypt.state=active,encrypt.new-secret=s3,encrypt.keyslot=1,encrypt.iter-time=10', ['--force']],
    ['s3', 'encrypt.state=inactive,encrypt.old-secret=s3', []],
    ['s3', 'encrypt.state=inactive,encrypt.old-secret=s3', ['--force']],
  ];

  it('the same messages, exit codes and slot states at every step; untouched on refusal', async () => {
    const log: string[] = [];
    for (const [key, o, extra] of steps) {
      const beforeU = await sha256File(u);
      const qr = await qemuImg(['amend', ...OBJ, ...extra, '--image-opts', '-o', o, opts(q, key)]);
      const ur = await qk(['amend', ...OBJ, ...extra, '--image-opts', '-o', o, opts(u, key)]);
      outputs.push(ur);
      const qm = qr.stderr.replace(/^qemu-img: /, '').replaceAll(q, 'IMG');
      const um = ur.stderr.replace(/^qcowkit: /, '').replaceAll(u, 'IMG');
      log.push(`${key} ${o} ${extra.join(' ')} -> ${qr.code} ${qm.trim()}`);
      expect(um, log.join('\n')).toBe(qm);
      expect(ur.code, log.join('\n')).toBe(qr.code);
      expect(await activeSlots(u), log.join('\n')).toEqual(await activeSlots(q));
      if (ur.code !== 0) expect(await sha256File(u)).toBe(beforeU);
    }
    // The walk went through successes and refusals alike.
    expect(log.filter((l) => / -> 0 /.test(l)).length).toBeGreaterThanOrEqual(5);
    expect(log.filter((l) => / -> 1 /.test(l)).length).toBeGreaterThanOrEqual(15);
    expect(await activeSlots(u)).toEqual(Array(8).fill(false));
  });
});

describe('amended images open in qemu-img with the right passwords', () => {
  it('add two passwords, erase the first: qemu opens with the new ones only, check stays clean', async () => {
    const f = path.join(dir, 'pw.qcow2');
    await qemuCreateEncrypted(f, '2M', 'encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv', PW.s);
    await qemuIoEncrypted(f, ['write -P 0x5c 0 64k'], PW.s);
    const amend = async (key: string, o: string) => {
      const r = await qk(['amend', ...OBJ, '--image-opts', '-o', o, opts(f, key)]);
      outputs.push(r);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
    };
    await amend('s', 'encrypt.state=active,encrypt.new-secret=s2,encrypt.iter-time=10');
    await amend('s2', 'encrypt.state=active,encrypt.new-secret=s3,encrypt.keyslot=7,encrypt.iter-time=10');
    await amend('s3', 'encrypt.state=inactive,encrypt.old-secret=s');
    expect(await activeSlots(f)).toEqual([false, true, false, false, false, false, false, true]);
    expect(await qemuOpens(f, 's')).toBe(false);
    expect(await qemuOpens(f, 's2')).toBe(true);
    expect(await qemuOpens(f, 's3')).toBe(true);
    const c = await qemuImg(['check', ...OBJ, '--image-opts', opts(f, 's2')]);
    expect(c.stdout).toContain('No errors were found on the image.');
    // The erased slot's key material no longer opens with the old password even if reactivated.
    const raw = fs.readFileSync(f);
    const luksAt = Number(raw.readBigUInt64BE(0x78));
    const h = decodeLuksHeader(new Uint8Array(raw.subarray(luksAt, luksAt + 592)));
    expect(h.slots[0]!.active).not.toBe(LUKS_SLOT_ENABLED);
    expect(h.slots[0]!.iterations).toBe(0);
    expect(h.slots[0]!.salt.every((b) => b === 0)).toBe(true);
  });

  it('amend needs the key to open, like qemu-img', async () => {
    const f = path.join(dir, 'nokey.qcow2');
    await qemuCreateEncrypted(f, '1M', 'encrypt.format=luks', PW.s);
    const before = await sha256File(f);
    const q = await qemuImg(['amend', ...OBJ, '-o', 'encrypt.state=active,encrypt.new-secret=s2', f]);
    const r = await qk(['amend', ...OBJ, '-o', 'encrypt.state=active,encrypt.new-secret=s2', f]);
    outputs.push(r);
    expect(r.code).toBe(1);
    expect(r.stderr.replace(/^\S+: /, '')).toBe(q.stderr.replace(/^\S+: /, ''));
    expect(await sha256File(f)).toBe(before);
    // Not a LUKS image: qemu-img's words.
    const plain = path.join(dir, 'plain.qcow2');
    await must(qemuImg(['create', '-q', '-f', 'qcow2', plain, '1M']));
    const q2 = await qemuImg(['amend', ...OBJ, '-o', 'encrypt.state=inactive,encrypt.keyslot=1', plain]);
    const r2 = await qk(['amend', ...OBJ, '-o', 'encrypt.state=inactive,encrypt.keyslot=1', plain]);
    expect(r2.code).toBe(1);
    expect(r2.stderr.replace(/^\S+: /, '')).toBe(q2.stderr.replace(/^\S+: /, ''));
  });
});

describe('write order (crash consistency)', () => {
  /** A LUKS area in memory that logs writes and flushes. */
  function memArea(blob: Uint8Array): { area: LuksArea; log: string[] } {
    const log: string[] = [];
    return {
      log,
      area: {
        read: async (off, len) => blob.slice(off, off + len),
        write: async (data, off) => {
          blob.set(data, off);
          log.push(`write ${off} ${data.length}`);
        },
        flush: async () => {
          log.push('flush');
        },
      },
    };
  }

  it('add: key material, flush, then the header; erase: header, flush, then the material', async () => {
    const be = cryptoBackend();
    const made = await createLuksHeader({ secret: enc('a'), iterTime: 1, calibrationMs: 5 }, be);
    const blob = made.blob;
    const { area, log } = memArea(blob);
    const secrets = new Map([['b', enc('b')]]);
    const add = await prepareLuksAmend(area, { state: 'active', newSecret: 'b', iterTime: 1 }, { password: enc('a'), secrets, force: false, calibrationMs: 5 }, be);
    expect(log).toEqual([]); // nothing written while preparing
    await add();
    const slot1 = made.header.slots[1]!.keyMaterialOffset * 512;
    expect(log).toEqual([`write ${slot1} ${64 * 4000}`, 'flush', 'write 0 592', 'flush']);
    // The new slot opens with the new password and gives the same master key.
    const h = decodeLuksHeader(blob.subarray(0, 592));
    const p = luksParams(h);
    const mk = await unlockLuks(h, p, async (o, l) => blob.slice(o, o + l), enc('b'), be);
    expect(Buffer.from(mk).equals(Buffer.from(made.masterKey))).toBe(true);

    log.length = 0;
    const erase = await prepareLuksAmend(area, { state: 'inactive', keyslot: 0n }, { password: enc('a'), secrets, force: false, calibrationMs: 5 }, be);
    expect(log).toEqual([]);
    await erase();
    expect(log[0]).toBe('write 0 592');
    expect(log[1]).toBe('flush');
    expect(log.slice(2, -1).every((l) => l === `write ${made.header.slots[0]!.keyMaterialOffset * 512} ${64 * 4000}`)).toBe(true);
    expect(log.length).toBeGreaterThan(3);
    await expect(unlockLuks(decodeLuksHeader(blob.subarray(0, 592)), p, async (o, l) => blob.slice(o, o + l), enc('a'), be)).rejects.toThrow(
      'Invalid password, cannot unlock any keyslot',
    );
  });
});

afterAll(() => {
  expect(outputs.length).toBeGreaterThan(0);
  for (const r of outputs) for (const pw of Object.values(PW)) {
    expect(r.stdout.includes(pw)).toBe(false);
    expect(r.stderr.includes(pw)).toBe(false);
  }
});
