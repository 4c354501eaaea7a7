/**
 * Interop matrix, part 3: backing chains (relative names in subfolders, raw at the bottom,
 * differing sizes), internal snapshots, external data files, persistent bitmaps.
 * qemu-img is the oracle.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { create, img, io, mixedImage, randomFile } from '../helpers/build.js';
import { defineMatrix, type Fixture } from '../helpers/matrix.js';
import { EXT, removeHeaderExtension } from '../helpers/qcow2.js';

const KiB = 1024;
const MiB = 1024 * 1024;

const fixtures: Fixture[] = [
  {
    // sub/top.qcow2 -> mid/mid.qcow2 -> ../low.qcow2 -> base.raw, every name relative to its
    // image's folder; each layer larger than the one below (reads past a backing file's end are zero).
    name: 'four-layer chain, relative names, raw bottom',
    image: 'sub/top.qcow2',
    chain: true,
    build: async (dir) => {
      fs.mkdirSync(path.join(dir, 'sub/mid'), { recursive: true });
      randomFile(dir, 'sub/base.raw', 31, 3 * MiB);
      randomFile(dir, 'rnd.bin', 32, 256 * KiB);
      await create(dir, 'sub/low.qcow2', 4 * MiB, { cluster_size: 4096 }, { backing: 'base.raw', backingFmt: 'raw' });
      await io(dir, 'sub/low.qcow2', ['write -q -P 0x11 1M 64k', 'write -q -z 2M 8k', 'write -q -P 0x12 3M 1M']);
      await create(dir, 'sub/mid/mid.qcow2', 6 * MiB, { cluster_size: 64 * KiB }, { backing: '../low.qcow2', backingFmt: 'qcow2' });
      await io(dir, 'sub/mid/mid.qcow2', ['write -q -P 0x21 1040k 100', 'write -q -s rnd.bin 2500k 256k', 'write -q -z 3M 64k', 'write -q -P 0x22 5M 4k']);
      await create(dir, 'sub/top.qcow2', 8 * MiB, { cluster_size: 512 }, { backing: 'mid/mid.qcow2', backingFmt: 'qcow2' });
      await io(dir, 'sub/top.qcow2', [
        'write -q -P 0x31 0 1000',
        'write -q -z 1041k 1k',
        'write -q -P 0x32 2600k 700',
        'discard -q 5M 4k',
        'write -q -P 0x33 7M 1M',
      ]);
    },
  },
  {
    name: 'v2 overlay on v3 base: zero writes and discards over backing data',
    image: 'top.qcow2',
    chain: true,
    build: async (dir) => {
      await mixedImage(dir, 'base.qcow2', 64 * KiB);
      await create(dir, 'top.qcow2', undefined, { compat: '0.10' }, { backing: 'base.qcow2' });
      await io(dir, 'top.qcow2', ['write -q -z 0 64k', 'write -q -z 200k 1000', 'discard -q 192k 64k', 'write -q -P 0x44 800k 64k']);
    },
  },
  {
    name: 'v3 overlay: zero writes and discards over backing data',
    image: 'top.qcow2',
    chain: true,
    build: async (dir) => {
      await mixedImage(dir, 'base.qcow2', 64 * KiB);
      await create(dir, 'top.qcow2', undefined, {}, { backing: 'base.qcow2' });
      await io(dir, 'top.qcow2', ['write -q -z 0 64k', 'write -q -z 200k 1000', 'discard -q 192k 64k', 'write -q -P 0x45 800k 64k']);
    },
  },
  {
    name: 'overlay smaller than its backing file',
    image: 'top.qcow2',
    chain: true,
    build: async (dir) => {
      randomFile(dir, 'base.raw', 33, 4 * MiB);
      await create(dir, 'top.qcow2', 2 * MiB - 512, {}, { backing: 'base.raw', backingFmt: 'raw' });
      await io(dir, 'top.qcow2', ['write -q -P 0x46 1M 10k']);
    },
  },
  {
    name: 'backing file without a recorded format (probed)',
    image: 'top.qcow2',
    chain: true,
    build: async (dir) => {
      await mixedImage(dir, 'base.qcow2', 4 * KiB);
      await create(dir, 'top.qcow2', undefined, {}, { backing: 'base.qcow2' });
      await io(dir, 'top.qcow2', ['write -q -P 0x47 10k 10k']);
      removeHeaderExtension(path.join(dir, 'top.qcow2'), EXT.backingFormat);
    },
  },
  {
    name: 'absolute backing file name',
    image: 'top.qcow2',
    chain: true,
    build: async (dir) => {
      randomFile(dir, 'base.raw', 34, 1 * MiB);
      await create(dir, 'top.qcow2', 1 * MiB, {}, { backing: path.join(dir, 'base.raw'), backingFmt: 'raw' });
      await io(dir, 'top.qcow2', ['write -q -P 0x48 300k 1k']);
    },
  },
  // ---------------------------------------------------------------- internal snapshots
  {
    name: 'two internal snapshots with differing data',
    image: 'snap.qcow2',
    snapshots: ['first', 'second'],
    build: async (dir) => {
      randomFile(dir, 'rnd.bin', 35, 128 * KiB);
      await create(dir, 'snap.qcow2', 4 * MiB);
      await io(dir, 'snap.qcow2', ['write -q -P 0x01 0 256k', 'write -q -s rnd.bin 1M 128k']);
      await img(dir, ['snapshot', '-c', 'first', 'snap.qcow2']);
      await io(dir, 'snap.qcow2', ['write -q -P 0x02 64k 64k', 'write -q -z 1M 64k', 'write -q -P 0x03 3M 100k']);
      await img(dir, ['snapshot', '-c', 'second', 'snap.qcow2']);
      await io(dir, 'snap.qcow2', ['write -q -P 0x04 0 4k', 'discard -q 3M 64k', 'write -q -P 0x05 2M 1k']);
    },
  },
  {
    // Snapshot taken at 2 MiB, image grown afterwards; 512-byte clusters.
    name: 'snapshots across a resize (512-byte clusters)',
    image: 'snap.qcow2',
    snapshots: ['small', 'big'],
    build: async (dir) => {
      await create(dir, 'snap.qcow2', 2 * MiB, { cluster_size: 512 });
      await io(dir, 'snap.qcow2', ['write -q -P 0x06 1000 5000']);
      await img(dir, ['snapshot', '-c', 'small', 'snap.qcow2']);
      await img(dir, ['resize', '-q', 'snap.qcow2', String(3 * MiB)]);
      await io(dir, 'snap.qcow2', ['write -q -P 0x07 2500k 10k', 'write -q -P 0x08 2000 100']);
      await img(dir, ['snapshot', '-c', 'big', 'snap.qcow2']);
      await io(dir, 'snap.qcow2', ['write -q -P 0x09 0 512']);
    },
  },
  {
    name: 'snapshots in a v2 image with refcount sharing',
    image: 'snap.qcow2',
    snapshots: ['a', 'b'],
    build: async (dir) => {
      await create(dir, 'snap.qcow2', 1 * MiB, { compat: '0.10', cluster_size: 4096 });
      await io(dir, 'snap.qcow2', ['write -q -P 0x0c 0 100k']);
      await img(dir, ['snapshot', '-c', 'a', 'snap.qcow2']);
      await io(dir, 'snap.qcow2', ['write -q -P 0x0d 50k 100k', 'write -q -z 0 8k']);
      await img(dir, ['snapshot', '-c', 'b', 'snap.qcow2']);
      await io(dir, 'snap.qcow2', ['discard -q 0 64k']);
    },
  },
  {
    name: 'snapshot of a compressed image',
    image: 'snap.qcow2',
    snapshots: ['c'],
    build: async (dir) => {
      randomFile(dir, 'rnd.bin', 36, 64 * KiB);
      await create(dir, 'snap.qcow2', 1 * MiB, { cluster_size: 4096 });
      await io(dir, 'snap.qcow2', ['write -q -c -P 0x0a 0 64k', 'write -q -s rnd.bin 64k 64k']);
      await img(dir, ['snapshot', '-c', 'c', 'snap.qcow2']);
      await io(dir, 'snap.qcow2', ['write -q -P 0x0b 1k 1k', 'write -q -z 70k 4k']);
    },
  },
  // ---------------------------------------------------------------- external data files
  {
    name: 'external data file',
    image: 'ext.qcow2',
    build: async (dir) => {
      randomFile(dir, 'rnd.bin', 37, 100 * KiB);
      await create(dir, 'ext.qcow2', 4 * MiB, { data_file: 'd.raw' });
      await io(dir, 'ext.qcow2', ['write -q -P 0x51 0 64k', 'write -q -s rnd.bin 100k 100k', 'write -q -z 1M 64k', 'write -q -P 0x52 2M 1']);
    },
  },
  {
    name: 'external data file, data_file_raw=on',
    image: 'ext.qcow2',
    build: async (dir) => {
      randomFile(dir, 'rnd.bin', 38, 100 * KiB);
      await create(dir, 'ext.qcow2', 4 * MiB, { data_file: 'd.raw', data_file_raw: true, cluster_size: 4096 });
      await io(dir, 'ext.qcow2', ['write -q -P 0x53 0 64k', 'write -q -s rnd.bin 100k 100k', 'write -q -z 8k 4k', 'discard -q 1M 1M']);
    },
  },
  // ---------------------------------------------------------------- persistent bitmaps
  {
    name: 'persistent dirty bitmaps',
    image: 'bm.qcow2',
    build: async (dir) => {
      await mixedImage(dir, 'bm.qcow2', 64 * KiB);
      await img(dir, ['bitmap', '--add', 'bm.qcow2', 'bm0']);
      await img(dir, ['bitmap', '--add', '-g', '128k', '--disable', 'bm.qcow2', 'bm1']);
    },
  },
];

defineMatrix('read matrix: chains, snapshots, data files', fixtures);
