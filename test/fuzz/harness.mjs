// Fuzz harness: mutations of valid images made by qemu-img, driven through open / info /
// block status / read (and check when available). Every case must end in success or a QcowError,
// quickly, without changing the image bytes. Shared by the short run in `npm test` and `npm run fuzz`.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { openImage } from '../../dist/block/open.js';
import { MemoryProvider, MemoryIO } from '../../dist/io/memory.js';
import { registerNodeCodecs } from '../../dist/codecs/node.js';
import { QcowError } from '../../dist/core/errors.js';
import { checkQcow2, CheckFailure } from '../../dist/formats/qcow2/check.js';

registerNodeCodecs();

/** Seed images: small, but covering the structures worth mutating. */
export function makeSeeds() {
  const dir = mkdtempSync(join(tmpdir(), 'qk-fuzz-'));
  const q = (...a) => execFileSync('qemu-img', a, { cwd: dir, stdio: 'pipe' });
  const io = (f, ...cmds) => execFileSync('qemu-io', [...cmds.flatMap((c) => ['-c', c]), f], { cwd: dir, stdio: 'pipe' });
  const seeds = {};
  q('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', 'plain.qcow2', '1M');
  io('plain.qcow2', 'write -P 0x11 0 12k', 'write -P 0x22 300k 70k', 'write -z 600k 8k');
  q('snapshot', '-c', 's1', 'plain.qcow2');
  io('plain.qcow2', 'write -P 0x33 4k 4k');
  seeds.plain = readFileSync(join(dir, 'plain.qcow2'));
  q('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=512', 'v2.qcow2', '256k');
  io('v2.qcow2', 'write -P 0x44 1000 5000');
  seeds.v2 = readFileSync(join(dir, 'v2.qcow2'));
  q('convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4096', 'plain.qcow2', 'comp.qcow2');
  seeds.comp = readFileSync(join(dir, 'comp.qcow2'));
  q('convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4096,compression_type=zstd', 'plain.qcow2', 'zstd.qcow2');
  seeds.zstd = readFileSync(join(dir, 'zstd.qcow2'));
  q('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=16384', 'ext.qcow2', '1M');
  io('ext.qcow2', 'write -P 0x55 1k 2k', 'write -z 32k 1k', 'write -P 0x66 100k 20k');
  seeds.ext = readFileSync(join(dir, 'ext.qcow2'));
  q('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'plain.qcow2', '-F', 'qcow2', 'overlay.qcow2');
  io('overlay.qcow2', 'write -P 0x77 8k 4k');
  seeds.overlay = readFileSync(join(dir, 'overlay.qcow2'));
  q('bitmap', '--add', 'plain.qcow2', 'bm0');
  seeds.bitmap = readFileSync(join(dir, 'plain.qcow2'));
  rmSync(dir, { recursive: true, force: true });
  return seeds;
}

const BOUNDARY = [0, 1, 2, 7, 8, 9, 21, 22, 63, 64, 255, 511, 512, 4095, 4096, 65535, 65536, 0x7fffffff, 0x80000000, 0xffffffff];
const BOUNDARY64 = [0n, 1n, 512n, 4096n, 65536n, 1n << 32n, 1n << 55n, 1n << 62n, 1n << 63n, (1n << 64n) - 1n, (1n << 63n) - 1n];

/** Apply one mutation described by plain numbers (so fast-check can shrink them). */
export function mutate(buf, m) {
  const out = Buffer.from(buf);
  const len = out.length;
  const hot = (x) => (m.hot ? x % Math.min(len, 4096) : x % len); // bias to header / early metadata
  switch (m.kind) {
    case 'flip': {
      const at = hot(m.a);
      out[at] ^= 1 << (m.b % 8);
      return out;
    }
    case 'u32': {
      const at = hot(m.a) & ~3;
      if (at + 4 <= len) out.writeUInt32BE(BOUNDARY[m.b % BOUNDARY.length] >>> 0, at);
      return out;
    }
    case 'u64': {
      const at = hot(m.a) & ~7;
      if (at + 8 <= len) out.writeBigUInt64BE(BOUNDARY64[m.b % BOUNDARY64.length], at);
      return out;
    }
    case 'copy': {
      // cross-link: copy 8 bytes from one place to another (table entries pointing at each other)
      const from = m.a % Math.max(1, len - 8);
      const to = hot(m.b) & ~7;
      if (to + 8 <= len) out.copy(out, to, from, from + 8);
      return out;
    }
    case 'truncate':
      return out.subarray(0, m.a % (len + 1));
    default:
      return out;
  }
}

/** In-memory storage that, like a full disk, refuses to grow past 64 MiB (repairs must fail cleanly). */
class LimitedIO extends MemoryIO {
  static LIMIT = 64 << 20;
  async write(buf, offset) {
    if (offset + buf.length > LimitedIO.LIMIT) throw new QcowError('EIO', 'No space left on device');
    return super.write(buf, offset);
  }
  async truncate(size) {
    if (size > LimitedIO.LIMIT) throw new QcowError('EIO', 'No space left on device');
    return super.truncate(size);
  }
}

const sha = (b) => createHash('sha256').update(b).digest('hex');

/**
 * Drive one mutated image. Returns { ok, error?, bug? }: `bug` is set for anything that is not a
 * clean outcome (an exception other than QcowError, a change to the image, a hang).
 */
export async function driveOne(bytes, { backing, budgetMs = 5000 } = {}) {
  const provider = new MemoryProvider();
  const img = new MemoryIO('/fuzz/img.qcow2', bytes);
  provider.files.set('/fuzz/img.qcow2', img);
  if (backing) provider.files.set('/fuzz/plain.qcow2', new MemoryIO('/fuzz/plain.qcow2', backing));
  const before = sha(bytes);
  const deadline = Date.now() + budgetMs;
  let error;
  try {
    const d = await openImage('/fuzz/img.qcow2', { io: provider, readOnly: true });
    try {
      d.info();
      let pos = 0;
      let readBudget = 8 << 20;
      while (pos < d.size && Date.now() < deadline) {
        const ext = await d.blockStatus(pos, Math.min(d.size - pos, 1 << 30));
        if (!ext.length) throw new Error('blockStatus returned no extents');
        for (const e of ext) {
          if (e.kind === 'data' && readBudget > 0) {
            const n = Math.min(e.length, readBudget, 1 << 20);
            await d.read(e.offset, n);
            readBudget -= n;
          }
        }
        const last = ext[ext.length - 1];
        const next = last.offset + last.length;
        if (next <= pos) throw new Error('blockStatus made no progress');
        pos = next;
      }
    } finally {
      await d.close();
    }
  } catch (e) {
    error = e;
  }
  // check (read-only) must end cleanly too, and must not touch the file.
  try {
    await checkQcow2(img, {});
  } catch (e) {
    if (!(e instanceof QcowError) && !(e instanceof CheckFailure)) {
      return { ok: false, bug: `check threw ${e && e.stack ? e.stack.split('\n').slice(0, 3).join(' | ') : e}` };
    }
  }
  const after = sha(img.bytes());
  if (after !== before) return { ok: false, bug: 'image bytes changed by a read-only open or check' };
  // Repair works on a copy: it may fail, but only with a clean error.
  if (Date.now() < deadline) {
    const copy = new LimitedIO('/fuzz/copy.qcow2', bytes);
    try {
      await checkQcow2(copy, { repair: 'all' });
    } catch (e) {
      if (!(e instanceof QcowError) && !(e instanceof CheckFailure)) {
        return { ok: false, bug: `check -r all threw ${e && e.stack ? e.stack.split('\n').slice(0, 3).join(' | ') : e}` };
      }
    }
  }
  if (Date.now() > deadline + 1000) return { ok: false, bug: `took too long (${budgetMs}ms budget)` };
  if (error && !(error instanceof QcowError)) {
    return { ok: false, bug: `non-QcowError: ${error && error.stack ? error.stack.split('\n').slice(0, 3).join(' | ') : error}` };
  }
  if (error && (!error.message || error.message.includes('\n'))) return { ok: false, bug: `bad message: ${JSON.stringify(error.message)}` };
  return { ok: !error, error: error && error.message };
}

/** Write a failing case so it can become a regression test. */
export function saveCrash(dir, name, bytes) {
  writeFileSync(join(dir, name), bytes);
}
