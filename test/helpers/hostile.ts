/**
 * Hostile-input runner: each case corrupts a valid qemu-img image; our info / map / convert must
 * fail cleanly (exit 1, one stderr line, no stack trace), quickly, and never modify the image.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { errorMessage, expectCleanFailure, expectNoStackTrace, maskDiskSizeLines } from './compare.js';
import { fileDifference, makeTmpDir, removeTmpDir, sha256File } from './files.js';
import { describeResult, pool, qemuImg, qkCpu, type RunResult } from './proc.js';

/**
 * Per-command bound (the brief: "within a second", generously padded): CPU time used by our process.
 * CPU time is what a hostile image can blow up (loops, huge allocations) and, unlike wall-clock time,
 * it does not grow when the machine is busy. A hang that burns no CPU is caught by the wall-clock
 * kill, set higher so that a loaded machine does not fail the suite.
 */
export const HOSTILE_TIME_LIMIT_MS = Number(process.env.QK_HOSTILE_LIMIT_MS ?? 5_000);
export const HOSTILE_WALL_LIMIT_MS = Number(process.env.QK_HOSTILE_WALL_MS ?? 30_000);

/**
 * fail:   we must refuse (exit 1, one clean line) even where QEMU accepts the image.
 * same:   we must fail (cleanly) exactly when qemu-img fails; when both succeed, the output must
 *         equal qemu-img's (info: modulo "disk size:", map: exact, convert: byte-identical file).
 * either: we may refuse although qemu-img accepts; otherwise as `same`.
 */
export type Expect = 'fail' | 'same' | 'either';

export interface HostileCase {
  name: string;
  /** Build the corrupted image in `dir`; returns its name relative to `dir`. */
  build(dir: string): Promise<string>;
  /** Key phrase qemu-img prints for this corruption; checked in our message wherever qemu-img also fails. */
  phrase?: string;
  /** Pass `-f FMT`. */
  fmt?: string;
  /** Commands (labels) not to run through qemu-img, e.g. where qemu-img hangs. */
  noOracle?: string[];
  /** Expectation per command; default 'fail' for all three. */
  info?: Expect;
  map?: Expect;
  convert?: Expect;
  /**
   * Extra commands that must fail too; 'IMG' stands for the image and 'OUT' for an output file,
   * e.g. ['info', '--backing-chain', 'IMG'].
   */
  extra?: string[][];
}

interface Outcome {
  label: string;
  ours: RunResult & { cpuMs?: number };
  theirs: RunResult;
  mode: Expect;
}

async function hashTree(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const walk = async (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) {
        if (e.name !== 'out') await walk(p);
      } else out[path.relative(dir, p)] = `${fs.statSync(p).size}:${await sha256File(p)}`;
    }
  };
  await walk(dir);
  return out;
}

interface Prepared {
  dir: string;
  outcomes: Outcome[];
  before: Record<string, string>;
  after: Record<string, string>;
}

/** Build one case, hash its files, run every command (ours and qemu-img), hash again. */
async function prepare(c: HostileCase, root: string): Promise<Prepared> {
  const dir = path.join(root, c.name.replace(/[^\w.-]+/g, '_'));
  fs.mkdirSync(path.join(dir, 'out'), { recursive: true });
  const image = await c.build(dir);
  const before = await hashTree(dir);
  const outcomes: Outcome[] = [];
  const f = c.fmt ? ['-f', c.fmt] : [];
  const cmds: Array<[string, string[], Expect]> = [
    ['info', ['info', ...f, image], c.info ?? 'fail'],
    ['map --output=json', ['map', ...f, '--output=json', image], c.map ?? 'fail'],
    ['convert -O raw', ['convert', ...f, '-O', 'raw', image, 'out/ours.raw'], c.convert ?? 'fail'],
    ...(c.extra ?? []).map((a): [string, string[], Expect] => [
      a.join(' '),
      a.map((x) => (x === 'IMG' ? image : x === 'OUT' ? 'out/ours.raw' : x)),
      'fail',
    ]),
  ];
  const o = { cwd: dir, timeout: HOSTILE_WALL_LIMIT_MS };
  // Ours one at a time (the time bound is per command); qemu-img alongside for the phrase check.
  for (const [label, args, mode] of cmds) {
    const qargs = args.map((a) => (a === 'out/ours.raw' ? 'out/qemu.raw' : a));
    const skipped: RunResult = { code: null, signal: null, stdout: '', stderr: '', ms: 0, timedOut: false, cmdline: '(qemu-img not run)' };
    const [ours, theirs] = await Promise.all([
      qkCpu(args, o),
      c.noOracle?.includes(label) ? Promise.resolve(skipped) : qemuImg(qargs, { cwd: dir, timeout: 30_000 }),
    ]);
    outcomes.push({ label, ours, theirs, mode });
  }
  const after = await hashTree(dir);
  return { dir, outcomes, before, after };
}

