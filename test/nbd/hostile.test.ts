/**
 * Malformed and hostile NBD clients (raw sockets): truncated handshakes, absurd lengths, unknown
 * options and commands, requests past the end, floods of connections. The server must answer
 * with the right errors or drop the client, never crash, and keep serving the next good client.
 */
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { create, io } from '../helpers/build.js';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { describeResult, must, qemuImg } from '../helpers/proc.js';
import { nbdinfo, startServer, type Served, stopAll } from './harness.js';
import { metaPayload, RawClient, REP_ACK, REP_ERR_INVALID, REP_ERR_UNKNOWN, REP_ERR_UNSUP, u16, u32 } from './raw-client.js';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;
const ENOTSUP = 95;
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 };

let dir: string;
let rw: Served;
let ro: Served;

beforeAll(async () => {
  dir = makeTmpDir('qk-nbd-hostile-');
  await create(dir, 'rw.qcow2', SIZE, { cluster_size: 65536 });
  await io(dir, 'rw.qcow2', ['write -q -P 0x61 0 64k', 'write -q -z 1M 64k']);
  await create(dir, 'ro.qcow2', SIZE, { cluster_size: 65536 });
  await io(dir, 'ro.qcow2', ['write -q -P 0x62 0 64k']);
  rw = await startServer(['-t', '-e', '0', '-x', 'exp', '--discard=unmap', 'rw.qcow2'], {
    dir,
    env: { QCOWKIT_NBD_HANDSHAKE_TIMEOUT_MS: '1500' },
  });
  ro = await startServer(['-t', '-e', '0', '-r', '-x', 'exp', 'ro.qcow2'], { dir });
}, 60_000);

afterAll(async () => {
  await ro?.stop();
  await stopAll();
  removeTmpDir(dir);
});

async function stillServes(s: Served): Promise<void> {
  const r = await nbdinfo(['--size', s.uri('exp')]);
  expect(r.stdout.trim(), describeResult(r)).toBe(String(SIZE));
}

async function session(s: Served, contexts?: string[]): Promise<RawClient> {
  const c = await RawClient.connect(s.port!);
  await c.greet();
  await c.go('exp', contexts ? { contexts } : {});
  return c;
}

