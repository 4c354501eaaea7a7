/**
 * Interop matrix, part 2: compressed clusters (zlib and zstd, several cluster sizes) and
 * extended L2 entries (subcluster allocation, zero writes, overlays). qemu-img is the oracle.
 */
import { create, img, io, mixedRawFile, randomFile } from '../helpers/build.js';
import { defineMatrix, type Fixture } from '../helpers/matrix.js';

const KiB = 1024;
const MiB = 1024 * 1024;

function compressed(name: string, cs: number, type: 'zlib' | 'zstd', size: number, chunk: number, extra = ''): Fixture {
  return {
    name,
    image: 'c.qcow2',
    build: async (dir) => {
      mixedRawFile(dir, 'src.raw', cs % 1000, size, chunk);
      const o = `cluster_size=${cs},compression_type=${type}${extra}`;
      await img(dir, ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', o, 'src.raw', 'c.qcow2']);
    },
  };
}

const fixtures: Fixture[] = [
  compressed('zlib 64k', 64 * KiB, 'zlib', 4 * MiB, 48 * KiB),
  compressed('zlib 4k', 4 * KiB, 'zlib', 2 * MiB, 6 * KiB),
  compressed('zlib 512', 512, 'zlib', 512 * KiB, 700),
  compressed('zlib 2M', 2 * MiB, 'zlib', 10 * MiB, 1536 * KiB),
  compressed('zstd 64k', 64 * KiB, 'zstd', 4 * MiB, 40 * KiB),
  compressed('zstd 4k', 4 * KiB, 'zstd', 2 * MiB, 5 * KiB),
  compressed('zstd 2M', 2 * MiB, 'zstd', 8 * MiB, 1024 * KiB),
  compressed('zlib 64k refcount_bits=64', 64 * KiB, 'zlib', 2 * MiB, 20 * KiB, ',refcount_bits=64'),
  {
    name: 'zlib compat=0.10',
    image: 'c.qcow2',
    build: async (dir) => {
      mixedRawFile(dir, 'src.raw', 21, 3 * MiB, 30 * KiB);
      await img(dir, ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compat=0.10', 'src.raw', 'c.qcow2']);
    },
  },
  {
    // A 512-byte image compressed: the only cluster is a zero-padded partial cluster.
    name: 'compressed 512-byte image',
    image: 'c.qcow2',
    build: async (dir) => {
      mixedRawFile(dir, 'src.raw', 22, 512, 512);
      await img(dir, ['convert', '-c', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'c.qcow2']);
    },
  },
  {
    // Compressed clusters partially overwritten (COW from compressed), zeroed, discarded, plus
    // qemu-io compressed writes into unallocated clusters.
    name: 'compressed then rewritten (zstd)',
    image: 'c.qcow2',
    build: async (dir) => {
      mixedRawFile(dir, 'src.raw', 23, 2 * MiB, 64 * KiB);
      await img(dir, ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', 'src.raw', 'c.qcow2']);
      await img(dir, ['resize', '-q', 'c.qcow2', String(4 * MiB)]);
      await io(dir, 'c.qcow2', [
        'write -q -P 0x31 100 1000',
        'write -q -P 0x32 65000 1000',
        'write -q -z 192k 64k',
        'discard -q 3M 64k',
        'write -q -c -P 0x33 2M 64k',
        'write -q -c -P 0x34 2112k 128k',
        'write -q -P 0x35 2148k 100',
      ]);
    },
  },
  {
    name: 'qemu-io compressed writes (zlib, 4k)',
    image: 'c.qcow2',
    build: async (dir) => {
      randomFile(dir, 'rnd.bin', 24, 8 * KiB);
      await create(dir, 'c.qcow2', 1 * MiB, { cluster_size: 4096 });
      await io(dir, 'c.qcow2', [
        'write -q -c -P 0x41 0 4k',
        'write -q -c -P 0x42 4k 12k',
        'write -q -c -s rnd.bin 64k 8k', // incompressible: stored uncompressed
        'write -q -c -P 0 128k 4k',
        'write -q -P 0x43 6k 10',
      ]);
    },
  },
  // ---------------------------------------------------------------- extended L2 entries
  ...[64 * KiB, 128 * KiB].map(
    (cs): Fixture => ({
      name: `extended_l2 cluster_size=${cs / KiB}k`,
      image: 'x.qcow2',
      build: async (dir) => {
        randomFile(dir, 'rnd.bin', 25, 16 * KiB);
        const sub = cs / 32;
        await create(dir, 'x.qcow2', 4 * MiB, { extended_l2: true, cluster_size: cs });
        await io(dir, 'x.qcow2', [
          'write -q -P 1 4k 4k',
          'write -q -z 64k 8k',
          `write -q -P 2 ${2 * cs + sub - 100} 300`, // straddles a subcluster boundary
          `write -q -s rnd.bin ${3 * cs - 5000} 10000`, // straddles a cluster boundary
          `write -q -z ${3 * cs + 100} 200`, // partial zero inside written subclusters
          `write -q -z -u ${5 * cs} ${4 * sub}`,
          `write -q -P 3 ${6 * cs} ${cs}`,
          `write -q -z ${6 * cs + 3 * sub} ${2 * sub}`, // zero subclusters inside a data cluster
          `discard -q ${7 * cs} ${cs}`,
          `write -q -c -P 4 ${8 * cs} ${cs}`,
          `write -q -P 5 ${8 * cs + 10} 10`, // rewrite inside a compressed cluster
          `write -q -P 6 ${4 * MiB - 1000} 1000`,
        ]);
      },
    }),
  ),
  {
    name: 'extended_l2 32k zstd compressed',
    image: 'x.qcow2',
    build: async (dir) => {
      mixedRawFile(dir, 'src.raw', 26, 1 * MiB, 20 * KiB);
      await img(dir, [
        'convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=32k,compression_type=zstd', 'src.raw', 'x.qcow2',
      ]);
      await io(dir, 'x.qcow2', ['write -q -P 7 33k 1k', 'write -q -z 100k 2k']);
    },
  },
  {
    // Unallocated subclusters of an allocated cluster read from the backing file.
    name: 'extended_l2 overlay on a qcow2 backing file',
    image: 'top.qcow2',
    chain: true,
    build: async (dir) => {
      randomFile(dir, 'rnd.bin', 27, 256 * KiB);
      await create(dir, 'base.qcow2', 2 * MiB);
      await io(dir, 'base.qcow2', ['write -q -s rnd.bin 0 256k', 'write -q -P 0x10 1M 512k']);
      await create(dir, 'top.qcow2', 2 * MiB, { extended_l2: true, cluster_size: 128 * KiB }, { backing: 'base.qcow2' });
      await io(dir, 'top.qcow2', [
        'write -q -P 0x20 4k 4k',
        'write -q -P 0x21 130000 9000',
        'write -q -z 8k 4k',
        'write -q -z 1100k 8k',
        'discard -q 1152k 128k',
        'write -q -P 0x22 1300k 1',
      ]);
    },
  },
  {
    name: 'extended_l2 overlay on a raw backing file',
    image: 'top.qcow2',
    chain: true,
    build: async (dir) => {
      randomFile(dir, 'base.raw', 28, 1 * MiB);
      await create(dir, 'top.qcow2', 3 * MiB, { extended_l2: true, cluster_size: 64 * KiB }, { backing: 'base.raw', backingFmt: 'raw' });
      await io(dir, 'top.qcow2', ['write -q -P 0x23 2k 2k', 'write -q -z 70k 3k', 'write -q -P 0x24 1000k 100k']);
    },
  },
];

defineMatrix('read matrix: compressed clusters and extended L2', fixtures);
