/** `dd` against qemu-img 7.2 on twin copies (see twin.ts): same output image, same messages. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { sha256File } from '../helpers/files.js';
import { create, io, runTwin, type TwinCase } from './twin.js';

const M = 1024 * 1024;

async function images(d: string): Promise<void> {
  await create(d, 'a.qcow2', 4 * M);
  await io(d, 'a.qcow2', ['write -q -P 1 0 1M', 'write -q -P 2 3M 100k', 'write -q -z 1M 64k', 'write -q -P 3 4095k 1k']);
  await create(d, 'top.qcow2', undefined, {}, { backing: 'a.qcow2' });
  await io(d, 'top.qcow2', ['write -q -P 4 512k 64k']);
  fs.writeFileSync(path.join(d, 'odd.raw'), Buffer.alloc(999, 5));
}

/** Output files must be byte-for-byte equal when raw. */
async function sameRawBytes(q: string, k: string): Promise<void> {
  for (const f of fs.readdirSync(q)) {
    if (!f.startsWith('out') || f.endsWith('.qcow2') || f.endsWith('.qcow')) continue;
    expect(fs.statSync(path.join(k, f)).size, `${f} size`).toBe(fs.statSync(path.join(q, f)).size);
    expect(await sha256File(path.join(k, f)), `${f} bytes`).toBe(await sha256File(path.join(q, f)));
  }
}

const runs: string[][] = [
  ['if=a.qcow2', 'of=out.raw'],
  ['-O', 'qcow2', 'if=a.qcow2', 'of=out.qcow2'],
  ['-O', 'qcow', 'if=a.qcow2', 'of=out.qcow'],
  ['-O', 'qcow2', 'bs=1000', 'count=3', 'if=a.qcow2', 'of=out.qcow2'],
  ['if=top.qcow2', 'of=out.raw'],
  ['bs=64k', 'count=3', 'skip=2', 'if=a.qcow2', 'of=out.raw'],
  ['bs=1000', 'count=3', 'if=a.qcow2', 'of=out.raw'],
  ['count=0', 'if=a.qcow2', 'of=out.raw'],
  ['skip=8191', 'if=a.qcow2', 'of=out.raw'],
  ['skip=9000', 'if=a.qcow2', 'of=out.raw'],
  ['bs=1M', 'count=1', 'skip=2', 'if=a.qcow2', 'of=out.raw'],
  ['bs=3M', 'count=2', 'if=a.qcow2', 'of=out.raw'],
  ['bs=1.5k', 'count=1', 'skip=2', 'if=a.qcow2', 'of=out.raw'],
  ['bs=1', 'count=1', 'if=a.qcow2', 'of=out.raw'],
  ['-f', 'raw', 'if=a.qcow2', 'of=out.raw'],
  ['-f', 'raw', 'if=odd.raw', 'of=out.raw'],
  ['-f', 'raw', 'bs=1000', 'skip=1', 'if=odd.raw', 'of=out.raw'],
  ['if=a.qcow2'],
  ['bs=0', 'if=a.qcow2', 'of=out.raw'],
  ['bs=abc', 'if=a.qcow2', 'of=out.raw'],
  ['count=-1', 'if=a.qcow2', 'of=out.raw'],
  ['bogus=1', 'if=a.qcow2', 'of=out.raw'],
  ['if=a.qcow2', 'of=out.raw', '=5'],
  ['if=nofile', 'of=out.raw'],
  ['-O', 'bogus', 'if=a.qcow2', 'of=out.raw'],
  ['if=a.qcow2', 'of=nodir/out.raw'],
  ['if=a.qcow2', 'of=a.qcow2'],
];

const cases: TwinCase[] = runs.map((args, i) => ({
  spawn: i < 2,
  name: args.join(' '),
  build: images,
  args: ['dd', ...args],
  after: sameRawBytes,
}));

describe.concurrent('dd', () => {
  for (const c of cases) it(c.name, () => runTwin(c).then(() => undefined));
});
