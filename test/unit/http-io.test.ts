/**
 * Images over HTTP: src/io/http.ts (range requests, block cache, errors) through the library and
 * through bin/qcowkit with http:// URLs, against a local node:http server on 127.0.0.1 that
 * honours Range (and variants that ignore it or answer 404). The fixture is a qcow2 with
 * zlib-compressed clusters over a backing file named relatively, made by qemu-img at test time;
 * qemu-img's `convert -O raw` of the local file is the reference.
 */
import * as fs from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { openImage, QcowError, type IOProvider } from '../../src/index.js';
import { createHttpProvider, HttpIO, httpProvider, resolveUrl } from '../../src/io/http.js';
import { mixedRawFile } from '../helpers/build.js';
import { expectCleanFailure } from '../helpers/compare.js';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { describeResult, must, qemuImg, qk } from '../helpers/proc.js';

const MiB = 1 << 20;
const SIZE = 8 * MiB;
const CLUSTER = 65536;
/** What a server that ignores Range claims to hold at /huge (streamed lazily, never fully). */
const HUGE = 256 * MiB;

interface Served {
  url: string;
  log: Array<{ method: string; path: string; range: string | undefined; auth?: string | undefined }>;
  /** Body bytes the server managed to send for /huge before the client went away. */
  hugeSent: number;
  close(): Promise<void>;
}

function serve(root: string, mode: 'range' | 'ignore-range'): Promise<Served> {
  const served: Served = { url: '', log: [], hugeSent: -1, close: async () => {} };
  const server = http.createServer((req, res) => {
    const u = new URL(req.url ?? '/', 'http://x');
    const p = decodeURIComponent(u.pathname);
    served.log.push({ method: req.method ?? '', path: p, range: req.headers.range, auth: req.headers.authorization });
    if (req.method === 'HEAD' && u.searchParams.has('nohead')) return void res.writeHead(405).end();
    if (mode === 'ignore-range' && p === '/huge') {
      if (req.method === 'HEAD') return void res.writeHead(200, { 'Content-Length': HUGE }).end();
      res.writeHead(200, { 'Content-Length': HUGE });
      let sent = 0;
      const body = new Readable({
        read() {
          if (sent >= HUGE) return void this.push(null);
          sent += CLUSTER;
          this.push(Buffer.alloc(CLUSTER));
        },
      });
      res.on('close', () => {
        served.hugeSent = sent;
        body.destroy();
      });
      body.pipe(res);
      return;
    }
    const file = path.join(root, path.basename(p));
    let size: number;
    try {
      size = fs.statSync(file).size;
    } catch {
      return void res.writeHead(404, { 'Content-Length': 9 }).end('not found');
    }
    if (req.method === 'HEAD') return void res.writeHead(200, { 'Content-Length': size, 'Accept-Ranges': 'bytes' }).end();
    const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
    if (mode === 'range' && m) {
      const a = Number(m[1]);
      const b = Math.min(Number(m[2]), size - 1);
      if (a >= size) return void res.writeHead(416, { 'Content-Range': `bytes */${size}` }).end();
      res.writeHead(206, { 'Content-Length': b - a + 1, 'Content-Range': `bytes ${a}-${b}/${size}` });
      fs.createReadStream(file, { start: a, end: b }).pipe(res);
      return;
    }
    res.writeHead(200, { 'Content-Length': size });
    fs.createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => {
      served.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
      served.close = () =>
        new Promise<void>((done) => {
          server.closeAllConnections();
          server.close(() => done());
        });
      resolve(served);
    });
  });
}

let dir: string;
let ranged: Served;
let ignoring: Served;
let expected: Buffer;
let topUrl: string;

