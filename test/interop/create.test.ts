/**
 * `create` against qemu-img 7.2: for a matrix of options both tools create the same image (same
 * absolute path, one after the other, then moved aside), and the results must be byte-identical,
 * `qemu-img check` clean, `qemu-img info` equal, and the "Formatting ..." line equal. Bad options
 * must fail with qemu-img's message, exit 1 and leave no file behind.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCreate } from '../../src/cli/create-command.js';
import { CliError, UsageError } from '../../src/cli/errors.js';
import { Output, type Io } from '../../src/cli/output.js';
import { fileDifference, makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { pool, qemuImg, qk, type RunResult } from '../helpers/proc.js';

let root: string;
beforeAll(async () => {
  root = makeTmpDir('qk-create-');
  const r1 = await qemuImg(['create', '-q', '-f', 'qcow2', path.join(root, 'base.qcow2'), '3M']);
  const r2 = await qemuImg(['create', '-q', '-f', 'raw', path.join(root, 'base.raw'), '1000']);
  expect([r1.code, r2.code]).toEqual([0, 0]);
});
afterAll(() => removeTmpDir(root));

class Sink extends Writable {
  text = '';
  override _write(chunk: Buffer, _enc: string, cb: () => void): void {
    this.text += chunk.toString();
    cb();
  }
}

/** Our `create`, in-process, with the dispatcher's error printing. */
async function ours(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = new Sink();
  const err = new Sink();
  const io: Io = { out: new Output(out), err: new Output(err), isTTY: false };
  let code: number;
  try {
    code = await runCreate(['create', ...args], io);
  } catch (e) {
    if (e instanceof UsageError) {
      io.err.write(`qcowkit: ${e.message}\nTry 'qcowkit --help' for more information\n`);
      code = 1;
    } else if (e instanceof CliError) {
      io.err.write(`qcowkit: ${e.message}\n`);
      code = e.exitCode;
    } else throw e;
  }
  await io.out.flush();
  await io.err.flush();
  return { code, stdout: out.text, stderr: err.text };
}

/** qemu-img's error text: prefixes dropped, continuation lines joined, the --help hint removed. */
function qemuMessage(stderr: string): string {
  return stderr
    .split('\n')
    .filter((l) => l && !l.startsWith("Try 'qemu-img --help'") && !l.includes('warning:'))
    .map((l) => l.replace(/^qemu-img: /, ''))
    .join(' ');
}
function ourMessage(stderr: string): string {
  const lines = stderr.split('\n').filter((l) => l && !l.startsWith("Try 'qcowkit --help'") && !l.includes('warning:'));
  expect(lines.length, stderr).toBe(1);
  return lines[0]!.replace(/^qcowkit: /, '');
}

interface Made {
  dir: string;
  result: { code: number | null; stdout: string; stderr: string };
}

let caseNo = 0;

/**
 * Create with both tools at the same path (`<work>/x.qcow2`, data file `<work>/d.raw`), moving each
 * tool's files aside, so names stored in headers are identical.
 */
async function both(args: (img: string, work: string) => string[]): Promise<{ q: Made; u: Made; work: string }> {
  const work = path.join(root, `case${caseNo++}`);
  fs.mkdirSync(work);
  for (const f of ['base.qcow2', 'base.raw']) fs.copyFileSync(path.join(root, f), path.join(work, f));
  const img = path.join(work, 'x.qcow2');
  const moveTo = (d: string) => {
    fs.mkdirSync(d);
    for (const f of fs.readdirSync(work)) {
      if (f.startsWith('x.') || f.startsWith('d.')) fs.renameSync(path.join(work, f), path.join(d, f));
    }
  };
  const rq: RunResult = await qemuImg(['create', ...args(img, work)]);
  moveTo(path.join(work, 'q'));
  const ru = await ours(args(img, work));
  moveTo(path.join(work, 'u'));
  return { q: { dir: path.join(work, 'q'), result: rq }, u: { dir: path.join(work, 'u'), result: ru }, work };
}

