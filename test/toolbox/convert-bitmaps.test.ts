/**
 * `convert --bitmaps [--skip-broken-bitmaps]` and `convert -O FMT -o help` against qemu-img 7.2 on
 * twin copies (see twin.ts): same exit codes and messages, and the bitmaps of the target (names,
 * flags, granularity and every bit, read with qcowkit's library) the same as qemu-img's.
 */
import * as fs from 'node:fs';
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

/** Every bitmap of `file` in directory order: name, granularity, flags and bits. */
async function bitmapDump(file: string): Promise<string[]> {
  if (!fs.existsSync(file)) return ['(no file)'];
  const imp = (p: string) => import(pathToFileURL(path.join(DIST, p)).href);
  const [openMod, fileMod, codecMod] = await Promise.all([imp('block/open.js'), imp('io/file.js'), imp('codecs/node.js')]);
  codecMod.registerNodeCodecs();
  const drv = (await openMod.openImage(file, { io: fileMod.fileProvider, readOnly: true, noBacking: true })) as BitmapDriver;
  try {
    const out: string[] = [];
    for (const b of drv.bitmaps ?? []) {
      const { bits, granularity } = await drv.bitmapOps().readBits(b.name);
      out.push(`${b.name}:${granularity}:${b.flags}:${Buffer.from(bits).toString('hex')}`);
    }
    return out;
  } finally {
    await drv.close();
  }
}

const sameBitmaps = (...files: string[]) => async (q: string, k: string) => {
  for (const f of files) expect(await bitmapDump(path.join(k, f)), `${f}: bitmaps`).toEqual(await bitmapDump(path.join(q, f)));
};