beforeAll(async () => {
  dir = makeTmpDir('qk-http-');
  // base: uncompressed; top: zlib-compressed clusters, holes where the backing file shows through.
  mixedRawFile(dir, 'base.raw', 11, SIZE, 96 * 1024);
  mixedRawFile(dir, 'top.raw', 12, SIZE, 160 * 1024);
  await must(qemuImg(['convert', '-O', 'qcow2', 'base.raw', 'base.qcow2'], { cwd: dir }));
  await must(qemuImg(['convert', '-c', '-O', 'qcow2', 'top.raw', 'top.qcow2'], { cwd: dir }));
  await must(qemuImg(['rebase', '-u', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], { cwd: dir }));
  await must(qemuImg(['convert', '-O', 'raw', 'top.qcow2', 'expected.raw'], { cwd: dir }));
  expected = fs.readFileSync(path.join(dir, 'expected.raw'));
  ranged = await serve(dir, 'range');
  ignoring = await serve(dir, 'ignore-range');
  topUrl = `${ranged.url}/top.qcow2`;
});

afterAll(async () => {
  await ranged?.close();
  await ignoring?.close();
  removeTmpDir(dir);
});

beforeEach(() => {
  if (ranged) ranged.log.length = 0;
  if (ignoring) ignoring.log.length = 0;
});

describe('the fixture', () => {
  it('has compressed clusters, a relative backing name and data shown through from the backing file', async () => {
    const check = JSON.parse((await must(qemuImg(['check', '--output=json', path.join(dir, 'top.qcow2')]))).stdout) as {
      'compressed-clusters': number;
      'allocated-clusters': number;
    };
    expect(check['compressed-clusters']).toBeGreaterThan(20);
    expect(check['allocated-clusters']).toBeLessThan(SIZE / CLUSTER);
    const info = JSON.parse((await must(qemuImg(['info', '--output=json', path.join(dir, 'top.qcow2')]))).stdout) as Record<string, unknown>;
    expect(info['backing-filename']).toBe('base.qcow2');
  });
});

/** Read the whole image through the library in 1 MiB pieces. */
async function readAll(): Promise<Buffer> {
  const img = await openImage(topUrl, { io: httpProvider, readOnly: true });
  try {
    expect(img.backing?.filename).toBe(`${ranged.url}/base.qcow2`);
    const parts: Uint8Array[] = [];
    for (let off = 0; off < img.size; off += MiB) parts.push(await img.read(off, Math.min(MiB, img.size - off)));
    return Buffer.concat(parts);
  } finally {
    await img.close();
  }
}

