/** Shared bits of the encryption tests: qemu-made encrypted images, raw content via qemu-img, our opens. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { BlockDriver } from '../../src/core/block-driver.js';
import { openImage } from '../../src/block/open.js';
import { fileProvider } from '../../src/io/file.js';
import { registerNodeCodecs } from '../../src/codecs/node.js';
import { registerNodeCrypto } from '../../src/codecs/crypto-node.js';
import { must, mustIo, qemuImg } from '../helpers/proc.js';

export const PASSWORD = 'correct horse';
export const SECRET_ARGS = ['--object', `secret,id=sec0,data=${PASSWORD}`];

export function registerAll(): void {
  registerNodeCodecs();
  registerNodeCrypto();
}

export const enc = (s: string) => new TextEncoder().encode(s);

/** `qemu-img create` of an encrypted qcow2 (iter-time 10 ms unless given). */
export async function qemuCreateEncrypted(file: string, size: string, opts: string, password = PASSWORD): Promise<void> {
  const o = opts.includes('encrypt.format=aes') || opts.includes('iter-time') ? opts : `${opts},encrypt.iter-time=10`;
  const args = ['create', '-q', '-f', 'qcow2', '--object', `secret,id=sec0,data=${password}`, '-o', `encrypt.key-secret=sec0,${o}`, file, size];
  // qemu-img's PBKDF2 calibration sometimes measures zero CPU time and gives up ("Unable to get
  // accurate CPU usage"), more often on a busy machine: try again.
  for (let attempt = 1; ; attempt++) {
    const r = await qemuImg(args);
    if (r.code !== 0 && attempt < 5 && r.stderr.includes('Unable to get accurate CPU usage')) continue;
    await must(Promise.resolve(r));
    return;
  }
}

export function imageOpts(file: string): string {
  return `driver=qcow2,file.filename=${file},encrypt.key-secret=sec0`;
}

/** qemu-io commands on an encrypted image. */
export async function qemuIoEncrypted(file: string, cmds: string[], password = PASSWORD): Promise<void> {
  await mustIo(['--object', `secret,id=sec0,data=${password}`, '--image-opts', imageOpts(file), ...cmds.flatMap((c) => ['-c', c])]);
}

/** The guest content as qemu-img decrypts it. */
export async function qemuRaw(file: string, dir: string, password = PASSWORD): Promise<Buffer> {
  const out = path.join(dir, `${path.basename(file)}.${Math.random().toString(36).slice(2)}.raw`);
  await must(qemuImg(['convert', '--object', `secret,id=sec0,data=${password}`, '--image-opts', imageOpts(file), '-O', 'raw', out]));
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

export function openOurs(file: string, o: { password?: string; readOnly?: boolean; keySecret?: string | null } = {}): Promise<BlockDriver> {
  const secrets = new Map([['sec0', enc(o.password ?? PASSWORD)]]);
  return openImage(file, {
    io: fileProvider,
    readOnly: o.readOnly ?? true,
    secrets,
    ...(o.keySecret === null ? {} : { keySecret: o.keySecret ?? 'sec0' }),
  });
}

export async function readAll(d: BlockDriver): Promise<Uint8Array> {
  return d.read(0, d.size);
}

/** First differing offset, or -1. */
export function firstDiff(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}
