/**
 * `qcowkit nbd -B NAME`: persistent dirty bitmaps exported as `qemu:dirty-bitmap:NAME`, compared
 * with qemu-nbd 7.2 serving the same image (nbdinfo --list/--json/--map, qemu-img map with
 * x-dirty-bitmap, which asks one extent at a time), live marking by writes through a writable
 * export, bitmaps found down the backing chain, and qemu-nbd's errors.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { create, img, io } from '../helpers/build.js';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { headerExtensions, EXT } from '../helpers/qcow2.js';
import { DIST, describeResult, must, qemuImg, qemuIo, qk, run } from '../helpers/proc.js';
import { nbdinfo, normalize, startServer, stopAll, type Served } from './harness.js';

const MiB = 1024 * 1024;
let dir: string;

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Any = any;
let M: Record<string, Any> = {};

beforeAll(async () => {
  dir = makeTmpDir('qk-nbd-bm-');
  const imp = (p: string) => import(pathToFileURL(path.join(DIST, p)).href);
  const [bm, meta] = await Promise.all([imp('nbd/dirty-bitmap.js'), imp('nbd/meta-context.js')]);
  M = { ...bm, ...meta };

  // qemu-img bitmap --add + qemu-io writes: b0 (64 KiB, enabled throughout), b1 (4 KiB, disabled
  // half-way), and a 512-byte one.
  await create(dir, 'a.qcow2', 8 * MiB, { cluster_size: 65536 });
  await img(dir, ['bitmap', '--add', 'a.qcow2', 'b0']);
  await img(dir, ['bitmap', '--add', '-g', '4096', 'a.qcow2', 'b1']);
  await img(dir, ['bitmap', '--add', '-g', '512', 'a.qcow2', 'fine']);
  await io(dir, 'a.qcow2', ['write -q -P 1 100k 10k', 'write -q -P 2 3M 1M', 'write -q -z 6M 64k', 'write -q 1000 1']);
  await img(dir, ['bitmap', '--disable', 'a.qcow2', 'b1']);
  await io(dir, 'a.qcow2', ['write -q 7M 4k', 'write -q -P 3 8388096 512']);

  // Made by our own bitmap command, then dirtied by qemu-io and merged by us.
  await create(dir, 'ours.qcow2', 5 * MiB + 512 * 3, { cluster_size: 4096 });
  await must(qk(['bitmap', '--add', '-g', '8192', 'ours.qcow2', 'mine'], { cwd: dir }));
  await must(qk(['bitmap', '--add', 'ours.qcow2', 'other', '--disable'], { cwd: dir }));
  await io(dir, 'ours.qcow2', ['write -q 4096 8192', 'write -q 2M 300k', 'write -q -z 5M 1536']);
  await must(qk(['bitmap', '--merge', 'mine', 'ours.qcow2', 'other'], { cwd: dir }));

  // A chain whose base holds the bitmap (QEMU finds bitmaps down the backing chain).
  await create(dir, 'base.qcow2', 2 * MiB);
  await img(dir, ['bitmap', '--add', 'base.qcow2', 'deep']);
  await io(dir, 'base.qcow2', ['write -q 64k 128k', 'write -q 1M 4k']);
  await create(dir, 'top.qcow2', 4 * MiB, {}, { backing: 'base.qcow2', backingFmt: 'qcow2' });
  await io(dir, 'top.qcow2', ['write -q 3M 64k']);
}, 60_000);

afterAll(async () => {
  await stopAll();
  removeTmpDir(dir);
});

const uriOpts = (s: Served, ctx: string) =>
  `driver=nbd,server.type=unix,server.path=${s.socket},x-dirty-bitmap=${ctx}`;

/** Start ours and qemu-nbd with the same arguments, run each client on both, compare. */
async function compareWithQemu(
  args: string[] | ((qemu: boolean) => string[]),
  clients: Array<(s: Served) => Promise<string>>,
): Promise<Array<[string, string]>> {
  const argsFor = (q: boolean) => (typeof args === 'function' ? args(q) : args);
  const ours = await startServer(argsFor(false), { dir, unix: true });
  const theirs = await startServer(argsFor(true), { dir, unix: true, qemu: true });
  try {
    const out: Array<[string, string]> = [];
    for (const c of clients) out.push([normalize(await c(ours), ours), normalize(await c(theirs), theirs)]);
    return out;
  } finally {
    expect((await ours.stop()).code).toBe(0);
    await theirs.stop();
  }
}

