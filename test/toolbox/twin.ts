/**
 * Twin runs for the toolbox commands: a fixture is built once (per builder) with qemu-img/qemu-io,
 * copied into two folders, the same command runs there with qemu-img and with qcowkit, and the
 * outcomes are compared — exit code, stdout and stderr (program name, snapshot dates and
 * progress lines normalised), and afterwards every image either tool changed: `qemu-img check`
 * clean on ours, same guest content (`qemu-img compare`), same `info --output=json` apart from
 * actual-size and snapshot dates (so the same snapshot list), same content of every snapshot.
 * When qemu-img fails without touching its copy, our copy must be byte-for-byte unchanged.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { pathToFileURL } from 'node:url';
import { afterAll, expect } from 'vitest';
import { makeTmpDir, removeTmpDir, sha256File } from '../helpers/files.js';
import { DIST, describeResult, qemuImg, qk, type RunResult } from '../helpers/proc.js';

export { create, img, io } from '../helpers/build.js';

export interface TwinCase {
  name: string;
  /** Build the fixture images in `dir` (with qemu-img / qemu-io). */
  build: (dir: string) => Promise<void>;
  /** Command line after the program name; a function gets the run folder (for absolute paths). */
  args: string[] | ((dir: string) => string[]);
  /** Working folder inside the run folder (default: the run folder itself). */
  cwd?: string;
  /** Images to compare afterwards (default: every file of the fixture plus new files). */
  images?: string[];
  /** Sanity check of the scenario: qemu-img's exit code. */
  expectCode?: number;
  /** Skip the stdout/stderr comparison (a known, reported difference). */
  skipText?: boolean;
  /** Run the real bin/qcowkit in a child process (default: main() in-process, see runQk). */
  spawn?: boolean;
  /** The command changes nothing: both tools run in the shared fixture folder, no images are compared. */
  readOnly?: boolean;
  /** Extra normalisation of both outputs (for texts that name things differently). */
  normalize?: (s: string) => string;
  /** Extra comparison after the run (q and k are the two run folders). */
  after?: (q: string, k: string) => Promise<void>;
}

/**
 * qcowkit's side of a case. Starting node for every run costs more than the rest of a case, so
 * by default the CLI's `main()` runs inside the test process (one run at a time, in the case's
 * folder) — the same code `bin/qcowkit` runs. Cases with `spawn: true`, and every case when
 * QK_TOOLBOX_SPAWN=1, run the real `bin/qcowkit` instead.
 */
let inProcessQueue: Promise<unknown> = Promise.resolve();

type MainFn = (argv: string[], io: unknown) => Promise<number>;
let cliModules: Promise<{ main: MainFn; Output: new (w: Writable) => unknown }> | undefined;

function qkInProcess(args: string[], cwd: string): Promise<RunResult> {
  cliModules ??= (async () => {
    const imp = (p: string) => import(pathToFileURL(path.join(DIST, p)).href);
    const [m, o] = await Promise.all([imp('cli/main.js'), imp('cli/output.js')]);
    return { main: m.main as MainFn, Output: o.Output };
  })();
  const run = async (): Promise<RunResult> => {
    const { main, Output } = await cliModules!;
    const out: string[] = [];
    const err: string[] = [];
    const sink = (into: string[]) =>
      new Writable({
        write(chunk: Buffer | string, _enc, cb) {
          into.push(chunk.toString());
          cb();
        },
      });
    const io = { out: new Output(sink(out)), err: new Output(sink(err)), isTTY: false };
    const start = performance.now();
    const old = process.cwd();
    process.chdir(cwd);
    let code: number;
    try {
      code = await main(args, io);
    } finally {
      process.chdir(old);
    }
    return {
      code,
      signal: null,
      stdout: out.join(''),
      stderr: err.join(''),
      ms: performance.now() - start,
      timedOut: false,
      cmdline: `qcowkit (in-process) ${args.join(' ')}`,
    };
  };
  const p = inProcessQueue.then(run);
  inProcessQueue = p.catch(() => undefined);
  return p;
}

function runQk(args: string[], cwd: string, spawn?: boolean): Promise<RunResult> {
  return spawn || process.env.QK_TOOLBOX_SPAWN === '1' ? qk(args, { cwd }) : qkInProcess(args, cwd);
}

/** Text as both tools should print it: program name unified, dates and progress masked. */
export function normalizeText(s: string): string {
  return s
    .replace(/qemu-img/g, 'qcowkit')
    .replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'YYYY-MM-DD hh:mm:ss')
    .replace(/(?: {4}\(\d+\.\d\d\/100%\)\r)+/g, '<progress>\r');
}

