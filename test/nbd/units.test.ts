/**
 * In-process checks of the NBD server's building blocks (loaded from dist/): the copy-on-write
 * overlay of -s, allocation-depth and base:allocation mapping, meta context matching, option
 * objects, and the lock/semaphore primitives.
 */
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { DIST } from '../helpers/proc.js';

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Any = any;
let M: Record<string, Any> = {};

beforeAll(async () => {
  const imp = (p: string) => import(pathToFileURL(path.join(DIST, p)).href);
  const [overlay, extents, meta, objects, sync, mem, raw] = await Promise.all([
    imp('nbd/cow-overlay.js'),
    imp('nbd/extents.js'),
    imp('nbd/meta-context.js'),
    imp('nbd/objects.js'),
    imp('nbd/sync.js'),
    imp('io/memory.js'),
    imp('formats/raw/driver.js'),
  ]);
  M = { ...overlay, ...extents, ...meta, ...objects, ...sync, ...mem, ...raw };
});

async function rawDriver(bytes: Uint8Array): Promise<Any> {
  return M.RawDriver.open(new M.MemoryIO('base', bytes, true), { readOnly: true });
}

describe('nbd building blocks', () => {
  it('CowOverlay: reads through, copies on write, zeroes and discards whole chunks, base untouched', async () => {
    const base = new Uint8Array(300 * 1024).map((_, i) => (i * 7) & 0xff);
    const o = await M.CowOverlay.create(await rawDriver(base));
    const expected = base.slice();
    const w = new Uint8Array(5000).fill(0xab);
    await o.write(65536 - 100, w);
    expected.set(w, 65536 - 100);
    await o.writeZeroes(128 * 1024, 64 * 1024);
    expected.fill(0, 128 * 1024, 192 * 1024);
    await o.writeZeroes(10, 20); // partial: written as data
    expected.fill(0, 10, 30);
    await o.discard(200 * 1024, 100 * 1024); // only the whole chunk 256K..300K (the last, short one) goes
    expected.fill(0, 256 * 1024, 300 * 1024);
    expect(Buffer.from(await o.read(0, base.length)).equals(Buffer.from(expected))).toBe(true);
    const ext = await o.blockStatus(0, base.length);
    expect(ext.map((e: Any) => [e.offset, e.kind, e.depth])).toEqual([
      [0, 'data', 0],
      [128 * 1024, 'zero', 0],
      [192 * 1024, 'data', 1],
      [256 * 1024, 'zero', 0],
    ]);
    await o.close();
  });

  it('allocation depth as qemu-nbd reports it (past a short backing file counts as that file)', () => {
    const base: Any = { size: 2 << 20 };
    const mid: Any = { size: 4 << 20, backing: base };
    const top: Any = { size: 6 << 20, backing: mid };
    const d = (kind: string, depth: number) => M.allocationDepth(top, { offset: 0, length: 1, kind, depth });
    expect(d('data', 0)).toBe(1);
    expect(d('zero', 1)).toBe(2);
    expect(d('data', 2)).toBe(3);
    expect(d('unallocated', 2)).toBe(0); // consulted down to the base, which has no backing
    expect(d('unallocated', 0)).toBe(2); // top's backing (mid) too short
    expect(d('unallocated', 1)).toBe(3); // mid's backing (base) too short
    expect(M.allocationFlags({ kind: 'data' })).toBe(0);
    expect(M.allocationFlags({ kind: 'data', zeroData: true })).toBe(2);
    expect(M.allocationFlags({ kind: 'zero' })).toBe(3);
    expect(M.allocationFlags({ kind: 'unallocated' })).toBe(3);
    expect(M.toDescriptors([{ length: 5, value: 1 }, { length: 6, value: 1 }, { length: 7, value: 0 }, { length: 1, value: 3 }], 2)).toEqual([
      { length: 11, flags: 1 },
      { length: 7, flags: 0 },
    ]);
  });

  it('meta context queries', () => {
    const names = (src: Any, q: string[], listing: boolean) => M.matchContexts(src, q, listing).map((c: Any) => c.name);
    const on = { allocationDepth: true };
    const off = { allocationDepth: false };
    expect(names(on, [], true)).toEqual(['base:allocation', 'qemu:allocation-depth']);
    expect(names(off, [], true)).toEqual(['base:allocation']);
    expect(names(on, [], false)).toEqual([]);
    expect(names(on, ['qemu:'], true)).toEqual(['qemu:allocation-depth']);
    expect(names(on, ['qemu:'], false)).toEqual([]);
    expect(names(on, ['qemu:allocation-depth', 'base:allocation', 'base:allocation'], false)).toEqual(['base:allocation', 'qemu:allocation-depth']);
    expect(names(off, ['qemu:allocation-depth', 'qemu:dirty-bitmap:x', 'nbd-server:x'], false)).toEqual([]);
  });

  it('--object parsing', () => {
    expect(M.parseObject('secret,id=s0,data=abc')).toMatchObject({ type: 'secret', id: 's0' });
    expect(M.parseObject('secret,id=s1,data=YWJj,format=base64').value.toString()).toBe('abc');
    expect(M.parseObject('{"qom-type":"tls-creds-x509","id":"t","dir":"/d,x","endpoint":"server","verify-peer":false}')).toEqual({
      type: 'tls-creds-x509', id: 't', dir: '/d,x', endpoint: 'server', verifyPeer: false,
    });
    expect(M.parseObject('tls-creds-x509,id=t,dir=/a,,b,endpoint=server')).toMatchObject({ dir: '/a,b', verifyPeer: true });
    expect(() => M.parseObject('secret,id=s0')).toThrow(/exactly one/);
    expect(() => M.parseObject('secret,data=x')).toThrow(/'id' is missing/);
    expect(() => M.parseObjects(['secret,id=a,data=1', 'secret,id=a,data=2'])).toThrow(/duplicate/);
  });

  it('RWLock: readers share, writers are alone, FIFO; Semaphore: weighted', async () => {
    const lock = new M.RWLock();
    const log: string[] = [];
    const step = (name: string, ms: number) => async () => {
      log.push(`+${name}`);
      await new Promise((r) => setTimeout(r, ms));
      log.push(`-${name}`);
    };
    await Promise.all([lock.shared(step('r1', 20)), lock.shared(step('r2', 5)), lock.exclusive(step('w', 5)), lock.shared(step('r3', 1))]);
    expect(log).toEqual(['+r1', '+r2', '-r2', '-r1', '+w', '-w', '+r3', '-r3']);
    const sem = new M.Semaphore(10);
    const got = await sem.acquire(25); // clamped to the capacity
    expect(got).toBe(10);
    let second = false;
    const p = sem.acquire(1).then(() => (second = true));
    await new Promise((r) => setTimeout(r, 5));
    expect(second).toBe(false);
    sem.release(got);
    await p;
    expect(second).toBe(true);
  });
});
