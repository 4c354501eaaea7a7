/**
 * Minimal power-cut reproductions: one small guest workload, one cut point, one choice of which
 * volatile write reached the disk. Each names the ordering rule it guards.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openImage } from '../../src/block/open.js';
import { registerNodeCodecs } from '../../src/codecs/node.js';
import type { IOProvider } from '../../src/core/byte-io.js';
import type { Qcow2Driver } from '../../src/formats/qcow2/driver.js';
import { RecordingIO, type ReplayOptions } from '../../src/io/recording.js';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { must, qemuImg } from '../helpers/proc.js';
import { describeIoOps, examine, parseLayout } from './harness.js';

let dir = '';
beforeAll(() => {
  registerNodeCodecs();
  dir = makeTmpDir('qk-crash-min-');
});
afterAll(() => removeTmpDir(dir));

async function record(size: string, options: string): Promise<{ rec: RecordingIO; drv: Qcow2Driver }> {
  const made = path.join(dir, `made-${Math.random().toString(36).slice(2)}.qcow2`);
  await must(qemuImg(['create', '-q', '-f', 'qcow2', '-o', options, made, size]));
  const rec = RecordingIO.fromBytes('/vm/img.qcow2', new Uint8Array(fs.readFileSync(made)));
  const provider: IOProvider = {
    open: async () => rec,
    resolve: (_b, n) => n,
  };
  const drv = (await openImage(rec.name, { io: provider, readOnly: false })) as Qcow2Driver;
  return { rec, drv };
}

/** Index of the first write to the refcount table (at its original place) at or after `from`. */
function reftableWrite(rec: RecordingIO, from: number): number {
  const l = parseLayout(rec.initial);
  return rec.ops.findIndex((o, i) => i >= from && o.kind === 'write' && o.offset >= l.reftableOffset && o.offset < l.reftableOffset + l.reftableClusters * l.clusterSize);
}

/** Rebuild the image at `cut` with the volatile op `lost` not on the disk; QEMU must find it consistent. */
async function expectSurvives(rec: RecordingIO, cut: number, lost: number): Promise<void> {
  const vol = rec.volatileOps(cut);
  expect(vol, 'the write to lose must be volatile at the cut').toContain(lost);
  await expectClean(rec, cut, { strategy: 'drop-one', index: vol.indexOf(lost) });
}

async function expectClean(rec: RecordingIO, cut: number, opts: ReplayOptions): Promise<void> {
  const bytes = rec.replay(cut, opts);
  const slot = fs.mkdtempSync(path.join(dir, 'slot-'));
  const v = await examine(bytes, slot, path.join(slot, 'raw'));
  fs.rmSync(slot, { recursive: true, force: true });
  const ops = describeIoOps(rec, Math.max(0, rec.lastFlushBefore(cut)), cut, bytes).join('\n');
  expect(v.problems, `power cut after io op ${cut} (${JSON.stringify(opts)}), volatile ops:\n${ops}\n${v.checkOutput}`).toEqual([]);
}

/** Every cut in `[from, to]`, with all, none and each single volatile write lost. */
async function expectAllCutsClean(rec: RecordingIO, from: number, to: number): Promise<number> {
  const seen = new Set<string>();
  for (let cut = from; cut <= to; cut++) {
    const n = rec.volatileOps(cut).length;
    const variants: ReplayOptions[] = [{ strategy: 'all' }, { strategy: 'none' }, ...Array.from({ length: n }, (_, index) => ({ strategy: 'drop-one' as const, index }))];
    for (const opts of variants) {
      const key = Buffer.from(rec.replay(cut, opts)).toString('base64');
      if (seen.has(key)) continue;
      seen.add(key);
      await expectClean(rec, cut, opts);
    }
  }
  return seen.size;
}

describe('power cut: minimal reproductions', () => {
  // 512-byte clusters: the refcount block qemu-img creates covers clusters 0..255 (128 KiB of
  // file). A write that lands past that creates a second block. Its reftable entry must be durable
  // before an L2 table already linked from L1 is written with entries into the block's range: a
  // disk that kept the L2 write and lost the reftable write left referenced clusters with refcount 0
  // ("ERROR cluster N refcount=0 reference=1") when both shared one flush window.
  it('new refcount block: its reftable entry is durable before a linked L2 table points into its range', async () => {
    const { rec, drv } = await record('1M', 'cluster_size=512');
    await drv.write(0, new Uint8Array(512).fill(1)); // L2 table for guest [0, 32K), linked at the flush
    await drv.write(64 * 1024, new Uint8Array(120 * 1024).fill(2)); // file grows to ~250 clusters
    await drv.flush();
    const from = rec.mark();
    await drv.write(512, new Uint8Array(31 * 1024 + 512).fill(3)); // clusters 251..313: needs refcount block #2
    await drv.flush();
    const rt = reftableWrite(rec, from);
    expect(rt, 'a reftable entry was written (the scenario still needs a new refcount block)').toBeGreaterThanOrEqual(0);
    // The original failure: cut at the end of the reftable write's window, that write lost.
    const nextFlush = rec.ops.findIndex((o, i) => i > rt && o.kind === 'flush');
    await expectSurvives(rec, nextFlush, rt);
    // And every other cut of the flush.
    await expectAllCutsClean(rec, from, rec.mark());
    await drv.close();
  });

  // Resize that moves the L1 table: allocating the new table creates a refcount block (the fill
  // below puts the new L1 just past the first block's range). The header's new l1_table_offset
  // must not become durable before that block's reftable entry: sharing one flush window, the
  // header could point at an L1 whose clusters QEMU saw with refcount 0.
  it('resize moving L1: the new L1 clusters are refcounted before the header points at them', async () => {
    const { rec, drv } = await record('1M', 'cluster_size=512');
    await drv.write(0, new Uint8Array(247 * 512).fill(0x5a));
    await drv.flush();
    const from = rec.mark();
    await drv.resize(4 << 20);
    const header = rec.ops.findIndex((o, i) => i >= from && o.kind === 'write' && o.offset === 36); // l1_size + l1_table_offset
    expect(header, 'the L1 table moved').toBeGreaterThanOrEqual(0);
    const rt = reftableWrite(rec, from);
    expect(rt, 'the new L1 needed a new refcount block (the scenario still holds)').toBeGreaterThanOrEqual(0);
    expect(rt).toBeLessThan(header);
    if (rec.lastFlushBefore(rt + 1) === rec.lastFlushBefore(header + 1)) await expectSurvives(rec, header + 1, rt);
    else expect(rec.lastFlushBefore(header + 1), 'a flush separates the reftable entry from the header update').toBeGreaterThan(rt);
    await expectAllCutsClean(rec, from, rec.mark());
    await drv.close();
  });
});
