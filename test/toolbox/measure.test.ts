/** `measure` against qemu-img 7.2 (see twin.ts): same numbers, same text and JSON, same errors. */
import { describe, it } from 'vitest';
import { create, img, io, runTwin, type TwinCase } from './twin.js';

const M = 1024 * 1024;

async function images(d: string): Promise<void> {
  // qcow2 v3 with data, a zero cluster, a snapshot and two bitmaps
  await create(d, 'a.qcow2', 64 * M);
  await io(d, 'a.qcow2', ['write -q -P 1 0 1M', 'write -q -z 1M 64k', 'write -q -P 2 5M 100k']);
  await img(d, ['snapshot', '-c', 's1', 'a.qcow2']);
  await io(d, 'a.qcow2', ['write -q -P 3 20M 1M']);
  await img(d, ['bitmap', '--add', 'a.qcow2', 'bm']);
  await img(d, ['bitmap', '--add', '-g', '4k', 'a.qcow2', 'bm-small']);
  // an image whose size is not a multiple of the cluster size, without bitmaps
  await create(d, 'odd.qcow2', 1000 * 1024 + 512);
  await io(d, 'odd.qcow2', ['write -q -P 4 0 100k']);
  // v2, overlay, raw, qcow v1
  await create(d, 'v2.qcow2', 4 * M, { compat: '0.10' });
  await io(d, 'v2.qcow2', ['write -q -P 5 1M 64k']);
  await create(d, 'top.qcow2', undefined, {}, { backing: 'a.qcow2' });
  await io(d, 'top.qcow2', ['write -q -P 6 30M 64k']);
  await create(d, 'r.raw', 2 * M, {}, { fmt: 'raw' });
  await io(d, 'r.raw', ['write -q -P 7 1M 64k'], 'raw');
  await create(d, 'v1.qcow', 4 * M, {}, { fmt: 'qcow' });
  await io(d, 'v1.qcow', ['write -q -P 8 0 64k'], 'qcow');
}

const runs: string[][] = [
  ['--size', '10G'],
  ['-O', 'qcow2', '--size', '10G'],
  ['-O', 'qcow2', '--output=json', '--size', '10G'],
  ['-O', 'raw', '--size', '1000'],
  ['-O', 'qcow2', '--size', '1000'],
  ['-O', 'qcow2', '-o', 'cluster_size=4k', '--size', '1G'],
  ['-O', 'qcow2', '-o', 'cluster_size=4k,refcount_bits=1', '--output=json', '--size', '1G'],
  ['-O', 'qcow2', '-o', 'cluster_size=2M', '--size', '1000'],
  ['-O', 'qcow2', '-o', 'preallocation=full', '--size', '1G'],
  ['-O', 'qcow2', '-o', 'compat=0.10', '--size', '1G'],
  ['-O', 'raw', '-o', 'preallocation=full', '--size', '1G'],
  // from images
  ['a.qcow2'],
  ['-O', 'qcow2', '--output=json', 'a.qcow2'],
  ['-O', 'qcow2', '-o', 'cluster_size=512', '--output=json', 'a.qcow2'],
  ['-O', 'qcow2', '-o', 'compat=0.10', '--output=json', 'a.qcow2'],
  ['-O', 'qcow2', '-o', 'preallocation=full', 'a.qcow2'],
  ['-O', 'qcow2', '-l', 's1', 'a.qcow2'],
  ['-O', 'qcow2', '--output=json', '-l', 'snapshot.name=s1', 'a.qcow2'],
  ['-O', 'qcow2', '-l', 'nope', 'a.qcow2'],
  ['-O', 'qcow2', '-U', 'odd.qcow2'],
  ['-O', 'qcow2', '--output=json', 'v2.qcow2'],
  ['-O', 'qcow2', 'top.qcow2'],
  ['-O', 'qcow2', 'r.raw'],
  ['-O', 'qcow2', '--output=json', '-f', 'raw', 'r.raw'],
  ['-O', 'qcow2', '-f', 'raw', 'a.qcow2'],
  ['-O', 'qcow2', '--output=json', 'v1.qcow'],
  ['-O', 'qcow2', '--image-opts', 'driver=qcow2,file.filename=a.qcow2'],
  // errors
  [],
  ['--size', '10G', 'a.qcow2'],
  ['-f', 'qcow2', '--size', '1G'],
  ['--size', 'abc'],
  ['-O', 'qcow2', '--size', '7E'],
  ['--output=xml', '--size', '1'],
  ['-O', 'vmdk', '--size', '1G'],
  ['-O', 'bogus', '--size', '1G'],
  ['-o', 'cluster_size=4k', '--size', '1G'],
  ['-O', 'qcow2', '-o', 'help', '--size', '1G'],
  ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=4k', '--size', '1G'],
  ['-O', 'qcow2', '-o', 'compat=v2', '--size', '1G'],
  ['-O', 'qcow2', '-o', 'compat=0.10,refcount_bits=8', '--size', '1G'],
  ['-O', 'qcow2', '-o', 'refcount_bits=3', '--size', '1G'],
  ['-O', 'qcow2', '-o', 'size=abc', '--size', '1G'],
  ['-O', 'qcow2', '-o', 'encrypt.format=luks', '--size', '1G'],
  ['-O', 'qcow2', 'nonexist'],
  ['-O', 'qcow2', '-l', 's1', 'r.raw'],
];

const cases: TwinCase[] = runs.map((args, i) => ({
  name: args.join(' ') || '(no arguments)',
  build: images,
  args: ['measure', ...args],
  readOnly: true,
  spawn: i < 2, // the rest run main() in-process (see twin.ts)
}));

describe.concurrent('measure', () => {
  for (const c of cases) it(c.name, () => runTwin(c).then(() => undefined));
});
