/**
 * Zero-copy READ replies (sendfile from read-only files): the bytes are the image's whatever path
 * a reply takes (at once on the event loop, finished by a pool thread once a slow client reads
 * again, or buffered), replies never interleave with the connection's other messages, a client
 * that goes away mid-reply leaves the server serving, and files the server writes are never sent
 * this way. Plus the addon itself: zeros past the end of the file, resuming, cancelling.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTmpDir, prng, removeTmpDir } from '../helpers/files.js';
import { DIST, must, qemuImg, qemuIo } from '../helpers/proc.js';
import { startServer, stopAll, type Served } from './harness.js';
import { RawClient } from './raw-client.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;
const CMD_READ = 0;
const CMD_BLOCK_STATUS = 7;
const FLAG_DF = 4;
const TYPE = { NONE: 0, DATA: 1, HOLE: 2, BLOCK_STATUS: 5 };

let dir: string;
let image: Buffer;

beforeAll(async () => {
  dir = makeTmpDir('qk-nbd-zc-');
  // base: 6 MiB of random bytes (one contiguous data run) then 2 MiB unallocated;
  // top: its own data at 1-2 MiB (a second file) and a zeroed range.
  const next = prng(7);
  const raw = Buffer.alloc(SIZE);
  for (let i = 0; i < 6 * MiB; i += 4) raw.writeUInt32LE(next(), i);
  fs.writeFileSync(path.join(dir, 'base.raw'), raw);
  await must(qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', 'base.raw', 'base.qcow2'], { cwd: dir }));
  await must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], { cwd: dir }));
  await must(qemuIo(['-c', 'write -q -P 0x77 1M 1M', '-c', 'write -q -z 3M 256k', 'top.qcow2'], { cwd: dir }));
  await must(qemuImg(['convert', '-O', 'raw', 'top.qcow2', 'top.raw'], { cwd: dir }));
  image = fs.readFileSync(path.join(dir, 'top.raw'));
  await must(qemuImg(['convert', '-O', 'qcow2', 'top.qcow2', 'flat.qcow2'], { cwd: dir }));
}, 60_000);

afterAll(async () => {
  await stopAll();
  removeTmpDir(dir);
});

async function connect(s: Served, structured: boolean, contexts?: string[]): Promise<RawClient> {
  const c = await RawClient.connect(s.socket ?? s.port!);
  await c.greet();
  await c.go('', { structured, ...(contexts ? { contexts } : {}) });
  return c;
}

/** Read structured replies until every handle is DONE; each READ's chunks must carry the image's bytes. */
async function collectReads(c: RawClient, reqs: Map<bigint, [number, number]>, others = new Set<bigint>()): Promise<void> {
  const open = new Set([...reqs.keys(), ...others]);
  const seen = new Map<bigint, Uint8Array>();
  for (const [h, [, len]] of reqs) seen.set(h, new Uint8Array(len));
  while (open.size) {
    const r = await c.readReply();
    expect(open.has(r.handle), `chunk for handle ${r.handle} after its DONE chunk or unknown`).toBe(true);
    expect(r.error).toBe(0);
    if (r.flags! & 1) open.delete(r.handle);
    const req = reqs.get(r.handle);
    if (!req) {
      expect(r.type).toBe(TYPE.BLOCK_STATUS);
      continue;
    }
    const [off] = req;
    const cov = seen.get(r.handle)!;
    if (r.type === TYPE.DATA) {
      const at = Number(r.payload.readBigUInt64BE(0));
      const data = r.payload.subarray(8);
      expect(data.equals(image.subarray(at, at + data.length)), `data of handle ${r.handle} at ${at}`).toBe(true);
      for (let i = at - off; i < at - off + data.length; i++) cov[i]!++;
    } else if (r.type === TYPE.HOLE) {
      const at = Number(r.payload.readBigUInt64BE(0));
      const n = r.payload.readUInt32BE(8);
      expect(image.subarray(at, at + n).every((b) => b === 0)).toBe(true);
      for (let i = at - off; i < at - off + n; i++) cov[i]!++;
    }
  }
  for (const [h, cov] of seen) expect(cov.every((n) => n === 1), `handle ${h} covered once`).toBe(true);
}

