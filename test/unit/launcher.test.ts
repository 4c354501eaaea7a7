/**
 * bin/qcowkit is both a shell script and a CommonJS file: executed, /bin/sh starts Node on it with
 * NODE_EXTRA_CA_CERTS removed (Node would parse that certificate file before our code runs);
 * run as `node bin/qcowkit`, the shell lines are inert JavaScript.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { CLI, run } from '../helpers/proc.js';

const env = { ...process.env, LC_ALL: 'C', NODE_EXTRA_CA_CERTS: '/nonexistent/qcowkit-test-ca.pem' };

describe('bin/qcowkit launcher', () => {
  it('executed directly: runs, and Node never loads NODE_EXTRA_CA_CERTS', async () => {
    const r = await run(CLI, ['--version'], { env });
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^qcowkit version /);
    // Node warns about an unreadable NODE_EXTRA_CA_CERTS file when it loads it at start-up.
    expect(r.stderr).toBe('');
  });

  it('run by node: the same CLI (and Node does load the variable, so the test above can fail)', async () => {
    const r = await run(process.execPath, [CLI, '--version'], { env });
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^qcowkit version /);
    expect(r.stderr).toMatch(/extra certs/i);
  });

  it('keeps NODE_EXTRA_CA_CERTS when an argument is an https:// image (a private CA may sign it)', async () => {
    const r = await run(CLI, ['info', 'https://127.0.0.1:9/none.qcow2'], { env });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/extra certs/i);
  });

  it('passes arguments with spaces and quotes through the shell unchanged', async () => {
    const r = await run(CLI, ['info', "/nonexistent dir/it's.qcow2"], { env });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("/nonexistent dir/it's.qcow2");
  });
});

/**
 * Once a command is over, the launcher ends the process at once (native/exit.c, from Node's
 * 'beforeExit') rather than through Node's teardown. A preload reports when that path is taken,
 * so these tests fail if it never is, and they check that nothing is lost by it.
 */
describe('bin/qcowkit fast exit', () => {
  let dir: string;
  let img: string;
  let preload: string;
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowkit-exit-'));
    preload = path.join(dir, 'mark.cjs');
    fs.writeFileSync(
      preload,
      `const dl = process.dlopen;
process.dlopen = function (m, f, ...r) {
  dl.call(this, m, f, ...r);
  if (String(f).endsWith('qcowkit_exit.node')) {
    const now = m.exports.exitNow;
    m.exports.exitNow = (c) => { require('fs').writeSync(2, 'FAST-EXIT ' + c + '\\n'); now(c); };
  }
};
`,
    );
    // A raw image with 2000 data extents: \`map --output=json\` prints ~150 KB, more than a pipe holds.
    img = path.join(dir, 'frag.raw');
    const fd = fs.openSync(img, 'w');
    const block = Buffer.alloc(4096, 0xab);
    for (let i = 0; i < 2000; i++) fs.writeSync(fd, block, 0, block.length, i * 8192);
    fs.ftruncateSync(fd, 2000 * 8192);
    fs.closeSync(fd);
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  const withMark = (fast: boolean) => ({
    ...process.env,
    QCOWKIT_V8_FLAGS: `--interrupt-budget=2000000 -r ${preload}`,
    QCOWKIT_FAST_EXIT: fast ? '1' : '0',
  });

  /** Run with stdout read only after a pause (the pipe fills, writes wait), as \`| (sleep; cat)\`. */
  const slowReader = (args: string[], env: NodeJS.ProcessEnv) =>
    new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
      const child = spawn(CLI, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
      const out: Buffer[] = [];
      const err: Buffer[] = [];
      child.stdout.pause();
      setTimeout(() => child.stdout.resume(), 400);
      child.stdout.on('data', (c: Buffer) => out.push(c));
      child.stderr.on('data', (c: Buffer) => err.push(c));
      child.on('close', (code) => resolve({ code, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() }));
    });

  it('is taken after a command, with its exit code, and loses no output behind a slow pipe', async () => {
    const fast = await slowReader(['map', '--output=json', img], withMark(true));
    const slow = await slowReader(['map', '--output=json', img], withMark(false));
    expect(fast.stderr).toBe('FAST-EXIT 0\n');
    expect(slow.stderr).toBe('');
    expect(fast.code).toBe(0);
    expect(slow.code).toBe(0);
    expect(fast.stdout.length).toBeGreaterThan(100_000);
    expect(fast.stdout).toBe(slow.stdout);
    expect(JSON.parse(fast.stdout)).toHaveLength(4000);
  });

  it('keeps a failing command\'s exit code and message', async () => {
    const r = await run(CLI, ['info', path.join(dir, 'missing.qcow2')], { env: withMark(true) });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/Could not open .*missing\.qcow2.*No such file or directory/);
    expect(r.stderr).toMatch(/FAST-EXIT 1\n$/);
  });

  it('leaves a converted image complete and clean', async () => {
    const out = path.join(dir, 'copy.qcow2');
    const r = await run(CLI, ['convert', '-O', 'qcow2', img, out], { env: withMark(true) });
    expect(r.code).toBe(0);
    expect(r.stderr).toBe('FAST-EXIT 0\n');
    const back = path.join(dir, 'back.raw');
    const r2 = await run(CLI, ['convert', '-O', 'raw', out, back], { env: withMark(true) });
    expect(r2.code).toBe(0);
    expect(fs.readFileSync(back).equals(fs.readFileSync(img))).toBe(true);
    const c = await run(CLI, ['check', out], { env: withMark(false) });
    expect(c.code).toBe(0);
    expect(c.stdout).toContain('No errors were found on the image.');
  });
});

