/**
 * Property test: random operations, an internal snapshot, more random operations; both the active
 * state and the snapshot (`convert -l snapshot.name=`, library `snapshot` open option) must match
 * the models of the two phases (validated against qemu-img first).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import fc from 'fast-check';
import { describe, it } from 'vitest';
import { applyOps, createArb, createOptions, ioArgs, opsArb, type CreateChoice } from '../helpers/model.js';
import { checkLibrary, checkModel, checkOurConvert, fcParams, label, propertyDirs, readsArb, RUNS } from '../helpers/property.js';
import { must, mustIo, qemuImg } from '../helpers/proc.js';

const freshDir = propertyDirs();

describe('property: internal snapshots', () => {
  it(
    'the active state and a snapshot taken between two random operation sequences both reproduce the model',
    async () => {
      const arb = createArb({ maxClusters: 32 }).chain((c) =>
        fc.tuple(fc.constant(c), opsArb(c.size, 2 ** c.clusterBits, 12), opsArb(c.size, 2 ** c.clusterBits, 12), readsArb),
      );
      await fc.assert(
        fc.asyncProperty(arb, async ([c0, ops1, ops2, reads]) => {
          // Snapshots double refcounts: keep the width comfortably large.
          const c: CreateChoice = { ...c0, refcountBits: Math.max(c0.refcountBits, 16) };
          const dir = freshDir();
          try {
            const cs = 2 ** c.clusterBits;
            await must(qemuImg(['create', '-q', '-f', 'qcow2', '-o', createOptions(c), 'img.qcow2', String(c.size)], { cwd: dir }));
            const opts = { size: c.size, clusterSize: cs, v3: c.compat === '1.1', allowCompress: true, allowDiscard: true };
            const first = applyOps(dir, ops1, opts);
            await mustIo(ioArgs('qcow2', 'img.qcow2', first.cmds), { cwd: dir });
            await must(qemuImg(['snapshot', '-c', 'snap', 'img.qcow2'], { cwd: dir }));
            // Second phase starts from the first model; clusters allocated before are never compressed into.
            const phase2 = applyOps(dir, ops2, {
              ...opts,
              initial: first.model,
              touched: first.touched,
              noMoreCompress: first.noMoreCompress || first.kept.some((o) => o.t === 'compress'),
              tag: 'second',
            });
            await mustIo(ioArgs('qcow2', 'img.qcow2', phase2.cmds), { cwd: dir });
            await checkModel(dir, 'img.qcow2', phase2.model);
            await checkLibrary(path.join(dir, 'img.qcow2'), phase2.model, reads);
            await checkOurConvert(dir, 'img.qcow2', phase2.model);
            await checkModel(dir, 'img.qcow2', first.model, ['-l', 'snapshot.name=snap']);
            await checkLibrary(path.join(dir, 'img.qcow2'), first.model, reads, 'snap');
            await checkOurConvert(dir, 'img.qcow2', first.model, ['-l', 'snapshot.name=snap']);
          } catch (e) {
            (e as Error).message = `${(e as Error).message}\nimage: ${label(c0, ops1)}\nafter snapshot: ${JSON.stringify(ops2)}`;
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