/** Run `fn` with one tool's files moved back to where they were created. */
async function inPlace<T>(m: Made, work: string, fn: () => Promise<T>): Promise<T> {
  const names = fs.readdirSync(m.dir);
  for (const f of names) fs.renameSync(path.join(m.dir, f), path.join(work, f));
  try {
    return await fn();
  } finally {
    for (const f of names) fs.renameSync(path.join(work, f), path.join(m.dir, f));
  }
}

function infoWithoutLocation(json: string): unknown {
  const v = JSON.parse(json) as Record<string, unknown>;
  delete v['filename'];
  delete v['actual-size'];
  delete v['full-backing-filename'];
  return v;
}

interface MatrixCase {
  o: string;
  size: string;
  /** Extra arguments before the image name (-b/-F/-u). */
  extra?: string[];
  /** Has a data file d.raw. */
  data?: boolean;
  /** The image cannot be opened (missing backing file): compare bytes only. */
  noCheck?: boolean;
}

// The option matrix. Every case is expected byte-identical to qemu-img's image.
const MATRIX: MatrixCase[] = [
  { o: '', size: '64M' },
  { o: 'compat=0.10', size: '64M' },
  { o: 'compat=1.1', size: '1000' },
  { o: 'cluster_size=512', size: '10M' }, // L1 over several clusters
  { o: 'cluster_size=4k', size: '100M' },
  { o: 'cluster_size=2M', size: '1G' },
  { o: '', size: '4T' },
  // L1 of 4150 clusters: 65 refcount blocks after it, the refcount table grows and moves behind
  // them, the old table is left as stale bytes in a freed cluster 1. (qemu-img needs ~2 s for this
  // one: it syncs after every refcount block; 128G with 512-byte clusters takes it ~30 s.)
  { o: 'cluster_size=512,refcount_bits=64', size: '8300M' },
  { o: 'cluster_size=1k,refcount_bits=64', size: '20G' },
  { o: 'cluster_size=512,refcount_bits=32', size: '1G' },
  { o: 'refcount_bits=1', size: '1G' },
  { o: 'refcount_bits=2,cluster_size=512', size: '2G' },
  { o: 'refcount_bits=64', size: '1G' },
  { o: 'lazy_refcounts=on', size: '1G' },
  { o: 'extended_l2=on', size: '1G' },
  { o: 'extended_l2=on,cluster_size=16k', size: '1G' },
  { o: 'compression_type=zstd', size: '1G' },
  { o: 'preallocation=metadata', size: '16M' },
  // refcount blocks land between L2 tables and their data clusters
  { o: 'preallocation=metadata,cluster_size=512,refcount_bits=64', size: '300k' },
  { o: 'preallocation=metadata,extended_l2=on', size: '1000' },
  { o: 'preallocation=metadata,compat=0.10,cluster_size=4k', size: '100000' },
  { o: 'preallocation=falloc', size: '16M' },
  // new refcount area + table at the end of the metadata, the first L2 table in the freed cluster 1
  { o: 'preallocation=falloc,cluster_size=512,refcount_bits=64', size: '2200k' },
  { o: 'preallocation=falloc,refcount_bits=4,cluster_size=4k', size: '30M' },
  { o: 'preallocation=full', size: '16M' },
  { o: 'preallocation=full,cluster_size=2M', size: '9M' },
  { o: 'preallocation=falloc', size: '0' },
  { o: '', size: '0' },
  { o: '', size: '', extra: ['-b', 'base.qcow2', '-F', 'qcow2'] },
  { o: '', size: '', extra: ['-b', 'base.raw', '-F', 'raw'] },
  { o: 'cluster_size=512', size: '', extra: ['-b', 'base.qcow2', '-F', 'qcow2'] }, // no feature table below 8k
  { o: 'compat=0.10', size: '5M', extra: ['-b', 'base.qcow2', '-F', 'qcow2'] },
  { o: 'extended_l2=on,preallocation=metadata', size: '', extra: ['-b', 'base.qcow2', '-F', 'qcow2'] },
  { o: '', size: '1M', extra: ['-u', '-b', 'missing.qcow2', '-F', 'qcow2'], noCheck: true },
  { o: 'backing_file=base.qcow2,backing_fmt=qcow2,lazy_refcounts=on', size: '2M' },
  { o: 'data_file=DATA', size: '16M', data: true },
  { o: 'data_file=DATA,data_file_raw=on', size: '100000', data: true },
  { o: 'data_file=DATA,preallocation=metadata,cluster_size=4k', size: '1M', data: true },
  { o: 'data_file=DATA,preallocation=full', size: '1000', data: true },
  { o: 'data_file=DATA,preallocation=falloc,extended_l2=on', size: '3M', data: true },
];

