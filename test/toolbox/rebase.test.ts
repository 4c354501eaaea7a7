/** `rebase` against qemu-img 7.2 on twin copies (see twin.ts). */
import * as path from 'node:path';
import { describe, it } from 'vitest';
import { create, img, io, runTwin, type TwinCase } from './twin.js';

const M = 1024 * 1024;

/** top over base; another image nb with partly equal content; a raw image; a shorter image. */
async function images(d: string): Promise<void> {
  await create(d, 'base.qcow2', 4 * M);
  await io(d, 'base.qcow2', ['write -q -P 1 0 1M', 'write -q -P 6 3M 4096']);
  await create(d, 'nb.qcow2', 4 * M);
  await io(d, 'nb.qcow2', ['write -q -P 1 0 512k', 'write -q -P 9 2M 64k', 'write -q -P 1 700k 1000']);
  await create(d, 'short.qcow2', 2 * M);
  await io(d, 'short.qcow2', ['write -q -P 1 0 2M']);
  await create(d, 'nb.raw', 4 * M, {}, { fmt: 'raw' });
  await io(d, 'nb.raw', ['write -q -P 1 0 1M'], 'raw');
  await create(d, 'top.qcow2', undefined, {}, { backing: 'base.qcow2' });
  await io(d, 'top.qcow2', ['write -q -P 3 768k 64k', 'write -q -z 2M 4096']);
}

async function inSubfolder(d: string): Promise<void> {
  await images(path.join(d, 'sub'));
}

async function missingOldBacking(d: string): Promise<void> {
  await images(d);
  await img(d, ['rebase', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', 'top.qcow2']);
}

const cases: TwinCase[] = [
  { name: 'safe rebase onto another image', spawn: true, build: images, args: ['rebase', '-b', 'nb.qcow2', '-F', 'qcow2', 'top.qcow2'], expectCode: 0 },
  { name: 'safe rebase onto a raw image', build: images, args: ['rebase', '-b', 'nb.raw', '-F', 'raw', 'top.qcow2'], expectCode: 0 },
  { name: 'safe rebase onto a shorter image', build: images, args: ['rebase', '-b', 'short.qcow2', '-F', 'qcow2', 'top.qcow2'], expectCode: 0 },
  { name: 'safe rebase, progress', build: images, args: ['rebase', '-p', '-b', 'nb.qcow2', '-F', 'qcow2', 'top.qcow2'], expectCode: 0 },
  { name: 'remove the backing file (safe)', build: images, args: ['rebase', '-b', '', 'top.qcow2'], expectCode: 0 },
  { name: 'unsafe', build: images, args: ['rebase', '-u', '-b', 'nb.qcow2', '-F', 'qcow2', 'top.qcow2'], expectCode: 0 },
  { name: 'unsafe onto a missing file', build: images, args: ['rebase', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', 'top.qcow2'], expectCode: 0 },
  { name: 'unsafe without -b removes the backing file', build: images, args: ['rebase', '-u', 'top.qcow2'], expectCode: 0 },
  { name: 'unsafe without -F', build: images, args: ['rebase', '-u', '-b', 'nb.qcow2', 'top.qcow2'], expectCode: 1 },
  { name: 'safe onto a missing file', spawn: true, build: images, args: ['rebase', '-b', 'missing.qcow2', '-F', 'qcow2', 'top.qcow2'], expectCode: 1 },
  // qemu-img copies the data, then refuses to change the header; qcowkit refuses first (same content).
  { name: 'safe without -F', build: images, args: ['rebase', '-b', 'nb.qcow2', 'top.qcow2'], expectCode: 1 },
  { name: 'bad backing format name', build: images, args: ['rebase', '-b', 'nb.qcow2', '-F', 'bogus', 'top.qcow2'], expectCode: 1 },
  { name: 'wrong backing format', build: images, args: ['rebase', '-b', 'nb.raw', '-F', 'qcow2', 'top.qcow2'], expectCode: 1 },
  {
    name: 'new backing name relative to the image folder',
    build: inSubfolder,
    args: ['rebase', '-b', 'nb.qcow2', '-F', 'qcow2', 'sub/top.qcow2'],
    expectCode: 0,
  },
  {
    name: 'new backing name relative to the current folder is not found',
    build: inSubfolder,
    args: ['rebase', '-b', 'sub/nb.qcow2', '-F', 'qcow2', 'sub/top.qcow2'],
    expectCode: 1,
  },
  { name: 'onto itself', build: images, args: ['rebase', '-b', 'top.qcow2', '-F', 'qcow2', 'top.qcow2'], expectCode: 1 },
  { name: 'old backing file missing (safe)', build: missingOldBacking, args: ['rebase', '-b', 'nb.qcow2', '-F', 'qcow2', 'top.qcow2'], expectCode: 1, images: [] },
  {
    name: 'old backing file missing (unsafe)',
    build: missingOldBacking,
    args: ['rebase', '-u', '-b', 'nb.qcow2', '-F', 'qcow2', 'top.qcow2'],
    expectCode: 0,
  },
  { name: 'raw image', build: images, args: ['rebase', '-f', 'raw', '-b', 'nb.qcow2', '-F', 'qcow2', 'nb.raw'], expectCode: 1 },
  { name: 'raw image, no -F', build: images, args: ['rebase', '-f', 'raw', '-b', 'nb.qcow2', 'nb.raw'], expectCode: 1 },
  {
    name: 'qcow v1 image',
    build: (d) => create(d, 'v1.qcow', M, {}, { fmt: 'qcow' }),
    args: ['rebase', '-b', '', 'v1.qcow'],
    expectCode: 1,
  },
  { name: 'no -b in safe mode', build: images, args: ['rebase', 'top.qcow2'], expectCode: 1 },
  { name: 'bad cache mode', build: images, args: ['rebase', '-t', 'bogus', '-b', 'nb.qcow2', '-F', 'qcow2', 'top.qcow2'], expectCode: 1 },
];

describe.concurrent('rebase', () => {
  for (const c of cases) it(c.name, () => runTwin(c).then(() => undefined));
});
