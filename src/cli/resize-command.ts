/**
 * `qcowkit resize [--object OBJ] [--image-opts] [-f FMT] [--preallocation=MODE] [-q] [--shrink] FILE [+|-]SIZE`:
 * qemu-img 7.2's resize. As in qemu-img the size is always the last argument (taken off before the
 * options are parsed, so `resize img -1M` needs no `--`); a leading + or - makes it relative.
 *
 * What the image formats do, as QEMU does it:
 * - qcow2: sizes must be multiples of 512; v2 images with snapshots cannot be resized; shrinking
 *   drops the clusters past the new end (allowed with snapshots on v3: they keep their own size);
 *   growing an overlay over a larger backing file makes the new area read as zeros; persistent
 *   bitmaps follow the new size (new area clean); preallocation (metadata/falloc/full) allocates
 *   the new area (qcowkit writes it as zeros in all three modes).
 * - raw: any size; the current size counts in whole sectors; full preallocation writes zeros.
 * - qcow (v1): not resizable.
 */
import type { BlockDriver } from '../core/block-driver.js';
import { QcowError } from '../core/errors.js';
import { BME_FLAG_AUTO } from '../formats/qcow2/bitmap-directory.js';
import { QCOW_MAX_L1_SIZE } from '../formats/qcow2/constants.js';
import { Qcow2Driver } from '../formats/qcow2/driver.js';
import { parseQemuSize, SizeParseError } from '../formats/qcow2/create-options.js';
import { RawDriver } from '../formats/raw/driver.js';
import { qprint } from './common.js';
import { CliError, HelpRequested, UsageError, messageOf } from './errors.js';
import { getopt } from './getopt.js';
import { closeAll, secretsFromObjects } from './open.js';
import type { Io } from './output.js';
import { openWritable } from './toolbox-common.js';

export type ResizePrealloc = 'off' | 'metadata' | 'falloc' | 'full';
const PREALLOC_MODES: readonly ResizePrealloc[] = ['off', 'metadata', 'falloc', 'full'];

const SIZE_HINT = 'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.';
const ZERO_CHUNK = 4 << 20;

/** Parse a `size` option value as qemu's QemuOpts does, with its messages. */
export function parseSizeOption(text: string, name = 'size'): bigint {
  try {
    return parseQemuSize(text);
  } catch (e) {
    if (e instanceof SizeParseError && e.kind === 'range') {
      throw new CliError(`Value '${text}' is out of range for parameter '${name}'`);
    }
    throw new CliError(`Parameter '${name}' expects a non-negative number below 2^64\n${SIZE_HINT}`);
  }
}

/** The image length qemu's block layer reports: raw files count in whole sectors. */
export function blockLength(drv: BlockDriver): number {
  return drv.format === 'raw' ? Math.ceil(drv.size / 512) * 512 : drv.size;
}

async function writeZeroData(drv: BlockDriver, from: number, to: number): Promise<void> {
  const zeros = new Uint8Array(Math.min(ZERO_CHUNK, Math.max(0, to - from)));
  for (let off = from; off < to; ) {
    const n = Math.min(zeros.length, to - off);
    await drv.write(off, n === zeros.length ? zeros : zeros.subarray(0, n));
    off += n;
  }
}

/**
 * Change the virtual size of an opened (writable) image the way qemu-img's resize (and amend's
 * size=) does. Throws with qemu's message when the format or image refuses.
 */
export async function resizeDriver(drv: BlockDriver, newSize: number, prealloc: ResizePrealloc = 'off'): Promise<void> {
  if (drv instanceof Qcow2Driver) {
    await resizeQcow2(drv, newSize, prealloc);
    return;
  }
  if (drv instanceof RawDriver) {
    if (prealloc === 'metadata') throw new QcowError('ENOTSUP', 'Unsupported preallocation mode: metadata');
    const old = drv.size;
    try {
      await drv.truncate(newSize);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      throw new QcowError('EIO', `Could not resize file: ${code === 'EFBIG' || code === 'EINVAL' ? 'File too large' : messageOf(e)}`);
    }
    if (prealloc === 'full' && newSize > old) await writeZeroData(drv, old, newSize);
    await drv.flush();
    return;
  }
  throw new QcowError('ENOTSUP', 'Image format driver does not support resize');
}

