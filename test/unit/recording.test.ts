/** RecordingIO: logging, pass-through reads, and power-cut replays under each strategy. */
import { describe, expect, it } from 'vitest';
import { MemoryIO } from '../../src/io/memory.js';
import { mulberry32, RecordingIO } from '../../src/io/recording.js';

const bytes = (...v: number[]) => Uint8Array.from(v);
const fill = (n: number, v: number) => new Uint8Array(n).fill(v);

async function readAll(io: RecordingIO): Promise<Uint8Array> {
  const b = new Uint8Array(await io.size());
  await io.read(b, 0);
  return b;
}

describe('RecordingIO', () => {
  it('logs writes (copied), truncates and flushes; reads see every write', async () => {
    const r = RecordingIO.fromBytes('img', bytes(1, 2, 3, 4));
    const w = bytes(9, 9);
    await r.write(w, 1);
    w[0] = 7; // the log keeps its own copy
    await r.flush();
    await r.truncate(6);
    await r.write(bytes(5), 8);
    expect(r.ops.map((o) => o.kind)).toEqual(['write', 'flush', 'truncate', 'write']);
    expect((r.ops[0] as { data: Uint8Array }).data).toEqual(bytes(9, 9));
    expect(await r.size()).toBe(9);
    expect(await readAll(r)).toEqual(bytes(1, 9, 9, 4, 0, 0, 0, 0, 5));
    expect(r.mark()).toBe(4);
    expect(r.initial).toEqual(bytes(1, 2, 3, 4));
  });

  it('wrap() snapshots and passes operations through to the inner storage', async () => {
    const inner = new MemoryIO('x', bytes(1, 2, 3));
    const r = await RecordingIO.wrap(inner);
    await r.write(bytes(8), 0);
    expect(inner.bytes()).toEqual(bytes(8, 2, 3));
    expect(r.replay(0)).toEqual(bytes(1, 2, 3));
    expect(r.replay(1)).toEqual(bytes(8, 2, 3));
    expect(r.name).toBe('x');
  });

  it('durable prefix up to the last flush; volatile writes chosen by strategy', async () => {
    const r = RecordingIO.fromBytes('img', new Uint8Array(4));
    await r.write(bytes(1), 0); // 0
    await r.flush(); // 1
    await r.write(bytes(2), 1); // 2
    await r.write(bytes(3), 1); // 3 overlaps 2
    await r.write(bytes(4), 3); // 4
    expect(r.lastFlushBefore(5)).toBe(1);
    expect(r.lastFlushBefore(1)).toBe(-1);
    expect(r.lastFlushBefore(2)).toBe(1);
    expect(r.volatileOps(5)).toEqual([2, 3, 4]);
    expect(r.volatileOps(2)).toEqual([]);
    expect(r.replay(0)).toEqual(bytes(0, 0, 0, 0));
    expect(r.replay(1, { strategy: 'none' })).toEqual(bytes(0, 0, 0, 0)); // write not yet flushed
    expect(r.replay(1, { strategy: 'all' })).toEqual(bytes(1, 0, 0, 0));
    expect(r.replay(2, { strategy: 'none' })).toEqual(bytes(1, 0, 0, 0));
    expect(r.replay(5, { strategy: 'all' })).toEqual(bytes(1, 3, 0, 4));
    expect(r.replay(5, { strategy: 'none' })).toEqual(bytes(1, 0, 0, 0));
    expect(r.replay(5, { strategy: 'reverse' })).toEqual(bytes(1, 2, 0, 4)); // older write lands last
    expect(r.replay(5, { strategy: 'drop-one', index: 1 })).toEqual(bytes(1, 2, 0, 4));
    expect(r.replay(5, { strategy: 'drop-one', index: 2 })).toEqual(bytes(1, 3, 0, 0));
    expect(r.replay(4, { strategy: 'all' })).toEqual(bytes(1, 3, 0, 0));
    expect(() => r.replay(6)).toThrow(RangeError);
    expect(() => r.replay(-1)).toThrow(RangeError);
  });

  it('random replays are deterministic per seed and only produce reachable states', async () => {
    const r = RecordingIO.fromBytes('img', new Uint8Array(3));
    await r.flush();
    await r.write(bytes(1), 0);
    await r.write(bytes(2), 1);
    await r.write(bytes(3), 2);
    const seen = new Set<string>();
    for (let seed = 1; seed <= 64; seed++) {
      const a = r.replay(4, { strategy: 'random', seed });
      expect(r.replay(4, { strategy: 'random', seed })).toEqual(a);
      for (let k = 0; k < 3; k++) expect([0, k + 1]).toContain(a[k]);
      seen.add(a.join(','));
    }
    expect(seen.size).toBe(8); // every subset shows up
  });

  it('extending writes may be lost: file size follows the writes that survived', async () => {
    const r = RecordingIO.fromBytes('img', new Uint8Array(2));
    await r.write(fill(4, 7), 4);
    expect(r.replay(1, { strategy: 'none' }).length).toBe(2);
    expect(r.replay(1, { strategy: 'all' })).toEqual(bytes(0, 0, 0, 0, 7, 7, 7, 7));
    await r.flush();
    await r.truncate(3);
    expect(r.replay(3, { strategy: 'none' }).length).toBe(8);
    expect(r.replay(3, { strategy: 'all' })).toEqual(bytes(0, 0, 0));
  });

  it('a shrink then a write past the end leaves zeros, not stale bytes, in the gap', async () => {
    const r = RecordingIO.fromBytes('img', fill(8, 9));
    await r.truncate(2);
    await r.write(bytes(1), 6);
    await r.flush();
    const want = bytes(9, 9, 0, 0, 0, 0, 1);
    expect(await readAll(r)).toEqual(want);
    expect(r.replay(3)).toEqual(want);
    expect(r.replay(2, { strategy: 'reverse' })).toEqual(bytes(9, 9)); // the write lands first, then the shrink
  });

  it('torn writes split at sector boundaries and keep each sector whole', async () => {
    const r = RecordingIO.fromBytes('img', new Uint8Array(2048));
    await r.flush();
    await r.write(fill(1536, 0xaa), 256); // sectors: [256,512) [512,1024) [1024,1536) [1536,1792)
    const shapes = new Set<string>();
    for (let seed = 1; seed <= 200; seed++) {
      const out = r.replay(2, { strategy: 'torn', seed });
      expect(out.length).toBe(2048);
      const parts = [
        [256, 512],
        [512, 1024],
        [1024, 1536],
        [1536, 1792],
      ].map(([a, b]) => {
        const s = out.subarray(a, b);
        const all = s.every((v) => v === 0xaa);
        const none = s.every((v) => v === 0);
        expect(all || none, `sector piece ${a}..${b} must be whole`).toBe(true);
        return all ? '1' : '0';
      });
      expect(out.subarray(0, 256).every((v) => v === 0)).toBe(true);
      shapes.add(parts.join(''));
    }
    expect(shapes.size).toBe(16);
  });

  it('a replayer visiting cuts in any order gives the same results as fresh replays', async () => {
    const rng = mulberry32(7);
    const r = RecordingIO.fromBytes('img', new Uint8Array(64));
    for (let i = 0; i < 200; i++) {
      if (rng() < 0.2) await r.flush();
      else await r.write(fill(1 + Math.floor(rng() * 8), i & 0xff), Math.floor(rng() * 80));
    }
    const rep = r.replayer();
    const cuts = [0, 5, 50, 51, 120, 60, 200, 3, 199];
    for (const cut of cuts) {
      for (const strategy of ['all', 'none', 'reverse', 'random'] as const) {
        expect(rep.at(cut, { strategy, seed: cut })).toEqual(r.replay(cut, { strategy, seed: cut }));
      }
    }
  });
});
