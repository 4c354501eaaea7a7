/** `snapshot` against qemu-img 7.2 on twin copies (see twin.ts). */
import { describe, it } from 'vitest';
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

describe.concurrent('snapshot', () => {
  for (const c of cases) it(c.name, () => runTwin(c).then(() => undefined));
});
