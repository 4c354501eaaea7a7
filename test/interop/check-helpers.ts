/**
 * Helpers for the `check` interop tests: run our check in-process (fast) with captured streams,
 * run qemu-img check on a copy of the same file, normalize both, and corrupt images in place.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { runCheck } from '../../src/cli/check-command.js';
import { CliError, HelpRequested, UsageError } from '../../src/cli/errors.js';
import { Output, type Io } from '../../src/cli/output.js';
import { QcowError } from '../../src/core/errors.js';
import { readAt, readU32, readU64, writeAt } from '../helpers/files.js';
import { qemuImg } from '../helpers/proc.js';

export interface Outcome {
  code: number;
  stdout: string;
  stderr: string;
}

class Collect extends Writable {
  text = '';
  override _write(chunk: Buffer | string, _enc: BufferEncoding, cb: () => void): void {
    this.text += chunk.toString();
    cb();
  }
}

/** `qcowkit check ARGS` in-process, with the dispatcher's error reporting. */
export async function oursCheck(args: string[]): Promise<Outcome> {
  const out = new Collect();
  const err = new Collect();
  const io: Io = { out: new Output(out), err: new Output(err), isTTY: false };
  let code: number;
  try {
    code = await runCheck(['check', ...args], io);
  } catch (e) {
    if (e instanceof HelpRequested) code = 0;
    else if (e instanceof UsageError) {
      io.err.write(`qcowkit: ${e.message}\nTry 'qcowkit --help' for more information\n`);
      code = 1;
    } else if (e instanceof CliError) {
      if (e.message) io.err.write(`qcowkit: ${e.message}\n`);
      code = e.exitCode;
    } else if (e instanceof QcowError) {
      io.err.write(`qcowkit: ${e.message}\n`);
      code = 1;
    } else throw e;
  }
  await io.out.flush();
  await io.err.flush();
  return { code, stdout: out.text, stderr: err.text };
}

/** qemu-img check ARGS FILE run in the file's folder (FILE given by base name). */
export async function qemuCheck(args: string[], file: string): Promise<Outcome> {
  const r = await qemuImg(['check', ...args, path.basename(file)], { cwd: path.dirname(file) });
  return { code: r.code ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** Replace the image name and program name so both tools' outputs compare. */
export function normalize(o: Outcome, file: string): Outcome {
  const fix = (s: string) =>
    s
      .split(file)
      .join('IMG')
      .split(path.dirname(file))
      .join('DIR')
      .split(path.basename(file))
      .join('IMG')
      .replace(/^qemu-img: /gm, 'PROG: ')
      .replace(/^qcowkit: /gm, 'PROG: ')
      .replace(/Try '(qemu-img|qcowkit) --help'/g, "Try 'PROG --help'");
  return { code: o.code, stdout: fix(o.stdout), stderr: fix(o.stderr) };
}

// ------------------------------------------------------------------------------------------------
// Locating and patching qcow2 metadata (big-endian; see /work/shared/qcow-notes.md §1-2)

export function clusterSize(file: string): number {
  return 2 ** readU32(file, 20);
}

function refcountBits(file: string): number {
  return readU32(file, 4) >= 3 ? 2 ** readU32(file, 96) : 16;
}

/** Byte offset of the 16-bit (or wider, byte-aligned) refcount entry of `cluster`. */
export function refcountEntry(file: string, cluster: number): { offset: number; bytes: number } {
  const cs = clusterSize(file);
  const bits = refcountBits(file);
  if (bits < 8) throw new Error('sub-byte refcounts: patch whole blocks instead');
  const per = (cs * 8) / bits;
  const rt = Number(readU64(file, 48));
  const block = Number(readU64(file, rt + 8 * Math.floor(cluster / per)) & ~0x1ffn);
  if (!block) throw new Error(`no refcount block for cluster ${cluster}`);
  return { offset: block + (cluster % per) * (bits / 8), bytes: bits / 8 };
}

export function setRefcount(file: string, cluster: number, value: number): void {
  const { offset, bytes } = refcountEntry(file, cluster);
  const b = Buffer.alloc(bytes);
  b.writeUIntBE(value, Math.max(0, bytes - 6), Math.min(bytes, 6));
  writeAt(file, offset, b);
}

export function getRefcount(file: string, cluster: number): number {
  const { offset, bytes } = refcountEntry(file, cluster);
  return readAt(file, offset, bytes).readUIntBE(Math.max(0, bytes - 6), Math.min(bytes, 6));
}

/**
 * Rewrite the snapshot table in place with entry `index`'s extra data replaced (entries keep
 * their order; the table must still fit in the clusters it had).
 */
export function rewriteSnapshotExtra(file: string, index: number, extra: (old: Buffer) => Buffer): void {
  const nb = readU32(file, 60);
  const so = Number(readU64(file, 64));
  const raw = readAt(file, so, 1 << 20);
  let off = 0;
  const entries: Array<{ head: Buffer; extra: Buffer; rest: Buffer }> = [];
  for (let i = 0; i < nb; i++) {
    const head = Buffer.from(raw.subarray(off, off + 40));
    const idSize = head.readUInt16BE(12);
    const nameSize = head.readUInt16BE(14);
    const ex = head.readUInt32BE(36);
    const e = Buffer.from(raw.subarray(off + 40, off + 40 + ex));
    const rest = Buffer.from(raw.subarray(off + 40 + ex, off + 40 + ex + idSize + nameSize));
    entries.push({ head, extra: i === index ? extra(e) : e, rest });
    off += Math.ceil((40 + ex + idSize + nameSize) / 8) * 8;
  }
  const parts: Buffer[] = [];
  for (const e of entries) {
    e.head.writeUInt32BE(e.extra.length, 36);
    const len = 40 + e.extra.length + e.rest.length;
    parts.push(e.head, e.extra, e.rest, Buffer.alloc(Math.ceil(len / 8) * 8 - len));
  }
  const table = Buffer.concat(parts);
  writeAt(file, so, Buffer.concat([table, Buffer.alloc(Math.max(0, off - table.length))]));
}

/** Offsets of the bitmap directory and each bitmap's table (from the bitmaps header extension). */
export function bitmapTables(file: string): { dirOffset: number; tables: number[] } {
  const cs = clusterSize(file);
  const head = readAt(file, 0, cs);
  let off = head.readUInt32BE(100);
  for (;;) {
    const type = head.readUInt32BE(off);
    const len = head.readUInt32BE(off + 4);
    if (type === 0) throw new Error('no bitmaps extension');
    if (type === 0x23852875) {
      const dirSize = Number(head.readBigUInt64BE(off + 16));
      const dirOffset = Number(head.readBigUInt64BE(off + 24));
      const dir = readAt(file, dirOffset, dirSize);
      const tables: number[] = [];
      for (let e = 0; e < dirSize; ) {
        tables.push(Number(dir.readBigUInt64BE(e)));
        e += Math.ceil((24 + dir.readUInt32BE(e + 20) + dir.readUInt16BE(e + 18)) / 8) * 8;
      }
      return { dirOffset, tables };
    }
    off += 8 + Math.ceil(len / 8) * 8;
  }
}

export function copy(src: string, dst: string): string {
  fs.copyFileSync(src, dst);
  return dst;
}
