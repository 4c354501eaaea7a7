/**
 * convert -O qcow2 lays an image out as qemu-img does: qemu-img writes in guest order, so its
 * clusters (data and L2 tables) land in guest order; qcowkit hands its writes to the image in
 * guest order too (they still run concurrently), places a new refcount block after the run that
 * needs it, and (extended L2) writes only allocated subclusters, so for the same source and
 * options the two files are byte for byte the same — not only equal in content.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { create, io, mixedRawFile } from '../helpers/build.js';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { must, qemuImg, qk } from '../helpers/proc.js';

let dir: string;

beforeAll(async () => {
  dir = makeTmpDir('qk-layout-');
  // a raw source whose data crosses many 4 KiB-cluster L2 tables (2 MiB each) and has holes
  mixedRawFile(dir, 'mixed.raw', 7, 24 << 20, 320 << 10);
  // an overlay whose backing file supplies part of the data (reads at different speeds)
  await create(dir, 'base.qcow2', 16 << 20);
  await io(dir, 'base.qcow2', ['write -q -P 0x11 0 3M', 'write -q -P 0x12 9M 2M']);
  await must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', path.join(dir, 'top.qcow2')]));
  await io(dir, 'top.qcow2', ['write -q -P 0x21 512k 1M', 'write -q -z 2M 1M', 'write -q -P 0x22 5M 5M']);
}, 60_000);
afterAll(() => removeTmpDir(dir));

// Small clusters make the refcount table grow during the copy (past everything described so
// far, with new blocks before it; the old table freed), once or several times.
const cases: Array<[string, string[]]> = [
  ['mixed.raw', []],
  ['mixed.raw', ['-o', 'cluster_size=4096']],
  ['mixed.raw', ['-o', 'cluster_size=4096,refcount_bits=1']],
  ['mixed.raw', ['-o', 'compat=0.10,cluster_size=8192']],
  ['mixed.raw', ['-o', 'lazy_refcounts=on,cluster_size=16384']],
  ['top.qcow2', []],
  ['top.qcow2', ['-o', 'compat=0.10']],
  ['top.qcow2', ['-o', 'cluster_size=4096']],
  ['top.qcow2', ['-o', 'preallocation=metadata']],
  ['top.qcow2', ['-o', 'compression_type=zstd,cluster_size=32768']],
  ['top.qcow2', ['-o', 'extended_l2=on,cluster_size=1M']],
  ['mixed.raw', ['-o', 'extended_l2=on,cluster_size=256k']],
  ['mixed.raw', ['-o', 'cluster_size=512']],
  ['mixed.raw', ['-o', 'cluster_size=512,refcount_bits=64']],
  ['top.qcow2', ['-o', 'cluster_size=1024,refcount_bits=32']],
];

describe('convert -O qcow2: the same bytes as qemu-img', () => {
  for (const [src, opts] of cases) {
    it(`${src} ${opts.join(' ') || '(defaults)'}`, async () => {
      const tag = `${src}-${opts.join('_')}`.replace(/[^\w.-]/g, '_');
      const q = path.join(dir, `${tag}.q.qcow2`);
      const k = path.join(dir, `${tag}.k.qcow2`);
      await must(qemuImg(['convert', '-O', 'qcow2', ...opts, path.join(dir, src), q]));
      const r = await qk(['convert', '-O', 'qcow2', ...opts, path.join(dir, src), k]);
      expect(r.code, r.stderr).toBe(0);
      const a = fs.readFileSync(q);
      const b = fs.readFileSync(k);
      let first = -1;
      for (let i = 0; i < Math.min(a.length, b.length); i++) {
        if (a[i] !== b[i]) {
          first = i;
          break;
        }
      }
      expect({ length: b.length, firstDifference: first }).toEqual({ length: a.length, firstDifference: -1 });
    });
  }
});
