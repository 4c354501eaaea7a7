/**
 * Small helpers shared by the "toolbox" commands (snapshot, resize, commit, rebase, amend,
 * measure, bitmap, dd): opening an image for writing with qemu-img's probing warning, errno
 * wording, same-file detection, and qemu's cvtnum for command arguments.
 */
import * as fsCalls from '../io/fs-calls.js';
import type { BlockDriver } from '../core/block-driver.js';
import type { IOProvider } from '../core/byte-io.js';
import { QcowError } from '../core/errors.js';
import { openImage } from '../block/open.js';
import { Qcow2Driver } from '../formats/qcow2/driver.js';
import { QcowDriver } from '../formats/qcow/driver.js';
import { KEY_SECRET_REQUIRED } from '../formats/crypto/qcow2.js';
import { fileProvider } from '../io/file.js';
import { CliError, messageOf } from './errors.js';
import { parseQemuSize } from './common.js';
import { parseQemuOpts } from './image-opts.js';
import { cliProvider, openForCli, resolveImageArg, type CliOpenOptions } from './open.js';
import type { Io } from './output.js';

/** What qemu-img prints when it opens a raw image for writing without `-f raw`. */
export function rawProbeWarning(name: string): string {
  return (
    `WARNING: Image format was not specified for '${name}' and probing guessed raw.\n` +
    '         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n' +
    "         Specify the 'raw' format explicitly to remove the restrictions.\n"
  );
}

const BACKING_KEY = /^((?:backing\.)+)encrypt\.key-secret$/;

/**
 * `--image-opts` keys `backing.encrypt.key-secret`, `backing.backing.encrypt.key-secret`, ...:
 * the secret id for each depth of the backing chain (1 = the image's backing file), and the
 * option string without them.
 */
export function splitBackingKeySecrets(text: string): { text: string; keys: Map<number, string> } {
  const keys = new Map<number, string>();
  const rest: string[] = [];
  const pairs = parseQemuOpts(text, 'file');
  for (const [k, v] of pairs) {
    const m = BACKING_KEY.exec(k);
    if (m) keys.set(m[1]!.length / 'backing.'.length, v);
    else rest.push(`${k}=${v.replace(/,/g, ',,')}`);
  }
  return keys.size ? { text: rest.join(','), keys } : { text, keys };
}

/**
 * The deepest backing level an `--image-opts` argument gives a key for (0: none). QEMU names the
 * images down to that level by their options (json:{...}), so `commit -b NAME` cannot find them.
 */
export function deepestBackingKey(arg: string, imageOpts: boolean): number {
  if (!imageOpts) return 0;
  return Math.max(0, ...splitBackingKeySecrets(arg).keys.keys());
}

/**
 * Open an image argument the way qemu-img's toolbox commands do (openForCli), with the
 * encrypted images of the backing chain unlocked as QEMU requires: each needs its key
 * (`backing.encrypt.key-secret=ID` in `--image-opts`, one `backing.` per level), or the open
 * fails with `Could not open backing file: Parameter 'encrypt.key-secret' is required for cipher`.
 * With `noBacking` the backing keys are left in the options (QEMU then refuses them).
 */
export async function openChainForCli(arg: string, o: CliOpenOptions): Promise<BlockDriver> {
  let text = arg;
  let keys = new Map<number, string>();
  if (o.imageOpts && !o.noBacking) ({ text, keys } = splitBackingKeySecrets(arg));
  let drv: BlockDriver;
  try {
    drv = await openForCli(text, o);
  } catch (e) {
    if (e instanceof CliError && text !== arg) throw new CliError(e.message.split(`'${text}'`).join(`'${arg}'`), e.exitCode);
    throw e;
  }
  try {
    if (!o.noBacking) await unlockBackingChain(drv, keys, o.secrets, `Could not open '${arg}': `, o.provider);
  } catch (e) {
    await drv.close().catch(() => {});
    throw e;
  }
  return drv;
}

