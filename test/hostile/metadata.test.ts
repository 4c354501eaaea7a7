/**
 * Hostile input, part 2: corrupted L1/L2 entries, compressed descriptors, subcluster bitmaps,
 * snapshot tables, backing loops and missing files. Open succeeds for most of these (QEMU's too),
 * so the reads (`convert`) are what must fail; `info` may succeed.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { create, img, io, mixedRawFile, randomFile } from '../helpers/build.js';
import { patchU32, patchU64, randomBytes, readU64, writeAt } from '../helpers/files.js';
import { defineHostile, type HostileCase } from '../helpers/hostile.js';
import {
  H,
  OFLAG_COMPRESSED,
  OFLAG_COPIED,
  compressedEntry,
  compressedFields,
  l1Entries,
  l2Slots,
  readHeader,
  stdOffset,
} from '../helpers/qcow2.js';

const KiB = 1024;
const MiB = 1024 * 1024;

/** A compressed image (mixed compressible/incompressible/zero content). */
async function compressedImage(dir: string, cs = 64 * KiB, type = 'zlib'): Promise<string> {
  mixedRawFile(dir, 'src.raw', 41, 16 * cs, Math.round(cs * 1.25));
  await img(dir, ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cs},compression_type=${type}`, 'src.raw', 'c.qcow2']);
  return 'c.qcow2';
}

/** The compressed L2 slot whose data lies furthest into the file. */
function lastCompressed(file: string) {
  const h = readHeader(file);
  const slots = l2Slots(file).filter((s) => (s.entry & OFLAG_COMPRESSED) !== 0n);
  if (!slots.length) throw new Error('fixture has no compressed clusters');
  slots.sort((a, b) => Number(compressedFields(a.entry, h.clusterBits).offset - compressedFields(b.entry, h.clusterBits).offset));
  return { slot: slots[slots.length - 1]!, h };
}

/** A plain image with a few data clusters (64 KiB clusters). */
async function plainImage(dir: string, o: Record<string, string | number | boolean> = {}): Promise<string> {
  randomFile(dir, 'rnd.bin', 42, 256 * KiB);
  await create(dir, 'p.qcow2', 4 * MiB, o);
  await io(dir, 'p.qcow2', ['write -q -s rnd.bin 0 192k', 'write -q -P 0x11 1M 64k']);
  return 'p.qcow2';
}

function firstNormal(file: string) {
  const s = l2Slots(file).find((x) => (x.entry & OFLAG_COMPRESSED) === 0n && stdOffset(x.entry) !== 0);
  if (!s) throw new Error('fixture has no normal data cluster');
  return s;
}

const alignedEnd = (file: string, cs: number) => Math.ceil(fs.statSync(file).size / cs) * cs;

const cases: HostileCase[] = [
  {
    name: 'compressed cluster: sector count field maxed (64k clusters)',
    info: 'same',
    map: 'same',
    convert: 'either',
    build: async (dir) => {
      const name = await compressedImage(dir);
      const f = path.join(dir, name);
      const { slot, h } = lastCompressed(f);
      const { offset, countBits } = compressedFields(slot.entry, h.clusterBits);
      patchU64(f, slot.fileOffset, compressedEntry(offset, (1n << BigInt(countBits)) - 1n, h.clusterBits));
      return name;
    },
  },
  {
    name: 'compressed cluster: sector count field maxed (2 MiB clusters, zstd)',
    info: 'same',
    map: 'same',
    convert: 'either',
    build: async (dir) => {
      const name = await compressedImage(dir, 2 * MiB, 'zstd');
      const f = path.join(dir, name);
      const { slot, h } = lastCompressed(f);
      const { offset, countBits } = compressedFields(slot.entry, h.clusterBits);
      patchU64(f, slot.fileOffset, compressedEntry(offset, (1n << BigInt(countBits)) - 1n, h.clusterBits));
      return name;
    },
  },
  {
    // Too short: the deflate stream is cut off, decompression can't produce a whole cluster.
    name: 'compressed cluster: sector count too small',
    info: 'same',
    map: 'same',
    convert: 'same',
    build: async (dir) => {
      const name = await compressedImage(dir);
      const f = path.join(dir, name);
      const h = readHeader(f);
      const s = l2Slots(f).find(
        (x) => (x.entry & OFLAG_COMPRESSED) !== 0n && compressedFields(x.entry, h.clusterBits).sectors >= 3n,
      );
      if (!s) throw new Error('no multi-sector compressed cluster');
      patchU64(f, s.fileOffset, compressedEntry(compressedFields(s.entry, h.clusterBits).offset, 0n, h.clusterBits));
      return name;
    },
  },
  {
    name: 'compressed cluster: offset past end of file',
    info: 'same',
    map: 'same',
    build: async (dir) => {
      const name = await compressedImage(dir);
      const f = path.join(dir, name);
      const { slot, h } = lastCompressed(f);
      const { sectors } = compressedFields(slot.entry, h.clusterBits);
      patchU64(f, slot.fileOffset, compressedEntry(BigInt(fs.statSync(f).size + MiB + 77), sectors, h.clusterBits));
      return name;
    },
  },
  {
    name: 'compressed cluster: garbage payload (zlib)',
    info: 'same',
    map: 'same',
    build: async (dir) => {
      const name = await compressedImage(dir);
      const f = path.join(dir, name);
      const { slot, h } = lastCompressed(f);
      const { offset, sectors } = compressedFields(slot.entry, h.clusterBits);
      const len = Number((sectors + 1n) * 512n) - Number(offset % 512n);
      writeAt(f, Number(offset), randomBytes(43, len));
      return name;
    },
  },
  {
    name: 'compressed cluster: garbage payload (zstd)',
    info: 'same',
    map: 'same',
    build: async (dir) => {
      const name = await compressedImage(dir, 64 * KiB, 'zstd');
      const f = path.join(dir, name);
      const { slot, h } = lastCompressed(f);
      const { offset, sectors } = compressedFields(slot.entry, h.clusterBits);
      const len = Number((sectors + 1n) * 512n) - Number(offset % 512n);
      writeAt(f, Number(offset), randomBytes(44, len));
      return name;
    },
  },
  {
    name: 'L2 table offset unaligned in the L1 table',
    info: 'same',
    phrase: 'L2 table offset 0x40200 unaligned',
    build: async (dir) => {
      const name = await plainImage(dir);
      const f = path.join(dir, name);
      const l1 = l1Entries(f)[0]!;
      patchU64(f, l1.fileOffset, l1.entry + 0x200n);
      return name;
    },
  },
  {
    name: 'L2 table past end of file',
    info: 'same',
    build: async (dir) => {
      const name = await plainImage(dir);
      const f = path.join(dir, name);
      const l1 = l1Entries(f)[0]!;
      patchU64(f, l1.fileOffset, OFLAG_COPIED | BigInt(alignedEnd(f, 64 * KiB) + 1024 * MiB));
      return name;
    },
  },
  {
    // Cluster 0 (the header) used as an L2 table: its bytes make nonsense entries.
    name: 'L1 entry pointing at the header cluster',
    info: 'same',
    map: 'either',
    convert: 'either',
    build: async (dir) => {
      const name = await plainImage(dir);
      const f = path.join(dir, name);
      const l1 = l1Entries(f)[0]!;
      patchU64(f, l1.fileOffset, OFLAG_COPIED);
      return name;
    },
  },
  {
    name: 'data cluster offset unaligned in an L2 entry',
    info: 'same',
    phrase: 'Cluster allocation offset 0x50200 unaligned',
    build: async (dir) => {
      const name = await plainImage(dir);
      const f = path.join(dir, name);
      const s = firstNormal(f);
      patchU64(f, s.fileOffset, s.entry + 0x200n);
      return name;
    },
  },
  {
    name: 'data cluster past end of file',
    info: 'same',
    map: 'either',
    convert: 'either',
    build: async (dir) => {
      const name = await plainImage(dir);
      const f = path.join(dir, name);
      const s = firstNormal(f);
      patchU64(f, s.fileOffset, OFLAG_COPIED | BigInt(alignedEnd(f, 64 * KiB) + 4096 * MiB));
      return name;
    },
  },
  {
    name: 'extended L2: allocated and zero bits both set',
    info: 'same',
    phrase: 'Invalid cluster entry found',
    build: async (dir) => {
      const name = await plainImage(dir, { extended_l2: true });
      const f = path.join(dir, name);
      const s = l2Slots(f).find((x) => x.bitmap && (x.bitmap & 0xffffffffn) !== 0n)!;
      patchU64(f, s.fileOffset + 8, s.bitmap! | ((s.bitmap! & 0xffffffffn) << 32n));
      return name;
    },
  },
  {
    name: 'backing loop a -> b -> a',
    extra: [['info', '--backing-chain', 'IMG']],
    info: 'same',
    phrase: 'creates an infinite loop',
    // qemu-img 7.2 hangs on map/convert of a backing loop.
    noOracle: ['map --output=json', 'convert -O raw'],
    build: async (dir) => {
      await create(dir, 'b.qcow2', 1 * MiB);
      await create(dir, 'a.qcow2', 1 * MiB, {}, { backing: 'b.qcow2' });
      await img(dir, ['rebase', '-u', '-b', 'a.qcow2', '-F', 'qcow2', 'b.qcow2']);
      return 'a.qcow2';
    },
  },
  {
    name: 'backing loop a -> a',
    extra: [['info', '--backing-chain', 'IMG']],
    info: 'same',
    phrase: 'creates an infinite loop',
    // qemu-img 7.2 hangs on map/convert of a backing loop.
    noOracle: ['map --output=json', 'convert -O raw'],
    build: async (dir) => {
      await create(dir, 'a.qcow2', 1 * MiB);
      await img(dir, ['rebase', '-u', '-b', 'a.qcow2', '-F', 'qcow2', 'a.qcow2']);
      return 'a.qcow2';
    },
  },
  {
    name: 'missing backing file',
    phrase: 'No such file or directory',
    extra: [['info', '--backing-chain', 'IMG']],
    info: 'same',
    build: async (dir) => {
      await create(dir, 'base.qcow2', 1 * MiB);
      await create(dir, 'top.qcow2', undefined, {}, { backing: 'base.qcow2' });
      fs.rmSync(path.join(dir, 'base.qcow2'));
      return 'top.qcow2';
    },
  },
  {
    name: 'missing external data file',
    phrase: 'No such file or directory',
    info: 'same',
    build: async (dir) => {
      await create(dir, 'e.qcow2', 1 * MiB, { data_file: 'd.raw' });
      await io(dir, 'e.qcow2', ['write -q -P 1 0 64k']);
      fs.rmSync(path.join(dir, 'd.raw'));
      return 'e.qcow2';
    },
  },
  {
    // The active state is fine; reading the snapshot must fail.
    name: 'snapshot L1 table offset unaligned',
    extra: [['convert', '-O', 'raw', '-l', 'snapshot.name=s1', 'IMG', 'OUT']],
    info: 'same',
    map: 'same',
    convert: 'same',
    phrase: 'Snapshot L1 table offset invalid',
    build: async (dir) => {
      const name = await plainImage(dir);
      await img(dir, ['snapshot', '-c', 's1', name]);
      const f = path.join(dir, name);
      const so = Number(readU64(f, H.snapshotsOffset));
      patchU64(f, so, readU64(f, so) + 0x200n);
      return name;
    },
  },
  {
    name: 'snapshot L1 table size huge',
    extra: [['convert', '-O', 'raw', '-l', 'snapshot.name=s1', 'IMG', 'OUT']],
    info: 'same',
    map: 'same',
    convert: 'same',
    phrase: 'Snapshot L1 table too large',
    build: async (dir) => {
      const name = await plainImage(dir);
      await img(dir, ['snapshot', '-c', 's1', name]);
      const f = path.join(dir, name);
      const so = Number(readU64(f, H.snapshotsOffset));
      patchU32(f, so + 8, 0x1000001);
      return name;
    },
  },
  {
    name: 'snapshot name not found',
    extra: [['convert', '-O', 'raw', '-l', 'snapshot.name=nope', 'IMG', 'OUT']],
    info: 'same',
    map: 'same',
    convert: 'same',
    phrase: "Can't find snapshot",
    build: async (dir) => {
      const name = await plainImage(dir);
      await img(dir, ['snapshot', '-c', 's1', name]);
      return name;
    },
  },
];

defineHostile('hostile metadata', cases);
