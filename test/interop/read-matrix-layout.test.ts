/**
 * Interop matrix, part 1: image layouts. Cluster sizes 512 B .. 2 MiB, compat 0.10 / 1.1,
 * refcount widths 1 / 16 / 64, odd virtual sizes, preallocation, dirty and corrupt flags, raw images.
 * qemu-img is the oracle for every expected output.
 */
import * as path from 'node:path';
import { create, io, mixedImage, mixedRawFile, mixedSize, randomFile, img } from '../helpers/build.js';
import { patchU32, patchU64, readU64 } from '../helpers/files.js';
import { EXT, H, headerExtensions } from '../helpers/qcow2.js';
import { defineMatrix, type Fixture } from '../helpers/matrix.js';

const KiB = 1024;
const MiB = 1024 * 1024;

const fixtures: Fixture[] = [
  ...[512, 4 * KiB, 64 * KiB, 2 * MiB].map(
    (cs): Fixture => ({
      name: `cluster_size=${cs}`,
      image: 'img.qcow2',
      build: (dir) => mixedImage(dir, 'img.qcow2', cs),
    }),
  ),
  {
    name: 'compat=0.10 64k',
    image: 'img.qcow2',
    fmt: 'qcow2',
    build: (dir) => mixedImage(dir, 'img.qcow2', 64 * KiB, { compat: '0.10' }),
  },
  {
    name: 'compat=0.10 512',
    image: 'img.qcow2',
    build: (dir) => mixedImage(dir, 'img.qcow2', 512, { compat: '0.10' }),
  },
  {
    name: 'compat=1.1 4k',
    image: 'img.qcow2',
    build: (dir) => mixedImage(dir, 'img.qcow2', 4 * KiB, { compat: '1.1' }),
  },
  {
    name: 'refcount_bits=1',
    image: 'img.qcow2',
    build: (dir) => mixedImage(dir, 'img.qcow2', 64 * KiB, { refcount_bits: 1 }),
  },
  {
    name: 'refcount_bits=16 4k',
    image: 'img.qcow2',
    build: (dir) => mixedImage(dir, 'img.qcow2', 4 * KiB, { refcount_bits: 16 }),
  },
  {
    name: 'refcount_bits=64',
    image: 'img.qcow2',
    build: (dir) => mixedImage(dir, 'img.qcow2', 64 * KiB, { refcount_bits: 64 }),
  },
  {
    name: 'refcount_bits=1 512',
    image: 'img.qcow2',
    build: (dir) => mixedImage(dir, 'img.qcow2', 512, { refcount_bits: 1 }),
  },
  {
    // Virtual size not a multiple of the cluster size; writes touching the partial last cluster.
    name: 'odd virtual size',
    image: 'odd.qcow2',
    build: async (dir) => {
      const size = 5 * MiB + 3 * 512;
      await create(dir, 'odd.qcow2', size);
      await io(dir, 'odd.qcow2', [
        `write -q -P 0x71 ${size - 1000} 1000`,
        `write -q -P 0x72 ${5 * MiB - 10} 20`,
        `write -q -z ${size - 600} 100`,
        `write -q -P 0x73 0 513`,
      ]);
    },
  },
  {
    name: 'random data converted in (4k clusters)',
    image: 'rnd.qcow2',
    build: async (dir) => {
      mixedRawFile(dir, 'src.raw', 11, 3 * MiB + 4 * KiB, 24 * KiB);
      await img(dir, ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4k', 'src.raw', 'rnd.qcow2']);
    },
  },
  {
    name: 'random data converted in (512 clusters, v2)',
    image: 'rnd.qcow2',
    build: async (dir) => {
      mixedRawFile(dir, 'src.raw', 12, 1 * MiB, 1536);
      await img(dir, ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512,compat=0.10', 'src.raw', 'rnd.qcow2']);
    },
  },
  {
    // Many L1 entries, most of them empty: 4k clusters -> one L2 table covers 2 MiB.
    name: 'sparse with many L1 entries',
    image: 'sparse.qcow2',
    build: async (dir) => {
      randomFile(dir, 'rnd.bin', 3, 64 * KiB);
      await create(dir, 'sparse.qcow2', 64 * MiB, { cluster_size: 4096 });
      await io(dir, 'sparse.qcow2', [
        `write -q -P 0x01 ${2 * MiB - 2048} 4096`,
        `write -q -s rnd.bin ${17 * MiB + 123} 40000`,
        `write -q -P 0x02 ${40 * MiB} 4096`,
        `write -q -z ${40 * MiB + 1024} 1024`,
        `write -q -P 0x03 ${64 * MiB - 4096} 4096`,
      ]);
    },
  },
  {
    name: 'zero writes: -z, -z -u, partial, discard',
    image: 'zero.qcow2',
    build: async (dir) => {
      await create(dir, 'zero.qcow2', 4 * MiB);
      await io(dir, 'zero.qcow2', [
        `write -q -P 0x41 0 ${1 * MiB}`,
        `write -q -z 0 64k`, // zero cluster keeping its allocation
        `write -q -z -u 64k 64k`, // zero cluster, unmapped
        `write -q -z 192k 100`, // partial: data cluster with zeros inside
        `discard -q 256k 128k`,
        `discard -q 512k 1000`, // unaligned discard: no effect
        `write -q -z ${2 * MiB} ${1 * MiB}`, // zero over unallocated
      ]);
    },
  },
  {
    name: 'v2 zero writes and discards',
    image: 'zero.qcow2',
    build: async (dir) => {
      await create(dir, 'zero.qcow2', 4 * MiB, { compat: '0.10' });
      await io(dir, 'zero.qcow2', [
        `write -q -P 0x42 0 ${1 * MiB}`,
        `write -q -z 0 64k`,
        `write -q -z 192k 100`,
        `discard -q 256k 128k`,
        `write -q -z ${2 * MiB} 64k`,
      ]);
    },
  },
  {
    name: 'preallocation=metadata',
    image: 'pre.qcow2',
    build: async (dir) => {
      await create(dir, 'pre.qcow2', 8 * MiB, { preallocation: 'metadata' });
      await io(dir, 'pre.qcow2', [`write -q -P 0x5a 100k 200k`, `write -q -z 1M 64k`, `write -q -P 0x5b ${8 * MiB - 512} 512`]);
    },
  },
  {
    name: 'preallocation=metadata 4k v2',
    image: 'pre.qcow2',
    build: async (dir) => {
      await create(dir, 'pre.qcow2', 2 * MiB, { preallocation: 'metadata', cluster_size: 4096, compat: '0.10' });
      await io(dir, 'pre.qcow2', [`write -q -P 0x5c 5000 9000`]);
    },
  },
  {
    name: 'preallocation=falloc',
    image: 'pre.qcow2',
    build: async (dir) => {
      await create(dir, 'pre.qcow2', 2 * MiB, { preallocation: 'falloc' });
      await io(dir, 'pre.qcow2', [`write -q -P 0x5d 70000 1000`]);
    },
  },
  {
    // lazy refcounts + crash (qemu-io abort) leaves the dirty bit set.
    name: 'dirty (lazy_refcounts, not cleanly closed)',
    image: 'dirty.qcow2',
    build: async (dir) => {
      await create(dir, 'dirty.qcow2', 4 * MiB, { lazy_refcounts: true });
      const { qemuIo } = await import('../helpers/proc.js');
      const r = await qemuIo(['-c', 'write -q -P 0x61 64k 192k', '-c', 'abort', 'dirty.qcow2'], { cwd: dir });
      if (r.signal !== 'SIGABRT' && r.code !== 134) throw new Error(`qemu-io abort did not abort: ${r.code} ${r.signal}`);
      if ((readU64(path.join(dir, 'dirty.qcow2'), H.incompatibleFeatures) & 1n) === 0n) throw new Error('dirty bit not set');
    },
  },
  {
    name: 'corrupt bit set',
    image: 'corrupt.qcow2',
    build: async (dir) => {
      await mixedImage(dir, 'corrupt.qcow2', 64 * KiB);
      const f = path.join(dir, 'corrupt.qcow2');
      patchU64(f, H.incompatibleFeatures, readU64(f, H.incompatibleFeatures) | 2n);
    },
  },
  {
    name: 'unknown compatible and autoclear bits',
    image: 'bits.qcow2',
    build: async (dir) => {
      await mixedImage(dir, 'bits.qcow2', 64 * KiB);
      const f = path.join(dir, 'bits.qcow2');
      patchU64(f, H.compatibleFeatures, 1n << 7n);
      patchU64(f, H.autoclearFeatures, 1n << 9n);
    },
  },
  {
    // An unknown header extension must be skipped (here: the feature name table renamed).
    name: 'unknown header extension',
    image: 'ext.qcow2',
    build: async (dir) => {
      await mixedImage(dir, 'ext.qcow2', 64 * KiB);
      const f = path.join(dir, 'ext.qcow2');
      const ft = headerExtensions(f).find((e) => e.type === EXT.featureTable);
      if (!ft) throw new Error('no feature table extension');
      patchU32(f, ft.offset, 0x12345678);
    },
  },
  {
    name: 'raw image with holes (-f raw)',
    image: 'disk.raw',
    fmt: 'raw',
    build: async (dir) => {
      randomFile(dir, 'rnd.bin', 5, 300 * KiB);
      await create(dir, 'disk.raw', 6 * MiB, {}, { fmt: 'raw' });
      await io(dir, 'disk.raw', [`write -q -s rnd.bin ${1 * MiB + 5} ${300 * KiB}`, `write -q -P 0x77 ${5 * MiB} 4096`], 'raw');
    },
  },
  {
    name: 'empty image',
    image: 'empty.qcow2',
    build: (dir) => create(dir, 'empty.qcow2', 1 * MiB),
  },
  {
    name: 'fully written small image (size 1000 -> 1024)',
    image: 'tiny.qcow2',
    build: async (dir) => {
      await create(dir, 'tiny.qcow2', 1000, { cluster_size: 512 });
      await io(dir, 'tiny.qcow2', ['write -q -P 0x7e 0 1024']);
    },
  },
];

// Keep the unused import lint-quiet when fixtures change.
void mixedSize;

defineMatrix('read matrix: layouts', fixtures);
