/**
 * `bitmap` against qemu-img 7.2 on twin copies (see twin.ts); afterwards the bits of every
 * bitmap (read with qcowkit's library) must be the same in both copies.
 */
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';
import { DIST } from '../helpers/proc.js';
import { create, img, io, runTwin, type TwinCase } from './twin.js';

const M = 1024 * 1024;

interface BitmapDriver {
  bitmaps: Array<{ name: string; flags: number; granularityBits: number }>;
  bitmapOps(): { readBits(name: string): Promise<{ bits: Uint8Array; granularity: number }> };
  close(): Promise<void>;
}

async function bitmapBits(file: string): Promise<Record<string, string>> {
  const imp = (p: string) => import(pathToFileURL(path.join(DIST, p)).href);
  const [openMod, fileMod, codecMod] = await Promise.all([imp('block/open.js'), imp('io/file.js'), imp('codecs/node.js')]);
  codecMod.registerNodeCodecs();
  const drv = (await openMod.openImage(file, { io: fileMod.fileProvider, readOnly: true, noBacking: true })) as BitmapDriver;
  try {
    const out: Record<string, string> = {};
    for (const b of drv.bitmaps ?? []) {
      const { bits, granularity } = await drv.bitmapOps().readBits(b.name);
      out[b.name] = `${granularity}:${b.flags}:${Buffer.from(bits).toString('hex')}`;
    }
    return out;
  } finally {
    await drv.close();
  }
}

async function sameBits(q: string, k: string): Promise<void> {
  for (const f of ['a.qcow2', 'src.qcow2']) {
    expect(await bitmapBits(path.join(k, f)), `${f}: bitmap bits`).toEqual(await bitmapBits(path.join(q, f)));
  }
}

/**
 * a.qcow2 (4 MiB): bitmaps b1 (enabled, dirty at 0 and 3M), b2 (4 KiB granularity, dirty at
 * 64k), off (disabled, clean). src.qcow2 (4 MiB): sb dirty at 1M..1M+128k; big.qcow2 (8 MiB) with
 * bitmap y; a v2 image and a raw image.
 */
async function images(d: string): Promise<void> {
  await create(d, 'a.qcow2', 4 * M);
  await img(d, ['bitmap', '--add', 'a.qcow2', 'b1']);
  await img(d, ['bitmap', '--add', '-g', '4k', 'a.qcow2', 'b2']);
  await io(d, 'a.qcow2', ['write -q -P 1 0 4096', 'write -q -P 2 3M 64k']);
  await img(d, ['bitmap', '--disable', 'a.qcow2', 'b2']);
  await img(d, ['bitmap', '--add', 'a.qcow2', 'off']);
  await img(d, ['bitmap', '--disable', 'a.qcow2', 'off']);
  await img(d, ['bitmap', '--enable', 'a.qcow2', 'b2']);
  await io(d, 'a.qcow2', ['write -q -P 3 64k 4096']);
  await create(d, 'src.qcow2', 4 * M);
  await img(d, ['bitmap', '--add', '-g', '128k', 'src.qcow2', 'sb']);
  await io(d, 'src.qcow2', ['write -q -P 4 1M 128k']);
  await create(d, 'big.qcow2', 8 * M);
  await img(d, ['bitmap', '--add', 'big.qcow2', 'y']);
  await create(d, 'v2.qcow2', 4 * M, { compat: '0.10' });
  await create(d, 'r.raw', 64 * 1024, {}, { fmt: 'raw' });
}

const runs: string[][] = [
  ['--add', 'a.qcow2', 'n1'],
  ['--add', 'a.qcow2', 'b1'],
  ['--add', '-g', '512', 'a.qcow2', 'n1'],
  ['--add', '-g', '6G', 'a.qcow2', 'n1'],
  ['--add', '-g', '4294967808', 'a.qcow2', 'n1'],
  ['--add', '-g', '3k', 'a.qcow2', 'n1'],
  ['--add', '--granularity', '8k', 'a.qcow2', 'n1'],
  ['--add', '--granularity=3k', 'a.qcow2', 'n1'],
  ['--add', '-g', '4G', 'a.qcow2', 'n1'],
  ['--add', '-g', 'abc', 'a.qcow2', 'n1'],
  ['--add', '--disable', 'a.qcow2', 'n1'],
  ['--add', '--disable', '--add', 'a.qcow2', 'n1'],
  ['--remove', '--add', 'a.qcow2', 'b1'],
  ['--remove', 'a.qcow2', 'nob'],
  ['--clear', 'a.qcow2', 'b1'],
  ['--clear', '--remove', 'a.qcow2', 'b2'],
  ['--enable', 'a.qcow2', 'off'],
  ['--disable', 'a.qcow2', 'b1'],
  ['--merge', 'b2', 'a.qcow2', 'b1'],
  ['--merge', 'b1', 'a.qcow2', 'off'],
  ['--merge', 'nob', 'a.qcow2', 'b1'],
  ['--merge', 'sb', '-b', 'src.qcow2', 'a.qcow2', 'b2'],
  ['--merge', 'sb', '--merge', 'b2', '-b', 'src.qcow2', 'a.qcow2', 'b1'],
  ['--merge', 'sb', '-b', 'src.qcow2', '-F', 'raw', 'a.qcow2', 'b1'],
  ['--merge', 'sb', '-b', 'nofile', 'a.qcow2', 'b1'],
  ['--merge', 'y', '-b', 'big.qcow2', 'a.qcow2', 'b1'],
  ['--merge', 'b1', '-b', 'a.qcow2', 'a.qcow2', 'b2'],
  ['--add', '--merge', 'b2', 'a.qcow2', 'n1'],
  ['--add', 'a.qcow2', ''],
  ['--add', 'a.qcow2', 'x'.repeat(1024)],
  ['--add', 'v2.qcow2', 'b'],
  ['--add', 'r.raw', 'b'],
  ['--add', '--image-opts', 'driver=qcow2,file.filename=a.qcow2', 'io1'],
  ['a.qcow2', 'b1'],
  ['--clear', '-g', '64k', 'a.qcow2', 'b1'],
  ['-F', 'qcow2', '--merge', 'b2', 'a.qcow2', 'b1'],
  ['--add', '-b', 'src.qcow2', 'a.qcow2', 'x1'],
  ['--add', 'a.qcow2'],
  ['--add', 'nonexist.qcow2', 'b'],
];

const cases: TwinCase[] = runs.map((args, i) => ({
  spawn: i < 2,
  name: args.map((a) => (a.length > 40 ? `${a.slice(0, 8)}...(${a.length})` : a)).join(' '),
  build: images,
  args: ['bitmap', ...args],
  images: ['a.qcow2', 'src.qcow2', 'v2.qcow2', 'r.raw'],
  after: sameBits,
  // qemu-img names the block node ('#block123'), qcowkit the file
  normalize: (s: string) => s.replace(/(persistent in '|persistent bitmaps to )(#block\d+|[^':]+)/g, '$1<node>'),
}));

describe.concurrent('bitmap', () => {
  for (const c of cases) it(c.name, () => runTwin(c).then(() => undefined));
});
