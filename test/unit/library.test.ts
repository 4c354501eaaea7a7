/**
 * The package entry point as a library user meets it: `import ... from 'qcowkit'` resolves to
 * dist/index.js (package.json "main"), which registers Node's codecs and crypto on import.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { REPO_ROOT, qemuImg, qemuIo } from '../helpers/proc.js';

const pkg = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')) as { main: string; types: string };
type Lib = typeof import('../../src/index.js');
let lib: Lib;
let dir: string;

beforeAll(async () => {
  lib = (await import(path.join(REPO_ROOT, pkg.main))) as Lib;
  dir = makeTmpDir('qk-lib-');
});
afterAll(() => removeTmpDir(dir));

describe('package entry point', () => {
  it('main and types name built files', () => {
    expect(fs.existsSync(path.join(REPO_ROOT, pkg.main))).toBe(true);
    expect(fs.existsSync(path.join(REPO_ROOT, pkg.types))).toBe(true);
  });

  it('creates a qcow2 image, writes through it, and QEMU agrees', async () => {
    const file = path.join(dir, 'made.qcow2');
    await lib.createImage({ filename: file, format: 'qcow2', size: 64n << 20n, options: ['cluster_size=65536'] }, lib.fileProvider);
    const data = new Uint8Array(3 * 65536 + 1000).map((_, i) => (i * 7 + 3) & 0xff);
    const img = await lib.openImage(file, { io: lib.fileProvider, readOnly: false });
    await img.write(5 * 65536 - 500, data);
    await img.writeZeroes(5 * 65536, 4096);
    await img.close();
    const check = await qemuImg(['check', file]);
    expect(check.code, check.stdout + check.stderr).toBe(0);
    expect(check.stdout).toContain('No errors were found on the image.');
    const expected = data.slice();
    expected.fill(0, 500, 500 + 4096);
    const io = await qemuIo(['-f', 'qcow2', '-c', `read -v ${5 * 65536 - 500} 16`, file]);
    expect(io.code).toBe(0);
    const back = await lib.openImage(file, { io: lib.fileProvider, readOnly: true });
    expect(Buffer.from(await back.read(5 * 65536 - 500, expected.length)).equals(Buffer.from(expected))).toBe(true);
    const entries = [];
    for await (const e of lib.mapImage(back)) entries.push(e);
    expect(entries.some((e) => e.data && e.offset !== undefined)).toBe(true);
    await back.close();
  });

  it('reads compressed clusters without any set-up (codecs registered on import)', async () => {
    const src = path.join(dir, 'src.qcow2');
    const comp = path.join(dir, 'comp.qcow2');
    expect((await qemuImg(['create', '-f', 'qcow2', src, '4M'])).code).toBe(0);
    expect((await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x5a 0 1M', src])).code).toBe(0);
    expect((await qemuImg(['convert', '-c', '-O', 'qcow2', src, comp])).code).toBe(0);
    const a = await lib.openImage(comp, { io: lib.fileProvider, readOnly: true });
    const b = await lib.openImage(src, { io: lib.fileProvider, readOnly: true });
    const r = await lib.compareImages(a, b);
    expect(r.identical).toBe(true);
    expect((await a.read(4096, 4))[0]).toBe(0x5a);
    await a.close();
    await b.close();
  });
});
