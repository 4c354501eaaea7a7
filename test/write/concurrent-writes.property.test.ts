// Property: requests issued concurrently through the library (as convert and the NBD server do)
// give the same image as a model. Each batch runs at once: writes and zero writes on byte ranges
// that do not overlap but share clusters (so one request's planning meets another's allocation in
// flight), plus flushes; sometimes over a backing file (copy-on-write of partial clusters).
// Afterwards `qemu-img check` is clean and qemu-img reads the model.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openImage } from '../../src/block/open.js';
import { fileProvider } from '../../src/io/file.js';
import { registerNodeCodecs } from '../../src/codecs/node.js';

let dir: string;
beforeAll(() => {
  registerNodeCodecs();
  dir = mkdtempSync(join(tmpdir(), 'qk-cwprop-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const SIZE = 2 << 20;

const options = fc.record({
  compat: fc.constantFrom('0.10', '1.1'),
  cluster: fc.constantFrom(4096, 65536),
  extendedL2: fc.boolean(),
  backing: fc.boolean(),
});

/** A batch: a window of the disk cut into adjacent pieces, each a write, a zero write, or left alone. */
const batch = fc.record({
  start: fc.nat(SIZE - 1),
  cuts: fc.uniqueArray(fc.integer({ min: 1, max: 300_000 }), { minLength: 1, maxLength: 8 }),
  kinds: fc.array(fc.constantFrom('write', 'write', 'zero', 'skip', 'flush'), { minLength: 9, maxLength: 9 }),
  seed: fc.nat(255),
});

describe('concurrent library writes against a model', () => {
  it('requests in flight together give the same image as the model', async () => {
    let n = 0;
    await fc.assert(
      fc.asyncProperty(options, fc.array(batch, { minLength: 1, maxLength: 12 }), async (o, batches) => {
        const v2 = o.compat === '0.10';
        const img = join(dir, `c${n++}.qcow2`);
        const model = new Uint8Array(SIZE);
        const args = ['create', '-q', '-f', 'qcow2', '-o',
          `compat=${o.compat},cluster_size=${o.cluster},extended_l2=${!v2 && o.extendedL2 && o.cluster >= 16384 ? 'on' : 'off'}`];
        if (o.backing) {
          const base = join(dir, `c${n}.base.raw`);
          for (let i = 0; i < SIZE; i++) model[i] = (i * 13 + 5) & 255;
          writeFileSync(base, model);
          args.push('-b', base, '-F', 'raw');
        }
        execFileSync('qemu-img', [...args, img, String(SIZE)]);
        const d = await openImage(img, { io: fileProvider, readOnly: false });
        try {
          for (const b of batches) {
            const points = [...new Set([b.start, ...b.cuts.map((c) => Math.min(SIZE, b.start + c))])].sort((x, y) => x - y);
            const jobs: Promise<void>[] = [];
            for (let i = 0; i + 1 < points.length; i++) {
              const off = points[i]!;
              const len = points[i + 1]! - off;
              const kind = b.kinds[i]!;
              if (kind === 'write') {
                const data = new Uint8Array(len).map((_, k) => (b.seed + i * 31 + k * 7) & 255);
                model.set(data, off);
                jobs.push(d.write(off, data));
              } else if (kind === 'zero') {
                model.fill(0, off, off + len);
                jobs.push(d.writeZeroes(off, len, { mayUnmap: (b.seed & 1) === 1 }));
              } else if (kind === 'flush') jobs.push(d.flush());
            }
            await Promise.all(jobs);
          }
          expect(Buffer.from(await d.read(0, SIZE)).equals(Buffer.from(model))).toBe(true);
        } finally {
          await d.close();
        }
        const check = spawnSync('qemu-img', ['check', '--output=json', img], { encoding: 'utf8' });
        const report = JSON.parse(check.stdout) as Record<string, unknown>;
        expect(report['corruptions'] ?? 0).toBe(0);
        expect(report['leaks'] ?? 0).toBe(0);
        expect(check.status).toBe(0);
        const out = join(dir, `c${n}.out.raw`);
        execFileSync('qemu-img', ['convert', '-O', 'raw', img, out]);
        expect(readFileSync(out).equals(Buffer.from(model))).toBe(true);
        rmSync(out);
      }),
      { numRuns: 40 },
    );
  }, 240_000);
});
