/**
 * `qcowkit rebase [--object OBJ] [--image-opts] [-U] [-q] [-f FMT] [-t CACHE] [-T SRC_CACHE] [-p] [-u] -b BACKING [-F BACKING_FMT] FILE`:
 * qemu-img 7.2's rebase. Safe mode opens the new backing image read-only (a relative name is
 * taken relative to FILE's folder), copies into FILE every range where the old and new backing
 * chains differ, then rewrites the header; `-u` only rewrites the backing name and format (and
 * `-u` without `-b` removes the backing file). `-b ""` removes the backing file.
 *
 * Every check qemu-img makes before changing the backing file (the new backing opens, a backing
 * format is given, the format can store a backing file) is made before anything is written, so a
 * refused rebase leaves the image untouched.
 */
import type { BlockDriver } from '../core/block-driver.js';
import { openImage } from '../block/open.js';
import { fileProvider } from '../io/file.js';
import { combinePath } from '../ops/info.js';
import { rebase } from '../ops/rebase.js';
import { checkCacheMode } from './common.js';
import { CliError, HelpRequested, UsageError, messageOf } from './errors.js';
import { getopt } from './getopt.js';
import { closeAll } from './open.js';
import type { Io } from './output.js';
import { ProgressPrinter } from './progress.js';
import { lockError, openWritable, sameFile } from './toolbox-common.js';

/** Format names qemu-img 7.2 knows (bdrv_find_format). */
export const QEMU_FORMATS = new Set([
  'raw', 'qcow2', 'qcow', 'luks', 'vmdk', 'vdi', 'vhdx', 'vpc', 'qed', 'parallels', 'dmg', 'bochs', 'cloop',
  'vvfat', 'file', 'host_device', 'host_cdrom', 'nbd', 'blkdebug', 'blkverify', 'null-co', 'null-aio',
  'copy-on-read', 'throttle', 'compress', 'quorum', 'replication', 'preallocate', 'snapshot-access',
]);

export async function cmdRebase(argv: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(argv, {
    short: ':hf:F:b:upt:T:qU',
    long: { help: false, object: true, 'image-opts': false, 'force-share': false },
  });
  let format: string | undefined;
  let backingFormat: string | undefined;
  let backing: string | undefined;
  let unsafe = false;
  let progress = false;
  let quiet = false;
  let cache: string | undefined;
  let srcCache: string | undefined;
  let imageOpts = false;
  for (const o of options) {
    switch (o.name) {
      case 'h':
      case 'help':
        throw new HelpRequested();
      case 'f':
        format = o.value!;
        break;
      case 'F':
        backingFormat = o.value!;
        break;
      case 'b':
        backing = o.value!;
        break;
      case 'u':
        unsafe = true;
        break;
      case 'p':
        progress = true;
        break;
      case 'q':
        quiet = true;
        break;
      case 't':
        cache = o.value!;
        break;
      case 'T':
        srcCache = o.value!;
        break;
      case 'image-opts':
        imageOpts = true;
        break;
      default:
        break; // -U, --object
    }
  }
  if (quiet) progress = false;
  if (operands.length !== 1) throw new UsageError('Expecting one image file name');
  if (!unsafe && backing === undefined) throw new UsageError('Must specify backing file (-b) or use unsafe mode (-u)');
  const file = operands[0]!;
  const bar = new ProgressPrinter(io.out, progress, 2.0, 'absolute');
  bar.report(0, 100);
  if (cache !== undefined) checkCacheMode(cache, false);
  if (srcCache !== undefined) checkCacheMode(srcCache, true);
  if (imageOpts && format !== undefined) throw new CliError('--image-opts and --format are mutually exclusive');

  const img = await openWritable(file, { imageOpts, noBacking: unsafe, ...(format !== undefined ? { format } : {}) }, io);
  let newBacking: BlockDriver | undefined;
  try {
    if (backingFormat !== undefined && !QEMU_FORMATS.has(backingFormat)) {
      throw new CliError(`Invalid format name: '${backingFormat}'`);
    }
    const name = backing ?? '';
    if (!unsafe && name) {
      const full = combinePath(img.filename, name);
      if (await sameFile(full, img.filename)) throw lockError(`Could not open new backing file '${name}': `, name);
      try {
        newBacking = await openImage(full, {
          io: fileProvider,
          readOnly: true,
          ...(backingFormat !== undefined ? { format: backingFormat } : {}),
        });
      } catch (e) {
        throw new CliError(`Could not open new backing file '${name}': ${messageOf(e)}`);
      }
    }
    if (name && backingFormat === undefined) {
      throw new CliError(`Could not change the backing file to '${name}': backing format must be specified`);
    }
    if (typeof (img as { setBackingFile?: unknown }).setBackingFile !== 'function') {
      throw new CliError(`Could not change the backing file to '${name}': Operation not supported`);
    }
    try {
      await rebase(img, {
        backingName: name,
        ...(backingFormat !== undefined ? { backingFormat } : {}),
        ...(newBacking ? { newBacking } : {}),
        unsafe,
        onProgress: (done, total) => bar.report(done, total),
      });
    } catch (e) {
      throw new CliError(messageOf(e));
    }
    bar.report(100, 100);
    const nb = newBacking;
    newBacking = undefined;
    await nb?.close();
    await img.close();
  } catch (e) {
    await closeAll([newBacking, img]);
    throw e;
  }
  bar.end();
  return 0;
}
