/** `snapshot` against qemu-img 7.2 on twin copies (see twin.ts). */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../../src/block/open.js';
import type { Qcow2Driver } from '../../src/formats/qcow2/driver.js';
import { SnapshotOps } from '../../src/formats/qcow2/snapshot.js';
import { fileProvider } from '../../src/io/file.js';
import { registerNodeCodecs } from '../../src/codecs/node.js';
import { expectSameBytes } from '../helpers/compare.js';
import { makeTmpDir, patchU32, patchU64, readAt, readU32, readU64, removeTmpDir, sha256File } from '../helpers/files.js';
import { qemuImg, qk } from '../helpers/proc.js';
import { create, img, io, runTwin, type TwinCase } from './twin.js';

const M = 1024 * 1024;

/** 16 MiB v3 image with data, two snapshots s1 (data A) and s2 (data A+B), then data C. */
async function withSnapshots(dir: string): Promise<void> {
  await create(dir, 'a.qcow2', 16 * M);
  await io(dir, 'a.qcow2', ['write -q -P 0x11 0 1M', 'write -q -z 2M 64k']);
  await img(dir, ['snapshot', '-c', 's1', 'a.qcow2']);
  await io(dir, 'a.qcow2', ['write -q -P 0x22 512k 1M']);
  await img(dir, ['snapshot', '-c', 's2', 'a.qcow2']);
  await io(dir, 'a.qcow2', ['write -q -P 0x33 8M 192k', 'write -q -z 0 64k']);
}

