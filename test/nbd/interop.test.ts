/**
 * `qcowkit nbd` against real NBD clients (nbdinfo, nbdcopy, qemu-img, qemu-io), with qemu-nbd
 * serving a copy of the same image as the oracle.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { create, io, randomFile } from '../helpers/build.js';
import { makeTmpDir, removeTmpDir, sha256File } from '../helpers/files.js';
import { describeResult, must, qemuImg, qemuIo, qk } from '../helpers/proc.js';
import { freePort, nbdcopy, nbdinfo, normalize, startServer, type Served, stopAll } from './harness.js';

const MiB = 1024 * 1024;
let dir: string;

beforeAll(async () => {
  dir = makeTmpDir('qk-nbd-');
  // A three-level chain, each layer longer than the one below, mixing data, zero clusters, discards
  // and ranges past the end of a shorter backing file.
  await create(dir, 'base.qcow2', 2 * MiB, { cluster_size: 65536 });
  await io(dir, 'base.qcow2', ['write -q -P 1 0 64k', 'write -q -P 9 1M 100k']);
  await create(dir, 'mid.qcow2', 4 * MiB, { cluster_size: 65536 }, { backing: 'base.qcow2', backingFmt: 'qcow2' });
  await io(dir, 'mid.qcow2', ['write -q -P 2 128k 64k', 'write -q -z 1M 64k', 'write -q -P 2 3M 64k']);
  await create(dir, 'top.qcow2', 6 * MiB, { cluster_size: 4096 }, { backing: 'mid.qcow2', backingFmt: 'qcow2' });
  await io(dir, 'top.qcow2', ['write -q -P 3 256k 5000', 'write -q -z 3M 8k', 'discard -q 1M 4k', 'write -q -P 3 5M 64k']);
  randomFile(dir, 'rnd.raw', 7, 5 * MiB + 4096);
  await must(qemuImg(['convert', '-q', '-O', 'raw', 'top.qcow2', 'top.raw'], { cwd: dir }));
}, 60_000);

afterAll(async () => {
  await stopAll();
  removeTmpDir(dir);
});

/** Run a client command against both servers and return the two outputs, normalized. */
async function both(
  serverArgs: string[] | ((qemu: boolean) => string[]),
  clients: Array<(s: Served) => Promise<string>>,
  o: { unix?: boolean } = {},
): Promise<Array<[string, string]>> {
  const argsFor = (qemu: boolean) => (typeof serverArgs === 'function' ? serverArgs(qemu) : serverArgs);
  const ours = await startServer(argsFor(false), { dir, unix: o.unix });
  const theirs = await startServer(argsFor(true), { dir, unix: o.unix, qemu: true });
  try {
    const out: Array<[string, string]> = [];
    for (const c of clients) out.push([normalize(await c(ours), ours), normalize(await c(theirs), theirs)]);
    return out;
  } finally {
    expect((await ours.stop()).code).toBe(0);
    await theirs.stop();
  }
}

const info = (args: string[]) => async (s: Served) => {
  const r = await nbdinfo([...args, s.uri('exp')]);
  if (r.code !== 0) throw new Error(describeResult(r));
  return r.stdout;
};

