/**
 * qcow (version 1) images created and written by our library, checked with qemu-img / qemu-io:
 * `createQcow` is byte-identical to `qemu-img create -f qcow`; the same writes through our driver and
 * through qemu-io give byte-identical files; random writes (fast-check) read back correctly with
 * `qemu-img convert -O raw`, `qemu-io read -P` and `qemu-img map`; compressed clusters written like
 * `convert -c -O qcow` are read by qemu-img.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { BlockDriver, Extent } from '../../src/core/block-driver.js';
import { fileProvider } from '../../src/io/file.js';
import { openImage, probeFormat } from '../../src/block/open.js';
import { registerNodeCodecs } from '../../src/codecs/node.js';
import { codecs } from '../../src/codecs/registry.js';
import { QcowDriver } from '../../src/formats/qcow/driver.js';
import { createQcow, QCOW_CREATE_HELP } from '../../src/formats/qcow/create.js';
import { create, io, mixedRawFile } from '../helpers/build.js';
import { fileDifference, makeTmpDir, randomBytes, removeTmpDir } from '../helpers/files.js';
import { describeResult, must, mustIo, qemuImg, qemuIo } from '../helpers/proc.js';

const KiB = 1024;
const MiB = 1024 * KiB;

async function openAny(name: string, readOnly = true): Promise<BlockDriver> {
  const f = await fileProvider.open(name, { readOnly });
  if ((await probeFormat(f)) === 'qcow') {
    try {
      return await QcowDriver.open(f, { readOnly, provider: fileProvider, openBacking: (n) => openAny(n, true) });
    } catch (e) {
      await f.close();
      throw e;
    }
  }
  await f.close();
  return openImage(name, { io: fileProvider, readOnly });
}

/** Create with our library and open read-write. */
async function ourCreate(file: string, size: number, backingFile?: string): Promise<QcowDriver> {
  const f = await fileProvider.create!(file);
  await createQcow(f, { size, backingFile });
  return QcowDriver.open(f, { readOnly: false, provider: fileProvider, openBacking: (n) => openAny(n, true) });
}

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

async function ourMap(d: BlockDriver): Promise<MapEntry[]> {
  const out: MapEntry[] = [];
  let pos = 0;
  while (pos < d.size) {
    const ext: Extent[] = await d.blockStatus(pos, d.size - pos);
    for (const e of ext) {
      const m: MapEntry = {
        start: e.offset,
        length: e.length,
        depth: e.depth,
        present: e.kind !== 'unallocated',
        zero: e.kind !== 'data' || e.zeroData === true,
        data: e.kind === 'data',
      };
      if (e.hostOffset !== undefined) m.offset = e.hostOffset;
      const last = out[out.length - 1];
      if (
        last &&
        last.depth === m.depth &&
        last.present === m.present &&
        last.zero === m.zero &&
        last.data === m.data &&
        (last.offset === undefined) === (m.offset === undefined) &&
        (last.offset === undefined || last.offset + last.length === m.offset)
      ) {
        last.length += m.length;
      } else out.push(m);
      pos += e.length;
    }
  }
  return out;
}

async function qemuRaw(dir: string, file: string): Promise<Buffer> {
  await must(qemuImg(['convert', '-f', 'qcow', '-O', 'raw', file, 'out.raw'], { cwd: dir }));
  return fs.readFileSync(path.join(dir, 'out.raw'));
}

let root = '';
beforeAll(() => {
  registerNodeCodecs();
  root = makeTmpDir('qk-qcow1-write-');
});
afterAll(() => removeTmpDir(root));

function sub(name: string): string {
  const d = path.join(root, name);
  fs.mkdirSync(d, { recursive: true });
  return d;
}

// ------------------------------------------------------------------------------------------------

describe('createQcow is byte-identical to qemu-img create -f qcow', () => {
  const cases: Array<{ name: string; size: string; bytes: number; backing?: string }> = [
    { name: '100M', size: '100M', bytes: 100 * MiB },
    { name: '1000 bytes (rounded up to a sector)', size: '1000', bytes: 1000 },
    { name: '1 byte', size: '1', bytes: 1 },
    { name: '3G+512', size: String(3 * 1024 * MiB + 512), bytes: 3 * 1024 * MiB + 512 },
    { name: '512G (2 MiB L1 table)', size: '512G', bytes: 512 * 1024 * MiB },
    { name: '10M with backing', size: '10M', bytes: 10 * MiB, backing: 'base.qcow2' },
    { name: '1G with backing in a folder', size: '1G', bytes: 1024 * MiB, backing: 'some/dir/base.img' },
    { name: 'backing name of 1023 bytes', size: '1M', bytes: MiB, backing: 'b'.repeat(1023) },
    { name: 'backing name of 7 bytes (L1 at 56)', size: '64M', bytes: 64 * MiB, backing: 'abc.raw' },
  ];
  for (const c of cases) {
    it(c.name, async () => {
      const dir = sub(`create-${c.name.replace(/\W+/g, '_')}`);
      const args = ['create', '-q', '-f', 'qcow'];
      if (c.backing) args.push('-u', '-b', c.backing, '-F', 'raw');
      await must(qemuImg([...args, 'theirs.qcow', c.size], { cwd: dir }));
      const f = await fileProvider.create!(path.join(dir, 'ours.qcow'));
      await createQcow(f, { size: c.bytes, backingFile: c.backing, backingFormat: 'raw' });
      await f.close();
      expect(await fileDifference(path.join(dir, 'ours.qcow'), path.join(dir, 'theirs.qcow'))).toBe('');
      fs.rmSync(path.join(dir, 'ours.qcow'));
      fs.rmSync(path.join(dir, 'theirs.qcow'));
    });
  }

  it('-o help text', async () => {
    const r = await must(qemuImg(['create', '-f', 'qcow', '-o', 'help', 'x']));
    expect(QCOW_CREATE_HELP).toBe(r.stdout);
  });

  it('zero size is refused like qemu-img', async () => {
    const dir = sub('create-zero');
    const r = await qemuImg(['create', '-q', '-f', 'qcow', 'z.qcow', '0'], { cwd: dir });
    expect(r.code).toBe(1);
    const f = await fileProvider.create!(path.join(dir, 'ours.qcow'));
    await expect(createQcow(f, { size: 0 })).rejects.toThrow(r.stderr.trim().replace(/^qemu-img: z\.qcow: /, ''));
    await f.close();
  });
});

