/**
 * READ replies on the wire, checked byte by byte with a raw client: structured replies mixing
 * data and hole chunks (each request's chunks cover its range exactly once, DONE only on the last
 * one — also with many requests in flight at once), DF, simple replies; on a read-only export
 * (no lock, cache-first synchronous reads) and a writable one. Plus the read policy that decides
 * between synchronous and thread-pool reads.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { create, io } from '../helpers/build.js';
import { makeTmpDir, prng, removeTmpDir } from '../helpers/files.js';
import { DIST, must, qemuImg } from '../helpers/proc.js';
import { startServer, stopAll, type Served } from './harness.js';
import { RawClient } from './raw-client.js';

const KiB = 1024;
const SIZE = 2 * 1024 * KiB;
const CMD_READ = 0;
const FLAG_DF = 4;
const TYPE = { NONE: 0, DATA: 1, HOLE: 2 };

let dir: string;
let image: Buffer;

beforeAll(async () => {
  dir = makeTmpDir('qk-nbd-reads-');
  await create(dir, 'img.qcow2', SIZE, { cluster_size: 65536 });
  // data | unallocated | zero cluster | data | compressed | data over a partial cluster ...
  await io(dir, 'img.qcow2', [
    'write -q -P 0x11 0 64k',
    'write -q -z 192k 64k',
    'write -q -P 0x22 256k 64k',
    'write -q -c -P 0x33 384k 64k',
    'write -q -P 0x44 1000k 5000',
    'write -q -P 0x55 2040k 8k',
  ]);
  await must(qemuImg(['convert', '-O', 'raw', 'img.qcow2', 'img.raw'], { cwd: dir }));
  image = fs.readFileSync(path.join(dir, 'img.raw'));
}, 60_000);

afterAll(async () => {
  await stopAll();
  removeTmpDir(dir);
});

interface Chunk {
  type: number;
  flags: number;
  offset: number;
  data?: Buffer;
  length: number;
}

/** Read structured replies for `handles` (any order, interleaved) until each one is DONE. */
async function collect(c: RawClient, handles: Set<bigint>): Promise<Map<bigint, Chunk[]>> {
  const out = new Map<bigint, Chunk[]>();
  const open = new Set(handles);
  while (open.size) {
    const r = await c.readReply();
    expect(r.structured).toBe(true);
    expect(open.has(r.handle), `chunk for handle ${r.handle} after its DONE chunk or unknown`).toBe(true);
    expect(r.error).toBe(0);
    const list = out.get(r.handle) ?? [];
    out.set(r.handle, list);
    if (r.type === TYPE.DATA) {
      const offset = Number(r.payload.readBigUInt64BE(0));
      list.push({ type: r.type, flags: r.flags!, offset, data: r.payload.subarray(8), length: r.payload.length - 8 });
    } else if (r.type === TYPE.HOLE) {
      list.push({ type: r.type, flags: r.flags!, offset: Number(r.payload.readBigUInt64BE(0)), length: r.payload.readUInt32BE(8) });
    } else {
      list.push({ type: r.type!, flags: r.flags!, offset: -1, length: 0 });
    }
    if (r.flags! & 1) open.delete(r.handle);
  }
  return out;
}

/** The chunks cover [offset, offset+length) exactly once and carry the image's bytes. */
function checkCoverage(chunks: Chunk[], offset: number, length: number): void {
  expect(chunks.filter((c) => c.flags & 1)).toHaveLength(1);
  expect(chunks[chunks.length - 1]!.flags & 1).toBe(1);
  const seen = new Uint8Array(length);
  for (const ch of chunks) {
    if (ch.type === TYPE.NONE) continue;
    expect(ch.offset).toBeGreaterThanOrEqual(offset);
    expect(ch.offset + ch.length).toBeLessThanOrEqual(offset + length);
    for (let i = ch.offset - offset; i < ch.offset - offset + ch.length; i++) seen[i]! += 1;
    const want = image.subarray(ch.offset, ch.offset + ch.length);
    if (ch.type === TYPE.DATA) expect(ch.data!.equals(want)).toBe(true);
    else expect(want.every((b) => b === 0)).toBe(true);
  }
  expect(seen.every((n) => n === 1)).toBe(true);
}

async function connect(s: Served, structured: boolean): Promise<RawClient> {
  const c = await RawClient.connect(s.port!);
  await c.greet();
  await c.go('', { structured });
  return c;
}

