/** Building fixture images with qemu-img / qemu-io (nothing binary is committed). */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes, textishBytes } from './files.js';
import { must, mustIo, qemuImg } from './proc.js';

export type CreateOpts = Record<string, string | number | boolean>;

function optString(o: CreateOpts): string {
  return Object.entries(o)
    .map(([k, v]) => `${k}=${typeof v === 'boolean' ? (v ? 'on' : 'off') : v}`)
    .join(',');
}

/** `qemu-img create -f FMT [-b B -F BF] [-o ...] FILE SIZE` in `dir`. */
export async function create(
  dir: string,
  file: string,
  size: number | string | undefined,
  o: CreateOpts = {},
  extra: { fmt?: string; backing?: string; backingFmt?: string } = {},
): Promise<void> {
  const args = ['create', '-q', '-f', extra.fmt ?? 'qcow2'];
  if (extra.backing !== undefined) args.push('-b', extra.backing, '-F', extra.backingFmt ?? 'qcow2');
  if (Object.keys(o).length) args.push('-o', optString(o));
  args.push(file);
  if (size !== undefined) args.push(String(size));
  fs.mkdirSync(path.dirname(path.join(dir, file)), { recursive: true });
  await must(qemuImg(args, { cwd: dir }));
}

/** One qemu-io invocation with many `-c` commands. */
export async function io(dir: string, file: string, cmds: string[], fmt = 'qcow2'): Promise<void> {
  if (cmds.length === 0) return;
  const args = ['-f', fmt];
  for (const c of cmds) args.push('-c', c);
  args.push(file);
  await mustIo(args, { cwd: dir });
}

export async function img(dir: string, args: string[]): Promise<void> {
  await must(qemuImg(args, { cwd: dir }));
}

/** Deterministic random bytes in a file (source for `write -s` and for `convert` of a raw file). */
export function randomFile(dir: string, file: string, seed: number, length: number): void {
  fs.writeFileSync(path.join(dir, file), randomBytes(seed, length));
}

/**
 * A raw file laid out in `chunk`-sized pieces: random (incompressible), text (compressible),
 * zeros (left as holes), and single-byte patterns, in a repeating deterministic order.
 */
export function mixedRawFile(dir: string, file: string, seed: number, size: number, chunk: number): void {
  const p = path.join(dir, file);
  const fd = fs.openSync(p, 'w');
  try {
    fs.ftruncateSync(fd, size);
    for (let off = 0, i = 0; off < size; off += chunk, i++) {
      const len = Math.min(chunk, size - off);
      let data: Buffer | undefined;
      switch (i % 5) {
        case 0:
          data = randomBytes(seed + i, len);
          break;
        case 1:
          data = textishBytes(seed + i, len);
          break;
        case 2:
          data = undefined; // hole
          break;
        case 3:
          data = Buffer.alloc(len, (seed + i) & 0xff || 1);
          break;
        case 4:
          // half random, half zero: partially compressible
          data = Buffer.concat([randomBytes(seed + i, len >> 1), Buffer.alloc(len - (len >> 1))]);
          break;
      }
      if (data) fs.writeSync(fd, data, 0, data.length, off);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** The size a "mixed" workload needs for cluster size `cs`. */
export function mixedSize(cs: number, min = 4 << 20): number {
  return Math.max(16 * cs, min);
}

/**
 * A varied qemu-io workload for cluster size `cs` on an image of `size` bytes (>= 16 clusters):
 * aligned and unaligned pattern writes, writes straddling cluster boundaries, random data
 * (needs `rnd.bin` of >= 2*cs+4096 bytes in the folder), zero writes (full and partial), discards,
 * and a write at the very end of the image.
 */
export function mixedOps(cs: number, size: number): string[] {
  const c = cs;
  return [
    `write -q -P 0x11 0 ${c}`,
    `write -q -P 0x22 ${3 * c + 100} ${2 * c}`,
    `write -q -P 0x33 ${8 * c - 7} 14`,
    `write -q -s rnd.bin ${9 * c + 1} ${c + 1000}`,
    `write -q -z ${4 * c} ${c}`,
    `write -q -z ${9 * c + 512} 1024`,
    `write -q -P 0x44 ${12 * c} ${3 * c}`,
    `discard -q ${12 * c} ${2 * c}`,
    `write -q -P 0x66 ${6 * c + 1} 1`,
    `write -q -P 0x55 ${size - c - 3} ${c + 3}`,
  ];
}

/** Create an image and run the mixed workload on it. */
export async function mixedImage(dir: string, file: string, cs: number, o: CreateOpts = {}, size = mixedSize(cs)): Promise<void> {
  randomFile(dir, 'rnd.bin', cs ^ 0x5eed, 2 * cs + 4096);
  await create(dir, file, size, { cluster_size: cs, ...o });
  await io(dir, file, mixedOps(cs, size));
}