describe('nbd handshake: hostile clients', () => {
  it('truncated handshakes and dropped connections', async () => {
    const cuts: Array<(c: RawClient) => Promise<void>> = [
      async () => {},
      async (c) => {
        await c.read(18);
        c.write(Buffer.from([0, 0]));
      },
      async (c) => {
        await c.greet();
        c.write(Buffer.alloc(10, 0x49));
      },
      async (c) => {
        await c.greet();
        c.sendOption(7, Buffer.alloc(10), 1000); // declares 1000 bytes, sends 10
      },
      async (c) => {
        await c.greet();
        c.sendOption(8);
        await c.readOptionReply();
        c.write(Buffer.from([0x25, 0x60])); // half a request magic, never transmission
      },
    ];
    for (const cut of cuts) {
      const c = await RawClient.connect(rw.port!);
      await cut(c);
      c.destroy();
    }
    await stillServes(rw);
  });

  it('a client that stalls in the handshake is dropped after the handshake timeout', async () => {
    const idle = await RawClient.connect(rw.port!);
    const half = await RawClient.connect(rw.port!);
    await half.greet();
    half.sendOption(8);
    await half.readOptionReply();
    expect(await idle.waitClosed(8000)).toBe(true);
    expect(await half.waitClosed(8000)).toBe(true);
    // A client that finished the handshake is not subject to it.
    const c = await session(rw);
    await new Promise((r) => setTimeout(r, 2000));
    c.sendRequest(CMD.READ, 0, 4);
    expect((await c.readChunks())[0]!.type).toBe(1);
    c.destroy();
  });

  it('-e 1 (the default): a second client waits until the first has left', async () => {
    const one = await startServer(['-t', '-x', 'exp', '-r', 'ro.qcow2'], { dir });
    try {
      const a = await session(one);
      const b = await RawClient.connect(one.port!);
      await expect(b.read(18, 700)).rejects.toThrow(/timed out/);
      a.sendRequest(CMD.DISC, 0, 0);
      await b.greet();
      await b.go('exp');
      b.destroy();
    } finally {
      expect((await one.stop()).code).toBe(0);
    }
  });

  it('bad client flags, bad option magic and absurd option lengths end the connection', async () => {
    const a = await RawClient.connect(rw.port!);
    await a.greet(0xff);
    expect(await a.waitClosed()).toBe(true);

    const b = await RawClient.connect(rw.port!);
    await b.greet();
    b.write(Buffer.alloc(16, 0x41));
    expect(await b.waitClosed()).toBe(true);

    for (const len of [0xffffffff, 64 * MiB]) {
      const c = await RawClient.connect(rw.port!);
      await c.greet();
      c.sendOption(6, Buffer.alloc(0), len);
      expect(await c.waitClosed()).toBe(true);
    }
    await stillServes(rw);
  });

  it('unknown and malformed options get errors, and the session goes on', async () => {
    const c = await RawClient.connect(rw.port!);
    await c.greet();
    c.sendOption(99, Buffer.alloc(100, 7));
    expect((await c.readOptionReply()).type).toBe(REP_ERR_UNSUP);
    c.sendOption(4); // PEEK_EXPORT (withdrawn)
    expect((await c.readOptionReply()).type).toBe(REP_ERR_UNSUP);
    c.sendOption(3, Buffer.from('x')); // LIST with a payload
    expect((await c.readOptionReply()).type).toBe(REP_ERR_INVALID);
    c.sendOption(6, Buffer.concat([u32(5000), Buffer.alloc(10)])); // INFO: name longer than the payload
    expect((await c.readOptionReply()).type).toBe(REP_ERR_INVALID);
    c.sendOption(6, Buffer.concat([u32(3), Buffer.from('exp'), u16(3), u16(1)])); // INFO: 3 requests declared, 1 sent
    expect((await c.readOptionReply()).type).toBe(REP_ERR_INVALID);
    c.sendOption(6, Buffer.concat([u32(4), Buffer.from('nope'), u16(0)]));
    expect((await c.readOptionReply()).type).toBe(REP_ERR_UNKNOWN);
    c.sendOption(10, metaPayload('exp', ['base:allocation'])); // before STRUCTURED_REPLY
    expect((await c.readOptionReply()).type).toBe(REP_ERR_INVALID);
    c.sendOption(5); // STARTTLS without TLS configured
    expect((await c.readOptionReply()).type).toBe(0x80000002);
    c.sendOption(8);
    expect((await c.readOptionReply()).type).toBe(REP_ACK);
    c.sendOption(8, Buffer.alloc(0)); // again
    expect((await c.readOptionReply()).type).toBe(REP_ERR_INVALID);
    c.sendOption(10, Buffer.concat([u32(3), Buffer.from('exp'), u32(1_000_000)])); // absurd query count
    expect((await c.readOptionReply()).type).toBe(REP_ERR_INVALID);
    c.sendOption(9, metaPayload('exp', [])); // LIST_META_CONTEXT: everything
    const listed = await c.readOptionReplies();
    expect(listed.map((r) => r.data.subarray(4).toString())).toEqual(['base:allocation', '']);
    c.sendOption(10, metaPayload('exp', ['base:', 'qemu:dirty-bitmap:none', 'x-junk:', 'base:allocation']));
    const set = await c.readOptionReplies();
    expect(set.map((r) => r.data.subarray(4).toString())).toEqual(['base:allocation', '']);
    const g = await c.go('exp', { structured: false });
    expect(g.size).toBe(BigInt(SIZE));
    c.sendRequest(CMD.BLOCK_STATUS, 0, SIZE, { handle: 5n });
    const bs = await c.readChunks();
    expect(bs[0]!.type).toBe(5);
    c.sendRequest(CMD.DISC, 0, 0);
    expect(await c.waitClosed()).toBe(true);
  });

  it('EXPORT_NAME of an unknown export, and old-style (non-fixed) clients', async () => {
    const a = await RawClient.connect(rw.port!);
    await a.greet();
    a.sendOption(1, Buffer.from('nope'));
    expect(await a.waitClosed()).toBe(true);

    const b = await RawClient.connect(rw.port!);
    await b.greet(0);
    b.sendOption(3); // only EXPORT_NAME is valid without fixed newstyle
    expect(await b.waitClosed()).toBe(true);

    const c = await RawClient.connect(rw.port!);
    await c.greet(0);
    c.sendOption(1, Buffer.from('exp'));
    const r = await c.read(8 + 2 + 124);
    expect(r.readBigUInt64BE(0)).toBe(BigInt(SIZE));
    c.sendRequest(CMD.READ, 0, 4, { handle: 9n });
    const rep = await c.readReply(4);
    expect([rep.error, rep.handle, [...rep.payload]]).toEqual([0, 9n, [0x61, 0x61, 0x61, 0x61]]);
    c.destroy();
  });
});

