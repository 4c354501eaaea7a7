// convert -O qcow2 through our CLI, for every create option family: the result passes
// `qemu-img check` (no errors, no leaks), `qemu-img compare` finds it equal to the source, and
// round trips both ways give identical bytes.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const CLI = resolve(__dirname, '../../bin/qcowkit');
let dir: string;
const q = (...a: string[]) => execFileSync('qemu-img', a, { cwd: dir, stdio: 'pipe' }).toString();
const ours = (...a: string[]) => spawnSync(CLI, a, { cwd: dir, encoding: 'utf8' });

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'qk-conv-'));
  // 8 MiB source: random data, text, zeros, holes, an unaligned tail
  const raw = Buffer.alloc(8 << 20);
  randomBytes(1 << 20).copy(raw, 0);
  Buffer.from('compressible text '.repeat(60000)).copy(raw, 2 << 20, 0, 1 << 20);
  randomBytes(5000).copy(raw, (5 << 20) + 123);
  raw.fill(7, (7 << 20) + 4096, (7 << 20) + 70000);
  writeFileSync(join(dir, 'src.raw'), raw);
  q('convert', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'src.qcow2');
  q('create', '-q', '-f', 'qcow2', 'base.qcow2', '8M');
  execFileSync('qemu-io', ['-c', 'write -P 0x33 0 3M', join(dir, 'base.qcow2')], { stdio: 'pipe' });
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function checkClean(img: string) {
  const r = spawnSync('qemu-img', ['check', '--output=json', img], { cwd: dir, encoding: 'utf8' });
  expect(r.status, r.stdout + r.stderr).toBe(0);
  const j = JSON.parse(r.stdout);
  expect(j['check-errors']).toBe(0);
  expect(j.leaks ?? 0).toBe(0);
  expect(j.corruptions ?? 0).toBe(0);
}

const CASES: Array<[string, string[]]> = [
  ['compat 0.10', ['-o', 'compat=0.10']],
  ['compat 1.1', ['-o', 'compat=1.1']],
  ['512 B clusters', ['-o', 'cluster_size=512']],
  ['4 KiB clusters, refcount_bits=1', ['-o', 'cluster_size=4096,refcount_bits=1']],
  ['2 MiB clusters, refcount_bits=64', ['-o', 'cluster_size=2M,refcount_bits=64']],
  ['lazy refcounts', ['-o', 'lazy_refcounts=on']],
  ['extended L2', ['-o', 'extended_l2=on']],
  ['zlib compressed', ['-c']],
  ['zstd compressed', ['-c', '-o', 'compression_type=zstd']],
  ['compressed, 4 KiB clusters', ['-c', '-o', 'cluster_size=4096']],
  ['preallocation=metadata', ['-o', 'preallocation=metadata']],
  ['preallocation=falloc', ['-o', 'preallocation=falloc']],
  ['preallocation=full', ['-o', 'preallocation=full']],
  ['external data file', ['-o', 'data_file=out.data']],
];

describe('convert -O qcow2 makes images QEMU accepts as its own', () => {
  for (const [name, opts] of CASES) {
    it(name, () => {
      rmSync(join(dir, 'out.qcow2'), { force: true });
      const r = ours('convert', '-O', 'qcow2', ...opts, 'src.qcow2', 'out.qcow2');
      expect(r.status, r.stderr).toBe(0);
      checkClean('out.qcow2');
      expect(q('compare', 'src.qcow2', 'out.qcow2')).toContain('Images are identical.');
      // round trip back through qemu-img: same bytes as the source
      q('convert', '-O', 'raw', 'out.qcow2', 'back.raw');
      expect(readFileSync(join(dir, 'back.raw')).equals(readFileSync(join(dir, 'src.raw')))).toBe(true);
      // as qemu-img, a compressed copy ends on a whole 512-byte sector
      if (opts.includes('-c')) expect(statSync(join(dir, 'out.qcow2')).size % 512).toBe(0);
    });
  }

  it('-B writes only what differs from the backing file', () => {
    q('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'ov.qcow2');
    execFileSync('qemu-io', ['-c', 'write -P 0x44 1M 64k', '-c', 'write -z 5M 64k', join(dir, 'ov.qcow2')], { stdio: 'pipe' });
    rmSync(join(dir, 'out.qcow2'), { force: true });
    const r = ours('convert', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', 'ov.qcow2', 'out.qcow2');
    expect(r.status, r.stderr).toBe(0);
    checkClean('out.qcow2');
    expect(q('compare', 'ov.qcow2', 'out.qcow2')).toContain('Images are identical.');
    const map = JSON.parse(q('map', '--output=json', 'out.qcow2')) as Array<{ depth: number; data: boolean; length: number }>;
    const own = map.filter((e) => e.depth === 0 && e.data).reduce((n, e) => n + e.length, 0);
    expect(own).toBe(65536); // only the cluster that differs from base
  });

  it('qemu-img reads our images and we read qemu-img\'s: round trips equal', () => {
    rmSync(join(dir, 'a.qcow2'), { force: true });
    expect(ours('convert', '-O', 'qcow2', 'src.raw', 'a.qcow2').status).toBe(0);
    q('convert', '-O', 'qcow2', 'a.qcow2', 'b.qcow2');
    rmSync(join(dir, 'c.raw'), { force: true });
    expect(ours('convert', '-O', 'raw', 'b.qcow2', 'c.raw').status).toBe(0);
    expect(readFileSync(join(dir, 'c.raw')).equals(readFileSync(join(dir, 'src.raw')))).toBe(true);
  });

  it('bad input: a failed convert leaves nothing behind', () => {
    rmSync(join(dir, 'bad.qcow2'), { force: true });
    const r = ours('convert', '-O', 'qcow2', '-o', 'cluster_size=3000', 'src.qcow2', 'bad.qcow2');
    expect(r.status).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(spawnSync('test', ['-e', join(dir, 'bad.qcow2')]).status).not.toBe(0);
    const r2 = ours('convert', '-O', 'qcow2', 'missing.qcow2', 'bad.qcow2');
    expect(r2.status).toBe(1);
    expect(spawnSync('test', ['-e', join(dir, 'bad.qcow2')]).status).not.toBe(0);
  });
});
