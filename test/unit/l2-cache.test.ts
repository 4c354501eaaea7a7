/** The L2 slice cache: read-ahead within a table, its failure path, and races with the writer. */
import { describe, expect, it } from 'vitest';
import { L2Cache, READ_AHEAD_BYTES } from '../../src/formats/qcow2/l2-cache.js';

const CS = 65536; // cluster size: one L2 table = 16 slices of 4 KiB

/** A loader over a fake file whose byte at offset o is (o >> 12) & 0xff; records every read. */
function fakeFile(opts: { fileSize?: number } = {}) {
  const reads: Array<[number, number]> = [];
  const gates: Array<() => void> = [];
  let held = false;
  const load = async (offset: number, length: number) => {
    reads.push([offset, length]);
    if (held) await new Promise<void>((r) => gates.push(r));
    if (opts.fileSize !== undefined && offset + length > opts.fileSize) throw new Error('past the end of the file');
    const b = new Uint8Array(length);
    for (let i = 0; i < length; i += 4096) b.fill(((offset + i) >> 12) & 0xff, i, i + 4096);
    return b;
  };
  return {
    load,
    reads,
    hold: () => (held = true),
    release: () => {
      held = false;
      for (const g of gates.splice(0)) g();
    },
  };
}

describe('L2Cache', () => {
  it('reads the rest of a table ahead in one read, and never past the table', async () => {
    const f = fakeFile();
    const c = new L2Cache(f.load, CS);
    for (let o = 0; o < 2 * CS; o += 4096) expect((await c.get(CS * 3 + o))[0]).toBe(((CS * 3 + o) >> 12) & 0xff);
    expect(f.reads).toEqual([
      [CS * 3, Math.min(CS, READ_AHEAD_BYTES)],
      [CS * 4, Math.min(CS, READ_AHEAD_BYTES)],
    ]);
    // a miss in the middle of a table reads from there to the table's end only
    const g = fakeFile();
    const d = new L2Cache(g.load, CS);
    await d.get(CS * 7 + 12 * 4096);
    expect(g.reads).toEqual([[CS * 7 + 12 * 4096, 4 * 4096]]);
  });

  it('stops the read-ahead at a slice already cached', async () => {
    const f = fakeFile();
    const c = new L2Cache(f.load, CS);
    c.insert(5 * 4096, new Uint8Array(4096).fill(0xee));
    await c.get(0);
    expect(f.reads).toEqual([[0, 5 * 4096]]);
    expect((await c.get(5 * 4096))[0]).toBe(0xee);
    expect(f.reads.length).toBe(1);
  });

  it('a failed read-ahead still gives the slice asked for, and later slices are read alone', async () => {
    // the table at 0 runs past the end of an 8 KiB file: the 64 KiB read fails
    const f = fakeFile({ fileSize: 8192 });
    const c = new L2Cache(f.load, CS);
    expect((await c.get(0))[0]).toBe(0);
    expect((await c.get(4096))[0]).toBe(1);
    await expect(c.get(8192)).rejects.toThrow(/past the end/);
    expect(f.reads[0]).toEqual([0, CS]);
  });

  it('does not cache bytes of a table dropped while they were read', async () => {
    const f = fakeFile();
    const c = new L2Cache(f.load, CS);
    f.hold();
    const p = c.get(0);
    c.dropTable(0, CS); // freed meanwhile (and maybe reused): what the read returns is stale
    f.release();
    await p;
    expect(c.peek(0)).toBeUndefined();
    expect(c.peek(4096)).toBeUndefined();
  });

  it('does not overwrite a slice the writer put in while a read was in flight', async () => {
    const f = fakeFile();
    const c = new L2Cache(f.load, CS);
    f.hold();
    const p = c.get(0);
    const fresh = new Uint8Array(4096).fill(0x77);
    c.insert(8192, fresh);
    f.release();
    await p;
    expect(c.peek(8192)).toBe(fresh);
    expect((await c.get(8192))[0]).toBe(0x77);
  });

  it('concurrent gets of slices in one read-ahead share the read', async () => {
    const f = fakeFile();
    const c = new L2Cache(f.load, CS);
    const all = await Promise.all([c.get(0), c.get(4096), c.get(15 * 4096)]);
    expect(all.map((b) => b[0])).toEqual([0, 1, 15]);
    expect(f.reads).toEqual([[0, CS]]);
  });
});
