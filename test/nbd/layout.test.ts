/**
 * Writes through the NBD server lay the image out as qemu-nbd does, byte for byte: the same
 * requests (writes, zeroing aligned and ragged, with and without unmap, discards of whole and
 * partial clusters — discarded clusters discarded in the file, with --discard=unmap — and a random
 * mix of writes and zeroing: new clusters placed after the ones before them, refcount blocks and
 * L2 tables where QEMU's allocator puts them) sent by qemu-io to qemu-nbd and to qcowkit nbd, on
 * twin images. Not covered: clusters a discard frees
 * and a later write reuses before the next flush (qcowkit applies frees once the dropping of the
 * references is durable; QEMU frees at once).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { create } from '../helpers/build.js';
import { expectSameBytes } from '../helpers/compare.js';
import { makeTmpDir, prng, removeTmpDir } from '../helpers/files.js';
import { must, qemuIo } from '../helpers/proc.js';
import { startServer, stopAll } from './harness.js';

const K = 1024;
const M = 1024 * K;

const commands = [
  `write -P 1 ${10 * M} ${M}`,
  `write -P 2 0 ${64 * K}`,
  `write -P 3 ${32 * K} ${8 * K}`,
  // ragged zeroing: into unallocated space (whole units zeroed), into data (zero bytes written)
  `write -z ${39 * M + 300 * 512} ${100 * K}`,
  `write -z ${10 * M + 7 * 512} ${3 * K}`,
  `write -z ${10 * M + 128 * K} ${128 * K}`,
  `write -z -u ${10 * M + 512 * K} ${192 * K}`,
  `write -P 4 ${50 * M} ${3 * M}`,
  `write -P 5 ${5 * M} ${100 * K}`,
  `write -z -u ${5 * M + 512} ${50 * K}`,
  // discards last: whole clusters, and partial ones (ignored)
  `discard ${50 * M + 3 * 512} ${M}`,
  `discard ${5 * M} ${4 * K}`,
  `discard ${11 * M - 64 * K} ${64 * K}`,
];

/** A random mix of writes (1 sector to 1.5 MiB, any sector) and zeroing, the same for both servers. */
function randomCommands(seed: number, count: number): string[] {
  const next = prng(seed);
  const sizes = [512, 4096, 64 * K, 100 * K, M, 3000 * 512];
  const out: string[] = [];
  for (let i = 0; i < count; i++) {
    const off = (next() % ((60 * M) / 512)) * 512;
    const len = sizes[next() % sizes.length]!;
    out.push(next() % 10 < 7 ? `write -P ${(i % 250) + 1} ${off} ${len}` : `write -z ${off} ${len}`);
  }
  return out;
}

afterAll(async () => {
  await stopAll();
});

describe.each([
  ['defaults', {}],
  ['4 KiB clusters', { cluster_size: 4096 }],
  ['512-byte clusters', { cluster_size: 512 }],
  ['extended L2', { extended_l2: 'on' }],
  ['compat=0.10', { compat: '0.10' }],
])('NBD writes lay the file out as qemu-nbd (%s)', (_name, opts) => {
  it.each([
    ['zeroing and discard', commands],
    ['200 random writes and zeroings', randomCommands(23, 200)],
  ])('%s: same bytes', async (_what, cmds) => {
    const dir = makeTmpDir('qk-nbd-layout-');
    try {
      for (const f of ['q.qcow2', 'k.qcow2']) await create(dir, f, 64 * M, opts);
      for (const qemu of [true, false]) {
        const f = qemu ? 'q.qcow2' : 'k.qcow2';
        const s = await startServer(['-t', '--discard=unmap', '-f', 'qcow2', f], { dir, unix: true, qemu });
        const args = ['-f', 'raw'];
        for (const c of cmds) args.push('-c', c);
        await must(qemuIo([...args, s.uri()], { cwd: dir }));
        expect((await s.stop()).code).toBe(0);
      }
      expectSameBytes(fs.readFileSync(path.join(dir, 'k.qcow2')), fs.readFileSync(path.join(dir, 'q.qcow2')));
    } finally {
      removeTmpDir(dir);
    }
  });
});
