/**
 * The interop matrix: for every fixture, run the same read-only commands through qemu-img (the oracle)
 * and through our CLI, then compare outcome by outcome.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  actualSizes,
  expectCleanFailure,
  firstLineDiff,
  expectSameOutcome,
  maskActualSizeText,
  maskDiskSizeLines,
  withoutActualSize,
} from './compare.js';
import { fileDifference, makeTmpDir, removeTmpDir, writeAt, readAt } from './files.js';
import { describeResult, pool, qemuImg, qk, type RunResult } from './proc.js';

export interface Fixture {
  name: string;
  /** Create the image(s) inside `dir`, which is also the cwd of every command. */
  build(dir: string): Promise<void>;
  /** Image to test, relative to `dir`. */
  image: string;
  /** Pass `-f FMT` (otherwise both tools probe). */
  fmt?: string;
  /** Internal snapshot names to read with `convert -l`. */
  snapshots?: string[];
  /** Also compare `info --backing-chain`. */
  chain?: boolean;
}

interface Pair {
  ours: RunResult;
  theirs: RunResult;
}

interface Results {
  convert: Pair;
  infoJson: Pair;
  infoHuman: Pair;
  mapJson: Pair;
  mapHuman: Pair;
  compareSame: Pair;
  compareDiff: Pair;
  compareStrict: Pair;
  chainJson?: Pair;
  chainHuman?: Pair;
  snap: Record<string, { byName: Pair; bare: Pair; dashS: Pair }>;
}

/** Commands run concurrently per fixture (tool processes; the machine has few cores). */
const CONCURRENCY = 2;

/** Build one fixture and run every command through both tools. */
async function prepare(fx: Fixture, root: string): Promise<{ dir: string; res: Results }> {
  const f = fx.fmt ? ['-f', fx.fmt] : [];
  const dir = path.join(root, fx.name.replace(/[^\w.=-]+/g, '_'));
  fs.mkdirSync(path.join(dir, 'out'), { recursive: true });
  await fx.build(dir);
  const o = { cwd: dir };
  const img = fx.image;
  // Reference raw content first: the compare cases need it.
  const qConvert = await qemuImg(['convert', ...f, '-O', 'raw', img, 'out/qemu.raw'], o);
  if (qConvert.code !== 0) throw new Error(`qemu-img convert failed on the fixture\n${describeResult(qConvert)}`);
  const size = fs.statSync(path.join(dir, 'out/qemu.raw')).size;
  // A copy with one byte changed, for the mismatch case of compare.
  const mut = path.join(dir, 'out/qemu-mut.raw');
  fs.copyFileSync(path.join(dir, 'out/qemu.raw'), mut);
  const flipAt = Math.floor(size * 0.37);
  if (size > 0) writeAt(mut, flipAt, Buffer.from([readAt(mut, flipAt, 1)[0]! ^ 0x5a]));

  const pairs: Array<[string, string[]]> = [
    ['infoJson', ['info', ...f, '--output=json', img]],
    ['infoHuman', ['info', ...f, img]],
    ['mapJson', ['map', ...f, '--output=json', img]],
    ['mapHuman', ['map', ...f, img]],
    ['compareSame', ['compare', ...f, '-F', 'raw', img, 'out/qemu.raw']],
    ['compareDiff', ['compare', ...f, '-F', 'raw', img, 'out/qemu-mut.raw']],
    ['compareStrict', ['compare', ...f, '-F', 'raw', '-s', img, 'out/qemu.raw']],
  ];
  if (fx.chain) {
    pairs.push(['chainJson', ['info', ...f, '--backing-chain', '--output=json', img]]);
    pairs.push(['chainHuman', ['info', ...f, '--backing-chain', img]]);
  }
  const jobs: Array<() => Promise<void>> = [];
  const r: Record<string, unknown> = { snap: {} };
  jobs.push(async () => {
    r.convert = { theirs: qConvert, ours: await qk(['convert', ...f, '-O', 'raw', img, 'out/ours.raw'], o) };
  });
  for (const [key, args] of pairs) {
    jobs.push(async () => {
      const [ours, theirs] = await Promise.all([qk(args, o), qemuImg(args, o)]);
      r[key] = { ours, theirs };
    });
  }
  for (const [i, s] of (fx.snapshots ?? []).entries()) {
    jobs.push(async () => {
      const byName = ['convert', ...f, '-O', 'raw', '-l', `snapshot.name=${s}`, img];
      const bare = ['convert', ...f, '-O', 'raw', '-l', s, img];
      const dashS = ['convert', ...f, '-O', 'raw', '-s', s, img];
      const [a, b, c, d, e, g] = await Promise.all([
        qemuImg([...byName, `out/qemu-snap${i}.raw`], o),
        qk([...byName, `out/ours-snap${i}.raw`], o),
        qemuImg([...bare, `out/qemu-snapb${i}.raw`], o),
        qk([...bare, `out/ours-snapb${i}.raw`], o),
        qemuImg([...dashS, `out/qemu-snaps${i}.raw`], o),
        qk([...dashS, `out/ours-snaps${i}.raw`], o),
      ]);
      (r.snap as Results['snap'])[s] = {
        byName: { theirs: a, ours: b },
        bare: { theirs: c, ours: d },
        dashS: { theirs: e, ours: g },
      };
    });
  }
  await pool(CONCURRENCY, jobs);
  return { dir, res: r as unknown as Results };
}