function listFiles(dir: string, rel = ''): string[] {
  const out: string[] = [];
  for (const e of fs.readdirSync(path.join(dir, rel), { withFileTypes: true })) {
    const r = rel ? `${rel}/${e.name}` : e.name;
    if (e.isDirectory()) out.push(...listFiles(dir, r));
    else if (e.isFile()) out.push(r);
  }
  return out.sort();
}

/** Size and modification time of every file (cheap change detection for read-only runs). */
function stamps(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const f of listFiles(dir)) {
    const st = fs.statSync(path.join(dir, f));
    out[f] = `${st.size}:${st.mtimeMs}`;
  }
  return out;
}

async function hashes(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const f of listFiles(dir)) out[f] = await sha256File(path.join(dir, f));
  return out;
}

interface ImageFacts {
  format: string;
  info: Record<string, unknown>;
}

async function facts(file: string, cwd: string): Promise<ImageFacts | undefined> {
  const r = await qemuImg(['info', '-U', '--output=json', file], { cwd });
  if (r.code !== 0) return undefined;
  const info = JSON.parse(r.stdout) as Record<string, unknown>;
  return { format: String(info.format), info };
}

/** info JSON without what legitimately differs (actual-size, snapshot dates). */
export function comparableInfo(info: Record<string, unknown>): Record<string, unknown> {
  const copy = JSON.parse(JSON.stringify(info)) as Record<string, unknown>;
  delete copy['actual-size'];
  const sn = copy.snapshots as Array<Record<string, unknown>> | undefined;
  if (sn) for (const s of sn) {
    delete s['date-sec'];
    delete s['date-nsec'];
  }
  return copy;
}

function ctx(rq: RunResult, rk: RunResult): string {
  return `qemu-img:\n${describeResult(rq)}\nqcowkit:\n${describeResult(rk)}`;
}

/** Compare one image of the two run folders. */
export async function compareImage(q: string, k: string, file: string): Promise<void> {
  const [fq, fk] = await Promise.all([facts(file, q), facts(file, k)]);
  if (!fq) {
    expect(fk, `${file}: qemu-img could not open its copy, ours opens`).toBeUndefined();
    return;
  }
  expect(fk, `${file}: our copy does not open`).toBeDefined();
  expect(comparableInfo(fk!.info), `${file}: info differs`).toEqual(comparableInfo(fq.info));
  const fmt = fq.format;
  // An image whose backing file is missing is checked and compared on its own.
  const full = fq.info['full-backing-filename'] as string | undefined;
  const alone = full !== undefined && !fs.existsSync(path.resolve(q, full));
  const spec = (d: string) =>
    alone ? `json:${JSON.stringify({ driver: fmt, backing: null, file: { driver: 'file', filename: path.join(d, file) } })}` : path.join(d, file);
  const fmtArgs = (flag: string) => (alone ? [] : [flag, fmt]);
  if (fmt === 'qcow2') {
    const c = await qemuImg(['check', '-U', spec(k)]);
    expect(c.code, `${file}: qemu-img check on ours\n${describeResult(c)}`).toBe(0);
    expect(c.stdout).toContain('No errors were found on the image.');
  }
  const cmp = await qemuImg(['compare', '-U', ...fmtArgs('-f'), ...fmtArgs('-F'), spec(q), spec(k)]);
  expect(cmp.code, `${file}: contents differ\n${describeResult(cmp)}`).toBe(0);
  // Each snapshot's content: converted (sparse) by qemu-img from both copies, then compared.
  const snapshots = (fq.info.snapshots as Array<{ id: string }> | undefined) ?? [];
  for (const s of snapshots) {
    const out = (d: string) => path.join(d, `.snap-${s.id}.qcow2`);
    await Promise.all(
      [q, k].map(async (d) => {
        const r = await qemuImg(['convert', '-U', ...fmtArgs('-f'), '-l', `snapshot.id=${s.id}`, '-O', 'qcow2', spec(d), out(d)]);
        expect(r.code, describeResult(r)).toBe(0);
      }),
    );
    const r = await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', out(q), out(k)]);
    expect(r.code, `${file}: snapshot ${s.id} content differs\n${describeResult(r)}`).toBe(0);
    fs.rmSync(out(q));
    fs.rmSync(out(k));
  }
}

/** Fixtures already built in this process, by builder: built once, copied for each case. */
const fixtures = new Map<TwinCase['build'], Promise<string>>();
const fixtureDirs: string[] = [];
// Registered while the importing test file is collected: runs after all of its tests.
afterAll(() => {
  for (const d of fixtureDirs.splice(0)) removeTmpDir(d);
  fixtures.clear();
});

function fixture(build: TwinCase['build']): Promise<string> {
  let p = fixtures.get(build);
  if (!p) {
    const dir = makeTmpDir('qk-toolbox-fx-');
    fixtureDirs.push(dir);
    p = build(dir).then(() => dir);
    fixtures.set(build, p);
  }
  return p;
}