describe.each([
  ['read-only', ['-r']],
  ['writable', []],
])('nbd READ replies (%s export)', (_label, extra) => {
  let s: Served;
  beforeAll(async () => {
    fs.copyFileSync(path.join(dir, 'img.qcow2'), path.join(dir, `img-${extra.length}.qcow2`));
    s = await startServer(['-t', '-e', '0', ...extra, '-f', 'qcow2', `img-${extra.length}.qcow2`], { dir });
  });
  afterAll(async () => {
    expect((await s.stop()).code).toBe(0);
  });

  it('one request over data, holes, zero and compressed clusters: data and hole chunks, DONE last', async () => {
    const c = await connect(s, true);
    c.sendRequest(CMD_READ, 0, 512 * KiB, { handle: 7n });
    const chunks = (await collect(c, new Set([7n]))).get(7n)!;
    checkCoverage(chunks, 0, 512 * KiB);
    expect(chunks.some((ch) => ch.type === TYPE.HOLE)).toBe(true);
    expect(chunks.filter((ch) => ch.type === TYPE.DATA).length).toBeGreaterThan(1);
    c.destroy();
  });

  it('many requests in flight at once, of every size and alignment, each answered completely', async () => {
    const c = await connect(s, true);
    const next = prng(99);
    const rand = () => next() / 2 ** 32;
    const reqs = new Map<bigint, [number, number]>();
    for (let i = 1; i <= 64; i++) {
      const len = 1 + Math.floor(rand() * (i % 4 === 0 ? 300 * KiB : 9000));
      const off = Math.floor(rand() * (SIZE - len));
      reqs.set(BigInt(i), [off, len]);
    }
    for (const [h, [off, len]] of reqs) c.sendRequest(CMD_READ, off, len, { handle: h });
    const got = await collect(c, new Set(reqs.keys()));
    for (const [h, [off, len]] of reqs) checkCoverage(got.get(h)!, off, len);
    c.destroy();
  });

  it('DF: one data chunk; without structured replies: simple replies with the data', async () => {
    const c = await connect(s, true);
    c.sendRequest(CMD_READ, 60 * KiB, 200 * KiB, { handle: 3n, flags: FLAG_DF });
    const chunks = (await collect(c, new Set([3n]))).get(3n)!;
    expect(chunks.map((ch) => ch.type)).toEqual([TYPE.DATA]);
    checkCoverage(chunks, 60 * KiB, 200 * KiB);
    c.destroy();

    const simple = await connect(s, false);
    const reqs: Array<[number, number]> = [
      [0, 4096],
      [100 * KiB, 300 * KiB],
      [SIZE - 8192, 8192],
      [1000 * KiB + 3, 17],
    ];
    reqs.forEach(([off, len], i) => simple.sendRequest(CMD_READ, off, len, { handle: BigInt(i + 1) }));
    // Simple replies to concurrent requests may come in any order: the handle says which.
    const seen = new Set<bigint>();
    for (let i = 0; i < reqs.length; i++) {
      const head = await simple.readReply(0);
      expect(head.structured).toBe(false);
      expect(head.error).toBe(0);
      const [off, len] = reqs[Number(head.handle) - 1]!;
      const data = await simple.read(len);
      expect(data.equals(image.subarray(off, off + len))).toBe(true);
      seen.add(head.handle);
    }
    expect(seen.size).toBe(reqs.length);
    simple.destroy();
  });
});

describe('cache-first reads', () => {
  it('the read policy: synchronous while fast and small, the thread pool after a slow read', async () => {
    const { readPolicy, nbdFileProvider } = await import(pathToFileURL(path.join(DIST, 'nbd/file-io.js')).href);
    readPolicy.observe(4096, 1000);
    expect(readPolicy.useSync(4096)).toBe(true);
    expect(readPolicy.useSync(64 << 20)).toBe(false); // large reads always go to the pool
    readPolicy.observe(4096, 5e9); // five seconds for 4 KiB: that came from a disk
    expect(readPolicy.useSync(4096)).toBe(false);
    readPolicy.observe(4096, 1000);
    expect(readPolicy.useSync(4096)).toBe(true);

    // And a file opened through the provider reads what the file holds, either way.
    const f = await nbdFileProvider.open(path.join(dir, 'img.raw'), { readOnly: true });
    const before = readPolicy.syncReads;
    const buf = new Uint8Array(4096);
    expect(await f.read(buf, 256 * KiB)).toBe(4096);
    expect(Buffer.from(buf).equals(image.subarray(256 * KiB, 260 * KiB))).toBe(true);
    expect(readPolicy.syncReads).toBe(before + 1);
    readPolicy.observe(4096, 5e9);
    expect(await f.read(buf, 0)).toBe(4096);
    expect(readPolicy.syncReads).toBe(before + 2); // the slow one counted; this one went to the pool
    expect(Buffer.from(buf).equals(image.subarray(0, 4096))).toBe(true);
    expect(await f.read(new Uint8Array(10), SIZE - 4)).toBe(4);
    await f.close();
  });
});

describe('reply buffer pool', () => {
  it('reuses buffers by size, keeps at most maxBytes, refuses oversized and foreign buffers', async () => {
    const { BufferPool } = await import(pathToFileURL(path.join(DIST, 'nbd/wire.js')).href);
    const pool = new BufferPool(1024, 2500);
    const a = pool.take(1000);
    const b = pool.take(1000);
    const c = pool.take(1000);
    pool.give(a);
    pool.give(b);
    pool.give(c); // 3000 > maxBytes (2500) with a and b held: dropped
    const got = [pool.take(1000), pool.take(1000), pool.take(1000)];
    expect(got[0]).toBe(b);
    expect(got[1]).toBe(a);
    expect(got[2]).not.toBe(c);
    pool.give(Buffer.allocUnsafeSlow(2000)); // larger than maxSize
    expect(pool.take(2000)).toHaveLength(2000);
    const slice = Buffer.allocUnsafeSlow(600).subarray(0, 500); // a view of a larger buffer
    pool.give(slice);
    expect(pool.take(500)).not.toBe(slice);
  });
});