/**
 * Open, read-write, the image at `depth` of the backing chain of the image argument `arg` (commit's
 * base), with the keys `--image-opts` gives for it and for its own backing chain.
 */
export async function openChainMemberWritable(
  arg: string,
  o: Pick<CliOpenOptions, 'imageOpts' | 'secrets'>,
  depth: number,
  member: BlockDriver,
): Promise<BlockDriver> {
  const keys = o.imageOpts ? splitBackingKeySecrets(arg).keys : new Map<number, string>();
  const keySecret = keys.get(depth);
  const below = new Map<number, string>();
  for (const [d, k] of keys) if (d > depth) below.set(d - depth, k);
  let drv: BlockDriver;
  try {
    drv = await openImage(member.filename, {
      io: fileProvider,
      readOnly: false,
      format: member.format,
      ...(keySecret !== undefined && member.info().encrypted ? { keySecret } : {}),
      ...(o.secrets ? { secrets: o.secrets } : {}),
    });
  } catch (e) {
    throw new CliError(`Could not open '${member.filename}': ${messageOf(e)}`);
  }
  try {
    await unlockBackingChain(drv, below, o.secrets, `Could not open '${member.filename}': `);
  } catch (e) {
    await drv.close().catch(() => {});
    throw e;
  }
  return drv;
}

/**
 * Refuse, as QEMU's open does, an image opened without the key it needs (and the encrypted images
 * of its backing chain): `errPrefix` + `Parameter 'encrypt.key-secret' is required for cipher`.
 */
export async function requireKeys(drv: BlockDriver, errPrefix: string): Promise<void> {
  if (isLocked(drv)) throw new CliError(errPrefix + KEY_SECRET_REQUIRED);
  await unlockBackingChain(drv, new Map(), undefined, errPrefix);
}

/** An encrypted image (qcow2 LUKS or AES, qcow v1 AES) opened without its key. */
function isLocked(d: BlockDriver): boolean {
  if (d instanceof Qcow2Driver) return d.info().encrypted === true && !d.cipher;
  if (d instanceof QcowDriver) return d.locked;
  return false;
}

/**
 * Reopen each encrypted (qcow2 or qcow) backing image with its key (`keys`: secret id by depth); refuse a
 * missing key as QEMU does (`errPrefix` + one `Could not open backing file: ` per level).
 */
async function unlockBackingChain(
  top: BlockDriver,
  keys: Map<number, string>,
  secrets: Map<string, Uint8Array> | undefined,
  errPrefix: string,
  provider: IOProvider = cliProvider,
): Promise<void> {
  let parent = top;
  for (let depth = 1; (parent instanceof Qcow2Driver || parent instanceof QcowDriver) && parent.backing; depth++) {
    const b: BlockDriver = parent.backing;
    const prefix = errPrefix + 'Could not open backing file: '.repeat(depth);
    const keySecret = keys.get(depth);
    if (isLocked(b)) {
      if (keySecret === undefined) throw new CliError(prefix + KEY_SECRET_REQUIRED);
      let nb: BlockDriver;
      try {
        nb = await openImage(b.filename, {
          io: provider,
          readOnly: true,
          format: b.format,
          keySecret,
          ...(secrets ? { secrets } : {}),
        });
      } catch (e) {
        throw new CliError(prefix + messageOf(e));
      }
      await b.close().catch(() => {});
      parent.backing = nb;
    }
    parent = parent.backing!;
  }
}

/**
 * Open an image argument read-write (with its backing chain unless `noBacking`), warning like
 * qemu-img when the format was probed as raw.
 */
export async function openWritable(arg: string, o: Omit<CliOpenOptions, 'writable'>, io: Io): Promise<BlockDriver> {
  const drv = await openChainForCli(arg, { ...o, writable: true });
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
    const [x, y] = await Promise.all([fsCalls.stat(a), fsCalls.stat(b)]);
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