const nbdinfoOut = (args: string[]) => async (s: Served) => {
  const r = await nbdinfo([...args, s.uri()]);
  if (r.code !== 0) throw new Error(describeResult(r));
  return r.stdout;
};

const qemuMap = (ctx: string) => async (s: Served) =>
  (await must(qemuImg(['map', '--output=json', '--image-opts', uriOpts(s, ctx)]))).stdout;

describe('nbd -B: dirty bitmaps as qemu-nbd exports them', () => {
  it('read-only: --list, --json, --map of each bitmap and qemu-img map (one extent a request)', async () => {
    const res = await compareWithQemu(
      ['-t', '-r', '-f', 'qcow2', '-A', '-B', 'b0', '-B', 'b1', '-B', 'fine', 'a.qcow2'],
      [
        nbdinfoOut(['--list']),
        nbdinfoOut(['--json']),
        nbdinfoOut(['--map=qemu:dirty-bitmap:b0']),
        nbdinfoOut(['--map=qemu:dirty-bitmap:b1']),
        nbdinfoOut(['--map=qemu:dirty-bitmap:fine']),
        nbdinfoOut(['--map=qemu:dirty-bitmap:fine', '--totals']),
        nbdinfoOut(['--map=qemu:allocation-depth']),
        qemuMap('qemu:dirty-bitmap:b0'),
        qemuMap('qemu:dirty-bitmap:b1'),
        qemuMap('qemu:dirty-bitmap:fine'),
      ],
    );
    for (const [ours, theirs] of res) expect(ours).toBe(theirs);
    // The order of the contexts is qemu-nbd's: last -B first.
    expect(res[0]![0]).toMatch(/base:allocation\s+qemu:allocation-depth\s+qemu:dirty-bitmap:fine\s+qemu:dirty-bitmap:b1\s+qemu:dirty-bitmap:b0/);
    // And the maps say something: b0 has dirty and clean parts.
    expect(res[2]![0]).toMatch(/\bdirty\b/);
    expect(res[2]![0]).toMatch(/\bclean\b/);
  });

  it('bitmaps made by our bitmap command (odd image size, 4 KiB clusters, merged)', async () => {
    const res = await compareWithQemu(
      ['-t', '-r', '-B', 'other', '-B', 'mine', '-B', 'other', 'ours.qcow2'],
      [
        nbdinfoOut(['--list']),
        nbdinfoOut(['--map=qemu:dirty-bitmap:mine']),
        nbdinfoOut(['--map=qemu:dirty-bitmap:other']),
        qemuMap('qemu:dirty-bitmap:other'),
        qemuMap('qemu:dirty-bitmap:mine'),
      ],
    );
    for (const [ours, theirs] of res) expect(ours).toBe(theirs);
    expect(res[2]![0]).toMatch(/\bdirty\b/);
  });

  it('a bitmap of the backing file, through the chain and under -s', async () => {
    for (const extra of [['-r'], ['-s']]) {
      const res = await compareWithQemu(
        ['-t', ...extra, '-B', 'deep', 'top.qcow2'],
        [
          nbdinfoOut(['--map=qemu:dirty-bitmap:deep']),
          async (s) => {
            if (extra[0] === '-s') await must(qemuIo(['-f', 'raw', '-c', 'write 64k 4k', '-c', 'write 3M 4k', s.uri()]));
            return (await nbdinfo(['--map=qemu:dirty-bitmap:deep', s.uri()])).stdout;
          },
          qemuMap('qemu:dirty-bitmap:deep'),
        ],
      );
      for (const [ours, theirs] of res) expect(ours).toBe(theirs);
      // Past the end of the (shorter) 2 MiB base everything is clean, up to the 4 MiB export end.
      expect(res[0]![0]).toMatch(/1114112\s+3080192\s+0\s+clean\n$/);
    }
  });

  it('writable export: writes mark an enabled bitmap live; a disabled one stays; the image is marked too', async () => {
    for (const who of ['ours', 'qemu']) fs.copyFileSync(path.join(dir, 'a.qcow2'), path.join(dir, `w-${who}.qcow2`));
    const writes = ['write 5M 4k', 'write -z 5200k 4k', 'write 1M 1', 'write -P 7 2M 200k'];
    const res = await compareWithQemu(
      (q) => ['-t', '-f', 'qcow2', '-B', 'b0', '-B', 'b1', q ? 'w-qemu.qcow2' : 'w-ours.qcow2'],
      [
        nbdinfoOut(['--json']),
        async (s) => {
          const args = ['-f', 'raw'];
          for (const w of writes) args.push('-c', w);
          await must(qemuIo([...args, s.uri()]));
          return (await nbdinfo(['--map=qemu:dirty-bitmap:b0', s.uri()])).stdout;
        },
        nbdinfoOut(['--map=qemu:dirty-bitmap:b1']),
      ],
    );
    for (const [ours, theirs] of res) expect(ours).toBe(theirs);
    expect(res[1]![0]).toMatch(/5242880\s+131072\s+1\s+dirty/);
    // After a clean shutdown both images are consistent and hold the same bitmaps.
    for (const who of ['ours', 'qemu']) await must(qemuImg(['check', `w-${who}.qcow2`], { cwd: dir }));
    const persisted = await compareWithQemu(
      (q) => ['-t', '-r', '-B', 'b0', '-B', 'b1', q ? 'w-qemu.qcow2' : 'w-ours.qcow2'],
      [nbdinfoOut(['--map=qemu:dirty-bitmap:b0']), nbdinfoOut(['--map=qemu:dirty-bitmap:b1'])],
    );
    for (const [ours, theirs] of persisted) expect(ours).toBe(theirs);
    expect(persisted[0]![0]).toBe(res[1]![0]);
  });

  it('--discard=unmap: discards mark the whole request range, as in qemu-nbd', async () => {
    for (const who of ['ours', 'qemu']) fs.copyFileSync(path.join(dir, 'a.qcow2'), path.join(dir, `d-${who}.qcow2`));
    const res = await compareWithQemu(
      (q) => ['-t', '-f', 'qcow2', '--discard=unmap', '-B', 'b0', q ? 'd-qemu.qcow2' : 'd-ours.qcow2'],
      [
        async (s) => {
          await must(qemuIo(['-f', 'raw', '-c', 'discard 2M 4k', '-c', 'discard 2200k 256k', '-c', 'write -z 7800k 4k', s.uri()]));
          return (await nbdinfo(['--map=qemu:dirty-bitmap:b0', s.uri()])).stdout;
        },
      ],
    );
    for (const [ours, theirs] of res) expect(ours).toBe(theirs);
    expect(res[0]![0]).toMatch(/2097152\s+65536\s+1\s+dirty/);
  });

  it('refuses what qemu-nbd refuses, with its messages', async () => {
    fs.copyFileSync(path.join(dir, 'a.qcow2'), path.join(dir, 'inuse.qcow2'));
    // Set in_use on the first directory entry (b0), as a crashed writer leaves it.
    const f = path.join(dir, 'inuse.qcow2');
    const ext = headerExtensions(f).find((e) => e.type === EXT.bitmaps)!;
    const dirOff = Number(ext.data.readBigUInt64BE(16));
    const flags = fs.readFileSync(f).readUInt32BE(dirOff + 12);
    const fd = fs.openSync(f, 'r+');
    const b = Buffer.alloc(4);
    b.writeUInt32BE(flags | 1);
    fs.writeSync(fd, b, 0, 4, dirOff + 12);
    fs.closeSync(fd);
    await must(qemuImg(['convert', '-O', 'raw', 'a.qcow2', 'a.raw'], { cwd: dir }));
    const cases: string[][] = [
      ['-r', '-B', 'nope', 'a.qcow2'],
      ['-B', 'nope', 'a.qcow2'],
      ['-r', '-B', 'x1', '-B', 'x2', 'a.qcow2'], // the last -B is checked first
      ['-r', '-B', 'b0', 'inuse.qcow2'],
      ['-r', '-B', 'b1', '-B', 'b0', 'inuse.qcow2'],
      ['-r', '-B', 'b0', '-B', 'x9', 'inuse.qcow2'],
      ['-r', '-f', 'raw', '-B', 'b0', 'a.raw'],
      ['-r', '-o', '65536', '-B', 'b0', 'a.qcow2'], // the offset layer hides the bitmaps
      ['-r', '-B', '', 'a.qcow2'],
    ];
    const sock = path.join(dir, 'never.sock');
    for (const c of cases) {
      const ours = await qk(['nbd', '-k', sock, ...c], { cwd: dir });
      const theirs = await run('qemu-nbd', ['-k', sock, ...c], { cwd: dir, timeout: 10_000 });
      expect(theirs.code, describeResult(theirs)).toBe(1);
      expect(ours.code, describeResult(ours)).toBe(1);
      const msg = (s: string) => s.trim().replace(/^(qemu-nbd|qcowkit( nbd)?): /, '');
      expect(msg(ours.stderr)).toBe(msg(theirs.stderr));
    }
    // A consistent bitmap of the same image is still served.
    const res = await compareWithQemu(['-t', '-r', '-B', 'b1', 'inuse.qcow2'], [nbdinfoOut(['--list'])]);
    for (const [ours, theirs] of res) expect(ours).toBe(theirs);
  });
});