async function resizeQcow2(drv: Qcow2Driver, newSize: number, prealloc: ResizePrealloc): Promise<void> {
  if (newSize % 512) throw new QcowError('EINVAL', 'The new size must be a multiple of 512');
  if (drv.snapshots.length && drv.header.version < 3) {
    throw new QcowError('ENOTSUP', "Can't resize a v2 image which has snapshots");
  }
  const old = drv.size;
  if (newSize < old && prealloc !== 'off') throw new QcowError('ENOTSUP', "Preallocation can't be used for shrinking an image");
  if (newSize === old) return;
  if (newSize > old && Math.ceil(newSize / drv.g.l1Coverage) > QCOW_MAX_L1_SIZE / 8) {
    throw new QcowError('EFBIG', 'Failed to grow the L1 table: File too large');
  }

  // Persistent bitmaps follow the image size: keep their bits (the new area starts clean).
  const saved: Array<{ name: string; granularity: number; disabled: boolean; bits: Uint8Array }> = [];
  for (const b of drv.bitmaps) {
    const { bits, granularity } = await drv.bitmapOps().readBits(b.name);
    saved.push({ name: b.name, granularity, disabled: (b.flags & BME_FLAG_AUTO) === 0, bits });
  }

  // Shrinking with snapshots (v3) and zeroing the new area over a larger backing file: resize.ts.
  await drv.resize(newSize);
  if (newSize > old && (prealloc === 'falloc' || prealloc === 'full') && !drv.cipher && !drv.g.dataFile && old % drv.g.clusterSize === 0) {
    // QEMU's layout: refcount structures, then all the new data clusters in one area.
    await drv.writer!.preallocate(old, newSize, prealloc);
  } else if (newSize > old && prealloc !== 'off') {
    const cipher = drv.cipher;
    if (!cipher) {
      await writeZeroData(drv, old, newSize);
    } else {
      // Encrypted: QEMU allocates the new clusters without writing encrypted data, so they hold
      // plain zeros in the file (and read back as the decryption of zeros, as after qemu-img).
      const edge = Math.min(newSize, Math.ceil(old / drv.g.clusterSize) * drv.g.clusterSize);
      await writeZeroData(drv, old, edge);
      drv.cipher = { encrypt: async () => {}, decrypt: async () => {} };
      try {
        await writeZeroData(drv, edge, newSize);
      } finally {
        drv.cipher = cipher;
      }
    }
  }

  if (saved.length) {
    const ops = drv.bitmapOps();
    for (const s of saved) {
      await ops.remove(s.name);
      await ops.add(s.name, { granularity: s.granularity, disabled: s.disabled });
      const keepBits = Math.ceil(newSize / s.granularity);
      const bits = new Uint8Array(Math.ceil(keepBits / 8));
      bits.set(s.bits.subarray(0, bits.length));
      if (keepBits % 8 && bits.length) bits[bits.length - 1]! &= (1 << keepBits % 8) - 1;
      if (bits.some((x) => x !== 0)) await ops.merge(s.name, { bits, granularity: s.granularity });
    }
  }
  await drv.flush();
}

export async function cmdResize(argv: string[], io: Io): Promise<number> {
  if (argv.length < 3) throw new UsageError('Not enough arguments');
  // The size is the last argument, removed before option parsing (so "-1M" is not an option).
  const sizeArg = argv[argv.length - 1]!;
  const { options, operands } = getopt(argv.slice(0, -1), {
    short: ':f:hq',
    long: { help: false, object: true, 'image-opts': false, preallocation: true, shrink: false },
  });
  let format: string | undefined;
  let quiet = false;
  let shrink = false;
  let imageOpts = false;
  let prealloc: ResizePrealloc = 'off';
  const objects: string[] = [];
  for (const o of options) {
    switch (o.name) {
      case 'h':
      case 'help':
        throw new HelpRequested();
      case 'f':
        format = o.value!;
        break;
      case 'q':
        quiet = true;
        break;
      case 'preallocation':
        if (!(PREALLOC_MODES as readonly string[]).includes(o.value!)) {
          throw new CliError(`Invalid preallocation mode '${o.value}'`);
        }
        prealloc = o.value as ResizePrealloc;
        break;
      case 'shrink':
        shrink = true;
        break;
      case 'image-opts':
        imageOpts = true;
        break;
      case 'object':
        objects.push(o.value!);
        break;
      default:
        break;
    }
  }
  const secrets = secretsFromObjects(objects);
  if (operands.length !== 1) throw new UsageError('Expecting image file name and size');
  if (imageOpts && format !== undefined) throw new CliError('--image-opts and --format are mutually exclusive');
  const file = operands[0]!;

  let relative = 0n;
  let text = sizeArg;
  if (text.startsWith('+')) {
    relative = 1n;
    text = text.slice(1);
  } else if (text.startsWith('-')) {
    relative = -1n;
    text = text.slice(1);
  }
  const n = parseSizeOption(text);

  const drv = await openWritable(file, { imageOpts, ...(format !== undefined ? { format } : {}), ...(secrets ? { secrets } : {}) }, io);
  try {
    const current = BigInt(blockLength(drv));
    // int64 arithmetic as in qemu-img (a size of 2^63 or more wraps negative)
    const total = BigInt.asIntN(64, relative ? current + n * relative : n);
    if (total <= 0n) throw new CliError('New image size must be positive');
    if (total <= current && prealloc !== 'off') throw new CliError('Preallocation can only be used for growing images');
    if (total < current && !shrink) {
      io.err.write('qcowkit: Use the --shrink option to perform a shrink operation.\n');
      throw new CliError(
        "warning: Shrinking an image will delete all data beyond the shrunken image's end. " +
          'Before performing such an operation, make sure there is no important data there.',
      );
    }
    if (total > BigInt(Number.MAX_SAFE_INTEGER)) {
      if (drv instanceof Qcow2Driver) throw new CliError('Failed to grow the L1 table: File too large');
      if (drv instanceof RawDriver) throw new CliError('Could not resize file: File too large');
      throw new CliError('Image format driver does not support resize');
    }
    try {
      await resizeDriver(drv, Number(total), prealloc);
    } catch (e) {
      throw e instanceof CliError ? e : new CliError(messageOf(e));
    }
    await drv.close();
  } catch (e) {
    await closeAll([drv]);
    throw e;
  }
  qprint(io, quiet, 'Image resized.\n');
  return 0;
}
