/** `commit` against qemu-img 7.2 on twin copies (see twin.ts). */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { expectSameBytes } from '../helpers/compare.js';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { qemuImg, qk } from '../helpers/proc.js';
import { create, img, io, runTwin, type TwinCase } from './twin.js';

const M = 1024 * 1024;

/** base <- mid <- top, 8 MiB, overlapping writes at each level, zero writes in top. */
async function chain(d: string): Promise<void> {
  await create(d, 'base.qcow2', 8 * M);
  await io(d, 'base.qcow2', ['write -q -P 1 0 2M', 'write -q -P 5 6M 1M']);
  await create(d, 'mid.qcow2', undefined, {}, { backing: 'base.qcow2' });
  await io(d, 'mid.qcow2', ['write -q -P 2 512k 1M', 'write -q -z 6M 64k']);
  await create(d, 'top.qcow2', undefined, {}, { backing: 'mid.qcow2' });
  await io(d, 'top.qcow2', ['write -q -P 3 1M 1M', 'write -q -z 3M 64k', 'write -q -P 4 7M 100k', 'write -q -z 0 4096']);
}

/** A 2 MiB base under a 4 MiB overlay: commit grows the base. */
async function smallBase(d: string): Promise<void> {
  await create(d, 'b.qcow2', 2 * M);
  await io(d, 'b.qcow2', ['write -q -P 1 0 2M']);
  await create(d, 't.qcow2', 4 * M, {}, { backing: 'b.qcow2' });
  await io(d, 't.qcow2', ['write -q -P 2 1M 2M']);
}

async function smallRawBase(d: string): Promise<void> {
  await create(d, 'b.raw', M, {}, { fmt: 'raw' });
  await io(d, 'b.raw', ['write -q -P 1 0 1M'], 'raw');
  await create(d, 't.qcow2', 4 * M, {}, { backing: 'b.raw', backingFmt: 'raw' });
  await io(d, 't.qcow2', ['write -q -P 2 512k 3M']);
}

async function inSubfolder(d: string): Promise<void> {
  await chain(path.join(d, 'sub'));
}

const cases: TwinCase[] = [
  { name: 'into the backing file, emptying the image', spawn: true, build: chain, args: ['commit', 'top.qcow2'], expectCode: 0 },
  { name: '-d keeps the image', build: chain, args: ['commit', '-d', 'top.qcow2'], expectCode: 0 },
  { name: '-p shows progress', build: chain, args: ['commit', '-p', 'top.qcow2'], expectCode: 0 },
  { name: '-b BASE skipping a level', build: chain, args: ['commit', '-b', 'base.qcow2', 'top.qcow2'], expectCode: 0 },
  { name: '-b ./BASE', build: chain, args: ['commit', '-b', './base.qcow2', 'top.qcow2'], expectCode: 0 },
  {
    name: '-b with an absolute name',
    build: chain,
    args: (dir) => ['commit', '-b', path.join(dir, 'base.qcow2'), 'top.qcow2'],
    expectCode: 0,
  },
  { name: '-b names the direct backing file', build: chain, args: ['commit', '-b', 'mid.qcow2', 'top.qcow2'], expectCode: 0 },
  {
    name: '-b resolved against the image folder',
    build: inSubfolder,
    args: ['commit', '-b', 'base.qcow2', 'sub/top.qcow2'],
    expectCode: 0,
  },
  {
    name: '-b relative to the current folder is not found',
    build: inSubfolder,
    args: ['commit', '-b', 'sub/base.qcow2', 'sub/top.qcow2'],
    expectCode: 1,
  },
  { name: '-b not in the chain', build: chain, args: ['commit', '-b', 'nothere.qcow2', 'top.qcow2'], expectCode: 1 },
  { name: '-b the image itself', build: chain, args: ['commit', '-b', 'top.qcow2', 'top.qcow2'], expectCode: 1 },
  { name: 'no backing file', spawn: true, build: chain, args: ['commit', 'base.qcow2'], expectCode: 1 },
  {
    name: 'raw image (probed): no backing file',
    build: (d) => create(d, 'r.raw', M, {}, { fmt: 'raw' }),
    args: ['commit', 'r.raw'],
    expectCode: 1,
  },
  { name: 'base grows to the image size', build: smallBase, args: ['commit', 't.qcow2'], expectCode: 0 },
  { name: 'raw base grows to the image size', build: smallRawBase, args: ['commit', 't.qcow2'], expectCode: 0 },
  { name: 'bad rate limit', build: chain, args: ['commit', '-r', 'abc', 'top.qcow2'], expectCode: 1 },
  { name: 'rate limit accepted', build: chain, args: ['commit', '-r', '1M', '-q', 'top.qcow2'], expectCode: 0 },
  { name: 'bad cache mode', build: chain, args: ['commit', '-t', 'bogus', 'top.qcow2'], expectCode: 1 },
];

