/**
 * `qcowkit nbd` command line: option errors worded like qemu-nbd's, --image-opts with --object
 * secrets, -o OFFSET compared with qemu-nbd, --help.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { create, io } from '../helpers/build.js';
import { makeTmpDir, removeTmpDir, sha256File } from '../helpers/files.js';
import { describeResult, qk, run } from '../helpers/proc.js';
import { nbdinfo, normalize, startServer, stopAll } from './harness.js';

let dir: string;

beforeAll(async () => {
  dir = makeTmpDir('qk-nbd-cli-');
  await create(dir, 'img.qcow2', 3 << 20, { cluster_size: 65536 });
  await io(dir, 'img.qcow2', ['write -q -P 1 0 128k', 'write -q -z 1M 64k', 'write -q -P 2 2M 64k']);
}, 30_000);

afterAll(async () => {
  await stopAll();
  removeTmpDir(dir);
});

describe('qcowkit nbd: command line', () => {
  it('refuses bad options the way qemu-nbd does', async () => {
    const cases: Array<[string[], RegExp]> = [
      [['nope.qcow2'], /Failed to blk_new_open 'nope.qcow2': .*No such file or directory/],
      [['-f', 'qcow2', 'nope'], /Failed to blk_new_open 'nope'/],
      [['-l', 'nosnap', 'img.qcow2'], /Failed to load snapshot: Can't find snapshot/],
      [['--discard=foo', 'img.qcow2'], /Invalid discard mode `foo'/],
      [['--detect-zeroes=unmap', 'img.qcow2'], /detect-zeroes to unmap is not allowed without setting discard operation to unmap/],
      [['-e', '-1', 'img.qcow2'], /Invalid shared device number '-1'/],
      [['--tls-creds', 'tls0', 'img.qcow2'], /Failed to get TLS creds: No TLS credentials with id 'tls0'/],
      [['--object', 'tls-creds-x509,id=t,dir=/nonexistent,endpoint=server', '--tls-creds', 't', 'img.qcow2'], /Unable to access credentials \/nonexistent\/ca-cert.pem/],
      [['--object', 'foo,id=x', 'img.qcow2'], /Invalid object type 'foo'/],
      [['--object', 'secret,id=s,data=1,bogus=2', 'img.qcow2'], /Property 'secret.bogus' not found/],
      // (an unknown key secret for an unencrypted image is never looked up: qemu-nbd serves it)
      [['-o', '99999999', 'img.qcow2'], /Offset \(99999999\) cannot be greater than size of the containing file \(3145728\)/],
      [[], /Invalid number of arguments/],
      [['a', 'b'], /Invalid number of arguments/],
    ];
    const results = await Promise.all(cases.map(([args]) => qk(['nbd', ...args], { cwd: dir })));
    results.forEach((r, i) => {
      expect(r.code, describeResult(r)).toBe(1);
      expect(r.stderr, describeResult(r)).toMatch(cases[i]![1]);
    });
    const h = await qk(['nbd', '--help']);
    expect(h.code).toBe(0);
    expect(h.stdout).toContain('Usage: qcowkit nbd');
  });

  it('--image-opts with an --object secret serves the image', async () => {
    const s = await startServer(
      ['-t', '-r', '--object', 'secret,id=sec0,data=abc', '--image-opts', 'driver=qcow2,file.filename=img.qcow2,encrypt.key-secret=sec0'],
      { dir },
    );
    try {
      const r = await nbdinfo(['--size', s.uri()]);
      expect(r.stdout.trim(), describeResult(r)).toBe(String(3 << 20));
    } finally {
      expect((await s.stop()).code).toBe(0);
    }
  });

  it('-o OFFSET: same size, map and data as qemu-nbd', async () => {
    const outputs: string[][] = [];
    for (const qemu of [false, true]) {
      const s = await startServer(['-t', '-r', '-A', '-f', 'qcow2', '-o', '65536', 'img.qcow2'], { dir, qemu });
      try {
        const out: string[] = [];
        for (const args of [['--size'], ['--map'], ['--map=qemu:allocation-depth']]) {
          out.push(normalize((await nbdinfo([...args, s.uri()])).stdout, s));
        }
        const raw = path.join(dir, `off-${qemu}.raw`);
        const r = await run('nbdcopy', [s.uri(), raw]);
        expect(r.code, describeResult(r)).toBe(0);
        out.push(await sha256File(raw));
        fs.rmSync(raw);
        outputs.push(out);
      } finally {
        await s.stop();
      }
    }
    expect(outputs[0]).toEqual(outputs[1]);
  });
});