describe('nbd: what clients see matches qemu-nbd', () => {
  it('read-only chain: nbdinfo --json, --list, --map, --map=qemu:allocation-depth, --map --totals', async () => {
    const res = await both(
      ['-t', '-r', '-A', '-e', '3', '-x', 'exp', '-D', 'a test export', '-f', 'qcow2', 'top.qcow2'],
      [
        info(['--json']),
        async (s) => (await nbdinfo(['--list', s.uri()])).stdout,
        info(['--map']),
        info(['--map=qemu:allocation-depth']),
        info(['--map', '--totals']),
      ],
    );
    for (const [ours, theirs] of res) expect(ours).toBe(theirs);
  });

  it('writable export over a Unix socket: flags, contexts and maps', async () => {
    fs.copyFileSync(path.join(dir, 'top.qcow2'), path.join(dir, 'rw-ours.qcow2'));
    fs.copyFileSync(path.join(dir, 'top.qcow2'), path.join(dir, 'rw-qemu.qcow2'));
    const res = await both((q) => ['-t', '-x', 'exp', q ? 'rw-qemu.qcow2' : 'rw-ours.qcow2'], [info(['--json']), info(['--map'])], { unix: true });
    for (const [ours, theirs] of res) expect(ours).toBe(theirs);
  });

  it('raw image by probing: 512-byte minimum block size and no image header in block 0, like qemu-nbd', async () => {
    fs.copyFileSync(path.join(dir, 'top.raw'), path.join(dir, 'probe-ours.raw'));
    fs.copyFileSync(path.join(dir, 'top.raw'), path.join(dir, 'probe-qemu.raw'));
    fs.writeFileSync(path.join(dir, 'hdr.bin'), fs.readFileSync(path.join(dir, 'top.qcow2')).subarray(0, 512));
    const res = await both(
      (q) => ['-t', '-x', 'exp', q ? 'probe-qemu.raw' : 'probe-ours.raw'],
      [
        info(['--json']),
        async (s) => {
          const r = await qemuIo(['-f', 'raw', '-c', 'write -s hdr.bin 0 512', '-c', 'write -s hdr.bin 1 8', '-c', 'write -P 5 512 512', s.uri('exp')], { cwd: dir });
          return (r.stdout + r.stderr).replace(/\d+(\.\d+)? \w+\/sec and [\d.]+ ops\/sec|[\d.]+ sec/g, '');
        },
      ],
    );
    for (const [ours, theirs] of res) expect(ours).toBe(theirs);
    expect(res[1]![0]).toContain('Operation not permitted');
  });

  it('qemu-img info/map/compare/convert on nbd:// URIs', async () => {
    const res = await both(
      ['-t', '-r', '-e', '0', '-x', 'exp', 'top.qcow2'],
      [
        async (s) => (await must(qemuImg(['map', '--output=json', s.uri('exp')]))).stdout,
        async (s) => (await must(qemuImg(['info', '--output=json', s.uri('exp')]))).stdout.replace(/"actual-size": \d+,?/, ''),
        async (s) => (await qemuImg(['compare', s.uri('exp'), path.join(dir, 'top.qcow2')])).stdout,
        async (s) => {
          const out = path.join(dir, `conv-${s.port}.raw`);
          await must(qemuImg(['convert', '-O', 'raw', s.uri('exp'), out]));
          return sha256File(out);
        },
      ],
    );
    for (const [ours, theirs] of res) expect(ours).toBe(theirs);
    expect(res[2]![0]).toContain('Images are identical');
    expect(res[3]![0]).toBe(await sha256File(path.join(dir, 'top.raw')));
  });

  it('qemu-img on nbd+unix:// URIs', async () => {
    const s = await startServer(['-t', '-r', '-x', 'exp', 'top.qcow2'], { dir, unix: true });
    try {
      const r = await qemuImg(['compare', s.uri('exp'), path.join(dir, 'top.raw')]);
      expect(r.stdout, describeResult(r)).toContain('Images are identical');
      const m = await must(qemuImg(['map', '--output=json', s.uri('exp')]));
      expect(JSON.parse(m.stdout).length).toBeGreaterThan(1);
    } finally {
      expect((await s.stop()).code).toBe(0);
    }
    expect(fs.existsSync(s.socket!)).toBe(false);
  });

  it('-s (temporary overlay): same maps as qemu-nbd -s after the same writes; the image is untouched', async () => {
    const before = await sha256File(path.join(dir, 'top.qcow2'));
    const writes = ['write -P 0x44 100k 8k', 'write -z 5M 64k', 'discard 128k 64k', 'write -P 0x55 6140k 4k'];
    const res = await both(
      ['-t', '-s', '-A', '-x', 'exp', 'top.qcow2'],
      [
        async (s) => {
          const args = ['-f', 'raw'];
          for (const w of writes) args.push('-c', w);
          const r = await qemuIo([...args, s.uri('exp')]);
          expect(r.code, describeResult(r)).toBe(0);
          return '';
        },
        info(['--map']),
        info(['--map=qemu:allocation-depth']),
        async (s) => {
          const out = path.join(dir, `snap-${s.port}.raw`);
          await must(qemuImg(['convert', '-O', 'raw', s.uri('exp'), out]));
          return sha256File(out);
        },
      ],
    );
    for (const [ours, theirs] of res) expect(ours).toBe(theirs);
    expect(await sha256File(path.join(dir, 'top.qcow2'))).toBe(before);
  });
});