/** The server's -v line for a finished connection: replies sent zero-copy, and how many a pool thread finished. */
async function zeroCopyLog(s: Served, before: string): Promise<{ replies: number; waited: number }> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const m = /(\d+) read replies \((\d+) bytes\) sent zero-copy, (\d+) finished by a thread/.exec(s.stderr().slice(before.length));
    if (m) return { replies: Number(m[1]), waited: Number(m[3]) };
    if (Date.now() > deadline) throw new Error(`no zero-copy line from the server:\n${s.stderr()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe.each([
  ['Unix socket', true],
  ['TCP', false],
])('zero-copy READ replies (read-only export of a backing chain, %s)', (_label, unix) => {
  let s: Served;
  beforeAll(async () => {
    s = await startServer(['-r', '-t', '-e', '0', '-v', '-f', 'qcow2', 'top.qcow2'], { dir, unix });
  });
  afterAll(async () => {
    expect((await s.stop()).code).toBe(0);
  });

  it('large reads from either file, small reads and block status in flight together: every reply whole and right', async () => {
    const before = s.stderr();
    const c = await connect(s, true, ['base:allocation']);
    const next = prng(11);
    const reqs = new Map<bigint, [number, number]>();
    let h = 1n;
    for (let i = 0; i < 96; i++) {
      const len = i % 3 === 0 ? 4 * KiB + (next() % 4096) : 64 * KiB + 1 + (next() % (2 * MiB));
      const off = next() % (SIZE - len);
      reqs.set(h++, [off, len]);
    }
    const status = new Set<bigint>();
    for (const [handle, [off, len]] of reqs) {
      c.sendRequest(CMD_READ, off, len, { handle, flags: handle % 7n === 0n ? FLAG_DF : 0 });
      if (handle % 5n === 0n) {
        status.add(h);
        c.sendRequest(CMD_BLOCK_STATUS, off, len, { handle: h++ });
      }
    }
    await collectReads(c, reqs, status);
    c.destroy();
    expect((await zeroCopyLog(s, before)).replies).toBeGreaterThan(10);
  });

  it('simple replies: header and data whole, for reads inside one data run and across files', async () => {
    const c = await connect(s, false);
    const reqs: Array<[number, number]> = [
      [0, 1 * MiB], // base
      [1 * MiB, 1 * MiB], // top
      [512 * KiB, 2 * MiB], // base, top, base: buffered
      [4 * MiB, 2 * MiB], // base
      [5 * MiB, 3 * MiB], // base then unallocated
      [7 * MiB, 4 * KiB],
    ];
    reqs.forEach(([off, len], i) => c.sendRequest(CMD_READ, off, len, { handle: BigInt(i + 1) }));
    const got = new Set<bigint>();
    for (let i = 0; i < reqs.length; i++) {
      const head = await c.readReply(0);
      expect(head.structured).toBe(false);
      expect(head.error).toBe(0);
      const [off, len] = reqs[Number(head.handle) - 1]!;
      const data = await c.read(len);
      expect(data.equals(image.subarray(off, off + len))).toBe(true);
      got.add(head.handle);
    }
    expect(got.size).toBe(reqs.length);
    c.destroy();
  });

  it('a client that stops reading: the replies wait for it and arrive whole once it reads again', async () => {
    const before = s.stderr();
    const c = await connect(s, true, ['base:allocation']);
    const reqs = new Map<bigint, [number, number]>();
    const status = new Set<bigint>();
    let h = 1n;
    c.sock.pause();
    // zero-copy replies that fill the socket, with small, hole and block status replies between
    for (let i = 0; i < 24; i++) {
      const big: [number, number] = [(i * 256 * KiB) % (5 * MiB), 1 * MiB + 3 * KiB];
      const small: [number, number] = [(i * 37 * KiB) % (6 * MiB), 3000];
      const hole: [number, number] = [6 * MiB + i * 4 * KiB, 64 * KiB];
      for (const r of [big, small, hole]) {
        reqs.set(h, r);
        c.sendRequest(CMD_READ, r[0], r[1], { handle: h++ });
      }
      status.add(h);
      c.sendRequest(CMD_BLOCK_STATUS, big[0], big[1], { handle: h++ });
    }
    await new Promise((r) => setTimeout(r, 400));
    c.sock.resume();
    await collectReads(c, reqs, status);
    c.destroy();
    const log = await zeroCopyLog(s, before);
    expect(log.replies).toBeGreaterThan(0);
    // a Unix socket holds little: replies had to wait for the client (TCP's buffers may hold it all)
    if (unix) expect(log.waited).toBeGreaterThan(0);
  });

  it('a client that goes away in the middle of replies: the server serves the next one', async () => {
    for (let round = 0; round < 3; round++) {
      const c = await connect(s, true);
      for (let i = 0; i < 16; i++) c.sendRequest(CMD_READ, (i % 4) * MiB, 2 * MiB, { handle: BigInt(i + 1) });
      await new Promise((r) => setTimeout(r, round * 20));
      c.destroy();
    }
    const c = await connect(s, true);
    const reqs = new Map<bigint, [number, number]>([
      [1n, [0, 2 * MiB]],
      [2n, [4 * MiB, 2 * MiB]],
    ]);
    for (const [handle, [off, len]] of reqs) c.sendRequest(CMD_READ, off, len, { handle });
    await collectReads(c, reqs);
    c.destroy();
  });
});

describe('zero-copy is only for files the server does not write', () => {
  it('a writable export sends its own data through buffers', async () => {
    fs.copyFileSync(path.join(dir, 'flat.qcow2'), path.join(dir, 'flat-rw.qcow2'));
    const s = await startServer(['-t', '-e', '0', '-v', '-f', 'qcow2', 'flat-rw.qcow2'], { dir });
    const before = s.stderr();
    const c = await connect(s, true);
    const reqs = new Map<bigint, [number, number]>([
      [1n, [0, 2 * MiB]],
      [2n, [4 * MiB, 1 * MiB]],
    ]);
    for (const [handle, [off, len]] of reqs) c.sendRequest(CMD_READ, off, len, { handle });
    await collectReads(c, reqs);
    c.destroy();
    await c.waitClosed();
    expect((await s.stop()).code).toBe(0);
    expect(s.stderr().slice(before.length)).not.toMatch(/zero-copy/);
  });
});

describe('the sendfile addon', () => {
  type ZC = typeof import('../../src/nbd/zero-copy.js');
  let zc: ZC;
  let server: net.Server;
  let sockPath: string;
  const accepted: net.Socket[] = [];
  beforeAll(async () => {
    zc = (await import(pathToFileURL(path.join(DIST, 'nbd/zero-copy.js')).href)) as ZC;
    sockPath = path.join(dir, 'addon.sock');
    server = net.createServer((s) => accepted.push(s));
    await new Promise<void>((r) => server.listen(sockPath, r));
  });
  afterAll(() => {
    for (const s of accepted) s.destroy();
    server.close();
  });

  async function pair(): Promise<{ client: net.Socket; fd: number; received: () => Buffer }> {
    const n = accepted.length;
    const client = net.connect(sockPath);
    const chunks: Buffer[] = [];
    client.on('data', (d: Buffer) => chunks.push(d));
    while (accepted.length === n) await new Promise((r) => setTimeout(r, 5));
    const fd = zc.socketFd(accepted[n]!);
    expect(fd).toBeTypeOf('number');
    return { client, fd: fd!, received: () => Buffer.concat(chunks) };
  }

  async function until(cond: () => boolean): Promise<void> {
    const deadline = Date.now() + 10_000;
    while (!cond()) {
      if (Date.now() > deadline) throw new Error('timed out');
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  it('sends the header, the file bytes and zeros past the end of the file', async () => {
    expect(zc.zeroCopySupported()).toBe(true);
    const file = path.join(dir, 'small.bin');
    fs.writeFileSync(file, Buffer.from(Array.from({ length: 1000 }, (_, i) => (i * 7 + 1) & 255)));
    const fd = fs.openSync(file, 'r');
    const p = await pair();
    const header = Buffer.from('HEADER');
    expect(zc.trySend(p.fd, header, fd, 500, 2000, 0)).toBe(2006);
    // resumed from the middle of the header
    expect(zc.trySend(p.fd, header, fd, 990, 20, 3)).toBe(26);
    await until(() => p.received().length === 2006 + 23);
    const got = p.received();
    const want = Buffer.concat([header, fs.readFileSync(file).subarray(500), Buffer.alloc(1500), Buffer.from('DER'), fs.readFileSync(file).subarray(990), Buffer.alloc(10)]);
    expect(got.equals(want)).toBe(true);
    fs.closeSync(fd);
    p.client.destroy();
  });

  it('on the pool: waits while the socket is full, stops when cancelled', async () => {
    const fd = fs.openSync(path.join(dir, 'base.raw'), 'r');
    const p = await pair();
    p.client.pause();
    const cancel = new Int32Array(1);
    // More than the socket holds: trySend stops early, the pool finishes once the client reads.
    const header = Buffer.from('H');
    const done = zc.trySend(p.fd, header, fd, 0, 6 * MiB, 0);
    expect(done).toBeLessThan(6 * MiB + 1);
    const rest = zc.sendOnPool(p.fd, header, fd, 0, 6 * MiB, done, cancel);
    await new Promise((r) => setTimeout(r, 200));
    p.client.resume();
    await rest;
    await until(() => p.received().length === 6 * MiB + 1);
    const got = p.received();
    expect(got.subarray(0, 1).toString()).toBe('H');
    expect(got.subarray(1).equals(fs.readFileSync(path.join(dir, 'base.raw')).subarray(0, 6 * MiB))).toBe(true);
    p.client.destroy();

    const q = await pair();
    q.client.pause();
    const stuck = zc.sendOnPool(q.fd, Buffer.alloc(0), fd, 0, 6 * MiB, 0, cancel);
    await new Promise((r) => setTimeout(r, 150));
    cancel[0] = 1;
    await expect(stuck).rejects.toMatchObject({ code: 'ECANCELED' });
    q.client.destroy();
    fs.closeSync(fd);
  });
});
