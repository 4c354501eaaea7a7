/**
 * The toolbox commands on LUKS qcow2 images (resize, snapshot, commit, rebase, bitmap, dd) and the
 * NBD server, with the key given as qemu-img takes it: `--object secret,...` plus `--image-opts
 * ...,encrypt.key-secret=ID` (and `backing.encrypt.key-secret=ID` for an encrypted backing file).
 *
 * Twin runs: the fixture is copied into two folders, qemu-img runs in one and bin/qcowkit in the
 * other; exit code, stdout and stderr must match (program name normalised), and every image must
 * afterwards hold the same guest content (`qemu-img compare` with the keys) and pass `qemu-img
 * check`. When the command fails (missing key, wrong password, missing backing key...), our copy
 * must be byte-for-byte unchanged.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTmpDir, removeTmpDir, sha256File } from '../helpers/files.js';
import { must, qemuImg, qemuIo, qk, run, type RunResult } from '../helpers/proc.js';
import { nbdinfo, startServer, stopAll } from '../nbd/harness.js';
import { PASSWORD, qemuCreateEncrypted } from './helpers.js';

const SEC = ['--object', `secret,id=sec0,data=${PASSWORD}`];
const BAD = ['--object', 'secret,id=sec0,data=not-the-password'];
const IO = (file: string, more = '') => `driver=qcow2,file.filename=${file},encrypt.key-secret=sec0${more}`;
const BK = ',backing.encrypt.key-secret=sec0';

let root: string;
let fixture: string;

async function qio(args: string[]): Promise<void> {
  await must(qemuIo(args));
}

/**
 * The fixture:
 * - enc.qcow2: LUKS, 64M, data at 0..1M (0x11) and one snapshot `snap1` (taken before 0x22 at 0).
 * - base.qcow2: LUKS, 0x33 over 0..2M; top.qcow2: LUKS over base (0x44 at 1M+64k);
 *   plain.qcow2: unencrypted over base (0x55 at 1536k); plain2.qcow2: unencrypted over plain.
 * - u.qcow2: unencrypted (0x66 at 0..1M); etop.qcow2: LUKS over u (0x77 at 512k, 100k).
 */
async function buildFixture(dir: string): Promise<void> {
  const f = (n: string) => path.join(dir, n);
  const sec = ['--object', `secret,id=sec0,data=${PASSWORD}`];
  const io = (file: string, more: string, cmds: string[]) => qio([...sec, '--image-opts', IO(file, more), ...cmds.flatMap((c) => ['-c', c])]);
  await qemuCreateEncrypted(f('enc.qcow2'), '64M', 'encrypt.format=luks');
  await io(f('enc.qcow2'), '', ['write -P 0x11 0 1M']);
  await must(qemuImg(['snapshot', ...sec, '--image-opts', IO(f('enc.qcow2')), '-c', 'snap1']));
  await io(f('enc.qcow2'), '', ['write -P 0x22 0 64k']);
  await qemuCreateEncrypted(f('base.qcow2'), '64M', 'encrypt.format=luks');
  await io(f('base.qcow2'), '', ['write -P 0x33 0 2M']);
  await qemuCreateEncrypted(f('top.qcow2'), '64M', 'encrypt.format=luks,backing_file=base.qcow2,backing_fmt=qcow2');
  await io(f('top.qcow2'), BK, ['write -P 0x44 1088k 64k']);
  await must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f('plain.qcow2')]));
  await qio([...sec, '--image-opts', `driver=qcow2,file.filename=${f('plain.qcow2')}${BK}`, '-c', 'write -P 0x55 1536k 64k']);
  await must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'plain.qcow2', '-F', 'qcow2', f('plain2.qcow2')]));
  await must(qemuImg(['create', '-q', '-f', 'qcow2', f('u.qcow2'), '64M']));
  await qio(['-c', 'write -P 0x66 0 1M', f('u.qcow2')]);
  await qemuCreateEncrypted(f('etop.qcow2'), '64M', 'encrypt.format=luks,backing_file=u.qcow2,backing_fmt=qcow2');
  await io(f('etop.qcow2'), '', ['write -P 0x77 512k 100k']);
  // a qcow (v1) image with legacy AES under a plain qcow2 overlay
  await must(qemuImg(['create', '-q', '-f', 'qcow', ...sec, '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', f('aes.qcow'), '16M']));
  await qio([...sec, '--image-opts', `driver=qcow,file.filename=${f('aes.qcow')},encrypt.key-secret=sec0`, '-c', 'write -P 0x88 64k 192k']);
  await must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'aes.qcow', '-F', 'qcow', f('onaes.qcow2')]));
  await qio([...sec, '--image-opts', `driver=qcow2,file.filename=${f('onaes.qcow2')}${BK}`, '-c', 'write -P 0x99 128k 4k']);
}