/** Set the in-use flag of bitmap number `index` in the directory (a bitmap left inconsistent). */
function markInUse(file: string, index: number): void {
  const fd = fs.openSync(file, 'r+');
  try {
    const head = Buffer.alloc(65536);
    fs.readSync(fd, head, 0, head.length, 0);
    let off = head.readUInt32BE(100); // header_length (v3)
    for (;;) {
      const type = head.readUInt32BE(off);
      const len = head.readUInt32BE(off + 4);
      if (type === 0) throw new Error('no bitmaps extension');
      if (type === 0x23852875) {
        let entry = Number(head.readBigUInt64BE(off + 8 + 16)); // bitmap_directory_offset
        const dir = Buffer.alloc(4096);
        fs.readSync(fd, dir, 0, dir.length, entry);
        let at = 0;
        for (let i = 0; i < index; i++) {
          const nameSize = dir.readUInt16BE(at + 18);
          const extra = dir.readUInt32BE(at + 20);
          at += (24 + extra + nameSize + 7) & ~7;
        }
        entry += at + 12;
        const flags = Buffer.alloc(4);
        fs.readSync(fd, flags, 0, 4, entry);
        flags.writeUInt32BE(flags.readUInt32BE(0) | 1);
        fs.writeSync(fd, flags, 0, 4, entry);
        return;
      }
      off += 8 + ((len + 7) & ~7);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * s.qcow2 (8 MiB, over base.qcow2): bitmaps bA (128 KiB granularity, enabled, dirty at 0..1M and
 * 5M), bB (disabled, dirty at 0..1M), bC (4 KiB, enabled, clean). inc.qcow2: a copy whose bA is
 * in use (inconsistent). has.qcow2: an existing target holding a bitmap named bC. v2.qcow2.
 */
async function images(d: string): Promise<void> {
  await create(d, 'base.qcow2', 8 * M);
  await io(d, 'base.qcow2', ['write -q -P 9 2M 1M']);
  await img(d, ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 's.qcow2']);
  await img(d, ['bitmap', '--add', '-g', '128k', 's.qcow2', 'bA']);
  await img(d, ['bitmap', '--add', 's.qcow2', 'bB']);
  await io(d, 's.qcow2', ['write -q -P 1 0 1M']);
  await img(d, ['bitmap', '--disable', 's.qcow2', 'bB']);
  await img(d, ['bitmap', '--add', '-g', '4k', 's.qcow2', 'bC']);
  await img(d, ['bitmap', '--disable', 's.qcow2', 'bC']);
  await io(d, 's.qcow2', ['write -q -P 2 5M 64k']);
  await img(d, ['bitmap', '--enable', 's.qcow2', 'bC']);
  fs.copyFileSync(path.join(d, 's.qcow2'), path.join(d, 'inc.qcow2'));
  markInUse(path.join(d, 'inc.qcow2'), 0);
  await create(d, 'has.qcow2', 8 * M);
  await img(d, ['bitmap', '--add', 'has.qcow2', 'bC']);
  await create(d, 'v2.qcow2', 8 * M, { compat: '0.10' });
}

const runs: Array<{ args: string[]; check?: string[] }> = [
  { args: ['--bitmaps', '-O', 'qcow2', 's.qcow2', 't.qcow2'], check: ['t.qcow2'] },
  { args: ['--bitmaps', '-O', 'qcow2', '-o', 'cluster_size=4k', 's.qcow2', 't.qcow2'], check: ['t.qcow2'] },
  { args: ['--bitmaps', '-c', '-O', 'qcow2', 's.qcow2', 't.qcow2'], check: ['t.qcow2'] },
  { args: ['--bitmaps', '-O', 'qcow2', 'v2.qcow2', 't.qcow2'] },
  { args: ['--bitmaps', '-O', 'qcow2', 'base.qcow2', 't.qcow2'], check: ['t.qcow2'] },
  { args: ['--bitmaps', '-O', 'qcow2', 'v2.qcow2', 'inc.qcow2', 't.qcow2'] },
  { args: ['--bitmaps', '-n', '-O', 'qcow2', 's.qcow2', 'has.qcow2'], check: ['has.qcow2'] },
  { args: ['--bitmaps', '-O', 'raw', 's.qcow2', 't.raw'] },
  { args: ['--bitmaps', '-O', 'qcow2', '-o', 'compat=0.10', 's.qcow2', 't.qcow2'] },
  { args: ['--bitmaps', '-O', 'qcow', 's.qcow2', 't.qcow'] },
  { args: ['--bitmaps', '-O', 'qcow2', 's.qcow2', 'base.qcow2', 't.qcow2'] },
  { args: ['--bitmaps', '-O', 'qcow2', 'inc.qcow2', 't.qcow2'] },
  { args: ['--bitmaps', '--skip-broken-bitmaps', '-O', 'qcow2', 'inc.qcow2', 't.qcow2'], check: ['t.qcow2'] },
  { args: ['--skip-broken-bitmaps', '-O', 'qcow2', 'inc.qcow2', 't.qcow2'] },
  { args: ['-O', 'qcow2', '-o', 'help'] },
  { args: ['-O', 'qcow2', '-o', 'help', 's.qcow2', 't.qcow2'] },
  { args: ['-O', 'qcow2', '-o', 'cluster_size=4k,help'] },
  { args: ['-O', 'qcow', '-o', 'help'] },
  { args: ['-O', 'qcow', '-o', '?', 's.qcow2', 't.qcow'] },
  { args: ['-O', 'raw', '-o', 'help', 's.qcow2', 't.raw'] },
  { args: ['-o', 'help'] },
  { args: ['-n', '-O', 'qcow2', '-o', 'help', 's.qcow2', 'has.qcow2'] },
];

const cases: TwinCase[] = runs.map(({ args, check }, i) => ({
  spawn: i === 0,
  name: args.join(' '),
  build: images,
  args: ['convert', ...args],
  images: ['s.qcow2', 'has.qcow2', 'inc.qcow2'],
  ...(check ? { after: sameBitmaps(...check) } : {}),
}));

describe.concurrent('convert --bitmaps, convert -o help', () => {
  for (const c of cases) it(c.name, () => runTwin(c).then(() => undefined));
});
