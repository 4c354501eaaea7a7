/**
 * Property test: random create options (cluster size, compat, extended L2, refcount width, zstd) and a
 * random sequence of qemu-io operations (pattern and random-data writes at any offset/length, zero
 * writes, discards, compressed writes) applied in one qemu-io run, against an in-memory model. The
 * model is first checked against qemu-img's own raw conversion (so a wrong model can't pass
 * unnoticed), then our library (`openImage` + `read`/`blockStatus`) and our `convert -O raw` must
 * reproduce it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import fc from 'fast-check';
import { describe, it } from 'vitest';
import { applyOps, createArb, createOptions, ioArgs, opsArb } from '../helpers/model.js';
import { checkLibrary, checkModel, checkOurConvert, fcParams, label, propertyDirs, readsArb } from '../helpers/property.js';
import { must, mustIo, qemuImg } from '../helpers/proc.js';

const freshDir = propertyDirs();

describe('property: random single images', () => {
  it(
    'library reads and convert -O raw reproduce the model of random qemu-io operations',
    async () => {
      const arb = createArb().chain((c) => fc.tuple(fc.constant(c), opsArb(c.size, 2 ** c.clusterBits), readsArb));
      await fc.assert(
        fc.asyncProperty(arb, async ([c, ops, reads]) => {
          const dir = freshDir();
          try {
            const cs = 2 ** c.clusterBits;
            await must(qemuImg(['create', '-q', '-f', 'qcow2', '-o', createOptions(c), 'img.qcow2', String(c.size)], { cwd: dir }));
            const { cmds, model } = applyOps(dir, ops, {
              size: c.size,
              clusterSize: cs,
              v3: c.compat === '1.1',
              allowCompress: c.refcountBits >= 8,
              allowDiscard: true,
            });
            await mustIo(ioArgs('qcow2', 'img.qcow2', cmds), { cwd: dir });
            await checkModel(dir, 'img.qcow2', model);
            await checkLibrary(path.join(dir, 'img.qcow2'), model, reads);
            await checkOurConvert(dir, 'img.qcow2', model);
          } catch (e) {
            (e as Error).message = `${(e as Error).message}\nimage: ${label(c, ops)}`;
            throw e;
          } finally {
            fs.rmSync(dir, { recursive: true, force: true });
          }
        }),
        fcParams(),
      );
    },
    240_000,
  );
});

