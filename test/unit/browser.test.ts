/**
 * The browser build: pure-JS codecs (src/codecs/browser.ts) against the Node ones on clusters
 * QEMU compressed (zlib and zstd), images and their backing files opened from Blobs/Files
 * (src/io/blob.ts) through the browser entry (src/browser.ts), and the bundle `npm run build`
 * makes (dist/qcowkit.browser.js): present, free of `node:` imports, and working.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as browser from '../../src/browser.js';
import { codecs } from '../../src/codecs/registry.js';
import { nodeCodecs } from '../../src/codecs/node.js';
import { mixedRawFile } from '../helpers/build.js';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { DIST, must, qemuImg } from '../helpers/proc.js';
import { compressedFields, l2Slots, OFLAG_COMPRESSED, readHeader } from '../helpers/qcow2.js';

const MiB = 1 << 20;
const SIZE = 8 * MiB;
const BUNDLE = path.join(DIST, 'qcowkit.browser.js');

let dir: string;
const file = (name: string) => path.join(dir, name);
const bytes = (name: string) => new Uint8Array(fs.readFileSync(file(name)));

beforeAll(async () => {
  dir = makeTmpDir('qk-browser-');
  mixedRawFile(dir, 'base.raw', 21, SIZE, 96 * 1024);
  mixedRawFile(dir, 'top.raw', 22, SIZE, 160 * 1024);
  const img = (args: string[]) => must(qemuImg(args, { cwd: dir }));
  await img(['convert', '-O', 'qcow2', 'base.raw', 'base.qcow2']);
  await img(['convert', '-c', '-O', 'qcow2', 'top.raw', 'top.qcow2']);
  await img(['rebase', '-u', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2']);
  await img(['convert', '-O', 'raw', 'top.qcow2', 'top.expected.raw']);
  await img(['convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', 'top.raw', 'zstd.qcow2']);
  await img(['convert', '-O', 'raw', 'zstd.qcow2', 'zstd.expected.raw']);
  // the same chain with the backing file recorded by absolute path (a File object has no folder)
  fs.copyFileSync(file('top.qcow2'), file('top-abs.qcow2'));
  await img(['rebase', '-u', '-b', file('base.qcow2'), '-F', 'qcow2', 'top-abs.qcow2']);
});
afterAll(() => removeTmpDir(dir));

/** Each compressed cluster as QEMU reads it: from its offset to the end of its last sector. */
function compressedClusters(name: string): Uint8Array[] {
  const h = readHeader(file(name));
  const data = bytes(name);
  const out: Uint8Array[] = [];
  for (const slot of l2Slots(file(name))) {
    if (!(slot.entry & OFLAG_COMPRESSED)) continue;
    const { offset, sectors } = compressedFields(slot.entry, h.clusterBits);
    const start = Number(offset);
    const end = Math.min(data.length, (Math.floor(start / 512) + Number(sectors) + 1) * 512);
    out.push(data.subarray(start, end));
  }
  return out;
}

async function readImage(img: browser.BlockDriver, piece = MiB): Promise<Buffer> {
  const parts: Uint8Array[] = [];
  for (let off = 0; off < img.size; off += piece) parts.push(await img.read(off, Math.min(piece, img.size - off)));
  return Buffer.concat(parts);
}

describe('browser codecs', () => {
  it('are the ones the browser entry registers', () => {
    expect(codecs()).toBe(browser.browserCodecs);
    expect(browser.browserCodecs.deflateRaw).toBeUndefined();
  });

  it('inflate every zlib cluster QEMU compressed as the Node codec does', async () => {
    const clusters = compressedClusters('top.qcow2');
    expect(clusters.length).toBeGreaterThan(20);
    const cs = readHeader(file('top.qcow2')).clusterSize;
    for (const input of clusters) {
      const ours = await browser.browserCodecs.inflateRaw(input, cs);
      expect(ours.length).toBe(cs);
      expect(Buffer.from(ours).equals(Buffer.from(await nodeCodecs.inflateRaw(input, cs)))).toBe(true);
    }
    const out = new Uint8Array(cs); // the caller's buffer, when given, receives the cluster
    expect(await browser.browserCodecs.inflateRaw(clusters[0]!, cs, out)).toBe(out);
    expect(Buffer.from(out).equals(Buffer.from(await nodeCodecs.inflateRaw(clusters[0]!, cs)))).toBe(true);
  });

  it('decompress every zstd cluster QEMU compressed as the Node codec does', async () => {
    const clusters = compressedClusters('zstd.qcow2');
    expect(clusters.length).toBeGreaterThan(20);
    const cs = readHeader(file('zstd.qcow2')).clusterSize;
    for (const input of clusters) {
      const ours = await browser.browserCodecs.zstdDecompress(input, cs);
      expect(ours.length).toBe(cs);
      expect(Buffer.from(ours).equals(Buffer.from(await nodeCodecs.zstdDecompress(input, cs)))).toBe(true);
    }
  });

  it('throw QcowError EIO on bad, truncated or short streams', async () => {
    const c = browser.browserCodecs;
    const zlibCluster = compressedClusters('top.qcow2')[0]!;
    const zstdCluster = compressedClusters('zstd.qcow2')[0]!;
    const bad = new Uint8Array(600).fill(0xff);
    for (const p of [
      c.inflateRaw(bad, 65536),
      c.inflateRaw(zlibCluster.subarray(0, 20), 65536),
      c.inflateRaw(zlibCluster, 2 * 65536),
      c.zstdDecompress(bad, 65536),
      c.zstdDecompress(zstdCluster.subarray(0, 20), 65536),
      c.zstdDecompress(zstdCluster, 2 * 65536),
    ]) {
      await expect(p).rejects.toMatchObject({ name: 'QcowError', code: 'EIO' });
    }
  });
});