describe('create: images identical to qemu-img 7.2', () => {
  it('matrix', async () => {
    const failures: string[] = [];
    await pool(
      4,
      MATRIX.map((c) => async () => {
        const label = `${c.extra?.join(' ') ?? ''} -o '${c.o}' ${c.size}`;
        const t0 = performance.now();
        const { q, u, work } = await both((img, work) => {
          const o = c.o.replace('DATA', path.join(work, 'd.raw'));
          return ['-f', 'qcow2', ...(c.extra ?? []), ...(o ? ['-o', o] : []), img, ...(c.size ? [c.size] : [])];
        });
        if (q.result.code !== 0) {
          failures.push(`${label}: qemu-img failed: ${q.result.stderr}`);
          return;
        }
        if (u.result.code !== 0 || u.result.stderr !== '') {
          failures.push(`${label}: ours failed (${u.result.code}): ${u.result.stderr}`);
          return;
        }
        if (u.result.stdout !== q.result.stdout) failures.push(`${label}: Formatting line\n  ${u.result.stdout}  ${q.result.stdout}`);
        const files = c.data ? ['x.qcow2', 'd.raw'] : ['x.qcow2'];
        for (const f of files) {
          const d = await fileDifference(path.join(u.dir, f), path.join(q.dir, f));
          if (d) failures.push(`${label}: ${f} differs from qemu-img's: ${d}`);
        }
        // Our image (put back where it was made, next to its backing and data files) must check
        // clean and describe itself like qemu-img's own.
        if (c.noCheck) return;
        const img = path.join(work, 'x.qcow2');
        const iq = await inPlace(q, work, () => qemuImg(['info', '--output=json', '-U', img]));
        const [chk, iu] = await inPlace(u, work, () =>
          Promise.all([qemuImg(['check', '--output=json', img]), qemuImg(['info', '--output=json', '-U', img])]),
        );
        if (chk.code !== 0) failures.push(`${label}: qemu-img check exit ${chk.code}: ${chk.stdout}${chk.stderr}`);
        else if (/"leaks"|"corruptions"/.test(chk.stdout)) failures.push(`${label}: check reports problems: ${chk.stdout}`);
        expect(iu.code, iu.stderr).toBe(0);
        if (JSON.stringify(infoWithoutLocation(iu.stdout)) !== JSON.stringify(infoWithoutLocation(iq.stdout))) {
          failures.push(`${label}: info differs\n${iu.stdout}\n${iq.stdout}`);
        }
        if (process.env.QK_TIMING) console.log(label, Math.round(performance.now() - t0));
      }),
    );
    expect(failures).toEqual([]);
  });

  it('raw images: size rounding, the zeroed first block, preallocation', async () => {
    const failures: string[] = [];
    const cases: Array<[string, string]> = [
      ['', '0'],
      ['', '100'],
      ['', '1000'],
      ['', '5000'],
      ['', '1M'],
      ['preallocation=off', '64k'],
      ['preallocation=full', '100k'],
      ['preallocation=falloc', '100k'], // falloc: content and length equal; allocation stays sparse (no fallocate in Node)
    ];
    await pool(
      4,
      cases.map(([o, size]) => async () => {
        const { q, u } = await both((img) => ['-f', 'raw', ...(o ? ['-o', o] : []), img.replace('.qcow2', '.raw'), size]);
        expect(q.result.code).toBe(0);
        if (u.result.code !== 0) failures.push(`${o} ${size}: ${u.result.stderr}`);
        if (u.result.stdout !== q.result.stdout) failures.push(`${o} ${size}: ${u.result.stdout} vs ${q.result.stdout}`);
        const d = await fileDifference(path.join(u.dir, 'x.raw'), path.join(q.dir, 'x.raw'));
        if (d) failures.push(`${o} ${size}: ${d}`);
        const [mu, mq] = await Promise.all([
          qemuImg(['map', '--output=json', '-f', 'raw', path.join(u.dir, 'x.raw')]),
          qemuImg(['map', '--output=json', '-f', 'raw', path.join(q.dir, 'x.raw')]),
        ]);
        if (o !== 'preallocation=falloc' && mu.stdout !== mq.stdout) failures.push(`${o} ${size}: map\n${mu.stdout}\n${mq.stdout}`);
      }),
    );
    expect(failures).toEqual([]);
  });
});