beforeAll(async () => {
  root = makeTmpDir('qk-toolbox-secrets-');
  fixture = path.join(root, 'fixture');
  fs.mkdirSync(fixture);
  await buildFixture(fixture);
}, 120_000);

afterAll(async () => {
  await stopAll();
  removeTmpDir(root);
});

let seq = 0;
const norm = (s: string) => s.replace(/^qemu-img: /gm, 'qcowkit: ');

/** Images of a folder and the key options that open each with its whole chain. */
async function chainOpts(file: string): Promise<string> {
  const r = await must(qemuImg(['info', '--backing-chain', '--output=json', '-U', file]));
  const chain = JSON.parse(r.stdout) as Array<{ encrypted?: boolean }>;
  let opts = '';
  let prefix = '';
  for (const img of chain) {
    if (img.encrypted) opts += `,${prefix}encrypt.key-secret=s`;
    prefix += 'backing.';
  }
  return opts;
}

interface Twin {
  q: RunResult;
  k: RunResult;
  qdir: string;
  kdir: string;
}

/** Run `args` with qemu-img and qcowkit in two copies of the fixture; compare texts and images. */
async function twin(args: string[] | ((dir: string) => string[]), expectCode: number): Promise<Twin> {
  const id = ++seq;
  const qdir = path.join(root, `q${id}`);
  const kdir = path.join(root, `k${id}`);
  fs.cpSync(fixture, qdir, { recursive: true });
  fs.cpSync(fixture, kdir, { recursive: true });
  const before = new Map<string, string>();
  for (const n of fs.readdirSync(kdir)) before.set(n, await sha256File(path.join(kdir, n)));
  const argv = (d: string) => (typeof args === 'function' ? args(d) : args);
  const q = await qemuImg(argv(qdir), { cwd: qdir });
  const k = await qk(argv(kdir), { cwd: kdir });
  expect(q.code, q.stderr).toBe(expectCode);
  const dirs = (t: string, d: string) => norm(t).split(d).join('DIR');
  expect({ code: k.code, out: k.stdout, err: dirs(k.stderr, kdir) }).toEqual({ code: q.code, out: q.stdout, err: dirs(q.stderr, qdir) });
  const names = fs.readdirSync(qdir).filter((n) => n.endsWith('.qcow2') || n.endsWith('.raw'));
  expect(fs.readdirSync(kdir).filter((n) => n.endsWith('.qcow2') || n.endsWith('.raw')).sort()).toEqual(names.sort());
  for (const n of names) {
    const kf = path.join(kdir, n);
    if (q.code !== 0) {
      expect(await sha256File(kf), `${n} changed by a failed command`).toBe(before.get(n));
      continue;
    }
    const qf = path.join(qdir, n);
    const fmt = JSON.parse((await must(qemuImg(['info', '--output=json', '-U', kf]))).stdout).format as string;
    if (fmt === 'raw') {
      expect(fs.readFileSync(kf).equals(fs.readFileSync(qf)), n).toBe(true);
      continue;
    }
    const keyed = ['--object', `secret,id=s,data=${PASSWORD}`, '--image-opts'];
    const [qo, ko] = [await chainOpts(qf), await chainOpts(kf)];
    const cmp = await qemuImg(['compare', ...keyed, `driver=qcow2,file.filename=${qf}${qo}`, `driver=qcow2,file.filename=${kf}${ko}`]);
    expect(cmp.stdout + cmp.stderr, n).toBe('Images are identical.\n');
    const chk = await qemuImg(['check', ...keyed, `driver=qcow2,file.filename=${kf}${ko}`]);
    expect(chk.code, `${n}: ${chk.stdout}${chk.stderr}`).toBe(0);
  }
  return { q, k, qdir, kdir };
}

