// Property: random sequences of write / writeZeroes / discard / flush / reopen through the library,
// on random create options, match an in-memory model; `qemu-img check` is clean afterwards and
// qemu-img reads the same bytes. Small clusters with scattered writes force refcount-table growth.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openImage } from '../../src/block/open.js';
import { fileProvider } from '../../src/io/file.js';
import { registerNodeCodecs } from '../../src/codecs/node.js';
import type { BlockDriver } from '../../src/core/block-driver.js';

let dir: string;
beforeAll(() => {
  registerNodeCodecs();
  dir = mkdtempSync(join(tmpdir(), 'qk-wprop-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const createOpts = fc.record({
  compat: fc.constantFrom('0.10', '1.1'),
  cluster: fc.constantFrom(512, 4096, 65536),
  refcountBits: fc.constantFrom(1, 16, 64),
  extendedL2: fc.boolean(),
  lazy: fc.boolean(),
});

const SIZE = 6 << 20;
const op = fc.oneof(
  { weight: 6, arbitrary: fc.record({ kind: fc.constant('write' as const), off: fc.nat(SIZE - 1), len: fc.integer({ min: 1, max: 200_000 }), seed: fc.nat(255) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('zero' as const), off: fc.nat(SIZE - 1), len: fc.integer({ min: 1, max: 300_000 }), unmap: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('discard' as const), off: fc.nat(SIZE - 1), len: fc.integer({ min: 1, max: 300_000 }) }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'flush' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'reopen' as const }) },
);

describe('library writes against a model', () => {
  it('random operations keep the image consistent and equal to the model', async () => {
    let n = 0;
    await fc.assert(
      fc.asyncProperty(createOpts, fc.array(op, { minLength: 5, maxLength: 40 }), async (o, ops) => {
        const v2 = o.compat === '0.10';
        const opts = [
          `compat=${o.compat}`,
          `cluster_size=${o.cluster}`,
          `refcount_bits=${v2 ? 16 : o.refcountBits}`,
          `extended_l2=${!v2 && o.extendedL2 && o.cluster >= 16384 ? 'on' : 'off'}`,
          `lazy_refcounts=${!v2 && o.lazy ? 'on' : 'off'}`,
        ].join(',');
        const img = join(dir, `p${n++}.qcow2`);
        execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts, img, String(SIZE)]);
        const model = new Uint8Array(SIZE);
        let d: BlockDriver = await openImage(img, { io: fileProvider, readOnly: false });
        try {
          for (const x of ops) {
            if (x.kind === 'write') {
              const len = Math.min(x.len, SIZE - x.off);
              const data = new Uint8Array(len).map((_, i) => (x.seed + i * 7) & 255);
              await d.write(x.off, data);
              model.set(data, x.off);
            } else if (x.kind === 'zero') {
              const len = Math.min(x.len, SIZE - x.off);
              await d.writeZeroes(x.off, len, { mayUnmap: x.unmap });
              model.fill(0, x.off, x.off + len);
            } else if (x.kind === 'discard') {
              // discard leaves the content undefined: take what the image now reads
              const len = Math.min(x.len, SIZE - x.off);
              await d.discard(x.off, len);
              model.set(await d.read(x.off, len), x.off);
            } else if (x.kind === 'flush') await d.flush();
            else {
              await d.close();
              d = await openImage(img, { io: fileProvider, readOnly: false });
            }
          }
          expect(Buffer.from(await d.read(0, SIZE)).equals(Buffer.from(model))).toBe(true);
        } finally {
          await d.close();
        }
        const r = spawnSync('qemu-img', ['check', '--output=json', img], { encoding: 'utf8' });
        expect(r.status, `${opts}\n${r.stdout}${r.stderr}`).toBe(0);
        execFileSync('qemu-img', ['convert', '-O', 'raw', img, `${img}.raw`]);
        expect(readFileSync(`${img}.raw`).equals(Buffer.from(model)), opts).toBe(true);
        rmSync(img, { force: true });
        rmSync(`${img}.raw`, { force: true });
      }),
      { numRuns: 20 },
    );
  }, 240_000);

  it('refcount-table growth: many scattered small clusters', async () => {
    const img = join(dir, 'grow.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', img, '64M']);
    const before = readFileSync(img).readBigUInt64BE(48);
    const d = await openImage(img, { io: fileProvider, readOnly: false });
    const model = new Map<number, number>();
    for (let i = 0; i < 20000; i++) {
      const off = ((i * 7919) % 131072) * 512;
      await d.write(off, new Uint8Array(512).fill(i & 255));
      model.set(off, i & 255);
    }
    await d.close();
    expect(readFileSync(img).readBigUInt64BE(48)).not.toBe(before); // the table moved
    const r = spawnSync('qemu-img', ['check', img], { encoding: 'utf8' });
    expect(r.status, r.stdout + r.stderr).toBe(0);
    const d2 = await openImage(img, { io: fileProvider });
    for (const [off, v] of [...model].slice(0, 200)) expect((await d2.read(off, 512))[100]).toBe(v);
    await d2.close();
  }, 120_000);
});