/** Cases prepared concurrently per test file. */
const CASE_CONCURRENCY = Number(process.env.QK_FIXTURE_CONCURRENCY ?? 2);

export function defineHostile(title: string, cases: HostileCase[]): void {
  describe(title, () => {
    let root = '';
    const prepared = new Map<string, Prepared | { error: unknown }>();
    beforeAll(async () => {
      root = makeTmpDir('qk-hostile-');
      await pool(
        CASE_CONCURRENCY,
        cases.map((c) => async () => {
          try {
            prepared.set(c.name, await prepare(c, root));
          } catch (error) {
            prepared.set(c.name, { error });
          }
        }),
      );
    }, 900_000);
    afterAll(() => removeTmpDir(root));

    for (const c of cases) {
      describe(c.name, () => {
        let outcomes: Outcome[] = [];
        let dir = '';
        let before: Record<string, string> = {};
        let after: Record<string, string> = {};
        beforeEach(() => {
          const p = prepared.get(c.name);
          if (!p) throw new Error('case was not prepared');
          if ('error' in p) throw p.error;
          ({ dir, outcomes, before, after } = p);
        });

        const labels = ['info', 'map --output=json', 'convert -O raw', ...(c.extra ?? []).map((a) => a.join(' '))];
        const modes: Expect[] = [c.info ?? 'fail', c.map ?? 'fail', c.convert ?? 'fail', ...(c.extra ?? []).map((): Expect => 'fail')];
        const what: Record<Expect, string> = {
          fail: 'fails cleanly',
          same: 'fails cleanly where qemu-img fails, else same output',
          either: 'fails cleanly, or gives the same output as qemu-img',
        };
        labels.forEach((label, i) => {
          const mode = modes[i]!;
          it(`${label}: ${what[mode]}, within ${HOSTILE_TIME_LIMIT_MS / 1000} s of CPU`, async () => {
            const oc = outcomes.find((x) => x.label === label)!;
            const ctx = `ours:\n${describeResult(oc.ours)}\nqemu-img:\n${describeResult(oc.theirs)}`;
            expect(oc.ours.timedOut, `did not finish within ${HOSTILE_WALL_LIMIT_MS} ms (wall clock)\n${ctx}`).toBe(false);
            expect(oc.ours.signal, `killed by a signal\n${ctx}`).toBeNull();
            expect(oc.ours.cpuMs, `no CPU time reported: the process did not exit normally\n${ctx}`).toBeTypeOf('number');
            expect(oc.ours.cpuMs!, `used more than ${HOSTILE_TIME_LIMIT_MS} ms of CPU\n${ctx}`).toBeLessThan(HOSTILE_TIME_LIMIT_MS);
            const qemuFailed = oc.theirs.code !== 0 && oc.theirs.code !== null;
            const qemuOk = oc.theirs.code === 0;
            if (mode === 'same' && qemuOk) {
              expect(oc.ours.code, `qemu-img accepts this; we should too\n${ctx}`).toBe(0);
            }
            if (mode === 'fail' || oc.ours.code !== 0 || qemuFailed) {
              expectCleanFailure(oc.ours, 1);
            } else {
              expectNoStackTrace(oc.ours);
              if (qemuOk) {
                // Both accepted the image: then we must agree with qemu-img on what it contains.
                if (label === 'convert -O raw') {
                  expect(await fileDifference(path.join(dir, 'out/ours.raw'), path.join(dir, 'out/qemu.raw')), ctx).toBe('');
                } else if (label === 'info') {
                  expect(maskDiskSizeLines(oc.ours.stdout), ctx).toBe(maskDiskSizeLines(oc.theirs.stdout));
                } else {
                  expect(oc.ours.stdout, ctx).toBe(oc.theirs.stdout);
                }
              }
            }
            if (c.phrase && oc.ours.code !== 0 && qemuFailed) {
              // The phrase is checked against the oracle too, so a wrong expectation can't hide.
              expect(oc.theirs.stderr.toLowerCase(), `qemu-img's message lacks the phrase\n${ctx}`).toContain(
                c.phrase.toLowerCase(),
              );
              expect(errorMessage(oc.ours.stderr).toLowerCase(), `our message should contain "${c.phrase}"\n${ctx}`).toContain(
                c.phrase.toLowerCase(),
              );
            }
          });
        });

        it('leaves every file byte-identical', () => {
          expect(after).toEqual(before);
        });
      });
    }
  });
}
