import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ALLOCATE_FROM, FileWriter } from '../../src/io/file-writer.js';
import { FileIO } from '../../src/io/file.js';

// The writer thread (native/writer.c) is built by `npm run build`, which `npm test` runs first.
let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowkit-writer-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const pattern = (n: number, seed: number) => {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed * 7 + (i >>> 9)) & 0xff;
  return b;
};

describe('FileWriter (one writing thread per file)', () => {
  it('is available where the addon is built', () => {
    const fd = fs.openSync(path.join(dir, 'probe'), 'w');
    try {
      const w = FileWriter.open(fd);
      expect(w).toBeDefined();
      w!.close();
    } finally {
      fs.closeSync(fd);
    }
  });

  it('does many concurrent writes, overlapping ones in the order they were made', async () => {
    const name = path.join(dir, 'many');
    const fd = fs.openSync(name, 'w+');
    const w = FileWriter.open(fd)!;
    const model = new Uint8Array(3 * 1024 * 1024);
    const writes: Promise<void>[] = [];
    for (let k = 0; k < 300; k++) {
      const len = k % 7 === 0 ? ALLOCATE_FROM + 4096 * (k % 5) : 1 + ((k * 7919) % 20000);
      const at = (k * 104729) % (model.length - len);
      const data = pattern(len, k);
      model.set(data, at);
      writes.push(w.write(data, at));
    }
    await Promise.all(writes);
    w.close();
    fs.closeSync(fd);
    const got = fs.readFileSync(name);
    expect(Buffer.compare(got.subarray(0, model.length), Buffer.from(model.buffer, 0, got.length))).toBe(0);
  });

  it('allocates no more than a large write and a small one write', async () => {
    const name = path.join(dir, 'alloc');
    const fd = fs.openSync(name, 'w+');
    fs.ftruncateSync(fd, 64 * 1024 * 1024);
    const w = FileWriter.open(fd)!;
    await w.write(pattern(ALLOCATE_FROM * 4, 1), 8 * 1024 * 1024);
    await w.write(pattern(4096, 2), 40 * 1024 * 1024);
    w.close();
    const st = fs.fstatSync(fd);
    fs.closeSync(fd);
    // file systems without holes report everything; where there are holes, just what was written
    if (st.blocks * 512 < st.size) expect(st.blocks * 512).toBe(ALLOCATE_FROM * 4 + 4096);
    const got = fs.readFileSync(name);
    expect(got.subarray(8 * 1024 * 1024, 8 * 1024 * 1024 + ALLOCATE_FROM * 4).equals(Buffer.from(pattern(ALLOCATE_FROM * 4, 1)))).toBe(true);
    expect(got.subarray(0, 8 * 1024 * 1024).every((b) => b === 0)).toBe(true);
  });

  it("rejects with the system's message and errno code when the write fails", async () => {
    if (!fs.existsSync('/dev/full')) return;
    const fd = fs.openSync('/dev/full', 'w');
    const w = FileWriter.open(fd)!;
    try {
      await expect(w.write(pattern(ALLOCATE_FROM, 3), 0)).rejects.toMatchObject({ code: 'ENOSPC', message: 'No space left on device' });
      // the thread goes on with the next write
      await expect(w.write(pattern(10, 3), 0)).rejects.toMatchObject({ code: 'ENOSPC' });
    } finally {
      w.close();
      fs.closeSync(fd);
    }
  });

  it('rejects writes after close, and close waits for writes in progress', async () => {
    const name = path.join(dir, 'closing');
    const fd = fs.openSync(name, 'w+');
    const w = FileWriter.open(fd)!;
    const big = pattern(8 * 1024 * 1024, 4);
    const p = w.write(big, 0);
    w.close();
    await p; // settled by close
    expect(fs.fstatSync(fd).size).toBe(big.length);
    await expect(w.write(pattern(10, 5), 0)).rejects.toMatchObject({ code: 'EBADF' });
    w.close(); // twice is harmless
    fs.closeSync(fd);
  });
});

describe('FileIO writes through the writer thread', () => {
  it('reports a full device as qemu-img words it', async () => {
    if (!fs.existsSync('/dev/full')) return;
    const f = await FileIO.open('/dev/full', { readOnly: false });
    try {
      await expect(f.write(pattern(4096, 1), 0)).rejects.toThrow(/^No space left on device$/);
    } finally {
      await f.close();
    }
    await expect(f.write(pattern(1, 1), 0)).rejects.toThrow(/closed/);
  });

  it('keeps the process alive while a write is in flight, and lets it end after', async () => {
    // A child process whose only pending work is a write through the writer thread: it must
    // finish the write (the thread's completion keeps the event loop alive) and then exit
    // (an idle writer does not hold it).
    const name = path.join(dir, 'child');
    const script = `
      import { FileIO } from ${JSON.stringify(path.resolve('dist/io/file.js'))};
      const f = await FileIO.create(${JSON.stringify(name)});
      f.write(new Uint8Array(${ALLOCATE_FROM * 8}).fill(7), 0).then(() => process.stdout.write('written'));
    `;
    const { spawnSync } = await import('node:child_process');
    if (!fs.existsSync('dist/io/file.js')) return; // built by `npm test` (npm run build) first
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 20000 });
    expect(r.status).toBe(0);
    expect(r.stdout).toBe('written');
    expect(fs.statSync(name).size).toBe(ALLOCATE_FROM * 8);
  });
});
