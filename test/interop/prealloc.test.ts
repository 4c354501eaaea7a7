/**
 * preallocation=falloc gives the file its blocks (fallocate through the native addon), as qemu-img
 * does: the allocated size of our image is within a few clusters of qemu-img's, and both images
 * check clean. Where the file system cannot preallocate, both stay sparse and are compared as such.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { qemuImg, qk } from '../helpers/proc.js';

let root: string;
beforeAll(() => {
  root = makeTmpDir('qk-prealloc-');
});
afterAll(() => removeTmpDir(root));

const allocated = (f: string) => fs.statSync(f).blocks * 512;

describe('create -o preallocation=falloc', () => {
  it.each([
    ['raw', [] as string[]],
    ['qcow2', []],
    ['qcow2', ['-o', 'cluster_size=4096']],
    ['qcow2', ['-o', 'compat=0.10']],
  ])('%s %s: allocated like qemu-img', async (fmt, extra) => {
    const size = 32 << 20;
    const theirs = path.join(root, `q-${fmt}-${extra.join('')}.img`);
    const ours = path.join(root, `o-${fmt}-${extra.join('')}.img`);
    const args = ['create', '-q', '-f', fmt, ...extra, '-o', 'preallocation=falloc'];
    expect((await qemuImg([...args, theirs, String(size)])).code).toBe(0);
    const r = await qk([...args, ours, String(size)]);
    expect(r.code, r.stderr).toBe(0);
    expect(fs.statSync(ours).size).toBe(fs.statSync(theirs).size);
    const want = allocated(theirs);
    expect(Math.abs(allocated(ours) - want)).toBeLessThanOrEqual(512 * 1024);
    if (fmt === 'qcow2') {
      const c = await qemuImg(['check', ours]);
      expect(c.code, c.stdout + c.stderr).toBe(0);
    }
  });
});
