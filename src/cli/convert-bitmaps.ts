/**
 * `convert --bitmaps [--skip-broken-bitmaps]`: copy the persistent dirty bitmaps of the source's
 * top image into the target, as qemu-img does — checked before anything is created (one source;
 * no inconsistent bitmap unless told to skip them), copied after the data (same name,
 * granularity and enabled state, then the bits merged in).
 *
 * qemu-img walks a node's bitmaps newest first (the reverse of the directory), so that is the
 * order of its checks and messages; the directory it writes keeps the source's order.
 */
import type { BlockDriver } from '../core/block-driver.js';
import { BME_FLAG_AUTO, BME_FLAG_IN_USE, type BitmapDirectoryEntry } from '../formats/qcow2/bitmap-directory.js';
import { Qcow2Driver } from '../formats/qcow2/driver.js';
import { CliError, messageOf } from './errors.js';
import type { Io } from './output.js';

/** The source's bitmaps in qemu-img's walking order (empty for formats without bitmaps). */
function walkOrder(src: BlockDriver): BitmapDirectoryEntry[] {
  return src instanceof Qcow2Driver ? [...src.bitmaps].reverse() : [];
}

/** Before the target is made: refuse what qemu-img refuses. */
export function checkSourceBitmaps(sources: readonly BlockDriver[], skipBroken: boolean): void {
  if (sources.length > 1) throw new CliError('Copying bitmaps only possible with single source');
  if (!supportsBitmaps(sources[0]!)) throw new CliError('Source lacks bitmap support');
  if (skipBroken) return;
  const broken = walkOrder(sources[0]!).find((b) => b.flags & BME_FLAG_IN_USE);
  if (broken) {
    throw new CliError(
      `Cannot copy inconsistent bitmap '${broken.name}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it`,
    );
  }
}

/** Only qcow2 v3 images store persistent bitmaps. */
function supportsBitmaps(d: BlockDriver): d is Qcow2Driver {
  return d instanceof Qcow2Driver && d.header.version >= 3;
}

/** Once the target is open: it must be able to store bitmaps. */
export function checkTargetBitmaps(target: BlockDriver): void {
  if (!supportsBitmaps(target)) {
    throw new CliError(`Format driver '${target.format}' does not support bitmaps`);
  }
}

/** After the data: create each bitmap in the target and merge the source's bits into it. */
export async function copyBitmaps(src: BlockDriver, target: Qcow2Driver, skipBroken: boolean, io: Io): Promise<void> {
  if (!(src instanceof Qcow2Driver)) return;
  const todo: BitmapDirectoryEntry[] = [];
  let failure: string | undefined;
  for (const b of walkOrder(src)) {
    if (b.flags & BME_FLAG_IN_USE) {
      if (skipBroken) io.err.write(`qcowkit: warning: Skipping inconsistent bitmap '${b.name}'\n`);
      continue;
    }
    if (target.bitmaps.some((t) => t.name === b.name)) {
      failure = `Failed to create bitmap ${b.name}: Bitmap already exists: ${b.name}`;
      break;
    }
    todo.push(b);
  }
  // Those qemu-img got to before a failure are made (in the source's order), then it stops.
  const ops = target.bitmapOps();
  for (const b of todo.reverse()) {
    try {
      await ops.add(b.name, { granularity: 2 ** b.granularityBits, disabled: !(b.flags & BME_FLAG_AUTO) });
    } catch (e) {
      throw new CliError(`Failed to create bitmap ${b.name}: ${messageOf(e)}`);
    }
    try {
      await ops.merge(b.name, await src.bitmapOps().readBits(b.name));
    } catch (e) {
      await ops.remove(b.name).catch(() => undefined);
      throw new CliError(`Failed to populate bitmap ${b.name}: ${messageOf(e)}`);
    }
  }
  if (failure) throw new CliError(failure);
}
