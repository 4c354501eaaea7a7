/**
 * `qcowkit commit [--object OBJ] [--image-opts] [-q] [-f FMT] [-t CACHE] [-b BASE] [-r RATE] [-d] [-p] FILE`:
 * qemu-img 7.2's commit. The data FILE holds above BASE (default: its backing file) is written
 * into BASE (grown when smaller); FILE is then emptied unless -d is given (-b implies -d).
 * BASE is looked up in the backing chain by name the way qemu does (bdrv_find_backing_image: the
 * name resolved against each image's folder, compared with that image's backing file, both
 * canonicalised) and opened read-write on its own.
 */
import { realpathSync } from 'node:fs';
import type { BlockDriver } from '../core/block-driver.js';
import { RawDriver } from '../formats/raw/driver.js';
import { commit } from '../ops/commit.js';
import { combinePath } from '../ops/info.js';
import { checkCacheMode, qprint } from './common.js';
import { CliError, HelpRequested, UsageError, messageOf } from './errors.js';
import { getopt } from './getopt.js';
import { closeAll, secretsFromObjects } from './open.js';
import type { Io } from './output.js';
import { ProgressPrinter } from './progress.js';
import { cvtnum, deepestBackingKey, openChainMemberWritable, openWritable } from './toolbox-common.js';

function canonical(p: string): string | undefined {
  try {
    return realpathSync(p);
  } catch {
    return undefined;
  }
}

/** The backing file name an image stores (undefined: none). */
function storedBackingName(drv: BlockDriver): string | undefined {
  return drv.info().backingFilename;
}

/**
 * Find `name` in the backing chain of `top`: returns the chain depth of the matching image
 * (1 = direct backing file) or undefined.
 */
export function findBackingImage(top: BlockDriver, name: string): number | undefined {
  let depth = 0;
  for (let cur: BlockDriver | undefined = top; cur?.backing; cur = cur.backing, depth++) {
    const stored = storedBackingName(cur);
    if (stored === undefined) continue;
    const given = canonical(combinePath(cur.filename, name));
    if (given === undefined) continue;
    const backing = canonical(combinePath(cur.filename, stored));
    if (backing !== undefined && backing === given) return depth + 1;
  }
  return undefined;
}

export async function cmdCommit(argv: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(argv, {
    short: ':f:ht:b:dpqr:',
    long: { help: false, object: true, 'image-opts': false },
  });
  let format: string | undefined;
  let cache: string | undefined;
  let baseName: string | undefined;
  let keep = false;
  let progress = false;
  let quiet = false;
  let imageOpts = false;
  const objects: string[] = [];
  for (const o of options) {
    switch (o.name) {
      case 'h':
      case 'help':
        throw new HelpRequested();
      case 'f':
        format = o.value!;
        break;
      case 't':
        cache = o.value!;
        break;
      case 'b':
        baseName = o.value!;
        keep = true; // -b implies -d
        break;
      case 'd':
        keep = true;
        break;
      case 'p':
        progress = true;
        break;
      case 'q':
        quiet = true;
        break;
      case 'r':
        cvtnum('rate limit', o.value!); // accepted; qcowkit does not throttle
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
  if (quiet) progress = false;
  if (operands.length !== 1) throw new UsageError('Expecting one image file name');
  if (cache !== undefined) checkCacheMode(cache, false);
  if (imageOpts && format !== undefined) throw new CliError('--image-opts and --format are mutually exclusive');
  const file = operands[0]!;

  const top = await openWritable(file, { imageOpts, ...(format !== undefined ? { format } : {}), ...(secrets ? { secrets } : {}) }, io);
  let base: BlockDriver | undefined;
  try {
    let depth: number;
    if (baseName !== undefined) {
      const d = findBackingImage(top, baseName);
      // Images whose options name a backing key are known to QEMU by those options, not by name.
      if (d === undefined || d <= deepestBackingKey(file, imageOpts)) throw new CliError(`Did not find '${baseName}' in the backing chain of '${file}'`);
      depth = d;
    } else {
      if (!top.backing) throw new CliError('Image does not have a backing file');
      depth = 1;
    }
    let chainBase: BlockDriver = top;
    for (let i = 0; i < depth; i++) chainBase = chainBase.backing!;
    if (!keep && typeof (top as { makeEmpty?: unknown }).makeEmpty !== 'function') {
      throw new CliError(`Image format '${top.format}' cannot be emptied after a commit; use -d to keep its data`);
    }

    base = await openChainMemberWritable(file, { imageOpts, ...(secrets ? { secrets } : {}) }, depth, chainBase);
    if (base instanceof RawDriver && base.size < top.size) await base.truncate(top.size);

    const bar = new ProgressPrinter(io.out, progress, 1.0, 'absolute');
    bar.report(0, top.size);
    try {
      await commit(top, base, { baseDepth: depth, keep, onProgress: bar.report });
    } catch (e) {
      throw new CliError(messageOf(e));
    }
    bar.report(top.size, top.size);
    bar.end();
    const b = base;
    base = undefined;
    await b.close();
    await top.close();
  } catch (e) {
    await closeAll([base, top]);
    throw e;
  }
  qprint(io, quiet, 'Image committed.\n');
  return 0;
}