describe('resize', () => {
  it('grows with the key', () => twin(['resize', ...SEC, '--image-opts', IO('enc.qcow2'), '128M'], 0));
  it('shrinks with the key', () => twin(['resize', ...SEC, '--shrink', '--image-opts', IO('enc.qcow2'), '32M'], 0));
  it('preallocation=metadata: the new clusters hold what qemu-img leaves there', () =>
    twin(['resize', ...SEC, '--preallocation=metadata', '--image-opts', IO('enc.qcow2'), '80M'], 0));
  it('an overlay over an encrypted backing file, with the backing key', () =>
    twin(['resize', ...SEC, '--image-opts', `driver=qcow2,file.filename=plain.qcow2${BK}`, '96M'], 0));
  it('refuses without the key', () => twin(['resize', ...SEC, 'enc.qcow2', '128M'], 1));
  it('refuses without the secret object', () => twin(['resize', '--image-opts', IO('enc.qcow2'), '128M'], 1));
  it('refuses a wrong password', () => twin(['resize', ...BAD, '--image-opts', IO('enc.qcow2'), '128M'], 1));
  it('refuses an encrypted backing file without its key', () => twin(['resize', 'plain.qcow2', '128M'], 1));
});

describe('snapshot', () => {
  it('-l with the key', async () => {
    const t = await twin(['snapshot', ...SEC, '-l', '--image-opts', IO('enc.qcow2')], 0);
    expect(t.k.stdout).toContain('snap1');
  });
  it('-c with the key', () => twin(['snapshot', ...SEC, '-c', 'two', '--image-opts', IO('enc.qcow2')], 0));
  it('-a with the key', () => twin(['snapshot', ...SEC, '-a', 'snap1', '--image-opts', IO('enc.qcow2')], 0));
  it('-d with the key', () => twin(['snapshot', ...SEC, '-d', 'snap1', '--image-opts', IO('enc.qcow2')], 0));
  it('-l refuses without the key', () => twin(['snapshot', ...SEC, '-l', 'enc.qcow2'], 1));
  it('-c refuses without the key', () => twin(['snapshot', '-c', 'two', 'enc.qcow2'], 1));
  it('-a refuses a wrong password', () => twin(['snapshot', ...BAD, '-a', 'snap1', '--image-opts', IO('enc.qcow2')], 1));
});

describe('commit', () => {
  it('encrypted top into encrypted base', () => twin(['commit', ...SEC, '--image-opts', IO('top.qcow2', BK)], 0));
  it('unencrypted top into encrypted base', () => twin(['commit', ...SEC, '--image-opts', `driver=qcow2,file.filename=plain.qcow2${BK}`], 0));
  it('two levels down to the encrypted base', () =>
    twin(['commit', ...SEC, '--image-opts', 'driver=qcow2,file.filename=plain2.qcow2,backing.backing.encrypt.key-secret=sec0'], 0));
  it('encrypted top into unencrypted base, -d', () => twin(['commit', ...SEC, '-d', '--image-opts', IO('etop.qcow2')], 0));
  it('refuses an encrypted backing file without its key', () => twin(['commit', ...SEC, '--image-opts', IO('top.qcow2')], 1));
  it('refuses a nested encrypted backing file without its key', () => twin(['commit', 'plain2.qcow2'], 1));
  it('refuses a wrong backing password', () => twin(['commit', ...BAD, '--image-opts', `driver=qcow2,file.filename=plain.qcow2${BK}`], 1));
  it('refuses an unknown backing secret id', () =>
    twin(['commit', ...SEC, '--image-opts', 'driver=qcow2,file.filename=plain.qcow2,backing.encrypt.key-secret=nope'], 1));
  it('-b cannot find an image named by its options', () =>
    twin(['commit', ...SEC, '-b', 'base.qcow2', '--image-opts', 'driver=qcow2,file.filename=plain2.qcow2,backing.backing.encrypt.key-secret=sec0'], 1));
});

