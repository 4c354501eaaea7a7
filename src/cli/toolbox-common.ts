/**
 * Small helpers shared by the "toolbox" commands (snapshot, resize, commit, rebase, amend,
 * measure, bitmap, dd): opening an image for writing with qemu-img's probing warning, errno
 * wording, same-file detection, and qemu's cvtnum for command arguments.
 */
import { promises as fsp } from 'node:fs';
import type { BlockDriver } from '../core/block-driver.js';
import { QcowError } from '../core/errors.js';
import { CliError, messageOf } from './errors.js';
import { parseQemuSize } from './common.js';
import { openForCli, resolveImageArg, type CliOpenOptions } from './open.js';
import type { Io } from './output.js';

/** What qemu-img prints when it opens a raw image for writing without `-f raw`. */
export function rawProbeWarning(name: string): string {
  return (
    `WARNING: Image format was not specified for '${name}' and probing guessed raw.\n` +
    '         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n' +
    "         Specify the 'raw' format explicitly to remove the restrictions.\n"
  );
}

/**
 * Open an image argument read-write (with its backing chain unless `noBacking`), warning like
 * qemu-img when the format was probed as raw.
 */
export async function openWritable(arg: string, o: Omit<CliOpenOptions, 'writable'>, io: Io): Promise<BlockDriver> {
  const drv = await openForCli(arg, { ...o, writable: true });
  const given = resolveImageArg(arg, o).format;
  if (given === undefined && drv.format === 'raw') io.err.write(rawProbeWarning(arg));
  return drv;
}

/** errno number and strerror text for a library error code (qemu prints "-95 (Operation not supported)"). */
const ERRNO: Record<string, [number, string]> = {
  EPERM: [1, 'Operation not permitted'],
  ENOENT: [2, 'No such file or directory'],
  EIO: [5, 'Input/output error'],
  ECORRUPT: [5, 'Input/output error'],
  EEXIST: [17, 'File exists'],
  EINVAL: [22, 'Invalid argument'],
  EFBIG: [27, 'File too large'],
  ERANGE: [34, 'Numerical result out of range'],
  ENOTSUP: [95, 'Operation not supported'],
};

export function errnoOf(e: unknown): [number, string] {
  const code = e instanceof QcowError ? e.code : 'EIO';
  return ERRNO[code] ?? [5, 'Input/output error'];
}

/** Whether two names are the same file (by device and inode). */
export async function sameFile(a: string, b: string): Promise<boolean> {
  try {
    const [x, y] = await Promise.all([fsp.stat(a), fsp.stat(b)]);
    return x.dev === y.dev && x.ino === y.ino;
  } catch {
    return false;
  }
}

/** qemu-img's lock conflict message (qcowkit takes no locks, but opening one file twice for writing is refused the same way). */
export function lockError(prefix: string, file: string, mode: 'shared "write"' | '"write"' = 'shared "write"'): CliError {
  return new CliError(`${prefix}Failed to get ${mode} lock\nIs another process using the image [${file}]?`);
}

const INT64_MAX = (1n << 63n) - 1n;

/**
 * qemu-img's cvtnum_full: a size argument with k/M/G/T/P/E suffixes, between `min` and `max`,
 * with qemu-img's two messages.
 */
export function cvtnum(what: string, text: string, min = 0n, max = INT64_MAX): bigint {
  const v = parseQemuSize(text);
  if (v === undefined) {
    throw new CliError(
      `Invalid ${what} specified. You may use k, M, G, T, P or E suffixes for\n` +
        'qcowkit: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    );
  }
  if (v < min || v > max) throw new CliError(`Invalid ${what} specified. Must be between ${min} and ${max}.`);
  return v;
}

/** A library failure as a CLI error with the library's message. */
export function asCliError(e: unknown, prefix = ''): CliError {
  if (e instanceof CliError) return prefix ? new CliError(prefix + e.message, e.exitCode) : e;
  return new CliError(prefix + messageOf(e));
}