/** Fixtures prepared concurrently per test file (each is a handful of short processes). */
const FIXTURE_CONCURRENCY = Number(process.env.QK_FIXTURE_CONCURRENCY ?? 3);

export function defineMatrix(title: string, fixtures: Fixture[]): void {
  describe(title, () => {
    let root = '';
    const prepared = new Map<string, { dir: string; res: Results } | { error: unknown }>();
    beforeAll(async () => {
      root = makeTmpDir('qk-matrix-');
      await pool(
        FIXTURE_CONCURRENCY,
        fixtures.map((fx) => async () => {
          try {
            prepared.set(fx.name, await prepare(fx, root));
          } catch (error) {
            prepared.set(fx.name, { error });
          }
        }),
      );
    }, 900_000);
    afterAll(() => removeTmpDir(root));

    for (const fx of fixtures) {
      describe(fx.name, () => {
        let dir = '';
        let res: Results;
        beforeEach(() => {
          const p = prepared.get(fx.name);
          if (!p) throw new Error('fixture was not prepared');
          if ('error' in p) throw p.error;
          ({ dir, res } = p);
        });

        const out = (name: string) => path.join(dir, 'out', name);

        it('convert -O raw: byte-identical to qemu-img convert', async () => {
          const { ours } = res.convert;
          expect(ours.code, describeResult(ours)).toBe(0);
          expect(await fileDifference(out('ours.raw'), out('qemu.raw')), describeResult(ours)).toBe('');
        });

        it('info --output=json: same as qemu-img', () => {
          const { ours, theirs } = res.infoJson;
          expectSameOutcome(ours, theirs, {
            stdout: (a, b) => compareInfoJson(a, b, ours, theirs),
          });
        });

        it('info (human): same as qemu-img except "disk size:"', () => {
          const { ours, theirs } = res.infoHuman;
          expectSameOutcome(ours, theirs, {
            stdout: (a, b) =>
              expect(maskDiskSizeLines(a), `${firstLineDiff(maskDiskSizeLines(a), maskDiskSizeLines(b))}\n${describeResult(ours)}`).toBe(
                maskDiskSizeLines(b),
              ),
          });
        });

        it('map --output=json: same as qemu-img', () => {
          const { ours, theirs } = res.mapJson;
          expectSameOutcome(ours, theirs, {
            stdout: (a, b) => {
              let parsed: unknown;
              try {
                parsed = JSON.parse(a);
              } catch (e) {
                throw new Error(`our map output is not JSON: ${(e as Error).message}\n${describeResult(ours)}`);
              }
              expect(parsed, 'parsed map differs').toEqual(JSON.parse(b));
              expect(a, `map JSON text differs (formatting); ${firstLineDiff(a, b)}`).toBe(b);
            },
          });
        });

        it('map (human): same as qemu-img', () => {
          const { ours, theirs } = res.mapHuman;
          expectSameOutcome(ours, theirs);
        });

        it('compare with the qemu-img raw copy: identical', () => {
          const { ours, theirs } = res.compareSame;
          expect(theirs.code, describeResult(theirs)).toBe(0);
          expectSameOutcome(ours, theirs);
        });

        it('compare with a one-byte-changed raw copy: same verdict and offset as qemu-img', () => {
          const { ours, theirs } = res.compareDiff;
          expectSameOutcome(ours, theirs, { stdoutOnFailure: true });
        });

        it('compare -s (strict) with the qemu-img raw copy: same verdict and offset as qemu-img', () => {
          const { ours, theirs } = res.compareStrict;
          // Strict mode compares QEMU's block-status answers, including their EOF flag.
          expect(ours.stderr, ours.cmdline).toBe('');
          expect(ours.stdout + ours.code, ours.cmdline).toBe(theirs.stdout + theirs.code);
        });

        if (fx.chain) {
          it('info --backing-chain --output=json: same as qemu-img', () => {
            const { ours, theirs } = res.chainJson!;
            expectSameOutcome(ours, theirs, {
              stdout: (a, b) => compareInfoJson(a, b, ours, theirs),
            });
          });
          it('info --backing-chain (human): same as qemu-img except "disk size:"', () => {
            const { ours, theirs } = res.chainHuman!;
            expectSameOutcome(ours, theirs, {
              stdout: (a, b) =>
                expect(maskDiskSizeLines(a), firstLineDiff(maskDiskSizeLines(a), maskDiskSizeLines(b))).toBe(maskDiskSizeLines(b)),
            });
          });
        }

        for (const [i, s] of (fx.snapshots ?? []).entries()) {
          it(`convert -l snapshot.name=${s}: byte-identical to qemu-img`, async () => {
            const { ours, theirs } = res.snap[s]!.byName;
            expect(theirs.code, describeResult(theirs)).toBe(0);
            expect(ours.code, describeResult(ours)).toBe(0);
            expect(await fileDifference(out(`ours-snap${i}.raw`), out(`qemu-snap${i}.raw`))).toBe('');
          });
          it(`convert -l ${s} (bare name): byte-identical to qemu-img`, async () => {
            const { ours, theirs } = res.snap[s]!.bare;
            expect(theirs.code, describeResult(theirs)).toBe(0);
            expect(ours.code, describeResult(ours)).toBe(0);
            expect(await fileDifference(out(`ours-snapb${i}.raw`), out(`qemu-snapb${i}.raw`))).toBe('');
          });
          // The old `convert -s NAME` spelling: qemu-img 7.2 no longer has it, so whatever it does is expected.
          it(`convert -s ${s}: same outcome as qemu-img`, async () => {
            const { ours, theirs } = res.snap[s]!.dashS;
            expectSameOutcome(ours, theirs);
            if (theirs.code === 0) expect(await fileDifference(out(`ours-snaps${i}.raw`), out(`qemu-snaps${i}.raw`))).toBe('');
          });
        }
      });
    }
  });
}

