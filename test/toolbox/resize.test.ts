/** `resize` against qemu-img 7.2 on twin copies (see twin.ts). */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../../src/block/open.js';
import { registerNodeCodecs } from '../../src/codecs/node.js';
import type { Qcow2Driver } from '../../src/formats/qcow2/driver.js';
import { fileProvider } from '../../src/io/file.js';
import { makeTmpDir, removeTmpDir, sha256File } from '../helpers/files.js';
import { describeResult, qemuImg } from '../helpers/proc.js';
import { create, img, io, runTwin, type TwinCase } from './twin.js';

const M = 1024 * 1024;

/** 8 MiB v3 image, data across the image including its last cluster. */
async function plain(d: string): Promise<void> {
  await create(d, 'a.qcow2', 8 * M);
  await io(d, 'a.qcow2', ['write -q -P 1 0 1M', 'write -q -P 2 3M 100k', 'write -q -z 5M 64k', 'write -q -P 3 8128k 64k']);
}

async function withSnapshot(d: string): Promise<void> {
  await plain(d);
  await img(d, ['snapshot', '-c', 's1', 'a.qcow2']);
  await io(d, 'a.qcow2', ['write -q -P 4 7M 128k']);
}

async function v2WithSnapshot(d: string): Promise<void> {
  await create(d, 'a.qcow2', 8 * M, { compat: '0.10' });
  await io(d, 'a.qcow2', ['write -q -P 1 0 1M']);
  await img(d, ['snapshot', '-c', 's1', 'a.qcow2']);
}

async function withBitmaps(d: string): Promise<void> {
  await create(d, 'a.qcow2', 8 * M);
  await img(d, ['bitmap', '--add', 'a.qcow2', 'b1']);
  await img(d, ['bitmap', '--add', '-g', '4k', 'a.qcow2', 'b2']);
  await img(d, ['bitmap', '--add', 'a.qcow2', 'b3']);
  await img(d, ['bitmap', '--disable', 'a.qcow2', 'b3']);
  await io(d, 'a.qcow2', ['write -q -P 1 0 64k', 'write -q -P 2 7M 64k']);
}

/** 1 MiB overlay (minus 24 KiB) over a 4 MiB backing file full of data. */
async function smallOverlay(d: string): Promise<void> {
  await create(d, 'base.qcow2', 4 * M);
  await io(d, 'base.qcow2', ['write -q -P 7 0 4M']);
  await create(d, 'top.qcow2', '1000k', {}, { backing: 'base.qcow2' });
}

async function raw(d: string): Promise<void> {
  await create(d, 'r.raw', M, {}, { fmt: 'raw' });
  await io(d, 'r.raw', ['write -q -P 9 0 64k'], 'raw');
}

async function oddRaw(d: string): Promise<void> {
  fs.writeFileSync(path.join(d, 'r.raw'), Buffer.alloc(999, 5));
}

const v1 = (d: string) => create(d, 'v1.qcow', M, {}, { fmt: 'qcow' });

