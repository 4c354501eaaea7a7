/**
 * Hostile input, part 1: corrupted qcow2 headers and header extensions (offsets per notes §1,
 * limits per notes §11). QEMU's message for each is the phrase we expect where it rejects too.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { create, img, io, mixedImage } from '../helpers/build.js';
import { patchU32, patchU64, readU32, readU64 } from '../helpers/files.js';
import { defineHostile, type HostileCase } from '../helpers/hostile.js';
import { EXT, H, headerExtensions } from '../helpers/qcow2.js';

const KiB = 1024;
const MiB = 1024 * 1024;

/** A valid v3 image with data (64 KiB clusters, 4 MiB). */
async function valid(dir: string, name = 'img.qcow2', o: Record<string, string | number | boolean> = {}): Promise<string> {
  await mixedImage(dir, name, 64 * KiB, o);
  return name;
}

function patched(
  mutate: (file: string) => void,
  o: Record<string, string | number | boolean> = {},
): (dir: string) => Promise<string> {
  return async (dir) => {
    const name = await valid(dir, 'img.qcow2', o);
    mutate(path.join(dir, name));
    return name;
  };
}

const cases: HostileCase[] = [
  {
    // QEMU accepts this and reads zeros; we refuse with a clear error.
    name: 'L1 table offset past end of file',
    build: patched((f) => {
      const end = Math.ceil(fs.statSync(f).size / (64 * KiB)) * 64 * KiB;
      patchU64(f, H.l1TableOffset, BigInt(end + 16 * 64 * KiB));
    }),
  },
  {
    name: 'L1 table offset misaligned',
    phrase: 'Active L1 table offset invalid',
    build: patched((f) => patchU64(f, H.l1TableOffset, readU64(f, H.l1TableOffset) + 512n)),
  },
  {
    name: 'refcount table offset misaligned',
    phrase: 'Reference count table offset invalid',
    build: patched((f) => patchU64(f, H.refcountTableOffset, readU64(f, H.refcountTableOffset) + 512n)),
  },
  {
    name: 'cluster_bits 8',
    phrase: 'Unsupported cluster size: 2^8',
    build: patched((f) => patchU32(f, H.clusterBits, 8)),
  },
  {
    name: 'cluster_bits 22',
    phrase: 'Unsupported cluster size: 2^22',
    build: patched((f) => patchU32(f, H.clusterBits, 22)),
  },
  {
    name: 'l1_size above 32 MiB of entries',
    phrase: 'Active L1 table too large',
    build: patched((f) => patchU32(f, H.l1Size, 32 * MiB / 8 + 1)),
  },
  {
    name: 'refcount_table_clusters huge',
    phrase: 'Reference count table too large',
    build: patched((f) => patchU32(f, H.refcountTableClusters, 0x100000)),
  },
  {
    name: 'refcount_table_clusters 0',
    phrase: 'Image does not contain a reference count table',
    build: patched((f) => patchU32(f, H.refcountTableClusters, 0)),
  },
  {
    name: 'header extension length overrunning the cluster',
    phrase: 'Header extension too large',
    build: patched((f) => {
      const ft = headerExtensions(f).find((e) => e.type === EXT.featureTable)!;
      patchU32(f, ft.offset + 4, 64 * KiB - 16);
    }),
  },
  {
    name: 'header extension length 0xffffffff',
    phrase: 'Header extension too large',
    build: patched((f) => {
      const ft = headerExtensions(f).find((e) => e.type === EXT.featureTable)!;
      patchU32(f, ft.offset + 4, 0xffffffff);
    }),
  },
  {
    name: 'nb_snapshots 70000',
    phrase: 'Snapshot table too large',
    build: async (dir) => {
      const name = await valid(dir);
      await img(dir, ['snapshot', '-c', 's1', name]);
      patchU32(path.join(dir, name), H.nbSnapshots, 70000);
      return name;
    },
  },
  {
    name: 'snapshot table offset unaligned',
    phrase: 'Snapshot table offset invalid',
    build: async (dir) => {
      const name = await valid(dir);
      await img(dir, ['snapshot', '-c', 's1', name]);
      const f = path.join(dir, name);
      patchU64(f, H.snapshotsOffset, readU64(f, H.snapshotsOffset) + 8n);
      return name;
    },
  },
  {
    name: 'unknown incompatible feature bit 5',
    phrase: 'Unsupported qcow2 feature(s): Unknown incompatible feature: 20',
    build: patched((f) => patchU64(f, H.incompatibleFeatures, readU64(f, H.incompatibleFeatures) | (1n << 5n))),
  },
  {
    name: 'unknown incompatible feature bit 40',
    phrase: 'Unknown incompatible feature: 10000000000',
    build: patched((f) => patchU64(f, H.incompatibleFeatures, readU64(f, H.incompatibleFeatures) | (1n << 40n))),
  },
  {
    name: 'refcount_order 7',
    phrase: 'Reference count entry width too large; may not exceed 64 bits',
    build: patched((f) => patchU32(f, H.refcountOrder, 7)),
  },
  {
    name: 'backing file name too long',
    phrase: 'Backing file name too long',
    build: async (dir) => {
      await valid(dir, 'base.qcow2');
      await create(dir, 'top.qcow2', undefined, {}, { backing: 'base.qcow2' });
      patchU32(path.join(dir, 'top.qcow2'), H.backingFileSize, 2000);
      return 'top.qcow2';
    },
  },
  {
    name: 'backing file offset beyond the first cluster',
    phrase: 'Invalid backing file offset',
    build: async (dir) => {
      await valid(dir, 'base.qcow2');
      await create(dir, 'top.qcow2', undefined, {}, { backing: 'base.qcow2' });
      patchU64(path.join(dir, 'top.qcow2'), H.backingFileOffset, BigInt(64 * KiB + 8));
      return 'top.qcow2';
    },
  },
  {
    name: 'backing format extension too long',
    phrase: 'ext_backing_format: len=20 too large',
    build: async (dir) => {
      await valid(dir, 'base.qcow2');
      await create(dir, 'top.qcow2', undefined, {}, { backing: 'base.qcow2' });
      const f = path.join(dir, 'top.qcow2');
      const bf = headerExtensions(f).find((e) => e.type === EXT.backingFormat)!;
      patchU32(f, bf.offset + 4, 20);
      return 'top.qcow2';
    },
  },
  {
    name: 'version 4',
    phrase: 'Unsupported qcow2 version 4',
    build: patched((f) => patchU32(f, H.version, 4)),
  },
  {
    name: 'header_length 100',
    phrase: 'qcow2 header too short',
    build: patched((f) => patchU32(f, H.headerLength, 100)),
  },
  {
    name: 'header_length larger than the cluster',
    phrase: 'qcow2 header exceeds cluster size',
    build: patched((f) => patchU32(f, H.headerLength, 64 * KiB + 8)),
  },
  {
    name: 'crypt_method 3',
    phrase: 'Unsupported encryption method',
    build: patched((f) => patchU32(f, H.cryptMethod, 3)),
  },
  {
    name: 'l1_size too small for the virtual size',
    phrase: 'L1 table is too small',
    build: async (dir) => {
      // 64 KiB clusters: one L2 table maps 512 MiB, so 2 GiB needs 4 L1 entries.
      await create(dir, 'big.qcow2', 2048 * MiB);
      await io(dir, 'big.qcow2', ['write -q -P 1 0 64k', `write -q -P 2 ${1536 * MiB} 64k`]);
      patchU32(path.join(dir, 'big.qcow2'), H.l1Size, 1);
      return 'big.qcow2';
    },
  },
  {
    name: 'virtual size 2^63-1',
    phrase: 'Image is too big',
    build: patched((f) => patchU64(f, H.size, (1n << 63n) - 1n)),
  },
  {
    name: 'compression type 2',
    phrase: 'unknown compression type',
    build: patched((f) => {
      patchU64(f, H.incompatibleFeatures, readU64(f, H.incompatibleFeatures) | (1n << 3n));
      const b = Buffer.alloc(1, 2);
      fs.writeSync(fs.openSync(f, 'r+'), b, 0, 1, H.compressionType);
    }),
  },
  {
    name: 'zstd compression type without its incompatible bit',
    phrase: 'Compression type incompatible feature bit must be set',
    build: patched(
      (f) => patchU64(f, H.incompatibleFeatures, readU64(f, H.incompatibleFeatures) & ~(1n << 3n)),
      { compression_type: 'zstd' },
    ),
  },
  {
    // QEMU reads the missing metadata as zeros and opens it; we refuse.
    name: 'truncated to the header',
    build: patched((f) => fs.truncateSync(f, readU32(f, H.headerLength))),
  },
  {
    name: 'truncated inside the header',
    phrase: 'qcow2 header too short',
    build: patched((f) => fs.truncateSync(f, 50)),
  },
  {
    name: 'not a qcow2 image, opened with -f qcow2',
    phrase: 'Image is not in qcow2 format',
    fmt: 'qcow2',
    build: async (dir) => {
      fs.writeFileSync(path.join(dir, 'disk.raw'), Buffer.alloc(64 * KiB, 0x41));
      return 'disk.raw';
    },
  },
];

defineHostile('hostile headers', cases);