describe('BlobProvider', () => {
  it('opens an image and its backing file from two File objects and reads them right', async () => {
    const files = [new File([bytes('top.qcow2')], 'top.qcow2'), new File([bytes('base.qcow2')], 'base.qcow2')];
    const img = await browser.openImage('top.qcow2', { io: new browser.BlobProvider(files) });
    try {
      expect(img.backing?.filename).toBe('base.qcow2');
      expect((await readImage(img)).equals(fs.readFileSync(file('top.expected.raw')))).toBe(true);
    } finally {
      await img.close();
    }
  });

  it('finds a backing file recorded by absolute path among Blobs by its base name', async () => {
    const io = new browser.BlobProvider({ 'top-abs.qcow2': new Blob([bytes('top-abs.qcow2')]), 'base.qcow2': new Blob([bytes('base.qcow2')]) });
    const img = await browser.openImage('top-abs.qcow2', { io });
    try {
      expect(img.backing?.filename).toBe(file('base.qcow2'));
      expect((await readImage(img, 3 * 65536 + 512)).equals(fs.readFileSync(file('top.expected.raw')))).toBe(true);
    } finally {
      await img.close();
    }
  });

  it('reads a zstd-compressed image; Blobs are read-only; a missing backing Blob is reported', async () => {
    const provider = new browser.BlobProvider(new Map([['zstd.qcow2', new Blob([bytes('zstd.qcow2')])]]));
    const img = await browser.openImage('zstd.qcow2', { io: provider });
    expect((await readImage(img)).equals(fs.readFileSync(file('zstd.expected.raw')))).toBe(true);
    await img.close();
    await expect(browser.openImage('zstd.qcow2', { io: provider, readOnly: false })).rejects.toMatchObject({ code: 'EPERM' });
    const io = await provider.open('zstd.qcow2', { readOnly: true });
    await expect(io.write(new Uint8Array(1), 0)).rejects.toThrow(/Read-only file system/);
    const buf = new Uint8Array(100);
    expect(await io.read(buf, (await io.size()) - 10)).toBe(10);
    expect(await io.read(buf, await io.size())).toBe(0);
    const lonely = new browser.BlobProvider([new File([bytes('top.qcow2')], 'top.qcow2')]);
    await expect(browser.openImage('top.qcow2', { io: lonely })).rejects.toThrow(/base\.qcow2.*No such file or directory/);
  });
});

describe('the browser bundle (npm run build)', () => {
  it('exists and imports no node: module', () => {
    expect(fs.existsSync(BUNDLE), `${BUNDLE} missing: run npm run build`).toBe(true);
    const text = fs.readFileSync(BUNDLE, 'utf8');
    expect(text).not.toContain('require("node:');
    expect(text).not.toContain("require('node:");
    expect(text).not.toContain('from "node:');
    expect(text).not.toContain("from 'node:");
  });

  it('works on its own: opens a zlib image and its backing file from Blobs, and a zstd image', async () => {
    type Browser = typeof import('../../src/browser.js');
    const lib = (await import(pathToFileURL(BUNDLE).href)) as Browser;
    const io = new lib.BlobProvider([new File([bytes('top.qcow2')], 'top.qcow2'), new File([bytes('base.qcow2')], 'base.qcow2')]);
    const img = await lib.openImage('top.qcow2', { io });
    expect((await readImage(img)).equals(fs.readFileSync(file('top.expected.raw')))).toBe(true);
    const depths = new Set<number>();
    for await (const e of lib.mapImage(img)) depths.add(e.depth);
    expect(depths.has(0) && depths.has(1)).toBe(true); // data from the image and from its backing file
    await img.close();
    const z = await lib.openImage('zstd.qcow2', { io: new lib.BlobProvider({ 'zstd.qcow2': new Blob([bytes('zstd.qcow2')]) }) });
    expect((await readImage(z)).equals(fs.readFileSync(file('zstd.expected.raw')))).toBe(true);
    await z.close();
  });
});