describe('rebase', () => {
  it('safe mode: encrypted top and backing onto an unencrypted image (absolute name)', () =>
    twin((d) => ['rebase', ...SEC, '-b', path.join(d, 'u.qcow2'), '-F', 'qcow2', '--image-opts', IO('top.qcow2', BK)], 0));
  it('safe mode: unencrypted top off its encrypted backing file', () =>
    twin(['rebase', ...SEC, '-b', '', '--image-opts', `driver=qcow2,file.filename=plain.qcow2${BK}`], 0));
  it('safe mode: encrypted top over unencrypted backing, onto nothing', () =>
    twin(['rebase', ...SEC, '-b', '', '--image-opts', IO('etop.qcow2')], 0));
  it('safe mode: a relative name against an image named by its options', () =>
    twin(['rebase', ...SEC, '-b', 'u.qcow2', '-F', 'qcow2', '--image-opts', IO('top.qcow2', BK)], 1));
  it('safe mode: an encrypted new backing file cannot get its key', () =>
    twin((d) => ['rebase', ...SEC, '-b', path.join(d, 'base.qcow2'), '-F', 'qcow2', '--image-opts', IO('etop.qcow2')], 1));
  it('safe mode: a new backing file over an encrypted one', () => twin(['rebase', '-b', 'plain.qcow2', '-F', 'qcow2', 'u.qcow2'], 1));
  it('unsafe mode with the key', () => twin(['rebase', ...SEC, '-u', '-b', 'base.qcow2', '-F', 'qcow2', '--image-opts', IO('etop.qcow2')], 0));
  it('unsafe mode refuses backing options', () =>
    twin(['rebase', ...SEC, '-u', '-b', 'u.qcow2', '-F', 'qcow2', '--image-opts', `driver=qcow2,file.filename=plain.qcow2${BK}`], 1));
  it('refuses the old encrypted backing file without its key', () => twin(['rebase', '-b', 'u.qcow2', '-F', 'qcow2', 'plain.qcow2'], 1));
});

describe('bitmap', () => {
  it('--add with the key', () => twin(['bitmap', ...SEC, '--add', '-g', '128k', '--image-opts', IO('enc.qcow2'), 'bm'], 0));
  it('--add refuses without the key', () => twin(['bitmap', '--add', 'enc.qcow2', 'bm'], 1));
  it('--merge from an encrypted source cannot get its key', () => twin(['bitmap', '--merge', 'x', '-b', 'enc.qcow2', 'u.qcow2', 'bm'], 1));
});

