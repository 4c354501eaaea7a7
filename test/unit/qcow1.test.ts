/**
 * qcow version 1: header codec and validation (QEMU 7.2's messages), the create layout, L2 entry
 * encoding, and the driver on in-memory images (random writes against a model, crash snapshots at
 * every barrier, compressed clusters, backing files, hostile mappings).
 */
import { beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import * as zlib from 'node:zlib';
import type { BlockDriver } from '../../src/core/block-driver.js';
import type { ByteIO } from '../../src/core/byte-io.js';
import { QcowError } from '../../src/core/errors.js';
import { MemoryIO, MemoryProvider } from '../../src/io/memory.js';
import { RawDriver } from '../../src/formats/raw/driver.js';
import { registerNodeCodecs } from '../../src/codecs/node.js';
import {
  decodeL2Entry,
  decodeQcowHeader,
  encodeCompressedEntry,
  encodeOffsetEntry,
  encodeQcowHeader,
  qcowCreateLayout,
  validateQcowHeader,
  type QcowHeader,
} from '../../src/formats/qcow/header.js';
import { createQcow, QCOW_CREATE_HELP } from '../../src/formats/qcow/create.js';
import { QcowDriver } from '../../src/formats/qcow/driver.js';

beforeAll(() => registerNodeCodecs());

const KiB = 1024;
const MiB = 1024 * KiB;

function baseHeader(over: Partial<QcowHeader> = {}): QcowHeader {
  return {
    magic: 0x514649fb,
    version: 1,
    backingFileOffset: 0n,
    backingFileSize: 0,
    mtime: 0,
    size: 100n * BigInt(MiB),
    clusterBits: 12,
    l2Bits: 9,
    cryptMethod: 0,
    l1TableOffset: 48n,
    ...over,
  };
}

function validationError(h: QcowHeader, fileSize?: number): string {
  try {
    validateQcowHeader(h, fileSize);
  } catch (e) {
    expect(e).toBeInstanceOf(QcowError);
    return (e as Error).message;
  }
  return '';
}

describe('qcow header', () => {
  it('round-trips through encode/decode', () => {
    const h = baseHeader({ backingFileOffset: 48n, backingFileSize: 10, mtime: 7, cryptMethod: 1, l1TableOffset: 64n });
    expect(decodeQcowHeader(encodeQcowHeader(h))).toEqual(h);
  });

  it('decodes the header qemu-img writes for a 100 MiB image', () => {
    const bytes = Buffer.from(
      ['514649fb', '00000001', '0000000000000000', '00000000', '00000000', '0000000006400000', '0c09', '0000', '00000000', '0000000000000030'].join(''),
      'hex',
    );
    const h = decodeQcowHeader(bytes);
    expect(h).toMatchObject({ version: 1, size: 104857600n, clusterBits: 12, l2Bits: 9, l1TableOffset: 48n, cryptMethod: 0 });
    const g = validateQcowHeader(h, 560);
    expect(g).toMatchObject({ clusterSize: 4096, l2Entries: 512, l2TableBytes: 4096, l1Size: 50, l1Coverage: 2 * MiB, size: 104857600 });
  });

  it('rejects what QEMU rejects, with its messages and in its order', () => {
    expect(validationError(baseHeader({ magic: 0x514649fa }))).toBe('Image not in qcow format');
    expect(validationError(baseHeader({ version: 2 }))).toContain('qcow (v1) does not support qcow version 2');
    expect(validationError(baseHeader({ version: 3 }))).toContain("Try the 'qcow2' driver instead.");
    expect(validationError(baseHeader({ clusterBits: 8 }))).toBe('Cluster size must be between 512 and 64k');
    expect(validationError(baseHeader({ clusterBits: 17 }))).toBe('Cluster size must be between 512 and 64k');
    expect(validationError(baseHeader({ l2Bits: 5 }))).toBe('L2 table size must be between 512 and 64k');
    expect(validationError(baseHeader({ l2Bits: 14 }))).toBe('L2 table size must be between 512 and 64k');
    expect(validationError(baseHeader({ size: 1n }))).toBe('Image size is too small (must be at least 2 bytes)');
    expect(validationError(baseHeader({ size: 0n }))).toBe('Image size is too small (must be at least 2 bytes)');
    expect(validationError(baseHeader({ cryptMethod: 2 }))).toBe('invalid encryption method in qcow header');
    expect(validationError(baseHeader({ size: (1n << 64n) - 1n }))).toBe('Image too large');
    expect(validationError(baseHeader({ size: 1n << 52n }))).toBe('Image too large');
    expect(validationError(baseHeader({ backingFileOffset: 48n, backingFileSize: 1024 }))).toBe('Backing file name too long');
    expect(validationError(baseHeader({ backingFileOffset: 48n, backingFileSize: 2000 }))).toBe('Backing file name too long');
    // QEMU's order: cluster bits, L2 bits, size, encryption method, L1 size, backing name.
    expect(validationError(baseHeader({ clusterBits: 8, l2Bits: 5 }))).toContain('Cluster size');
    expect(validationError(baseHeader({ l2Bits: 5, cryptMethod: 2 }))).toContain('L2 table size');
    expect(validationError(baseHeader({ cryptMethod: 2, size: 0n }))).toContain('too small');
    expect(validationError(baseHeader({ cryptMethod: 2, size: (1n << 64n) - 1n }))).toContain('encryption method');
    expect(validationError(baseHeader({ size: 1n << 62n, backingFileOffset: 48n, backingFileSize: 2000 }))).toBe('Image too large');
  });

  it('accepts the limits QEMU accepts', () => {
    expect(validationError(baseHeader({ clusterBits: 9, l2Bits: 6 }))).toBe('');
    expect(validationError(baseHeader({ clusterBits: 16, l2Bits: 13 }))).toBe('');
    expect(validationError(baseHeader({ size: 2n }))).toBe('');
    expect(validationError(baseHeader({ backingFileOffset: 48n, backingFileSize: 1023 }))).toBe('');
    // Backing name size without an offset is ignored.
    expect(validationError(baseHeader({ backingFileSize: 5000 }))).toBe('');
  });

  it('rounds the virtual size down to whole sectors', () => {
    expect(validateQcowHeader(baseHeader({ size: 1023n })).size).toBe(512);
    expect(validateQcowHeader(baseHeader({ size: 2n })).size).toBe(0);
    expect(validateQcowHeader(baseHeader({ size: 1023n })).l1Size).toBe(1);
  });

  it('requires the L1 table inside the file', () => {
    expect(validationError(baseHeader(), 448)).toBe('');
    expect(validationError(baseHeader(), 447)).toMatch(/L1 table .* past the end of the file/);
    expect(validationError(baseHeader({ l1TableOffset: 1n << 40n }), 560)).toMatch(/past the end of the file/);
    expect(validationError(baseHeader({ l1TableOffset: (1n << 64n) - 1n }), 560)).toMatch(/past the end of the file/);
    // 2^40 bytes need a 4 MiB L1 table: refused for a small file instead of allocating it.
    expect(validationError(baseHeader({ size: 1n << 40n }), 560)).toMatch(/past the end of the file/);
  });
});

describe('qcow L2 entries', () => {
  it('decodes normal and unallocated entries', () => {
    expect(decodeL2Entry(0, 0, 12)).toEqual({ type: 'unallocated' });
    expect(decodeL2Entry(0, 0x2000, 12)).toEqual({ type: 'normal', offset: 0x2000 });
    const [hi, lo] = encodeOffsetEntry(0x12_3456_7000);
    expect(decodeL2Entry(hi, lo, 12)).toEqual({ type: 'normal', offset: 0x12_3456_7000 });
  });

  it('encodes compressed entries with the size in bytes (observed qemu-img values)', () => {
    // From `qemu-img convert -c -O qcow`: cluster_bits 12, offset 0x3000, 48 bytes.
    const v = (1n << 63n) | (48n << 51n) | 0x3000n;
    const [hi, lo] = encodeCompressedEntry(0x3000, 48, 12);
    expect((BigInt(hi) << 32n) | BigInt(lo)).toBe(v);
    fc.assert(
      fc.property(fc.integer({ min: 9, max: 16 }), fc.nat(), fc.nat(), (cb, o, l) => {
        const offset = o % 2 ** Math.min(47, 63 - cb);
        const length = 1 + (l % (2 ** cb - 1));
        const [h, w] = encodeCompressedEntry(offset, length, cb);
        expect(decodeL2Entry(h, w, cb)).toEqual({ type: 'compressed', offset, length });
      }),
      { numRuns: 200 },
    );
  });
});

describe('qcow create layout', () => {
  it('matches qemu-img create -f qcow', () => {
    expect(qcowCreateLayout({ size: 100 * MiB })).toMatchObject({ l1Offset: 48, l1Size: 50, fileSize: 560, size: 100 * MiB });
    expect(qcowCreateLayout({ size: 1000 })).toMatchObject({ fileSize: 560, size: 1024 });
    expect(qcowCreateLayout({ size: 1 })).toMatchObject({ fileSize: 560, size: 512 });
    expect(qcowCreateLayout({ size: 2 * 2 ** 40 })).toMatchObject({ fileSize: 8388656 });
    const b = qcowCreateLayout({ size: 10 * MiB, backingFile: 'base.qcow2' });
    expect(b).toMatchObject({ l1Offset: 64, l1Size: 5, fileSize: 576 });
    expect(b.header).toMatchObject({ clusterBits: 9, l2Bits: 12, backingFileOffset: 48n, backingFileSize: 10 });
    expect(Buffer.from(b.headerBytes.subarray(48)).toString()).toBe('base.qcow2');
    expect(qcowCreateLayout({ size: 1 << 30, backingFile: 'base.qcow2' }).fileSize).toBe(4160);
  });

  it('refuses a zero size and sizes whose L1 table would overflow', () => {
    expect(() => qcowCreateLayout({ size: 0 })).toThrow('Image size is too small, cannot be zero length');
    expect(() => qcowCreateLayout({ size: 2 ** 52 })).toThrow('Image too large');
    expect(() => qcowCreateLayout({ size: 1, backingFile: 'x'.repeat(1024) })).toThrow('Backing file name too long');
  });

  it('has the -o help text', () => {
    expect(QCOW_CREATE_HELP.startsWith('Supported options:\n  backing_file=<str>')).toBe(true);
    expect(QCOW_CREATE_HELP.endsWith('size=<size>            - Virtual disk size\n')).toBe(true);
  });
});

// ------------------------------------------------------------------------------------------------
// The driver on in-memory images.

/** MemoryIO that records a copy of the file at every barrier (a crash can only happen "between"). */
class RecordingIO extends MemoryIO {
  snapshots: Uint8Array[] = [];
  override async flush(): Promise<void> {
    this.snapshots.push(this.bytes());
  }
}

async function openMem(
  provider: MemoryProvider,
  name: string,
  readOnly = false,
  io?: ByteIO,
  l2CacheBytes?: number,
): Promise<QcowDriver> {
  const f = io ?? (await provider.open(name, { readOnly }));
  return QcowDriver.open(f, {
    readOnly,
    provider,
    l2CacheBytes,
    openBacking: async (n) => {
      const bio = await provider.open(n, { readOnly: true });
      const head = new Uint8Array(8);
      await bio.read(head, 0);
      if (Buffer.from(head).readUInt32BE(0) === 0x514649fb) return openMem(provider, n, true, bio);
      return RawDriver.open(bio, { readOnly: true });
    },
  });
}

async function newImage(provider: MemoryProvider, name: string, size: number, backingFile?: string): Promise<QcowDriver> {
  const io = new RecordingIO(name);
  provider.files.set(name, io);
  await createQcow(io, { size, backingFile });
  return openMem(provider, name, false, io);
}

/** Byte equality without vitest's slow element-wise diff of typed arrays. */
function expectBytes(got: Uint8Array, want: Uint8Array): void {
  const a = Buffer.from(got.buffer, got.byteOffset, got.length);
  const b = Buffer.from(want.buffer, want.byteOffset, want.length);
  expect(a.length).toBe(b.length);
  if (!a.equals(b)) {
    let i = 0;
    while (a[i] === b[i]) i++;
    expect.fail(`bytes differ first at ${i}: got ${a[i]}, want ${b[i]}`);
  }
}

function deflate(cluster: Uint8Array): Uint8Array {
  return zlib.deflateRawSync(cluster, { windowBits: 12, memLevel: 9, level: 6 });
}

type Op =
  | { t: 'write'; off: number; len: number; seed: number }
  | { t: 'zero'; off: number; len: number }
  | { t: 'compress'; cluster: number; seed: number }
  | { t: 'flush' };

function fillPattern(buf: Uint8Array, seed: number): void {
  let x = seed * 2654435761 + 1;
  for (let i = 0; i < buf.length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    // Half of the patterns are compressible (a small alphabet).
    buf[i] = seed & 1 ? x >>> 24 : 0x40 + ((x >>> 24) & 3);
  }
}

function opsArb(size: number, cs: number): fc.Arbitrary<Op[]> {
  const clusters = Math.ceil(size / cs);
  const range = fc
    .tuple(fc.nat({ max: size - 1 }), fc.integer({ min: 1, max: 3 * cs }))
    .map(([off, len]) => ({ off, len: Math.min(len, size - off) }));
  return fc.array(
    fc.oneof(
      { weight: 5, arbitrary: fc.tuple(range, fc.nat()).map(([r, seed]) => ({ t: 'write' as const, ...r, seed })) },
      { weight: 2, arbitrary: range.map((r) => ({ t: 'zero' as const, ...r })) },
      {
        weight: 2,
        arbitrary: fc.tuple(fc.nat({ max: clusters - 1 }), fc.nat()).map(([cluster, seed]) => ({ t: 'compress' as const, cluster, seed })),
      },
      { weight: 1, arbitrary: fc.constant({ t: 'flush' as const }) },
    ),
    { minLength: 1, maxLength: 25 },
  );
}

async function applyOp(d: QcowDriver, model: Uint8Array, op: Op): Promise<void> {
  const cs = d.g.clusterSize;
  switch (op.t) {
    case 'write': {
      const data = new Uint8Array(op.len);
      fillPattern(data, op.seed);
      await d.write(op.off, data);
      model.set(data, op.off);
      return;
    }
    case 'zero':
      await d.writeZeroes(op.off, op.len);
      model.fill(0, op.off, op.off + op.len);
      return;
    case 'compress': {
      const off = op.cluster * cs;
      const n = Math.min(cs, d.size - off);
      const cluster = new Uint8Array(cs);
      fillPattern(cluster.subarray(0, n), op.seed | 0); // the tail past the image end stays zero
      const c = deflate(cluster);
      if (c.length >= cs) await d.write(off, cluster.subarray(0, n));
      else await d.writeCompressed(off, c);
      model.set(cluster.subarray(0, n), off);
      return;
    }
    case 'flush':
      await d.flush();
      return;
  }
}

describe('qcow driver (in memory)', () => {
  it('reads a fresh image as zeros and reports it unallocated', async () => {
    const p = new MemoryProvider();
    const d = await newImage(p, 'a.qcow', 3 * MiB + 512);
    expect(d.size).toBe(3 * MiB + 512);
    expectBytes(await d.read(0, 8192), new Uint8Array(8192));
    expect(await d.blockStatus(0, d.size)).toEqual([{ offset: 0, length: d.size, kind: 'unallocated', depth: 0 }]);
    expect(d.info()).toEqual({ clusterSize: 4096, dirty: false, encrypted: undefined, backingFilename: undefined });
    await d.close();
  });

  it('appends clusters and L2 tables at the end of the file like QEMU', async () => {
    const p = new MemoryProvider();
    const d = await newImage(p, 'a.qcow', 10 * MiB);
    await d.write(0, new Uint8Array(512).fill(0x11));
    await d.write(5000, new Uint8Array(10000).fill(0x22));
    await d.write(4 * MiB, new Uint8Array(100).fill(0x33));
    await d.close();
    const f = (p.files.get('a.qcow') as MemoryIO).bytes();
    // Same layout as qemu-io wrote for these requests: L2 at 0x1000, clusters from 0x2000, second L2 at 0x6000.
    expect(f.length).toBe(0x8000);
    const dv = new DataView(f.buffer);
    expect(dv.getBigUint64(48)).toBe(0x1000n);
    expect(dv.getBigUint64(56)).toBe(0n);
    expect(dv.getBigUint64(64)).toBe(0x6000n);
    expect([0, 1, 2, 3].map((i) => dv.getBigUint64(0x1000 + 8 * i))).toEqual([0x2000n, 0x3000n, 0x4000n, 0x5000n]);
    expect(dv.getBigUint64(0x6000)).toBe(0x7000n);
    const r = await openMem(p, 'a.qcow', true);
    const ext = await r.blockStatus(0, r.size);
    expect(ext[0]).toMatchObject({ offset: 0, length: 16384, kind: 'data', hostOffset: 0x2000, depth: 0 });
    expect(ext[1]).toMatchObject({ offset: 16384, kind: 'unallocated' });
    expect(ext[2]).toMatchObject({ offset: 4 * MiB, length: 4096, kind: 'data', hostOffset: 0x7000 });
    await r.close();
  });

  it('random writes, zero writes and compressed clusters match a model; every barrier state is consistent', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(9, 12, 16).chain((cb) =>
          fc.record({
            cb: fc.constant(cb),
            l2: fc.constantFrom(6, 9, 13),
            size: fc.integer({ min: 2, max: 40 }).map((n) => n * 2 ** cb + (n % 3) * 512),
            // Sometimes a tiny L2 cache: eviction, reloads and flushes under cache pressure.
            tinyCache: fc.boolean(),
          }).chain((g) => fc.tuple(fc.constant(g), opsArb(g.size, 2 ** g.cb))),
        ),
        async ([g, ops]) => {
          const p = new MemoryProvider();
          const io = new RecordingIO('t.qcow');
          p.files.set('t.qcow', io);
          const layout = qcowCreateLayout({ size: g.size });
          // Non-default geometry: patch the header before opening (createQcow uses qemu-img's defaults).
          await createQcow(io, { size: g.size });
          const h = { ...layout.header, clusterBits: g.cb, l2Bits: g.l2 };
          await io.write(encodeQcowHeader(h), 0);
          const l1Bytes = Math.ceil(g.size / 2 ** (g.cb + g.l2)) * 8;
          if (48 + l1Bytes > (await io.size())) await io.write(new Uint8Array(48 + l1Bytes - (await io.size())), await io.size());
          io.snapshots = [];
          const d = await openMem(p, 't.qcow', false, io, g.tinyCache ? 1 : undefined);
          const model = new Uint8Array(d.size);
          for (const op of ops) await applyOp(d, model, op);
          expectBytes(await d.read(0, d.size), model);
          await d.close();
          // Reopened from the file: same content.
          const r = await openMem(p, 't.qcow', true);
          expectBytes(await r.read(0, r.size), model);
          // Extents tile the image; unallocated ranges read as zeros.
          let pos = 0;
          for (const e of await r.blockStatus(0, r.size)) {
            expect(e.offset).toBe(pos);
            if (e.kind === 'unallocated') expect(model.subarray(e.offset, e.offset + e.length).every((b) => b === 0)).toBe(true);
            pos += e.length;
          }
          expect(pos).toBe(r.size);
          await r.close();
          // Any state at a barrier opens and reads without error.
          for (const snap of io.snapshots) {
            const s = new MemoryProvider();
            s.files.set('s.qcow', new MemoryIO('s.qcow', snap));
            const sd = await openMem(s, 's.qcow', true);
            await sd.read(0, sd.size);
            await sd.close();
          }
        },
      ),
      { numRuns: 40 },
    );
  });

  it('concurrent writes apply in call order; concurrent reads see old or new data', async () => {
    const p = new MemoryProvider();
    const base = new MemoryIO('base.raw');
    await base.write(new Uint8Array(256 * KiB).fill(0xbb), 0);
    p.files.set('base.raw', base);
    const io = new RecordingIO('c.qcow');
    p.files.set('c.qcow', io);
    await createQcow(io, { size: 256 * KiB, backingFile: 'base.raw' });
    const d = await openMem(p, 'c.qcow', false, io, 1);
    const model = new Uint8Array(256 * KiB).fill(0xbb);
    const jobs: Promise<unknown>[] = [];
    let seed = 1;
    for (let i = 0; i < 200; i++) {
      seed = (seed * 1103515245 + 12345) >>> 0;
      const off = seed % (250 * KiB);
      const len = 1 + ((seed >>> 8) % 5000);
      const n = Math.min(len, model.length - off);
      const pat = 1 + (i % 250);
      if (i % 3 === 2) {
        jobs.push(
          d.read(off, n).then((b) => {
            expect(b.every((x) => x === 0xbb || (x >= 1 && x <= 250))).toBe(true);
          }),
        );
      } else {
        jobs.push(d.write(off, new Uint8Array(n).fill(pat)));
        model.fill(pat, off, off + n);
      }
      if (i % 50 === 49) jobs.push(d.flush());
    }
    await Promise.all(jobs);
    expectBytes(await d.read(0, d.size), model);
    await d.close();
    const r = await openMem(p, 'c.qcow', true);
    expectBytes(await r.read(0, r.size), model);
  });

  it('unflushed metadata stays off the disk until flush', async () => {
    const p = new MemoryProvider();
    const d = await newImage(p, 'a.qcow', MiB);
    await d.write(0, new Uint8Array(4096).fill(7));
    const before = (p.files.get('a.qcow') as MemoryIO).bytes();
    expect(new DataView(before.buffer).getBigUint64(48)).toBe(0n); // L1 not yet pointing anywhere
    await d.flush();
    const after = (p.files.get('a.qcow') as MemoryIO).bytes();
    expect(new DataView(after.buffer).getBigUint64(48)).toBe(0x1000n);
    await d.close();
  });

  it('reads unallocated clusters from the backing file and copies on write', async () => {
    const p = new MemoryProvider();
    const base = new MemoryIO('base.raw');
    const baseData = new Uint8Array(3000 + 2 * 512);
    fillPattern(baseData, 9);
    await base.write(baseData, 0);
    p.files.set('base.raw', base);
    const d = await newImage(p, 'ov.qcow', 8 * KiB, 'base.raw');
    expect(d.g.clusterSize).toBe(512);
    expect(d.info().backingFilename).toBe('base.raw');
    const model = new Uint8Array(d.size);
    model.set(baseData);
    expectBytes(await d.read(0, d.size), model);
    await d.write(700, new Uint8Array([1, 2, 3]));
    model.set([1, 2, 3], 700);
    await d.writeZeroes(3900, 1000); // partly over backing data, partly past the backing file's end
    model.fill(0, 3900, 4900);
    await d.close();
    const r = await openMem(p, 'ov.qcow', true);
    expectBytes(await r.read(0, r.size), model);
    const ext = await r.blockStatus(0, r.size);
    expect(ext.map((e) => [e.offset, e.length, e.kind, e.depth])).toEqual([
      [0, 512, 'data', 1],
      [512, 512, 'data', 0],
      [1024, 2560, 'data', 1],
      [3584, 512, 'data', 0], // zero write over backing data: zeros written into a new cluster
      [4096, 8192 - 4096, 'unallocated', 0], // past the backing file's end: nothing written
    ]);
    await r.close();
  });

  it('rewrites a compressed cluster as a normal cluster on a partial write', async () => {
    const p = new MemoryProvider();
    const d = await newImage(p, 'c.qcow', 64 * KiB);
    const cluster = new Uint8Array(4096).fill(0x61);
    await d.writeCompressed(4096, deflate(cluster));
    let ext = await d.blockStatus(4096, 4096);
    expect(ext).toEqual([{ offset: 4096, length: 4096, kind: 'data', depth: 0 }]);
    expectBytes(await d.read(4096, 4096), cluster);
    await d.write(4096 + 100, new Uint8Array([9]));
    cluster[100] = 9;
    expectBytes(await d.read(4096, 4096), cluster);
    ext = await d.blockStatus(4096, 4096);
    expect(ext[0]!.hostOffset).toBeDefined();
    await expect(d.writeCompressed(100, deflate(cluster))).rejects.toThrow('cluster aligned');
    await expect(d.writeCompressed(0, new Uint8Array(4096))).rejects.toThrow(QcowError);
    await d.close();
  });

  it('detects corrupt mappings on access', async () => {
    const p = new MemoryProvider();
    const d = await newImage(p, 'a.qcow', MiB);
    await d.write(0, new Uint8Array(4096).fill(1));
    await d.close();
    const io = p.files.get('a.qcow') as MemoryIO;
    const put = (off: number, v: bigint) => {
      const b = new Uint8Array(8);
      new DataView(b.buffer).setBigUint64(0, v);
      return io.write(b, off);
    };
    // Data cluster offset unaligned.
    await put(0x1000, 0x2001n);
    let r = await openMem(p, 'a.qcow', true);
    await expect(r.read(0, 512)).rejects.toThrow(/corrupt.*unaligned/);
    // Data cluster past the end of the file.
    await put(0x1000, 0x100000n);
    r = await openMem(p, 'a.qcow', true);
    await expect(r.read(0, 512)).rejects.toThrow(/past the end of the file/);
    // L2 table unaligned / past the end.
    await put(48, 0x1001n);
    r = await openMem(p, 'a.qcow', true);
    await expect(r.blockStatus(0, 512)).rejects.toThrow(/L2 table offset 0x1001 unaligned/);
    await put(48, 0x10000000n);
    r = await openMem(p, 'a.qcow', true);
    await expect(r.read(0, 512)).rejects.toThrow(/past the end of the file/);
    // Garbage compressed data.
    await put(48, 0x1000n);
    await put(0x1000, (1n << 63n) | (100n << 51n) | 0x10n);
    r = await openMem(p, 'a.qcow', true);
    await expect(r.read(0, 512)).rejects.toThrow(/could not decompress/);
  });

  it('refuses reads and writes of encrypted images opened without a key but opens them read-only', async () => {
    const p = new MemoryProvider();
    const io = new MemoryIO('e.qcow');
    p.files.set('e.qcow', io);
    await createQcow(io, { size: MiB });
    await io.write(new Uint8Array([0, 0, 0, 1]), 36);
    const d = await openMem(p, 'e.qcow', true);
    expect(d.info().encrypted).toBe(true);
    await expect(d.read(0, 512)).rejects.toThrow('the image is encrypted and was opened without a key');
    await expect(openMem(p, 'e.qcow', false)).rejects.toThrow("Parameter 'encrypt.key-secret' is required for cipher");
  });

  it('refuses writes when read-only and requests past the end', async () => {
    const p = new MemoryProvider();
    await newImage(p, 'a.qcow', MiB).then((d) => d.close());
    const d: BlockDriver = await openMem(p, 'a.qcow', true);
    await expect(d.write(0, new Uint8Array(1))).rejects.toThrow('read-only');
    await expect(d.read(MiB - 1, 2)).rejects.toThrow('past the end');
  });
});
