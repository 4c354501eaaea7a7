import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { MAX_RUNS, sparseRuns, sparseSupported } from '../../src/io/sparse.js';

type Run = { offset: number; length: number; data: boolean };

const K = 1024;
const M = 1024 * K;

let dir: string;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowkit-sparse-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Runs must tile [offset, offset+length) exactly, in order, alternating kinds. */
function checkTiling(runs: Run[], offset: number, length: number) {
  let pos = offset;
  for (let i = 0; i < runs.length; i++) {
    const r = runs[i]!;
    expect(r.offset).toBe(pos);
    expect(r.length).toBeGreaterThan(0);
    if (i > 0) expect(r.data).not.toBe(runs[i - 1]!.data);
    pos += r.length;
  }
  expect(pos).toBe(offset + length);
}

function kindAt(runs: Run[], off: number): boolean | undefined {
  return runs.find((r) => off >= r.offset && off < r.offset + r.length)?.data;
}

/** 4 MiB file: data at [0, 4k) and [1M, 1M+64k), holes elsewhere. */
function makeSparse(name: string): string {
  const file = path.join(dir, name);
  const fd = fs.openSync(file, 'w+');
  try {
    fs.writeSync(fd, Buffer.alloc(4 * K, 0xaa), 0, 4 * K, 0);
    fs.writeSync(fd, Buffer.alloc(64 * K, 0xbb), 0, 64 * K, 1 * M);
    fs.ftruncateSync(fd, 4 * M);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  return file;
}

/** Whether the file system really left holes in the file (otherwise only "all data" can come back). */
function hasHoles(file: string): boolean {
  const st = fs.statSync(file);
  return st.blocks * 512 < st.size;
}

async function withFd<T>(file: string, f: (fd: number) => Promise<T>): Promise<T> {
  const fd = fs.openSync(file, 'r');
  try {
    return await f(fd);
  } finally {
    fs.closeSync(fd);
  }
}

describe('sparseRuns', () => {
  it('reports data and holes of a sparse file', async () => {
    const file = makeSparse('a.img');
    const runs = await withFd(file, (fd) => sparseRuns(fd, 0, 4 * M));
    if (runs === undefined) {
      console.warn(
        `sparseRuns: no SEEK_DATA/SEEK_HOLE here (addon ${sparseSupported() ? 'loaded' : 'not built'}); skipping checks`,
      );
      return;
    }
    checkTiling(runs, 0, 4 * M);
    if (!hasHoles(file)) {
      // No hole support in this file system: whatever it says, the written bytes must be data.
      expect(kindAt(runs, 0)).toBe(true);
      expect(kindAt(runs, M)).toBe(true);
      return;
    }
    // Allocation granularity is the file system block (4k on ext4, could be larger elsewhere).
    expect(kindAt(runs, 0)).toBe(true);
    expect(kindAt(runs, 4 * K - 1)).toBe(true);
    expect(kindAt(runs, M)).toBe(true);
    expect(kindAt(runs, M + 64 * K - 1)).toBe(true);
    expect(kindAt(runs, 512 * K)).toBe(false);
    expect(kindAt(runs, 3 * M)).toBe(false);
    expect(kindAt(runs, 4 * M - 1)).toBe(false);
    expect(runs.length).toBe(4);
    if (fs.statSync(file).blksize === 4096) {
      expect(runs).toEqual([
        { offset: 0, length: 4 * K, data: true },
        { offset: 4 * K, length: M - 4 * K, data: false },
        { offset: M, length: 64 * K, data: true },
        { offset: M + 64 * K, length: 3 * M - 64 * K, data: false },
      ]);
    }
  });

  it('clips runs to a sub-range and counts bytes past EOF as a hole', async () => {
    const file = makeSparse('b.img');
    await withFd(file, async (fd) => {
      // Starts inside the first hole, ends inside the data at 1M.
      const a = await sparseRuns(fd, 8 * K, M + 16 * K - 8 * K);
      if (a === undefined) return;
      checkTiling(a, 8 * K, M + 8 * K);
      expect(kindAt(a, M + 8 * K)).toBe(true);
      if (hasHoles(file)) expect(a[0]!.data).toBe(false);

      // Starts inside data.
      const b = await sparseRuns(fd, M + 4 * K, 8 * K);
      expect(b).toEqual([{ offset: M + 4 * K, length: 8 * K, data: true }]);

      // Crosses EOF (4M) and lies entirely past it.
      const c = (await sparseRuns(fd, 3 * M, 2 * M))!;
      checkTiling(c, 3 * M, 2 * M);
      expect(c[c.length - 1]).toMatchObject({ data: false });
      expect(kindAt(c, 5 * M - 1)).toBe(false);
      expect(await sparseRuns(fd, 8 * M, 4 * K)).toEqual([{ offset: 8 * M, length: 4 * K, data: false }]);

      expect(await sparseRuns(fd, 0, 0)).toEqual([]);
    });
  });

  it('an empty file is all hole', async () => {
    const file = path.join(dir, 'empty.img');
    fs.writeFileSync(file, '');
    const runs = await withFd(file, (fd) => sparseRuns(fd, 0, 64 * K));
    if (runs === undefined) return;
    expect(runs).toEqual([{ offset: 0, length: 64 * K, data: false }]);
  });

  it(`caps the result at ${MAX_RUNS} runs covering a prefix, the rest coming from later calls`, async () => {
    const file = path.join(dir, 'many.img');
    const chunks = MAX_RUNS + 30; // 4k data every 8k: more than twice MAX_RUNS runs
    const fd = fs.openSync(file, 'w+');
    try {
      const buf = Buffer.alloc(4 * K, 0xcc);
      for (let i = 0; i < chunks; i++) fs.writeSync(fd, buf, 0, buf.length, i * 8 * K);
      fs.ftruncateSync(fd, chunks * 8 * K + 12 * K);
      fs.fsyncSync(fd);
      const size = chunks * 8 * K + 12 * K;
      const all: Array<{ offset: number; length: number; data: boolean }> = [];
      let calls = 0;
      for (let pos = 0; pos < size; calls++) {
        const runs = await sparseRuns(fd, pos, size - pos);
        if (runs === undefined) return;
        expect(runs.length).toBeGreaterThan(0);
        expect(runs.length).toBeLessThanOrEqual(MAX_RUNS);
        expect(runs[0]!.offset).toBe(pos);
        for (let i = 1; i < runs.length; i++) expect(runs[i]!.offset).toBe(runs[i - 1]!.offset + runs[i - 1]!.length);
        all.push(...runs);
        const last = runs[runs.length - 1]!;
        pos = last.offset + last.length;
      }
      // Put together, the calls' answers tile the file with alternating kinds: no extent split.
      checkTiling(all, 0, size);
      for (let i = 1; i < all.length; i++) expect(all[i]!.data).not.toBe(all[i - 1]!.data);
      if (hasHoles(file) && fs.statSync(file).blksize === 4096) {
        expect(calls).toBeGreaterThan(2);
        // (the last chunk's hole and the 12k past it are one hole)
        expect(all.length).toBe(2 * chunks);
        for (let i = 0; i < 2 * chunks - 1; i++) expect(all[i]).toEqual({ offset: i * 4 * K, length: 4 * K, data: i % 2 === 0 });
        expect(all[2 * chunks - 1]).toEqual({ offset: (2 * chunks - 1) * 4 * K, length: 16 * K, data: false });
      }
    } finally {
      fs.closeSync(fd);
    }
  });

  it('throws for a bad descriptor and for a bad range', async () => {
    await expect(sparseRuns(0, -1, 10)).rejects.toThrow(RangeError);
    await expect(sparseRuns(0, 0, 1.5)).rejects.toThrow(RangeError);
    if (!sparseSupported()) return;
    // A descriptor number that is surely not open.
    await expect(sparseRuns(2 ** 30, 0, 4096)).rejects.toMatchObject({ code: 'EBADF' });
  });
});

describe('fallocate: punching holes and preallocating (FileIO)', async () => {
  const { FileIO } = await import('../../src/io/file.js');

  it('punchHole deallocates whole blocks and the range reads as zeros; the size is kept', async () => {
    const file = path.join(dir, 'punch.bin');
    fs.writeFileSync(file, Buffer.alloc(4 * M, 0xab));
    const io = await FileIO.open(file, { readOnly: false });
    try {
      const before = await io.allocatedSize();
      await io.punchHole(1 * M + 100, 2 * M);
      const got = Buffer.alloc(4 * M);
      await io.read(got, 0);
      const want = Buffer.alloc(4 * M, 0xab).fill(0, 1 * M + 100, 3 * M + 100);
      expect(got.equals(want)).toBe(true);
      expect(await io.size()).toBe(4 * M);
      // Where the file system supports holes (ext4, xfs, tmpfs) whole blocks were freed.
      if (sparseSupported()) expect(await io.allocatedSize()).toBeLessThan(before);
    } finally {
      await io.close();
    }
  });

  it('allocate gives blocks to a sparse file without changing its content or size', async () => {
    const file = path.join(dir, 'alloc.bin');
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 8 * M);
    const io = await FileIO.open(file, { readOnly: false });
    try {
      const ok = await io.allocate(0, 8 * M);
      if (ok) expect(await io.allocatedSize()).toBeGreaterThanOrEqual(8 * M);
      expect(await io.size()).toBe(8 * M);
      const got = Buffer.alloc(8 * M, 1);
      await io.read(got, 0);
      expect(got.equals(Buffer.alloc(8 * M))).toBe(true);
    } finally {
      await io.close();
    }
  });

  it('read-only files refuse both', async () => {
    const file = path.join(dir, 'ro.bin');
    fs.writeFileSync(file, Buffer.alloc(M, 1));
    const io = await FileIO.open(file, { readOnly: true });
    try {
      await expect(io.punchHole(0, M)).rejects.toThrow(/read-only/);
      await expect(io.allocate(0, M)).rejects.toThrow(/read-only/);
    } finally {
      await io.close();
    }
  });
});
