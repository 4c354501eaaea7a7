/**
 * Toolbox operations whose result is qemu-img's file byte for byte: each case builds the same
 * image twice (with qemu-img/qemu-io), runs the operation once with qemu-img and once with
 * qcowkit, and compares the files. (snapshot and commit have their own such tests.)
 *
 * resize: shrinking drops the clusters past the new end (discarded in the file), refcount blocks
 * that count nothing any more, and cuts the file after its last used cluster; falloc/full put new
 * refcount structures after the last used cluster, then every new data cluster in one area.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { expectSameBytes } from '../helpers/compare.js';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { describeResult, qk } from '../helpers/proc.js';
import { create, img, io } from './twin.js';

const M = 1024 * 1024;

interface LayoutCase {
  name: string;
  /** Build the inputs in `dir` (the image under test is `t.qcow2`). */
  build(dir: string): Promise<void>;
  /** The operation's arguments (run in `dir`). */
  args: string[];
}

async function withBase(dir: string, opts: Record<string, string> = {}): Promise<void> {
  await create(dir, 'b1.qcow2', 64 * M);
  await io(dir, 'b1.qcow2', ['write -q -P 1 0 3M', 'write -q -P 2 10M 5M']);
  await create(dir, 'b2.qcow2', 64 * M);
  await io(dir, 'b2.qcow2', ['write -q -P 5 0 8M']);
  await create(dir, 't.qcow2', 64 * M, opts, { backing: 'b1.qcow2' });
  await io(dir, 't.qcow2', ['write -q -P 7 1M 4M', 'write -q -z 12M 1M']);
}

async function plain(dir: string, opts: Record<string, string> = {}): Promise<void> {
  await create(dir, 't.qcow2', 64 * M, opts);
  await io(dir, 't.qcow2', ['write -q -P 1 0 3M', 'write -q -P 2 10M 5M', 'write -q -z 20M 1M', 'write -q -P 3 40M 64k']);
}

/** Data spread over the image, up to its end (for resize). */
async function spread(dir: string, opts: Record<string, string | number> = {}): Promise<void> {
  await create(dir, 't.qcow2', 64 * M, opts);
  await io(dir, 't.qcow2', ['write -q -P 1 0 3M', 'write -q -P 2 10M 5M', 'write -q -P 3 40M 64k', 'write -q -P 4 60M 4M']);
}

/** A leaked cluster: one refcount raised by hand. */
async function leaky(dir: string): Promise<void> {
  await plain(dir);
  const f = path.join(dir, 't.qcow2');
  const d = fs.readFileSync(f);
  const block = Number(d.readBigUInt64BE(Number(d.readBigUInt64BE(48))));
  d.writeUInt16BE(1, block + 2 * 200);
  fs.writeFileSync(f, d);
}

const cases: LayoutCase[] = [
  { name: 'rebase (safe) onto no backing file', build: (d) => withBase(d), args: ['rebase', '-q', '-b', '', 't.qcow2'] },
  { name: 'rebase (safe) onto another backing file', build: (d) => withBase(d), args: ['rebase', '-q', '-b', 'b2.qcow2', '-F', 'qcow2', 't.qcow2'] },
  { name: 'rebase -u', build: (d) => withBase(d), args: ['rebase', '-q', '-u', '-b', 'b2.qcow2', '-F', 'qcow2', 't.qcow2'] },
  { name: 'amend lazy_refcounts=on', build: (d) => plain(d), args: ['amend', '-o', 'lazy_refcounts=on', 't.qcow2'] },
  { name: 'amend compat=1.1 (from 0.10)', build: (d) => plain(d, { compat: '0.10' }), args: ['amend', '-o', 'compat=1.1', 't.qcow2'] },
  { name: 'amend compat=0.10 (zero clusters written out)', build: (d) => plain(d), args: ['amend', '-o', 'compat=0.10', 't.qcow2'] },
  { name: 'check -r all (a leak)', build: leaky, args: ['check', '-q', '-r', 'all', 't.qcow2'] },
  { name: 'resize: shrink, 64 KiB clusters', build: (d) => spread(d), args: ['resize', '-q', '--shrink', 't.qcow2', '32M'] },
  { name: 'resize: shrink, 4 KiB clusters', build: (d) => spread(d, { cluster_size: 4096 }), args: ['resize', '-q', '--shrink', 't.qcow2', '12M'] },
  {
    name: 'resize: shrink, 1 KiB clusters, 1-bit refcounts, almost everything gone',
    build: (d) => spread(d, { cluster_size: 1024, refcount_bits: 1 }),
    args: ['resize', '-q', '--shrink', 't.qcow2', '100k'],
  },
  { name: 'resize: preallocation=falloc', build: (d) => spread(d), args: ['resize', '-q', '--preallocation=falloc', 't.qcow2', '+16M'] },
  {
    name: 'resize: preallocation=full, 4 KiB clusters, 64-bit refcounts',
    build: (d) => spread(d, { cluster_size: 4096, refcount_bits: 64 }),
    args: ['resize', '-q', '--preallocation=full', 't.qcow2', '+8M'],
  },
  {
    name: 'resize: preallocation=falloc, 512-byte clusters',
    build: (d) => spread(d, { cluster_size: 512 }),
    args: ['resize', '-q', '--preallocation=falloc', 't.qcow2', '80M'],
  },
  {
    name: 'resize: preallocation=falloc, extended L2',
    build: (d) => spread(d, { extended_l2: 'on' }),
    args: ['resize', '-q', '--preallocation=falloc', 't.qcow2', '+24M'],
  },
];

describe.concurrent('qemu-img\'s bytes', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const d = makeTmpDir('qk-layout-');
      try {
        const q = path.join(d, 'q');
        const k = path.join(d, 'k');
        fs.mkdirSync(q);
        fs.mkdirSync(k);
        await c.build(q);
        await c.build(k);
        await img(q, c.args);
        const r = await qk(c.args, { cwd: k });
        expect(r.code, describeResult(r)).toBe(0);
        expectSameBytes(fs.readFileSync(path.join(k, 't.qcow2')), fs.readFileSync(path.join(q, 't.qcow2')));
      } finally {
        removeTmpDir(d);
      }
    });
  }
});