// ------------------------------------------------------------------------------------------------

/** A qemu-io write command and the same request for our driver. */
type W = { off: number; len: number; pat: number };

async function sameWritesSameFile(name: string, size: number, writes: W[], backing?: { file: string; fmt: string }): Promise<void> {
  const dir = sub(`same-${name.replace(/\W+/g, '_')}`);
  const extra = backing ? { fmt: 'qcow', backing: backing.file, backingFmt: backing.fmt } : { fmt: 'qcow' };
  await create(dir, 'theirs.qcow', size, {}, extra);
  await io(dir, 'theirs.qcow', writes.map((w) => `write -q -P ${w.pat} ${w.off} ${w.len}`), 'qcow');
  const d = await ourCreate(path.join(dir, 'ours.qcow'), size, backing?.file);
  for (const w of writes) await d.write(w.off, new Uint8Array(w.len).fill(w.pat));
  await d.close();
  expect(await fileDifference(path.join(dir, 'ours.qcow'), path.join(dir, 'theirs.qcow'))).toBe('');
}

describe('the same writes through our driver and qemu-io give byte-identical files', () => {
  it('default geometry: partial, multi-cluster and L2-straddling writes', async () => {
    await sameWritesSameFile('default', 10 * MiB, [
      { off: 0, len: 512, pat: 0x11 },
      { off: 5000, len: 10000, pat: 0x22 },
      { off: 4 * MiB, len: 100, pat: 0x33 },
      { off: 2 * MiB - 100, len: 300, pat: 0x44 },
      { off: 100, len: 10, pat: 0x55 }, // in place
      { off: 10 * MiB - 4096, len: 4096, pat: 0x66 },
      { off: 7 * MiB + 3, len: 70000, pat: 0x77 },
    ]);
  });

  it('with a qcow2 backing file (512-byte clusters, 32 KiB L2 tables)', async () => {
    const dir = sub('same-with_a_qcow2_backing');
    await create(dir, 'base.qcow2', 3 * MiB);
    await io(dir, 'base.qcow2', ['write -q -P 0xaa 0 3M']);
    await sameWritesSameFile(
      'with a qcow2 backing',
      4 * MiB,
      [
        { off: 0, len: 512, pat: 0x11 },
        { off: 1000, len: 3000, pat: 0x22 },
        { off: 2 * MiB - 512, len: 1024, pat: 0x33 },
        { off: 3 * MiB - 512, len: 4096, pat: 0x44 },
      ],
      { file: 'base.qcow2', fmt: 'qcow2' },
    );
  });
});

// ------------------------------------------------------------------------------------------------

type Op = { t: 'write'; off: number; len: number; pat: number } | { t: 'zero'; off: number; len: number } | { t: 'flush' };

function opsArb(size: number): fc.Arbitrary<Op[]> {
  const range = fc
    .tuple(fc.nat({ max: size - 1 }), fc.integer({ min: 1, max: 20000 }))
    .map(([off, len]) => ({ off, len: Math.min(len, size - off) }));
  return fc.array(
    fc.oneof(
      { weight: 6, arbitrary: fc.tuple(range, fc.integer({ min: 1, max: 255 })).map(([r, pat]) => ({ t: 'write' as const, ...r, pat })) },
      { weight: 2, arbitrary: range.map((r) => ({ t: 'zero' as const, ...r })) },
      { weight: 1, arbitrary: fc.constant({ t: 'flush' as const }) },
    ),
    { minLength: 1, maxLength: 20 },
  );
}