const cases: TwinCase[] = [
  { name: 'list (-U -q)', spawn: true, build: withSnapshots, args: ['snapshot', '-U', '-q', '-l', 'a.qcow2'], expectCode: 0 },
  {
    name: 'list without snapshots prints nothing',
    build: (d) => create(d, 'a.qcow2', M),
    args: ['snapshot', '-l', 'a.qcow2'],
    expectCode: 0,
  },
  {
    name: 'list on raw and qcow v1',
    build: async (d) => {
      await create(d, 'r.raw', M, {}, { fmt: 'raw' });
    },
    args: ['snapshot', '-l', 'r.raw'],
    expectCode: 0,
  },
  { name: 'create', spawn: true, build: withSnapshots, args: ['snapshot', '-c', 'new', 'a.qcow2'], expectCode: 0 },
  { name: 'create with a duplicate name', build: withSnapshots, args: ['snapshot', '-c', 's1', 'a.qcow2'], expectCode: 0 },
  {
    name: 'create on a v2 image with 512-byte clusters',
    build: async (d) => {
      await create(d, 'a.qcow2', 4 * M, { compat: '0.10', cluster_size: 512 });
      await io(d, 'a.qcow2', ['write -q -P 7 1000 300k']);
    },
    args: ['snapshot', '-c', 'x', 'a.qcow2'],
    expectCode: 0,
  },
  {
    name: 'create on an overlay',
    build: async (d) => {
      await create(d, 'base.qcow2', 4 * M);
      await io(d, 'base.qcow2', ['write -q -P 1 0 4M']);
      await create(d, 'top.qcow2', undefined, {}, { backing: 'base.qcow2' });
      await io(d, 'top.qcow2', ['write -q -P 2 1M 64k']);
    },
    args: ['snapshot', '-c', 'o', 'top.qcow2'],
    expectCode: 0,
  },
  {
    // qemu-img fails with EINVAL (and leaks a cluster); qcowkit fails the same way, image untouched
    name: 'create with 2-bit refcounts overflowing',
    build: async (d) => {
      await create(d, 'a.qcow2', 4 * M, { refcount_bits: 2 });
      await io(d, 'a.qcow2', ['write -q -P 1 0 64k']);
      await img(d, ['snapshot', '-c', 'a', 'a.qcow2']);
      await img(d, ['snapshot', '-c', 'b', 'a.qcow2']);
    },
    args: ['snapshot', '-c', 'c', 'a.qcow2'],
    expectCode: 1,
  },
  {
    name: 'create on qcow v1 is refused',
    build: (d) => create(d, 'v1.qcow', M, {}, { fmt: 'qcow' }),
    args: ['snapshot', '-c', 's', 'v1.qcow'],
    expectCode: 1,
  },
  {
    name: 'create on probed raw: warning and refusal',
    build: (d) => create(d, 'r.raw', M, {}, { fmt: 'raw' }),
    args: ['snapshot', '-c', 's', 'r.raw'],
    expectCode: 1,
  },
  { name: 'apply by id', build: withSnapshots, args: ['snapshot', '-a', '2', 'a.qcow2'], expectCode: 0 },
  {
    name: 'apply restores the size recorded with the snapshot',
    build: async (d) => {
      await withSnapshots(d);
      await img(d, ['resize', 'a.qcow2', '24M']);
      await io(d, 'a.qcow2', ['write -q -P 0x44 20M 64k']);
    },
    args: ['snapshot', '-a', 's1', 'a.qcow2'],
    expectCode: 0,
  },
  { name: 'apply a missing snapshot', build: withSnapshots, args: ['snapshot', '-a', 'nope', 'a.qcow2'], expectCode: 1 },
  { name: 'delete by name', build: withSnapshots, args: ['snapshot', '-d', 's1', 'a.qcow2'], expectCode: 0 },
  // qemu-img deletes by name only: an ID is "not found"
  { name: 'delete by id is refused', build: withSnapshots, args: ['snapshot', '-d', '2', 'a.qcow2'], expectCode: 1 },
  {
    name: 'delete the snapshot named like an id',
    build: async (d) => {
      await withSnapshots(d);
      await img(d, ['snapshot', '-c', '1', 'a.qcow2']);
    },
    args: ['snapshot', '-d', '1', 'a.qcow2'],
    expectCode: 0,
  },
  { name: 'delete a missing snapshot', spawn: true, build: withSnapshots, args: ['snapshot', '-d', 'nope', 'a.qcow2'], expectCode: 1 },
  {
    name: 'delete on qcow v1, apply on raw',
    build: (d) => create(d, 'v1.qcow', M, {}, { fmt: 'qcow' }),
    args: ['snapshot', '-d', 's', 'v1.qcow'],
    expectCode: 1,
  },
  {
    name: 'apply on raw',
    build: (d) => create(d, 'r.raw', M, {}, { fmt: 'raw' }),
    args: ['snapshot', '-a', 's', 'r.raw'],
    expectCode: 1,
  },
  { name: '-U with a write action', build: withSnapshots, args: ['snapshot', '-U', '-c', 'x', 'a.qcow2'], expectCode: 1 },
  { name: 'no action', build: withSnapshots, args: ['snapshot', 'a.qcow2'], expectCode: 0 },
  { name: 'mixed actions', build: withSnapshots, args: ['snapshot', '-l', '-c', 'x', 'a.qcow2'], expectCode: 1 },
  { name: 'no -f option', build: withSnapshots, args: ['snapshot', '-f', 'qcow2', '-l', 'a.qcow2'], expectCode: 1 },
  { name: 'missing file', build: async () => {}, args: ['snapshot', '-l', 'nonexist.qcow2'], expectCode: 1 },
  {
    name: 'missing backing file',
    build: async (d) => {
      await create(d, 'base.qcow2', M);
      await create(d, 'top.qcow2', undefined, {}, { backing: 'base.qcow2' });
      await img(d, ['rebase', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', 'top.qcow2']);
    },
    args: ['snapshot', '-c', 's', 'top.qcow2'],
    expectCode: 1,
    images: [],
  },
];

/**
 * A snapshot holding VM state, as QEMU's savevm leaves it (qemu-img and qemu-io cannot write VM
 * state: `qemu-img snapshot -c` always records vm_state_size 0). Built by hand: a 1 GiB image
 * gets data at 0 and a 128 KiB "VM state" at 512 MiB (= l1_vm_state_index 1 for a 4 MiB disk),
 * qemu-img takes snapshot vm1, the VM state is discarded from the active state (as QEMU does
 * after savevm), then the header size becomes 4 MiB and the snapshot entry records disk_size
 * 4 MiB and vm_state_size 128 KiB. `qemu-img check` finds it clean, `snapshot -l` lists VM SIZE 128 KiB.
 */
function withVmState(compat: '1.1' | '0.10') {
  return async (dir: string): Promise<void> => {
    const f = path.join(dir, 'vm.qcow2');
    await create(dir, 'vm.qcow2', '1G', { compat });
    await io(dir, 'vm.qcow2', ['write -q -P 0x11 0 1M', 'write -q -P 0x77 512M 128k']);
    await img(dir, ['snapshot', '-c', 'vm1', 'vm.qcow2']);
    await io(dir, 'vm.qcow2', ['discard -q 512M 128k', 'write -q -P 0x22 0 64k']);
    const so = Number(readU64(f, 64));
    patchU64(f, 24, BigInt(4 * M));
    patchU32(f, so + 32, 128 * 1024);
    patchU64(f, so + 40, BigInt(128 * 1024));
    patchU64(f, so + 48, BigInt(4 * M));
    const l = await qemuImg(['snapshot', '-l', 'vm.qcow2'], { cwd: dir });
    if (!/vm1\s+128 KiB/.test(l.stdout)) throw new Error(`fixture: no VM state listed\n${l.stdout}`);
  };
}

/** The VM state bytes of snapshot `name` (found by walking its L1/L2 tables in the file). */
function vmState(file: string, name: string): Buffer {
  const cs = 2 ** readU32(file, 20);
  const n = readU32(file, 60);
  let pos = Number(readU64(file, 64));
  for (let i = 0; i < n; i++) {
    const e = readAt(file, pos, 40);
    const idLen = e.readUInt16BE(12);
    const nameLen = e.readUInt16BE(14);
    const extra = e.readUInt32BE(36);
    const x = readAt(file, pos + 40, extra + idLen + nameLen);
    const vmSize = Number(x.readBigUInt64BE(0));
    const diskSize = Number(x.readBigUInt64BE(8));
    if (x.subarray(extra + idLen).toString() === name) {
      const l1 = Number(e.readBigUInt64BE(0));
      const idx = Math.ceil(diskSize / (cs * (cs / 8)));
      const l2 = Number(readU64(file, l1 + idx * 8) & 0x00fffffffffffe00n);
      const out = Buffer.alloc(vmSize);
      if (!l2) return out;
      for (let k = 0; k * cs < vmSize; k++) {
        const host = Number(readU64(file, l2 + k * 8) & 0x00fffffffffffe00n);
        if (host) readAt(file, host, Math.min(cs, vmSize - k * cs)).copy(out, k * cs);
      }
      return out;
    }
    pos += (40 + extra + idLen + nameLen + 7) & ~7;
  }
  throw new Error(`no snapshot ${name} in ${file}`);
}

const vmStateIntact = async (q: string, k: string) => {
  for (const d of [q, k]) {
    const v = vmState(path.join(d, 'vm.qcow2'), 'vm1');
    expect(v.length).toBe(128 * 1024);
    expect(v.every((b) => b === 0x77), `${d === q ? 'qemu-img' : 'qcowkit'}: VM state of vm1 changed`).toBe(true);
  }
};

for (const compat of ['1.1', '0.10'] as const) {
  const build = withVmState(compat);
  cases.push(
    { name: `VM state (compat ${compat}): create keeps it`, build, args: ['snapshot', '-c', 'later', 'vm.qcow2'], expectCode: 0, after: vmStateIntact },
    { name: `VM state (compat ${compat}): apply keeps it`, build, args: ['snapshot', '-a', 'vm1', 'vm.qcow2'], expectCode: 0, after: vmStateIntact },
    // check (on ours, in runTwin) finds no leaks: the VM state clusters were freed exactly.
    { name: `VM state (compat ${compat}): delete frees it`, build, args: ['snapshot', '-d', 'vm1', 'vm.qcow2'], expectCode: 0 },
    {
      name: `VM state (compat ${compat}): another snapshot created and deleted`,
      build: async (d) => {
        await build(d);
        await img(d, ['snapshot', '-c', 'mid', 'vm.qcow2']);
      },
      args: ['snapshot', '-d', 'mid', 'vm.qcow2'],
      expectCode: 0,
      after: vmStateIntact,
    },
  );
}

cases.push(
  {
    // qemu-img fails with EINVAL and leaks a cluster; qcowkit refuses before writing anything
    name: 'create with 1-bit refcounts',
    build: async (d) => {
      await create(d, 'a.qcow2', 4 * M, { refcount_bits: 1 });
      await io(d, 'a.qcow2', ['write -q -P 1 0 128k']);
    },
    args: ['snapshot', '-c', 's', 'a.qcow2'],
    expectCode: 1,
  },
  { name: 'create on a v2 image with snapshots', build: async (d) => {
      await create(d, 'a.qcow2', 16 * M, { compat: '0.10' });
      await io(d, 'a.qcow2', ['write -q -P 0x11 0 1M', 'write -q -c -P 0x12 1M 64k']);
      await img(d, ['snapshot', '-c', 's1', 'a.qcow2']);
      await io(d, 'a.qcow2', ['write -q -P 0x22 512k 1M']);
    }, args: ['snapshot', '-c', 's2', 'a.qcow2'], expectCode: 0 },
);

describe('snapshot: a failed create leaves the image as it was', () => {
  for (const opts of [{ refcount_bits: 1 }, { refcount_bits: 1, lazy_refcounts: true }, { refcount_bits: 2 }] as Array<Record<string, number | boolean>>) {
    it(`library create refused with ${JSON.stringify(opts)}: byte-identical, clean, not dirty`, async () => {
      const dir = makeTmpDir('qk-snap-fail-');
      try {
        await create(dir, 'a.qcow2', 4 * M, opts);
        await io(dir, 'a.qcow2', ['write -q -P 1 0 128k', 'write -q -c -P 2 1M 64k']);
        if (opts.refcount_bits === 2) {
          await img(dir, ['snapshot', '-c', 'x', 'a.qcow2']);
          await img(dir, ['snapshot', '-c', 'y', 'a.qcow2']);
        }
        const file = path.join(dir, 'a.qcow2');
        const before = await sha256File(file);
        const drv = (await (registerNodeCodecs(), openImage(file, { io: fileProvider, readOnly: false }))) as Qcow2Driver;
        let err: unknown;
        try {
          await new SnapshotOps(drv, drv.writer!).create({ name: 's' });
        } catch (e) {
          err = e;
        }
        expect((err as { code?: string } | undefined)?.code, String(err)).toBe('ERANGE');
        // Still usable: a write goes through and the snapshot list is unchanged.
        expect(drv.snapshots.length).toBe(opts.refcount_bits === 2 ? 2 : 0);
        await drv.close();
        expect(await sha256File(file), 'image changed').toBe(before);
        expect(readU64(file, 72) & 1n, 'dirty bit left set').toBe(0n);
        const c = await qemuImg(['check', 'a.qcow2'], { cwd: dir });
        expect(c.code, c.stdout + c.stderr).toBe(0);
        // And through the CLI: qemu-img's message, exit 1, image unchanged.
        const r = await qk(['snapshot', '-c', 's', 'a.qcow2'], { cwd: dir });
        expect(r.code).toBe(1);
        expect(r.stderr).toBe("qcowkit: Could not create snapshot 's': -22 (Invalid argument)\n");
        expect(await sha256File(file)).toBe(before);
        expect(fs.readdirSync(dir)).toEqual(['a.qcow2']);
      } finally {
        removeTmpDir(dir);
      }
    });
  }
});

describe.concurrent('snapshot', () => {
  for (const c of cases) it(c.name, () => runTwin(c).then(() => undefined));
});

/**
 * v3 snapshot operations leave the file as qemu-img leaves it, byte for byte but for each
 * snapshot's creation time: clusters they free are discarded (QEMU's pass-discard-snapshot), the
 * snapshot table ends with its last entry, an applied snapshot's L1 table gets COPIED flags that
 * match the new refcounts.
 */
describe('snapshot (v3): the same bytes as qemu-img', () => {
  /** The file with every snapshot's date (seconds and nanoseconds) zeroed. */
  function withoutDates(file: string): Buffer {
    const d = Buffer.from(fs.readFileSync(file));
    const n = d.readUInt32BE(60);
    let o = Number(d.readBigUInt64BE(64));
    for (let i = 0; i < n; i++) {
      d.fill(0, o + 16, o + 24);
      const idLen = d.readUInt16BE(o + 12);
      const nameLen = d.readUInt16BE(o + 14);
      const extra = d.readUInt32BE(o + 36);
      o = (o + 40 + extra + idLen + nameLen + 7) & ~7;
    }
    return d;
  }

  const sequences: Array<[string, string[][]]> = [
    ['create, write, apply', [['-c', 's1'], ['write -q -P 9 0 1M'], ['-a', 's1']]],
    ['create, delete', [['-c', 's1'], ['-d', 's1']]],
    [
      'two snapshots, apply, delete, create, delete',
      [['-c', 's1'], ['-c', 's2'], ['write -q -P 9 0 1M'], ['-a', 's1'], ['-d', 's2'], ['-c', 's3'], ['-d', 's1']],
    ],
  ];
  for (const [name, steps] of sequences) {
    it(name, async () => {
      const d = makeTmpDir('qk-snap-bytes-');
      try {
        for (const f of ['q.qcow2', 'k.qcow2']) {
          await create(d, f, '64M');
          await io(d, f, ['write -q -P 1 0 3M', 'write -q -P 2 10M 5M', 'write -q -z 20M 1M', 'write -q -P 3 40M 64k']);
          for (const step of steps) {
            if (step[0]!.startsWith('write')) await io(d, f, [step[0]!]);
            else if (f === 'q.qcow2') await img(d, ['snapshot', ...step, f]);
            else expect((await qk(['snapshot', ...step, f], { cwd: d })).code).toBe(0);
          }
        }
        expectSameBytes(withoutDates(path.join(d, 'k.qcow2')), withoutDates(path.join(d, 'q.qcow2')));
      } finally {
        removeTmpDir(d);
      }
    });
  }
});
