/**
 * Property test: a random qcow2 overlay (random create options and operations) on a random qcow2 or
 * raw backing file of a different size; reads through the chain against an in-memory model
 * (validated against qemu-img first), through our library and our `convert -O raw`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import fc from 'fast-check';
import { describe, it } from 'vitest';
import { applyOps, createArb, createOptions, ioArgs, opsArb } from '../helpers/model.js';
import { checkLibrary, checkModel, checkOurConvert, fcParams, label, propertyDirs, readsArb, RUNS } from '../helpers/property.js';
import { must, mustIo, qemuImg } from '../helpers/proc.js';

const freshDir = propertyDirs();

describe('property: random overlays on random backing files', () => {
  it(
    'reads through a backing file (qcow2 or raw, smaller or larger) reproduce the model',
    async () => {
      const arb = fc
        .tuple(createArb({ maxClusters: 24 }), createArb({ maxClusters: 24 }), fc.boolean())
        .chain(([b, t, rawBase]) =>
          fc.tuple(
            fc.constant(b),
            fc.constant(t),
            fc.constant(rawBase),
            opsArb(b.size, 2 ** b.clusterBits, 12),
            opsArb(t.size, 2 ** t.clusterBits, 15),
            readsArb,
          ),
        );
      await fc.assert(
        fc.asyncProperty(arb, async ([b, t, rawBase, baseOps, topOps, reads]) => {
          const dir = freshDir();
          try {
            const bfmt = rawBase ? 'raw' : 'qcow2';
            const base = rawBase ? 'base.raw' : 'base.qcow2';
            const bargs = ['create', '-q', '-f', bfmt];
            if (!rawBase) bargs.push('-o', createOptions(b));
            await must(qemuImg([...bargs, base, String(b.size)], { cwd: dir }));
            const bm = applyOps(dir, baseOps, {
              size: b.size,
              clusterSize: rawBase ? 4096 : 2 ** b.clusterBits,
              v3: b.compat === '1.1',
              allowCompress: !rawBase && b.refcountBits >= 8,
              allowDiscard: !rawBase,
            });
            await mustIo(ioArgs(bfmt, base, bm.cmds), { cwd: dir });
            await must(
              qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', bfmt, '-o', createOptions(t), 'top.qcow2', String(t.size)], {
                cwd: dir,
              }),
            );
            const seen = new Uint8Array(t.size);
            seen.set(bm.model.subarray(0, Math.min(b.size, t.size)));
            const tm = applyOps(dir, topOps, {
              size: t.size,
              clusterSize: 2 ** t.clusterBits,
              backing: seen,
              v3: t.compat === '1.1',
              allowCompress: t.refcountBits >= 8,
              allowDiscard: true,
            });
            await mustIo(ioArgs('qcow2', 'top.qcow2', tm.cmds), { cwd: dir });
            await checkModel(dir, 'top.qcow2', tm.model);
            await checkLibrary(path.join(dir, 'top.qcow2'), tm.model, reads);
            await checkOurConvert(dir, 'top.qcow2', tm.model);
          } catch (e) {
            (e as Error).message = `${(e as Error).message}\nbase (${rawBase ? 'raw' : 'qcow2'}): ${label(b, baseOps)}\ntop: ${label(t, topOps)}`;
            throw e;
          } finally {
            fs.rmSync(dir, { recursive: true, force: true });
          }
        }),
        { ...fcParams(), numRuns: Math.max(1, Math.round(RUNS * 0.75)) },
      );
    },
    240_000,
  );
});