describe('create: failures like qemu-img', () => {
  // [args before the image, size] — each must fail with qemu-img's message and leave nothing behind.
  const BAD: Array<[string[], string]> = [
    [['-f', 'qcow2', '-o', 'cluster_size=256'], '1M'],
    [['-f', 'qcow2', '-o', 'cluster_size=4M'], '1M'],
    [['-f', 'qcow2', '-o', 'cluster_size=3000'], '1M'],
    [['-f', 'qcow2', '-o', 'refcount_bits=3'], '1M'],
    [['-f', 'qcow2', '-o', 'refcount_bits=128'], '1M'],
    [['-f', 'qcow2', '-o', 'refcount_bits=abc'], '1M'],
    [['-f', 'qcow2', '-o', 'compat=0.10,lazy_refcounts=on'], '1M'],
    [['-f', 'qcow2', '-o', 'compat=0.10,refcount_bits=8'], '1M'],
    [['-f', 'qcow2', '-o', 'compat=0.10,extended_l2=on'], '1M'],
    [['-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=8k'], '1M'],
    [['-f', 'qcow2', '-o', 'compat=0.10,compression_type=zstd'], '1M'],
    [['-f', 'qcow2', '-o', 'compat=0.10,data_file=dd'], '1M'],
    [['-f', 'qcow2', '-o', 'data_file_raw=on'], '1M'],
    [['-f', 'qcow2', '-o', 'compat=1.0'], '1M'],
    [['-f', 'qcow2', '-o', 'preallocation=bogus'], '1M'],
    [['-f', 'qcow2', '-o', 'compression_type=lz4'], '1M'],
    [['-f', 'qcow2', '-o', 'lazy_refcounts=maybe'], '1M'],
    [['-f', 'qcow2', '-o', 'foo=bar'], '1M'],
    [['-f', 'qcow2', '-o', 'foo'], '1M'],
    [['-f', 'qcow2', '-o', 'backing_fmt=qcow2'], '1M'],
    [['-f', 'qcow2', '-o', 'size=abc'], ''],
    [['-f', 'qcow2', '-o', 'size=1M'], '2M'],
    [['-f', 'qcow2', '-o', 'lazy_refcounts=on,,,'], '1M'],
    [['-f', 'qcow2'], ''],
    [['-f', 'qcow2'], 'abc'],
    [['-f', 'qcow2'], '8E'],
    [['-f', 'qcow2'], '1.5'],
    [['-f', 'qcow2'], '7E'],
    [['-f', 'qcow2', '-o', 'cluster_size=512'], '129G'],
    [['-f', 'foo'], '1M'],
    [['-f', 'raw', '-o', 'preallocation=bogus'], '1M'],
    [['-f', 'raw', '-b', 'base.raw'], '1M'],
    [['-f', 'qcow2', '-b', 'base.qcow2'], ''],
    [['-f', 'qcow2', '-b', 'missing', '-F', 'qcow2'], ''],
    [['-f', 'qcow2', '-b', 'missing', '-u'], '1M'],
    [['-f', 'qcow2', '-b', 'missing', '-F', 'qcow2', '-u'], ''],
    [['-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', '-o', 'preallocation=metadata'], ''],
    [['-f', 'qcow2', '-o', 'data_file=dd,data_file_raw=on,backing_file=base.qcow2,backing_fmt=qcow2'], ''],
    [['-f', 'qcow2', '-o', 'data_file=dd'], '7E'],
  ];

  it('same message, exit 1, no file left', async () => {
    const failures: string[] = [];
    await pool(
      4,
      BAD.map(([pre, size]) => async () => {
        const label = `${pre.join(' ')} IMG ${size}`;
        const { q, u, work } = await both((img, w) => [
          ...pre.map((a) => a.replace('data_file=dd', `data_file=${path.join(w, 'd.raw')}`)),
          img,
          ...(size ? [size] : []),
        ]);
        if (q.result.code !== 1) {
          failures.push(`${label}: qemu-img did not fail: ${q.result.stdout}`);
          return;
        }
        if (u.result.code !== 1) failures.push(`${label}: exit ${u.result.code}`);
        const want = qemuMessage(q.result.stderr).replaceAll(work, 'WORK');
        const got = ourMessage(u.result.stderr).replaceAll(work, 'WORK');
        if (got !== want) failures.push(`${label}:\n  ours: ${got}\n  qemu: ${want}`);
        if (u.result.stdout !== q.result.stdout) failures.push(`${label}: stdout ${u.result.stdout} vs ${q.result.stdout}`);
        if (fs.readdirSync(q.dir).length) failures.push(`${label}: qemu-img left ${fs.readdirSync(q.dir).join(', ')}`);
        const left = fs.readdirSync(u.dir);
        if (left.length) failures.push(`${label}: left behind: ${left.join(', ')}`);
      }),
    );
    expect(failures).toEqual([]);
  });

  it('encryption with an unknown secret is refused like qemu-img (no file left)', async () => {
    const { q, u } = await both((img) => ['-f', 'qcow2', '-o', 'encrypt.format=luks,encrypt.key-secret=s0', img, '1M']);
    expect(u.result.code).toBe(1);
    expect(ourMessage(u.result.stderr)).toMatch(/: No secret with id 's0'$/);
    expect(ourMessage(u.result.stderr)).toBe(qemuMessage(q.result.stderr));
    expect(fs.readdirSync(u.dir)).toEqual([]);
  });

  it('-o help lists the options like qemu-img', async () => {
    for (const args of [
      ['-f', 'qcow2', '-o', 'help', 'x'],
      ['-f', 'qcow2', '-o', '?'],
      ['-o', 'help'],
      ['-f', 'raw', '-o', 'help', 'x'],
      ['-f', 'qcow2', '-o', 'cluster_size=4k,help', 'x', '1M'],
    ]) {
      const q = await qemuImg(['create', ...args], { cwd: root });
      const u = await ours(args);
      expect(u.code).toBe(q.code);
      expect(u.stdout).toBe(q.stdout);
    }
    expect(fs.existsSync(path.join(root, 'x'))).toBe(false);
  });
});