describe('library: openImage over HTTP', () => {
  it('reads the compressed image and its backing file byte for byte as qemu-img converts the local file', async () => {
    const got = await readAll();
    expect(got.equals(expected)).toBe(true);
    expect(ranged.log.every((r) => r.method === 'HEAD' || /^bytes=\d+-\d+$/.test(r.range ?? ''))).toBe(true);
  });

  it('the block cache saves most requests (4 KiB reads, as a guest reads)', async () => {
    const span = 2 * MiB;
    const read4k = async (provider: IOProvider): Promise<number> => {
      ranged.log.length = 0;
      const img = await openImage(topUrl, { io: provider, readOnly: true });
      const parts: Uint8Array[] = [];
      for (let off = 0; off < span; off += 4096) parts.push(await img.read(off, 4096));
      await img.close();
      expect(Buffer.concat(parts).equals(expected.subarray(0, span))).toBe(true);
      return ranged.log.length;
    };
    const cached = await read4k(httpProvider);
    const uncached = await read4k(createHttpProvider({ directReadSize: 1 })); // every read its own request
    console.log(`library, ${span / 4096} reads of 4 KiB: ${cached} requests with the cache, ${uncached} without`);
    expect(cached * 10).toBeLessThan(uncached);
    expect(cached).toBeLessThan(span / 65536);
  });

  it('refuses a server that ignores Range (200 for a range request), without downloading the whole file', async () => {
    const err = await HttpIO.open(`${ignoring.url}/top.qcow2`).then(async (io) => io.read(new Uint8Array(8), 0)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QcowError);
    expect((err as Error).message).toMatch(/does not support range requests: HTTP 200 OK instead of 206/);
    expect((err as Error).message).toContain(`${ignoring.url}/top.qcow2`);

    const huge = await HttpIO.open(`${ignoring.url}/huge`);
    expect(await huge.size()).toBe(HUGE);
    await expect(huge.read(new Uint8Array(512), 0)).rejects.toThrow(/does not support range requests/);
    for (let i = 0; i < 100 && ignoring.hugeSent < 0; i++) await new Promise((r) => setTimeout(r, 20));
    expect(ignoring.hugeSent).toBeGreaterThan(0);
    expect(ignoring.hugeSent).toBeLessThan(HUGE / 4);
  });

  it('cuts off a 206 that sends more than was asked (without end), and refuses an impossible length', async () => {
    let sent = 0;
    const server = http.createServer((req, res) => {
      if (req.method === 'HEAD') {
        res.writeHead(200, { 'Content-Length': req.url === '/absurd' ? '36028797018963968' : String(1 << 30) });
        res.end();
        return;
      }
      res.writeHead(206, { 'Content-Range': `bytes 0-4095/${1 << 30}` });
      const chunk = Buffer.alloc(65536, 0x42);
      const pump = () => {
        while (sent < (256 << 20) && res.write(chunk)) sent += chunk.length;
        if (sent < (256 << 20)) res.once('drain', pump);
        else res.end();
      };
      res.on('close', () => res.removeAllListeners('drain'));
      pump();
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const url = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
    try {
      const io = await HttpIO.open(`${url}/endless`);
      const buf = new Uint8Array(4096);
      expect(await io.read(buf, 0)).toBe(4096);
      expect(buf.every((b) => b === 0x42)).toBe(true);
      await new Promise((r) => setTimeout(r, 100));
      expect(sent).toBeLessThan(64 << 20);
      await expect(HttpIO.open(`${url}/absurd`)).rejects.toThrow(/impossible length/);
    } finally {
      server.closeAllConnections();
      await new Promise((r) => server.close(r));
    }
  });

  it('reports a 404 as a one-line QcowError naming the status and the URL', async () => {
    const err = (await openImage(`${ranged.url}/missing.qcow2`, { io: httpProvider }).catch((e: unknown) => e)) as QcowError;
    expect(err).toBeInstanceOf(QcowError);
    expect(err.code).toBe('ENOENT');
    expect(err.message).toBe(`HTTP 404 Not Found for ${ranged.url}/missing.qcow2 (bytes=0-0)`);
  });

  it('reports a refused connection as a one-line QcowError', async () => {
    const closed = await serve(dir, 'range');
    const url = `${closed.url}/top.qcow2`;
    await closed.close();
    const err = (await HttpIO.open(url).catch((e: unknown) => e)) as QcowError;
    expect(err).toBeInstanceOf(QcowError);
    expect(err.message).toMatch(new RegExp(`^HTTP request failed for ${url.replace(/[.]/g, '\\.')}: .*ECONNREFUSED`));
    expect(err.message).not.toContain('\n');
  });

  it('is read-only: open for writing, create, write and truncate are refused', async () => {
    await expect(httpProvider.open(topUrl, { readOnly: false })).rejects.toThrow(/^Read-only file system/);
    await expect(httpProvider.create!(`${ranged.url}/new.qcow2`)).rejects.toThrow("Protocol driver 'http' does not support image creation");
    const io = await httpProvider.open(topUrl, { readOnly: true });
    expect(io.readOnly).toBe(true);
    await expect(io.write(new Uint8Array(1), 0)).rejects.toMatchObject({ code: 'EPERM' });
    await expect(io.truncate(0)).rejects.toMatchObject({ code: 'EPERM' });
    await io.close();
  });

  it('sends a URL\'s credentials as Basic authorization and shows no password in messages', async () => {
    const io = await HttpIO.open(ranged.url.replace('//', '//qk:p%40ss@') + '/base.raw');
    await io.read(new Uint8Array(4), 0);
    expect(ranged.log.map((r) => r.auth)).toEqual(Array(ranged.log.length).fill(`Basic ${Buffer.from('qk:p@ss').toString('base64')}`));
    await io.close();
    const err = (await HttpIO.open(ranged.url.replace('//', '//qk:p%40ss@') + '/missing').catch((e: unknown) => e)) as Error;
    expect(err.message).toContain('//qk:***@127.0.0.1');
    expect(err.message).not.toContain('p%40ss');
  });

  it('resolves backing names as QEMU does: relative to the URL, absolute URLs kept', () => {
    expect(resolveUrl('http://h:8/a/b/top.qcow2', 'base.qcow2')).toBe('http://h:8/a/b/base.qcow2');
    expect(resolveUrl('http://h:8/a/b/top.qcow2', '../c/base.qcow2')).toBe('http://h:8/a/c/base.qcow2');
    expect(resolveUrl('http://h:8/a/b/top.qcow2', '/srv/base.qcow2')).toBe('http://h:8/srv/base.qcow2');
    expect(resolveUrl('http://h:8/a/top.qcow2', 'https://other/x.qcow2')).toBe('https://other/x.qcow2');
    expect(httpProvider.resolve('https://h/img?sig=1', 'base.qcow2')).toBe('https://h/base.qcow2');
  });
});

describe('HttpIO: reads and the block cache', () => {
  it('reads past the end return short counts, like a file', async () => {
    const io = await HttpIO.open(`${ranged.url}/base.raw`);
    expect(await io.size()).toBe(SIZE);
    const buf = new Uint8Array(1000);
    expect(await io.read(buf, SIZE - 100)).toBe(100);
    expect(Buffer.from(buf.subarray(0, 100)).equals(fs.readFileSync(path.join(dir, 'base.raw')).subarray(SIZE - 100))).toBe(true);
    expect(await io.read(buf, SIZE)).toBe(0);
    expect(await io.read(buf, SIZE + 5000)).toBe(0);
    await io.close();
  });

  it('takes the length from a bytes=0-0 GET when HEAD gives none', async () => {
    const io = await HttpIO.open(`${ranged.url}/base.raw?nohead=1`);
    expect(await io.size()).toBe(SIZE);
    expect(ranged.log.map((r) => `${r.method} ${r.range ?? ''}`)).toEqual(['HEAD ', 'GET bytes=0-0']);
    const buf = new Uint8Array(10);
    expect(await io.read(buf, 5)).toBe(10);
    expect(Buffer.from(buf).equals(fs.readFileSync(path.join(dir, 'base.raw')).subarray(5, 15))).toBe(true);
    await io.close();
  });

  it('concurrent small reads of one block share one request; a large read is one request; the cache is bounded', async () => {
    const raw = fs.readFileSync(path.join(dir, 'base.raw'));
    const io = await HttpIO.open(`${ranged.url}/base.raw`, { blockSize: 65536, cacheSize: 4 * 65536 });
    const before = io.stats.requests;
    const bufs = Array.from({ length: 16 }, () => new Uint8Array(512));
    await Promise.all(bufs.map((b, i) => io.read(b, 70000 + i * 1000)));
    expect(io.stats.requests - before).toBe(1);
    bufs.forEach((b, i) => expect(Buffer.from(b).equals(raw.subarray(70000 + i * 1000, 70000 + i * 1000 + 512))).toBe(true));

    // a small read across a block boundary: both blocks in one request
    const across = new Uint8Array(4096);
    await io.read(across, 3 * 65536 - 2048);
    expect(io.stats.requests - before).toBe(2);
    expect(Buffer.from(across).equals(raw.subarray(3 * 65536 - 2048, 3 * 65536 + 2048))).toBe(true);

    const big = new Uint8Array(3 * MiB);
    expect(await io.read(big, 12345)).toBe(big.length);
    expect(io.stats.requests - before).toBe(3);
    expect(Buffer.from(big).equals(raw.subarray(12345, 12345 + big.length))).toBe(true);

    // block 1 is cached; after reading 4 more blocks (cache: 4 blocks) it is gone
    await io.read(new Uint8Array(16), 65536 + 10);
    expect(io.stats.requests - before).toBe(3);
    for (let b = 20; b < 24; b++) await io.read(new Uint8Array(16), b * 65536);
    expect(io.stats.requests - before).toBe(7);
    await io.read(new Uint8Array(16), 65536 + 10);
    expect(io.stats.requests - before).toBe(8);
    await io.close();
  });
});

describe('bin/qcowkit with http:// sources', () => {
  it('convert -O raw URL out.raw equals qemu-img convert of the local file, in few requests', async () => {
    const out = path.join(dir, 'cli-out.raw');
    const r = await qk(['convert', '-O', 'raw', topUrl, out]);
    expect(r.code, describeResult(r)).toBe(0);
    expect(fs.readFileSync(out).equals(expected)).toBe(true);
    const clusters = (2 * SIZE) / CLUSTER;
    console.log(`qcowkit convert over HTTP: ${ranged.log.length} requests for ${clusters} clusters (image + backing file)`);
    expect(ranged.log.length).toBeLessThan(clusters / 2);
  });

  it('info --output=json shows what it shows for the local file (and the backing file as a URL)', async () => {
    const viaUrl = JSON.parse((await must(qk(['info', '--output=json', topUrl]))).stdout) as Record<string, unknown>;
    const local = JSON.parse((await must(qk(['info', '--output=json', path.join(dir, 'top.qcow2')]))).stdout) as Record<string, unknown>;
    for (const k of ['virtual-size', 'format', 'cluster-size', 'backing-filename', 'backing-filename-format', 'format-specific']) {
      expect(viaUrl[k], k).toEqual(local[k]);
    }
    expect(viaUrl.filename).toBe(topUrl);
    expect(viaUrl['full-backing-filename']).toBe(`${ranged.url}/base.qcow2`);
  });

  it('map, compare and check work on the URL as on the file', async () => {
    const local = path.join(dir, 'top.qcow2');
    expect((await must(qk(['map', '--output=json', topUrl]))).stdout).toBe((await must(qk(['map', '--output=json', local]))).stdout);
    const cmp = await qk(['compare', topUrl, path.join(dir, 'expected.raw')]);
    expect(cmp.code, describeResult(cmp)).toBe(0);
    expect(cmp.stdout).toBe('Images are identical.\n');
    const check = await qk(['check', topUrl]);
    expect(check.code, describeResult(check)).toBe(0);
    expect(check.stdout).toBe((await qk(['check', local])).stdout);
  });

  it('prints what qemu-img (curl driver) prints for the same URL, where qemu-img has one', async () => {
    const theirs = await qemuImg(['info', '--output=json', topUrl]);
    if (theirs.code !== 0) return; // qemu-img without its curl module (qemu-block-extra)
    expect((await qk(['info', '--output=json', topUrl])).stdout).toBe(theirs.stdout);
    expect((await qk(['map', '--output=json', topUrl])).stdout).toBe((await qemuImg(['map', '--output=json', topUrl])).stdout);
  });

  it('fails with one clear line and exit 1: 404, a server that ignores Range, writing to a URL', async () => {
    const missing = await qk(['info', `${ranged.url}/missing.qcow2`]);
    expectCleanFailure(missing);
    expect(missing.stderr).toContain(`HTTP 404 Not Found for ${ranged.url}/missing.qcow2`);

    const noRange = await qk(['convert', '-O', 'raw', `${ignoring.url}/top.qcow2`, path.join(dir, 'never.raw')]);
    expectCleanFailure(noRange);
    expect(noRange.stderr).toContain('does not support range requests');

    for (const args of [['resize', topUrl, '16M'], ['check', '-r', 'all', topUrl], ['snapshot', '-c', 's1', topUrl]]) {
      const w = await qk(args);
      expectCleanFailure(w);
      expect(w.stderr).toContain(`Could not open '${topUrl}': Read-only file system`);
    }
    // creating an image at a URL: qemu-img's words
    for (const [args, line] of [
      [['convert', '-O', 'raw', topUrl, `${ranged.url}/new.raw`], "qcowkit: Protocol driver 'http' does not support image creation"],
      [['convert', '-O', 'qcow2', topUrl, `${ranged.url}/new.qcow2`], "qcowkit: Protocol driver 'http' does not support image creation"],
      [['create', '-f', 'qcow2', `${ranged.url}/new.qcow2`, '1M'], `qcowkit: ${ranged.url}/new.qcow2: Protocol driver 'http' does not support image creation`],
    ] as const) {
      const c = await qk([...args]);
      expectCleanFailure(c);
      expect(c.stderr.trim()).toBe(line);
    }
  });
});