describe('dirty bitmap extents and context matching', () => {
  /** Model: the state of every byte from the bits, then runs. */
  function modelExtents(bits: Uint8Array, g: number, size: number, offset: number, length: number, max: number) {
    const out: Array<{ length: number; flags: number }> = [];
    for (let pos = offset; pos < offset + length; pos++) {
      const bit = Math.floor(pos / g);
      const v = pos < size && bits[bit >> 3]! & (1 << (bit & 7)) ? 1 : 0;
      const last = out[out.length - 1];
      if (last && last.flags === v) last.length++;
      else out.push({ length: 1, flags: v });
    }
    return out.slice(0, max);
  }

  it('extents() and mark() agree with a byte-by-byte model', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 4 }),
        fc.integer({ min: 1, max: 3000 }),
        fc.uint8Array({ minLength: 0, maxLength: 64 }),
        fc.array(fc.tuple(fc.nat(3200), fc.nat(900))),
        fc.nat(3200),
        fc.integer({ min: 1, max: 3300 }),
        fc.integer({ min: 1, max: 6 }),
        (gBits, size, seed, marks, offset, length, max) => {
          const g = 1 << gBits;
          const nbits = Math.ceil(size / g);
          const bits = new Uint8Array(Math.ceil(nbits / 8));
          for (let i = 0; i < nbits; i++) if ((seed[i % Math.max(1, seed.length)] ?? 0) & (1 << (i % 8))) bits[i >> 3]! |= 1 << (i & 7);
          const view = new M.DirtyBitmapView('x', bits.slice(), g, size, true);
          const model = bits.slice();
          for (const [o, l] of marks) {
            view.mark(o, l);
            for (let p = o; p < Math.min(o + l, size); p++) model[Math.floor(p / g) >> 3]! |= 1 << (Math.floor(p / g) & 7);
          }
          const got = view.extents(offset, length, max);
          expect(got).toEqual(modelExtents(model, g, size, offset, length, max));
        },
      ),
      { numRuns: 300, seed: 7 },
    );
  });

  it('LIST and SET queries select bitmap contexts as qemu-nbd does', () => {
    const src = { allocationDepth: false, bitmaps: ['b1', 'b0', 'b1'] };
    const names = (q: string[], listing: boolean) => M.matchContexts(src, q, listing).map((c: Any) => `${c.id}:${c.name}`);
    expect(names([], true)).toEqual(['0:base:allocation', '2:qemu:dirty-bitmap:b1', '3:qemu:dirty-bitmap:b0', '4:qemu:dirty-bitmap:b1']);
    expect(names(['qemu:dirty-bitmap:'], true)).toEqual(['2:qemu:dirty-bitmap:b1', '3:qemu:dirty-bitmap:b0', '4:qemu:dirty-bitmap:b1']);
    expect(names(['qemu:'], true)).toEqual(['2:qemu:dirty-bitmap:b1', '3:qemu:dirty-bitmap:b0', '4:qemu:dirty-bitmap:b1']);
    expect(names(['qemu:dirty-bitmap:'], false)).toEqual([]);
    expect(names(['qemu:dirty-bitmap:b1'], false)).toEqual(['2:qemu:dirty-bitmap:b1']);
    expect(names(['qemu:dirty-bitmap:b0', 'base:allocation', 'qemu:dirty-bitmap:zz'], false)).toEqual(['0:base:allocation', '3:qemu:dirty-bitmap:b0']);
  });
});