describe.concurrent('commit', () => {
  for (const c of cases) it(c.name, () => runTwin(c).then(() => undefined));
});

/**
 * The emptied top image is the file qemu-img leaves, byte for byte: rebuilt from scratch (v3
 * holding only its active state: header, refcount table and block, zeroed L1, nothing after),
 * or, otherwise, every active cluster discarded with its L2 tables kept.
 */
describe('commit: the emptied top image has qemu-img\'s bytes, the base its allocation', () => {
  const tops: Array<[string, Record<string, string>]> = [
    ['v3', {}],
    ['v3, lazy refcounts', { lazy_refcounts: 'on' }],
    ['v2 (every cluster discarded)', { compat: '0.10' }],
    ['v3, 4 KiB clusters', { cluster_size: '4096' }],
  ];
  for (const [name, opts] of tops) {
    it(name, async () => {
      const d = makeTmpDir('qk-commit-bytes-');
      try {
        for (const who of ['q', 'k']) {
          const dir = path.join(d, who);
          fs.mkdirSync(dir);
          await create(dir, 'base.qcow2', '64M');
          await io(dir, 'base.qcow2', ['write -q -P 1 0 3M', 'write -q -P 2 10M 5M']);
          await create(dir, 'top.qcow2', '64M', opts, { backing: 'base.qcow2' });
          await io(dir, 'top.qcow2', ['write -q -P 7 1M 4M', 'write -q -z 12M 1M', 'write -q -P 8 40M 64k']);
          if (who === 'q') await img(dir, ['commit', '-q', 'top.qcow2']);
          else expect((await qk(['commit', '-q', 'top.qcow2'], { cwd: dir })).code).toBe(0);
        }
        expectSameBytes(fs.readFileSync(path.join(d, 'k', 'top.qcow2')), fs.readFileSync(path.join(d, 'q', 'top.qcow2')));
        // The base: the same allocation (zeros written with unmap, as qemu-img's commit job), but
        // where new data lands depends on the order of qemu's concurrent copy requests.
        const map = async (who: string) =>
          (JSON.parse((await qemuImg(['map', '--output=json', 'base.qcow2'], { cwd: path.join(d, who) })).stdout) as Array<Record<string, unknown>>).map(
            ({ offset: _o, ...rest }) => rest,
          );
        const merge = (m: Array<Record<string, unknown>>) =>
          m.reduce<Array<Record<string, unknown>>>((out, e) => {
            const last = out[out.length - 1];
            if (last && JSON.stringify({ ...last, start: 0, length: 0 }) === JSON.stringify({ ...e, start: 0, length: 0 })) {
              last.length = (last.length as number) + (e.length as number);
            } else out.push({ ...e });
            return out;
          }, []);
        expect(merge(await map('k'))).toEqual(merge(await map('q')));
      } finally {
        removeTmpDir(d);
      }
    });
  }
});