describe('nbd transmission: hostile requests', () => {
  it('requests past the end, unknown commands and flags, oversized lengths: errors, connection kept', async () => {
    const c = await session(rw);
    const expectError = async (errno: number) => {
      const chunks = await c.readChunks();
      expect(chunks[chunks.length - 1]!.error).toBe(errno);
    };
    c.sendRequest(CMD.READ, SIZE - 512, 1024);
    await expectError(EINVAL);
    c.sendRequest(CMD.READ, 0xffffffffffffffffn, 1);
    await expectError(EINVAL);
    c.sendRequest(CMD.READ, 0, 0xffffffff);
    await expectError(EINVAL);
    c.sendRequest(CMD.READ, 0, 33 * MiB);
    await expectError(EINVAL);
    c.sendRequest(42, 0, 512);
    await expectError(EINVAL);
    c.sendRequest(CMD.READ, 0, 512, { flags: 0x8000 });
    await expectError(EINVAL);
    c.sendRequest(CMD.BLOCK_STATUS, 0, 512); // no context negotiated
    await expectError(EINVAL);
    c.sendRequest(CMD.WRITE, SIZE - 100, 200, { payload: Buffer.alloc(200, 1) });
    await expectError(ENOSPC);
    c.sendRequest(CMD.WRITE_ZEROES, SIZE, 1);
    await expectError(ENOSPC);
    c.sendRequest(CMD.TRIM, 0xfffffffffffff000n, 4096);
    await expectError(EINVAL);
    c.sendRequest(CMD.CACHE, SIZE, 1);
    await expectError(EINVAL);
    c.sendRequest(CMD.WRITE_ZEROES, 512, 512, { flags: 1 << 4 }); // FAST_ZERO on a partial cluster
    await expectError(ENOTSUP);
    // Still a working session: a hole read comes back as a hole chunk.
    c.sendRequest(CMD.READ, 1 * MiB, 65536, { handle: 77n });
    const hole = await c.readChunks();
    expect(hole.map((h) => h.type)).toEqual([2]);
    c.sendRequest(CMD.READ, 0, 4096, { handle: 78n });
    const data = await c.readChunks();
    expect(data[0]!.type).toBe(1);
    expect(data[0]!.payload.subarray(8).every((b) => b === 0x61)).toBe(true);
    // An oversized write cannot be skipped: EINVAL, then the server hangs up.
    c.sendRequest(CMD.WRITE, 0, 64 * MiB);
    await expectError(EINVAL);
    expect(await c.waitClosed()).toBe(true);
    await stillServes(rw);
  });

  it('bad request magic drops the client; simple replies carry errors too', async () => {
    const a = await session(rw);
    a.write(Buffer.alloc(28, 0x33));
    expect(await a.waitClosed()).toBe(true);

    const b = await RawClient.connect(rw.port!);
    await b.greet();
    await b.go('exp', { structured: false });
    b.sendRequest(CMD.READ, SIZE, 1, { handle: 3n });
    const e = await b.readReply();
    expect([e.structured, e.error, e.handle]).toEqual([false, EINVAL, 3n]);
    b.sendRequest(CMD.READ, 0, 2, { handle: 4n });
    const ok = await b.readReply(2);
    expect([ok.error, [...ok.payload]]).toEqual([0, [0x61, 0x61]]);
    b.destroy();
  });

  it('writes on a read-only export fail with EPERM', async () => {
    const c = await session(ro);
    for (const [type, payload] of [
      [CMD.WRITE, Buffer.alloc(512, 1)],
      [CMD.WRITE_ZEROES, undefined],
      [CMD.TRIM, undefined],
    ] as const) {
      c.sendRequest(type, 0, 512, payload ? { payload } : {});
      const r = await c.readChunks();
      expect(r[r.length - 1]!.error).toBe(EPERM);
    }
    c.sendRequest(CMD.FLUSH, 0, 0);
    expect((await c.readReply()).error).toBe(0);
    c.destroy();
  });

  it('pipelined requests all get answered; DISC waits for writes in flight', async () => {
    const c = await session(rw, ['base:allocation']);
    const N = 200;
    for (let i = 0; i < N; i++) {
      if (i % 2) c.sendRequest(CMD.READ, (i * 4096) % SIZE, 4096, { handle: BigInt(i) });
      else c.sendRequest(CMD.BLOCK_STATUS, 0, SIZE, { handle: BigInt(i), flags: 1 << 3 });
    }
    const seen = new Set<bigint>();
    while (seen.size < N) {
      const r = await c.readReply();
      expect(r.error).toBe(0);
      if (r.flags! & 1) seen.add(r.handle);
      if (r.type === 5) expect(r.payload.length).toBe(4 + 8); // REQ_ONE: one descriptor
    }
    c.sendRequest(CMD.WRITE, 2 * MiB, 65536, { payload: Buffer.alloc(65536, 0x7e), handle: 1000n });
    c.sendRequest(CMD.DISC, 0, 0);
    expect((await c.readReply()).error).toBe(0);
    expect(await c.waitClosed()).toBe(true);
    const d = await session(rw);
    d.sendRequest(CMD.READ, 2 * MiB, 16);
    const chunks = await d.readChunks();
    expect(chunks[0]!.payload.subarray(8).every((b) => b === 0x7e)).toBe(true);
    d.destroy();
  });

  it('1000+ connections opened and dropped (some mid-handshake, some sending junk): the server answers the next client', async () => {
    const junk = Buffer.alloc(64, 0xee);
    for (let batch = 0; batch < 11; batch++) {
      await Promise.all(
        Array.from({ length: 100 }, async (_, i) => {
          const c = await RawClient.connect(rw.port!);
          if (i % 3 === 1) c.write(junk);
          if (i % 3 === 2) {
            await c.greet();
            c.sendOption(8);
          }
          c.destroy();
        }),
      );
    }
    await stillServes(rw);
    const c = await session(rw);
    c.sendRequest(CMD.READ, 0, 8);
    expect((await c.readChunks())[0]!.payload.subarray(8).every((b) => b === 0x61)).toBe(true);
    c.destroy();
  });

  it('after all that (and with a client that never reads its replies): clean shutdown on SIGTERM, consistent image', async () => {
    const deaf = await session(rw);
    deaf.sock.pause();
    for (let i = 0; i < 64; i++) deaf.sendRequest(CMD.READ, 0, 4 * MiB, { handle: BigInt(i) });
    await new Promise((r) => setTimeout(r, 300));
    const t0 = Date.now();
    expect(await rw.stop()).toEqual({ code: 0, signal: null });
    expect(Date.now() - t0).toBeLessThan(12_000);
    const r = await must(qemuImg(['check', path.join(dir, 'rw.qcow2')]));
    expect(r.stdout).toContain('No errors were found');
  });
});
