import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as fsCalls from '../../src/io/fs-calls.js';
import { FileIO } from '../../src/io/file.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowkit-fscalls-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
afterEach(() => fsCalls.setQuickCallsOnThisThread(false));

const pattern = (n: number) => Uint8Array.from({ length: n }, (_, i) => (i * 13 + (i >>> 8)) & 0xff);

describe.each([false, true])('file-system calls, quick calls on this thread: %s', (quick) => {
  it('read the same bytes, short at the end of the file, through both paths by length', async () => {
    fsCalls.setQuickCallsOnThisThread(quick);
    const name = path.join(dir, `data-${quick}`);
    const bytes = pattern(fsCalls.QUICK_READ * 3);
    fs.writeFileSync(name, bytes);
    const io = await FileIO.open(name, { readOnly: true });
    expect(await io.size()).toBe(bytes.length);
    for (const [offset, length] of [
      [0, 512],
      [1000, fsCalls.QUICK_READ], // the longest quick read
      [7, fsCalls.QUICK_READ + 1], // the shortest pool read
      [bytes.length - 100, 4096], // past the end: short
    ] as const) {
      const buf = new Uint8Array(length);
      const n = await io.read(buf, offset);
      expect(n).toBe(Math.min(length, bytes.length - offset));
      expect(buf.subarray(0, n)).toEqual(bytes.subarray(offset, offset + n));
    }
    await io.close();
  });

  it('report failures as rejected promises, never as exceptions thrown at the call', async () => {
    fsCalls.setQuickCallsOnThisThread(quick);
    const missing = path.join(dir, 'no-such-file');
    const opening = FileIO.open(missing, { readOnly: true });
    await expect(opening).rejects.toThrow(/No such file or directory/);
    await expect(fsCalls.stat(missing)).rejects.toMatchObject({ code: 'ENOENT' });

    const name = path.join(dir, `closed-${quick}`);
    fs.writeFileSync(name, pattern(4096));
    const io = await FileIO.open(name, { readOnly: true });
    await io.close();
    let reading: Promise<number> | undefined;
    expect(() => {
      reading = io.read(new Uint8Array(512), 0);
    }).not.toThrow();
    await expect(reading).rejects.toThrow(/closed/);

    const fd = fs.openSync(name, 'r');
    fs.closeSync(fd);
    await expect(fsCalls.read(fd, new Uint8Array(16), 0)).rejects.toMatchObject({ code: 'EBADF' });
    await expect(fsCalls.fstat(fd)).rejects.toMatchObject({ code: 'EBADF' });
  });

  it('create, truncate and close a file', async () => {
    fsCalls.setQuickCallsOnThisThread(quick);
    const name = path.join(dir, `made-${quick}`);
    const io = await FileIO.create(name);
    await io.truncate(12345);
    expect(await io.size()).toBe(12345);
    await io.close();
    expect(fs.statSync(name).size).toBe(12345);
  });
});