const cases: TwinCase[] = [
  { name: 'grow, relative', spawn: true, build: plain, args: ['resize', 'a.qcow2', '+1M'], expectCode: 0 },
  { name: 'grow, absolute, quiet', build: plain, args: ['resize', '-q', 'a.qcow2', '20M'], expectCode: 0 },
  { name: 'grow past one L2 table (L1 grows)', build: plain, args: ['resize', 'a.qcow2', '1G'], expectCode: 0 },
  { name: 'shrink without --shrink', spawn: true, build: plain, args: ['resize', 'a.qcow2', '4M'], expectCode: 1 },
  { name: 'shrink, relative, no -- needed', build: plain, args: ['resize', '--shrink', 'a.qcow2', '-3M'], expectCode: 0 },
  { name: 'shrink inside a cluster', build: plain, args: ['resize', '--shrink', 'a.qcow2', '3129856'], expectCode: 0 },
  { name: 'qcow2 size not a multiple of 512', build: plain, args: ['resize', '--shrink', 'a.qcow2', '1000'], expectCode: 1 },
  { name: 'size 0', build: plain, args: ['resize', '--shrink', 'a.qcow2', '0'], expectCode: 1 },
  { name: '8E wraps negative', build: plain, args: ['resize', 'a.qcow2', '8E'], expectCode: 1 },
  { name: 'L1 table limit', build: plain, args: ['resize', 'a.qcow2', '1E'], expectCode: 1 },
  { name: 'bad size', build: plain, args: ['resize', 'a.qcow2', 'abc'], expectCode: 1 },
  { name: 'size out of range', build: plain, args: ['resize', 'a.qcow2', '100000000000000000000'], expectCode: 1 },
  { name: 'not enough arguments', build: plain, args: ['resize', 'a.qcow2'], expectCode: 1 },
  { name: 'bad preallocation mode', build: plain, args: ['resize', '--preallocation=bogus', 'a.qcow2', '+1M'], expectCode: 1 },
  {
    name: 'preallocation needs growth',
    build: plain,
    args: ['resize', '--preallocation=full', '--shrink', 'a.qcow2', '1M'],
    expectCode: 1,
  },
  { name: 'preallocation=full', build: plain, args: ['resize', '--preallocation=full', 'a.qcow2', '+1M'], expectCode: 0 },
  { name: 'preallocation=metadata', build: plain, args: ['resize', '--preallocation=metadata', 'a.qcow2', '+2M'], expectCode: 0 },
  { name: 'grow with a snapshot', build: withSnapshot, args: ['resize', 'a.qcow2', '+3M'], expectCode: 0 },
  { name: 'shrink with a snapshot (v3)', build: withSnapshot, args: ['resize', '--shrink', 'a.qcow2', '2M'], expectCode: 0 },
  { name: 'v2 image with a snapshot', build: v2WithSnapshot, args: ['resize', 'a.qcow2', '+1M'], expectCode: 1 },
  { name: 'grow with bitmaps', build: withBitmaps, args: ['resize', 'a.qcow2', '+8M'], expectCode: 0 },
  { name: 'shrink with bitmaps', build: withBitmaps, args: ['resize', '--shrink', 'a.qcow2', '4M'], expectCode: 0 },
  { name: 'grow an overlay over a larger backing file', build: smallOverlay, args: ['resize', 'top.qcow2', '3M'], expectCode: 0 },
  {
    name: 'grow a v2 overlay over a larger backing file (refused)',
    build: async (d) => {
      await create(d, 'base.qcow2', 4 * M);
      await io(d, 'base.qcow2', ['write -q -P 7 0 4M']);
      await create(d, 'top.qcow2', '1000k', { compat: '0.10' }, { backing: 'base.qcow2' });
    },
    args: ['resize', 'top.qcow2', '6M'],
    expectCode: 1,
  },
  { name: 'raw grow (probed: warning)', build: raw, args: ['resize', 'r.raw', '+1000'], expectCode: 0 },
  { name: 'raw shrink to an odd size', build: raw, args: ['resize', '-f', 'raw', '--shrink', 'r.raw', '999'], expectCode: 0 },
  { name: 'raw relative from an odd size', build: oddRaw, args: ['resize', '-f', 'raw', 'r.raw', '+1000'], expectCode: 0 },
  { name: 'raw preallocation=full', build: raw, args: ['resize', '-f', 'raw', '--preallocation=full', 'r.raw', '2M'], expectCode: 0 },
  {
    name: 'raw preallocation=metadata',
    build: raw,
    args: ['resize', '-f', 'raw', '--preallocation=metadata', 'r.raw', '2M'],
    expectCode: 1,
  },
  { name: 'qcow v1 cannot be resized', build: v1, args: ['resize', 'v1.qcow', '2M'], expectCode: 1 },
  { name: 'wrong format', build: raw, args: ['resize', '-f', 'qcow2', 'r.raw', '2M'], expectCode: 1 },
];