describe('create through bin/qcowkit', () => {
  it('creates, prints, fails like qemu-img', async () => {
    const dir = path.join(root, 'bin');
    fs.mkdirSync(dir);
    const args = ['create', '-f', 'qcow2', '-o', 'cluster_size=4k,preallocation=metadata', 'img', '3M'];
    const q = await qemuImg(args.map((a) => (a === 'img' ? 'q.qcow2' : a)), { cwd: dir });
    const u = await qk(args.map((a) => (a === 'img' ? 'u.qcow2' : a)), { cwd: dir });
    expect(u.code, u.stderr).toBe(0);
    expect(u.stdout).toBe(q.stdout.replace("'q.qcow2'", "'u.qcow2'"));
    expect(await fileDifference(path.join(dir, 'u.qcow2'), path.join(dir, 'q.qcow2'))).toBe('');
    const bad = await qk(['create', '-f', 'qcow2', '-o', 'refcount_bits=3', 'bad.qcow2', '1M'], { cwd: dir });
    expect(bad.code).toBe(1);
    expect(bad.stderr).toBe('qcowkit: bad.qcow2: Refcount width must be a power of two and may not exceed 64 bits\n');
    expect(fs.existsSync(path.join(dir, 'bad.qcow2'))).toBe(false);
  });
});