/** Run one case: the same command with qemu-img and with qcowkit on twin copies. */
export async function runTwin(c: TwinCase): Promise<{ q: RunResult; k: RunResult }> {
  if (c.readOnly) return runReadOnly(c);
  const root = makeTmpDir('qk-toolbox-');
  try {
    const fx = await fixture(c.build);
    const q = path.join(root, 'q');
    const k = path.join(root, 'k');
    fs.cpSync(fx, q, { recursive: true });
    fs.cpSync(fx, k, { recursive: true });
    const before = await hashes(k);
    const argsFor = (d: string) => (typeof c.args === 'function' ? c.args(d) : c.args);
    const cwdFor = (d: string) => (c.cwd ? path.join(d, c.cwd) : d);
    const rq = await qemuImg(argsFor(q), { cwd: cwdFor(q) });
    const rk = await runQk(argsFor(k), cwdFor(k), c.spawn);
    const where = ctx(rq, rk);
    if (c.expectCode !== undefined) expect(rq.code, `scenario: qemu-img exit code\n${where}`).toBe(c.expectCode);
    expect(rk.timedOut, where).toBe(false);
    expect(rk.code, `exit code differs\n${where}`).toBe(rq.code);
    expect(/^\s+at /m.test(rk.stderr), `stack trace\n${where}`).toBe(false);
    if (!c.skipText) {
      const dirs = (s: string, d: string) => (c.normalize ?? ((x: string) => x))(s.split(d).join('<dir>'));
      expect(normalizeText(dirs(rk.stdout, k)), `stdout differs\n${where}`).toBe(normalizeText(dirs(rq.stdout, q)));
      expect(normalizeText(dirs(rk.stderr, k)), `stderr differs\n${where}`).toBe(normalizeText(dirs(rq.stderr, q)));
    }
    // A failure must leave the image untouched (unless qemu-img itself changed it before failing,
    // as bitmap does when a later operation fails: then the results are compared as usual).
    if (rq.code !== 0 && JSON.stringify(await hashes(q)) === JSON.stringify(before)) {
      expect(await hashes(k), `our files changed although the command failed\n${where}`).toEqual(before);
      await c.after?.(q, k);
      return { q: rq, k: rk };
    }
    const images = c.images ?? [...new Set([...Object.keys(before), ...listFiles(q)])].filter((f) => !f.endsWith('.bin'));
    const [afterQ, afterK] = await Promise.all([hashes(q), hashes(k)]);
    for (const f of images) {
      if (!fs.existsSync(path.join(q, f))) {
        expect(fs.existsSync(path.join(k, f)), `${f} created by us only`).toBe(false);
        continue;
      }
      expect(fs.existsSync(path.join(k, f)), `${f} not created by us`).toBe(true);
      // Left untouched by both tools: nothing to compare.
      if (before[f] !== undefined && afterQ[f] === before[f] && afterK[f] === before[f]) continue;
      // Byte-identical raw outputs: nothing more to compare.
      if (afterQ[f] === afterK[f] && /\.(raw|img)$/.test(f)) continue;
      await compareImage(q, k, f);
    }
    await c.after?.(q, k);
    return { q: rq, k: rk };
  } finally {
    removeTmpDir(root);
  }
}

function compareText(rq: RunResult, rk: RunResult, c: TwinCase): void {
  const where = ctx(rq, rk);
  if (c.expectCode !== undefined) expect(rq.code, `scenario: qemu-img exit code\n${where}`).toBe(c.expectCode);
  expect(rk.timedOut, where).toBe(false);
  expect(rk.code, `exit code differs\n${where}`).toBe(rq.code);
  expect(/^\s+at /m.test(rk.stderr), `stack trace\n${where}`).toBe(false);
  if (!c.skipText) {
    const n = (s: string) => normalizeText((c.normalize ?? ((x: string) => x))(s));
    expect(n(rk.stdout), `stdout differs\n${where}`).toBe(n(rq.stdout));
    expect(n(rk.stderr), `stderr differs\n${where}`).toBe(n(rq.stderr));
  }
}

async function runReadOnly(c: TwinCase): Promise<{ q: RunResult; k: RunResult }> {
  const fx = await fixture(c.build);
  const args = typeof c.args === 'function' ? c.args(fx) : c.args;
  const cwd = c.cwd ? path.join(fx, c.cwd) : fx;
  const before = stamps(fx);
  const rq = await qemuImg(args, { cwd });
  const rk = await runQk(args, cwd, c.spawn);
  compareText(rq, rk, c);
  expect(stamps(fx), 'a read-only command changed files').toEqual(before);
  return { q: rq, k: rk };
}