describe.concurrent('resize', () => {
  for (const c of cases) it(c.name, () => runTwin(c).then(() => undefined));
});

/**
 * The library's Qcow2Driver.resize against qemu-img resize on twin copies: shrinking a v3 image with
 * snapshots, growing an overlay over a larger backing file (v3 and v2: the new area reads as zeros,
 * not as the backing file), refusing v2 images with snapshots. Compared: qemu-img check clean,
 * active content and every snapshot's content equal to qemu-img's result.
 */
describe('resize through the library', () => {
  const scenarios: Array<{ name: string; build: (d: string) => Promise<void>; file: string; size: number; refused?: string }> = [
    { name: 'shrink a v3 image with a snapshot', build: withSnapshot, file: 'a.qcow2', size: 2 * M },
    { name: 'grow an overlay over a larger backing file', build: smallOverlay, file: 'top.qcow2', size: 3 * M },
    {
      name: 'grow a v2 overlay over a larger backing file',
      build: async (d) => {
        await create(d, 'base.qcow2', 4 * M);
        await io(d, 'base.qcow2', ['write -q -P 7 0 4M']);
        await create(d, 'top.qcow2', '1000k', { compat: '0.10' }, { backing: 'base.qcow2' });
      },
      file: 'top.qcow2',
      size: 6 * M,
      refused: 'Failed to zero out new clusters: Operation not supported',
    },
    { name: 'v2 image with a snapshot is refused', build: v2WithSnapshot, file: 'a.qcow2', size: 9 * M, refused: "Can't resize a v2 image which has snapshots" },
  ];
  for (const sc of scenarios) {
    it(sc.name, async () => {
      registerNodeCodecs();
      const root = makeTmpDir('qk-resize-lib-');
      try {
        const q = path.join(root, 'q');
        const k = path.join(root, 'k');
        fs.mkdirSync(q);
        await sc.build(q);
        fs.cpSync(q, k, { recursive: true });
        const rq = await qemuImg(['resize', '--shrink', sc.file, String(sc.size)], { cwd: q });
        const before = await sha256File(path.join(k, sc.file));
        const drv = (await openImage(path.join(k, sc.file), { io: fileProvider, readOnly: false })) as Qcow2Driver;
        let err: Error | undefined;
        try {
          await drv.resize(sc.size);
        } catch (e) {
          err = e as Error;
        } finally {
          await drv.close();
        }
        if (sc.refused) {
          expect(rq.code, describeResult(rq)).toBe(1);
          expect(rq.stderr).toContain(sc.refused);
          expect(err?.message).toBe(sc.refused);
          expect(await sha256File(path.join(k, sc.file))).toBe(before);
          return;
        }
        expect(rq.code, describeResult(rq)).toBe(0);
        expect(err).toBeUndefined();
        const c = await qemuImg(['check', sc.file], { cwd: k });
        expect(c.code, describeResult(c)).toBe(0);
        const cmp = await qemuImg(['compare', path.join(q, sc.file), path.join(k, sc.file)]);
        expect(cmp.code, describeResult(cmp)).toBe(0);
        const info = JSON.parse((await qemuImg(['info', '--output=json', sc.file], { cwd: k })).stdout) as { 'virtual-size': number; snapshots?: Array<{ id: string }> };
        expect(info['virtual-size']).toBe(sc.size);
        for (const s of info.snapshots ?? []) {
          for (const d of [q, k]) await img(d, ['convert', '-l', `snapshot.id=${s.id}`, '-O', 'raw', sc.file, `s${s.id}.raw`]);
          expect(await sha256File(path.join(k, `s${s.id}.raw`)), `snapshot ${s.id}`).toBe(await sha256File(path.join(q, `s${s.id}.raw`)));
        }
      } finally {
        removeTmpDir(root);
      }
    });
  }
});