describe('convert, compare, map, measure: encrypted backing files need their keys too', () => {
  const PLAIN_BK = `driver=qcow2,file.filename=plain.qcow2${BK}`;
  const AES_BK = `driver=qcow2,file.filename=onaes.qcow2${BK}`;
  it('convert with backing.encrypt.key-secret (LUKS backing)', () => twin(['convert', ...SEC, '-O', 'raw', '--image-opts', PLAIN_BK, 'out.raw'], 0));
  it('convert with backing.encrypt.key-secret (qcow v1 AES backing)', () => twin(['convert', ...SEC, '-O', 'raw', '--image-opts', AES_BK, 'out.raw'], 0));
  it('convert two levels down', () =>
    twin(['convert', ...SEC, '-O', 'raw', '--image-opts', 'driver=qcow2,file.filename=plain2.qcow2,backing.backing.encrypt.key-secret=sec0', 'out.raw'], 0));
  it('convert refuses an encrypted backing file without its key', () => twin(['convert', '-O', 'raw', 'plain.qcow2', 'out.raw'], 1));
  it('convert refuses a qcow v1 AES backing file without its key', () => twin(['convert', '-O', 'raw', 'onaes.qcow2', 'out.raw'], 1));
  it('compare with the backing keys', () => twin(['compare', ...SEC, '--image-opts', PLAIN_BK, AES_BK], 1));
  it('compare refuses without them (exit 2)', () => twin(['compare', 'plain.qcow2', 'onaes.qcow2'], 2));
  it('map with the backing key', () => twin(['map', '--output=json', ...SEC, '--image-opts', AES_BK], 0));
  it('map refuses without it', () => twin(['map', 'onaes.qcow2'], 1));
  it('measure with the backing key', () => twin(['measure', '-O', 'qcow2', ...SEC, '--image-opts', PLAIN_BK], 0));
  it('measure refuses without it', () => twin(['measure', '-O', 'qcow2', 'plain.qcow2'], 1));
});

describe('dd', () => {
  it('reads an encrypted image', () => twin(['dd', ...SEC, '--image-opts', `if=${IO('enc.qcow2')}`, 'of=out.raw', 'bs=64k', 'count=20'], 0));
  it('reads an encrypted chain', () => twin(['dd', ...SEC, '--image-opts', `if=${IO('top.qcow2', BK)}`, 'of=out.raw', 'bs=100k', 'skip=5'], 0));
  it('refuses without the key', () => twin(['dd', 'if=enc.qcow2', 'of=out.raw'], 1));
  it('refuses an encrypted backing file without its key', () => twin(['dd', ...SEC, '--image-opts', 'if=driver=qcow2,file.filename=plain.qcow2', 'of=out.raw'], 1));
});

describe('nbd', () => {
  it('serves an encrypted chain with its keys', async () => {
    const dir = path.join(root, 'nbd');
    fs.cpSync(fixture, dir, { recursive: true });
    const s = await startServer(['-r', '-t', ...SEC, '--image-opts', IO('top.qcow2', BK)], { dir, unix: true });
    const info = await nbdinfo(['--size', s.uri()]);
    expect(info.stdout.trim()).toBe(String(64 << 20));
    const out = path.join(dir, 'served.raw');
    await must(qemuImg(['convert', '-f', 'raw', s.uri(), '-O', 'raw', out]));
    const want = path.join(dir, 'want.raw');
    await must(qemuImg(['convert', ...SEC, '--image-opts', IO(path.join(dir, 'top.qcow2'), BK), '-O', 'raw', want]));
    expect(fs.readFileSync(out).equals(fs.readFileSync(want))).toBe(true);
    expect(fs.readFileSync(out).includes(Buffer.alloc(4096, 0x44))).toBe(true);
    await s.stop();
  });

  it.each([
    ['no key', ['-r', 'enc.qcow2']],
    ['no secret object', ['-r', '--image-opts', IO('enc.qcow2')]],
    ['wrong password', ['-r', ...BAD, '--image-opts', IO('enc.qcow2')]],
    ['encrypted backing file without its key', ['-r', ...SEC, '--image-opts', 'driver=qcow2,file.filename=plain.qcow2']],
  ])('refuses like qemu-nbd: %s', async (_name, args) => {
    const q = await run('qemu-nbd', args, { cwd: fixture, timeout: 20_000 });
    const k = await qk(['nbd', ...args], { cwd: fixture, timeout: 20_000 });
    expect(q.code).toBe(1);
    expect({ code: k.code, err: k.stderr.replace(/^qcowkit: /gm, '') }).toEqual({ code: 1, err: q.stderr.replace(/^qemu-nbd: /gm, '') });
  });
});