describe('nbd: data through the server', () => {
  it('nbdcopy export → raw equals qemu-img convert -O raw', async () => {
    const s = await startServer(['-r', '-x', 'exp', 'top.qcow2'], { dir });
    const out = path.join(dir, 'copied.raw');
    const r = await nbdcopy([s.uri('exp'), out]);
    expect(r.code, describeResult(r)).toBe(0);
    // Without -t the server exits after its only client leaves.
    expect(await s.exited).toEqual({ code: 0, signal: null });
    expect(await sha256File(out)).toBe(await sha256File(path.join(dir, 'top.raw')));
  });

  it('nbdcopy raw → export, then SIGTERM: image checks clean and holds the data', async () => {
    await create(dir, 'target.qcow2', 5 * MiB + 4096, { cluster_size: 65536 });
    const s = await startServer(['-t', '--discard=unmap', '--detect-zeroes=unmap', 'target.qcow2'], { dir, unix: true });
    const r = await nbdcopy([path.join(dir, 'rnd.raw'), s.uri()]);
    expect(r.code, describeResult(r)).toBe(0);
    expect(await s.stop()).toEqual({ code: 0, signal: null });
    await must(qemuImg(['check', path.join(dir, 'target.qcow2')]));
    const c = await qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', path.join(dir, 'target.qcow2'), path.join(dir, 'rnd.raw')]);
    expect(c.stdout, describeResult(c)).toContain('Images are identical');
  });

  it('SIGTERM in the middle of a stream of writes: requests in flight finish, exit 0, image consistent', async () => {
    randomFile(dir, 'rnd16.raw', 16, 16 * MiB);
    await create(dir, 'busy.qcow2', 16 * MiB, { cluster_size: 65536 });
    const s = await startServer(['-t', '-f', 'qcow2', 'busy.qcow2'], { dir });
    const copy = nbdcopy([path.join(dir, 'rnd16.raw'), s.uri()]);
    await new Promise((r) => setTimeout(r, 150));
    expect(await s.stop()).toEqual({ code: 0, signal: null });
    await copy; // usually cut short ("transport endpoint shutdown"); either way the image must be consistent
    const r = await must(qemuImg(['check', path.join(dir, 'busy.qcow2')]));
    expect(r.stdout).toContain('No errors were found');
  });

  it('qemu-io writes, zeroes and discards through the server, SIGTERM, qemu-img check, contents', async () => {
    await create(dir, 'io.qcow2', 8 * MiB, { cluster_size: 65536 }, { backing: 'base.qcow2', backingFmt: 'qcow2' });
    const s = await startServer(['-t', '--discard=unmap', '-x', 'io', 'io.qcow2'], { dir });
    const cmds = [
      'write -P 0xa1 0 100k',
      'write -f -P 0xa2 3M 1M', // FUA
      'write -z 1M 128k',
      'write -z -u 64k 64k',
      'discard 6M 1M',
      'aio_write -P 0xa3 7M 4k',
      'aio_write -P 0xa4 7405568 4k',
      'aio_flush',
      'flush',
      'read -P 0xa2 3M 1M',
    ];
    const args = ['-f', 'raw'];
    for (const c of cmds) args.push('-c', c);
    const r = await qemuIo([...args, s.uri('io')]);
    expect(r.code, describeResult(r)).toBe(0);
    expect(r.stdout + r.stderr).not.toMatch(/error|failed|Pattern verification/i);
    expect(await s.stop()).toEqual({ code: 0, signal: null });
    await must(qemuImg(['check', path.join(dir, 'io.qcow2')]));
    const v = await qemuIo([
      '-c', 'read -P 0xa1 0 64k',
      '-c', 'read -P 0 64k 64k',
      '-c', 'read -P 0xa2 3M 1M',
      '-c', 'read -P 0 1M 128k',
      '-c', 'read -P 0 6M 1M',
      '-c', 'read -P 0xa3 7M 4k',
      '-c', 'read -P 0xa4 7405568 4k',
      path.join(dir, 'io.qcow2'),
    ]);
    expect(v.stdout + v.stderr, describeResult(v)).not.toMatch(/error|failed|verification/i);
  });

  it('-r refuses writes with EPERM; -l exports an internal snapshot', async () => {
    fs.copyFileSync(path.join(dir, 'top.raw'), path.join(dir, 'snap-src.raw'));
    await must(qemuImg(['convert', '-q', '-O', 'qcow2', 'snap-src.raw', 'snap.qcow2'], { cwd: dir }));
    await must(qemuImg(['snapshot', '-c', 'before', 'snap.qcow2'], { cwd: dir }));
    await io(dir, 'snap.qcow2', ['write -q -P 0x77 0 1M']);
    const s = await startServer(['-t', '-l', 'before', '-x', 'old', 'snap.qcow2'], { dir });
    try {
      // The export says it is read-only, so qemu-io will not even open it for writing.
      const w = await qemuIo(['-f', 'raw', '-c', 'write -P 1 0 512', s.uri('old')]);
      expect(w.stdout + w.stderr).toMatch(/Permission denied|read-only/i);
      const ro = await nbdinfo(['--json', s.uri('old')]);
      expect(JSON.parse(ro.stdout).exports[0].is_read_only).toBe(true);
      const c = await qemuImg(['compare', s.uri('old'), path.join(dir, 'snap-src.raw')]);
      expect(c.stdout, describeResult(c)).toContain('Images are identical');
    } finally {
      expect((await s.stop()).code).toBe(0);
    }
  });

  it('--fork detaches once listening and --pid-file names the server', async () => {
    const port = await freePort();
    const pidFile = path.join(dir, 'forked.pid');
    const r = await must(qk(['nbd', '--fork', '--pid-file', pidFile, '-b', '127.0.0.1', '-p', String(port), '-r', 'top.raw'], { cwd: dir }));
    expect(r.code).toBe(0);
    const pid = Number(fs.readFileSync(pidFile, 'utf8').trim());
    expect(pid).toBeGreaterThan(0);
    const alive = () => {
      try {
        process.kill(pid, 0);
        return true;
      } catch {
        return false;
      }
    };
    try {
      const sz = await nbdinfo(['--size', `nbd://127.0.0.1:${port}`]);
      expect(sz.stdout.trim()).toBe(String(6 * MiB));
      // Not persistent: it exits after that client; wait for it to go.
      const deadline = Date.now() + 10_000;
      while (alive() && Date.now() < deadline) await new Promise((res) => setTimeout(res, 50));
      expect(alive()).toBe(false);
      expect(fs.existsSync(pidFile)).toBe(false);
    } finally {
      if (alive()) process.kill(pid, 'SIGKILL');
    }
  });
});