describe('random writes through our driver, checked by qemu-img and qemu-io', () => {
  it('without and with a backing file', async () => {
    const dir = sub('random');
    const baseSize = 700 * KiB;
    const base = randomBytes(99, baseSize);
    fs.writeFileSync(path.join(dir, 'base.raw'), base);
    let run = 0;
    await fc.assert(
      fc.asyncProperty(
        fc.boolean(),
        fc.integer({ min: 1, max: 2048 }).chain((n) => fc.tuple(fc.constant(n * 512), opsArb(n * 512))),
        async (backed, [size, ops]) => {
          const name = `r${run++}.qcow`;
          const file = path.join(dir, name);
          const d = await ourCreate(file, size, backed ? 'base.raw' : undefined);
          const model = new Uint8Array(size);
          if (backed) model.set(base.subarray(0, Math.min(size, baseSize)));
          for (const op of ops) {
            if (op.t === 'write') {
              await d.write(op.off, new Uint8Array(op.len).fill(op.pat));
              model.fill(op.pat, op.off, op.off + op.len);
            } else if (op.t === 'zero') {
              await d.writeZeroes(op.off, op.len);
              model.fill(0, op.off, op.off + op.len);
            } else await d.flush();
          }
          await d.close();
          const raw = await qemuRaw(dir, name);
          expect(raw.length).toBe(size);
          expect(raw.equals(Buffer.from(model)), `qemu-img convert differs for ${JSON.stringify({ backed, size, ops })}`).toBe(true);
          // qemu-io pattern reads of the last few pattern writes that were not overwritten later.
          const checks: string[] = [];
          for (let i = ops.length - 1; i >= 0 && checks.length < 3; i--) {
            const op = ops[i]!;
            if (op.t !== 'write') continue;
            if (model.subarray(op.off, op.off + op.len).every((b) => b === op.pat)) checks.push(`read -q -P ${op.pat} ${op.off} ${op.len}`);
          }
          if (checks.length) {
            const r = await qemuIo(['-f', 'qcow', ...checks.flatMap((c) => ['-c', c]), name], { cwd: dir });
            expect(r.stdout + r.stderr, describeResult(r)).not.toMatch(/fail|error/i);
          }
          // qemu-img map agrees with our block status.
          const m = await must(qemuImg(['map', '--output=json', '-f', 'qcow', name], { cwd: dir }));
          const r2 = await openAny(file);
          expect(await ourMap(r2)).toEqual(JSON.parse(m.stdout));
          await r2.close();
          fs.rmSync(file);
        },
      ),
      { numRuns: 12 },
    );
  });
});

// ------------------------------------------------------------------------------------------------

describe('compressed clusters written by our driver', () => {
  it('a whole image compressed like convert -c -O qcow is read by qemu-img', async () => {
    const dir = sub('compressed');
    const size = 2 * MiB + 1536;
    mixedRawFile(dir, 'src.raw', 5, size, 5 * KiB);
    const src = fs.readFileSync(path.join(dir, 'src.raw'));
    const d = await ourCreate(path.join(dir, 'c.qcow'), size);
    const cs = d.g.clusterSize;
    for (let off = 0; off < size; off += cs) {
      const n = Math.min(cs, size - off);
      const cluster = new Uint8Array(cs);
      cluster.set(src.subarray(off, off + n));
      if (cluster.every((b) => b === 0)) continue;
      const c = await codecs().deflateRaw!(cluster, cs);
      if (c) await d.writeCompressed(off, c);
      else await d.write(off, cluster.subarray(0, n));
    }
    // Partial rewrite of a compressed cluster, then a compressed write over a normal one.
    await d.write(cs + 10, new Uint8Array(20).fill(0x5a));
    src.fill(0x5a, cs + 10, cs + 30);
    await d.close();
    fs.writeFileSync(path.join(dir, 'expected.raw'), src);
    const cmp = await qemuImg(['compare', '-f', 'raw', '-F', 'qcow', 'expected.raw', 'c.qcow'], { cwd: dir });
    expect(cmp.code, describeResult(cmp)).toBe(0);
    const m = await must(qemuImg(['map', '--output=json', '-f', 'qcow', 'c.qcow'], { cwd: dir }));
    const r = await openAny(path.join(dir, 'c.qcow'));
    const ours = await ourMap(r);
    expect(ours).toEqual(JSON.parse(m.stdout));
    expect(ours.some((e) => e.data && e.offset === undefined)).toBe(true); // some clusters are compressed
    await r.close();
  });

  it('same compressed layout as qemu-io write -c', async () => {
    const dir = sub('compressed-same');
    const writes = [0, 3, 4, 10].map((c) => ({ c, pat: 0x30 + c }));
    await create(dir, 'theirs.qcow', MiB, {}, { fmt: 'qcow' });
    await mustIo(['-f', 'qcow', ...writes.flatMap((w) => ['-c', `write -q -c -P ${w.pat} ${w.c * 4096} 4096`]), 'theirs.qcow'], { cwd: dir });
    const d = await ourCreate(path.join(dir, 'ours.qcow'), MiB);
    for (const w of writes) {
      const c = zlib.deflateRawSync(new Uint8Array(4096).fill(w.pat), { windowBits: 12, memLevel: 9, level: 6 });
      await d.writeCompressed(w.c * 4096, c);
    }
    await d.close();
    expect(await fileDifference(path.join(dir, 'ours.qcow'), path.join(dir, 'theirs.qcow'))).toBe('');
  });
});