function compareInfoJson(a: string, b: string, ours: RunResult, theirs: RunResult): void {
  let parsed: unknown;
  try {
    parsed = JSON.parse(a);
  } catch (e) {
    throw new Error(`our info output is not JSON: ${(e as Error).message}\n${describeResult(ours)}`);
  }
  const expected = JSON.parse(b) as unknown;
  expect(withoutActualSize(parsed), `info JSON differs\n${describeResult(ours)}\n${describeResult(theirs)}`).toEqual(
    withoutActualSize(expected),
  );
  // actual-size: present where qemu-img has it, and close (both are allocated bytes of the same files).
  const sa = actualSizes(parsed);
  const sb = actualSizes(expected);
  expect(sa.length, 'number of actual-size keys').toBe(sb.length);
  sa.forEach((v, i) => {
    expect(Math.abs(v - sb[i]!), `actual-size ${v} too far from qemu-img's ${sb[i]}`).toBeLessThanOrEqual(
      Math.max(1 << 20, sb[i]! * 0.1),
    );
  });
  // Drop-in: the text itself (key order, indentation) matches too.
  expect(
    maskActualSizeText(a),
    `info JSON text differs (key order / formatting); ${firstLineDiff(maskActualSizeText(a), maskActualSizeText(b))}`,
  ).toBe(maskActualSizeText(b));
}

export { expectCleanFailure };
