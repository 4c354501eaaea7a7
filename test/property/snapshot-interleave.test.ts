/**
 * Property test: random interleavings of guest writes (by QEMU through qemu-io, or through our
 * library), zero writes, and snapshot create / apply / delete (through our library), against a
 * model of the active content and of every snapshot's content. At the end `qemu-img check` finds
 * the image clean and qemu-img reads the active state and every snapshot (`convert -l
 * snapshot.name=`) exactly as the model says.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { openImage } from '../../src/block/open.js';
import { registerNodeCodecs } from '../../src/codecs/node.js';
import type { Qcow2Driver } from '../../src/formats/qcow2/driver.js';
import { SnapshotOps } from '../../src/formats/qcow2/snapshot.js';
import { fileProvider } from '../../src/io/file.js';
import { fileVsBuffer } from '../helpers/files.js';
import { createArb, createOptions, type CreateChoice } from '../helpers/model.js';
import { fcParams, propertyDirs, RUNS } from '../helpers/property.js';
import { describeResult, must, mustIo, qemuImg } from '../helpers/proc.js';

const freshDir = propertyDirs();

type Via = 'qemu' | 'lib';
type SOp =
  | { t: 'write'; off: number; len: number; pat: number; via: Via }
  | { t: 'zero'; off: number; len: number; via: Via }
  | { t: 'create' }
  | { t: 'apply'; k: number }
  | { t: 'delete'; k: number };

function opArb(size: number, cs: number): fc.Arbitrary<SOp> {
  const sectors = size / 512;
  const range = fc
    .tuple(fc.integer({ min: 0, max: sectors - 1 }), fc.integer({ min: 1, max: Math.max(1, Math.min(sectors, (3 * cs) / 512)) }))
    .map(([s, n]) => ({ off: s * 512, len: Math.min(n, sectors - s) * 512 }));
  const via = fc.constantFrom<Via>('qemu', 'lib');
  return fc.oneof(
    { weight: 5, arbitrary: fc.tuple(range, fc.integer({ min: 1, max: 255 }), via).map(([r, pat, v]) => ({ t: 'write' as const, ...r, pat, via: v })) },
    { weight: 1, arbitrary: fc.tuple(range, via).map(([r, v]) => ({ t: 'zero' as const, ...r, via: v })) },
    { weight: 2, arbitrary: fc.constant({ t: 'create' as const }) },
    { weight: 2, arbitrary: fc.nat(20).map((k) => ({ t: 'apply' as const, k })) },
    { weight: 1, arbitrary: fc.nat(20).map((k) => ({ t: 'delete' as const, k })) },
  );
}

let codecs = false;

describe('property: snapshot interleavings', () => {
  it(
    'writes, snapshot create/apply/delete in any order keep every snapshot and the active state as modelled',
    async () => {
      if (!codecs) {
        registerNodeCodecs();
        codecs = true;
      }
      const arb = createArb({ minClusters: 4, maxClusters: 24 }).chain((c) => fc.tuple(fc.constant(c), fc.array(opArb(c.size, 2 ** c.clusterBits), { minLength: 4, maxLength: 18 })));
      await fc.assert(
        fc.asyncProperty(arb, async ([c0, ops]) => {
          // Up to ~7 references per cluster (active + snapshots): 8-bit refcounts at least.
          const c: CreateChoice = { ...c0, refcountBits: Math.max(c0.refcountBits, 8) };
          const dir = freshDir();
          const file = path.join(dir, 'img.qcow2');
          // Consecutive library operations share one open driver (later ones see the state the
          // earlier ones left in memory); QEMU runs only while it is closed.
          let lib: { drv: Qcow2Driver; ops: SnapshotOps } | undefined;
          const closeLib = async () => {
            const l = lib;
            lib = undefined;
            await l?.drv.close();
          };
          try {
            await must(qemuImg(['create', '-q', '-f', 'qcow2', '-o', createOptions(c), 'img.qcow2', String(c.size)], { cwd: dir }));
            let active = new Uint8Array(c.size);
            const snaps: Array<{ name: string; content: Uint8Array }> = [];
            let counter = 0;
            let cmds: string[] = [];
            const runQemu = async () => {
              if (!cmds.length) return;
              await closeLib();
              const args = ['-f', 'qcow2'];
              for (const x of cmds) args.push('-c', x);
              await mustIo([...args, 'img.qcow2'], { cwd: dir });
              cmds = [];
            };
            const withLib = async (fn: (drv: Qcow2Driver, ops: SnapshotOps) => Promise<void>) => {
              await runQemu();
              if (!lib) {
                const drv = (await openImage(file, { io: fileProvider, readOnly: false })) as Qcow2Driver;
                lib = { drv, ops: new SnapshotOps(drv, drv.writer!) };
              }
              await fn(lib.drv, lib.ops);
            };
            for (const op of ops) {
              switch (op.t) {
                case 'write':
                  active.fill(op.pat, op.off, op.off + op.len);
                  if (op.via === 'qemu') cmds.push(`write -q -P ${op.pat} ${op.off} ${op.len}`);
                  else await withLib((d) => d.write(op.off, new Uint8Array(op.len).fill(op.pat)));
                  break;
                case 'zero':
                  active.fill(0, op.off, op.off + op.len);
                  if (op.via === 'qemu') cmds.push(`write -q -z ${op.off} ${op.len}`);
                  else await withLib((d) => d.writeZeroes(op.off, op.len, { mayUnmap: op.off % 1024 === 0 }));
                  break;
                case 'create': {
                  if (snaps.length >= 6) break;
                  const name = `s${counter++}`;
                  snaps.push({ name, content: active.slice() });
                  await withLib((_d, o) => o.create({ name }).then(() => undefined));
                  break;
                }
                case 'apply': {
                  if (!snaps.length) break;
                  const s = snaps[op.k % snaps.length]!;
                  active = s.content.slice();
                  await withLib((_d, o) => o.apply(s.name));
                  break;
                }
                case 'delete': {
                  if (!snaps.length) break;
                  const [s] = snaps.splice(op.k % snaps.length, 1);
                  await withLib((_d, o) => o.delete(s!.name));
                  break;
                }
              }
            }
            await runQemu();
            await closeLib();
            const chk = await qemuImg(['check', 'img.qcow2'], { cwd: dir });
            expect(chk.code, describeResult(chk)).toBe(0);
            expect(chk.stdout).toContain('No errors were found on the image.');
            const views: Array<[string, Uint8Array, string[]]> = [['active', active, []], ...snaps.map((s): [string, Uint8Array, string[]] => [s.name, s.content, ['-l', `snapshot.name=${s.name}`]])];
            for (const [what, model, extra] of views) {
              await must(qemuImg(['convert', ...extra, '-O', 'raw', 'img.qcow2', 'out.raw'], { cwd: dir }));
              expect(await fileVsBuffer(path.join(dir, 'out.raw'), model), `${what} differs from the model`).toBe('');
            }
            const info = JSON.parse((await must(qemuImg(['info', '--output=json', 'img.qcow2'], { cwd: dir }))).stdout) as { snapshots?: Array<{ name: string }> };
            expect((info.snapshots ?? []).map((s) => s.name)).toEqual(snaps.map((s) => s.name));
          } catch (e) {
            (e as Error).message = `${(e as Error).message}\nimage: ${createOptions(c)} size=${c.size}\nops: ${JSON.stringify(ops)}`;
            throw e;
          } finally {
            await closeLib().catch(() => undefined);
            fs.rmSync(dir, { recursive: true, force: true });
          }
        }),
        { ...fcParams(), numRuns: Math.max(1, Math.round(RUNS * 0.75)) },
      );
    },
    240_000,
  );
});
