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
import { closeAll, resolveImageArg, secretsFromObjects } from './open.js';
import type { Io } from './output.js';
import { ProgressPrinter } from './progress.js';
import { lockError, openWritable, requireKeys, sameFile, splitBackingKeySecrets } from './toolbox-common.js';

/** Format names qemu-img 7.2 knows (bdrv_find_format). */
export const QEMU_FORMATS = new Set([
  'raw', 'qcow2', 'qcow', 'luks', 'vmdk', 'vdi', 'vhdx', 'vpc', 'qed', 'parallels', 'dmg', 'bochs', 'cloop',
  'vvfat', 'file', 'host_device', 'host_cdrom', 'nbd', 'blkdebug', 'blkverify', 'null-co', 'null-aio',
  'copy-on-read', 'throttle', 'compress', 'quorum', 'replication', 'preallocate', 'snapshot-access',
]);

/**
 * The name QEMU gives an image opened with key secrets in `--image-opts` (its own
 * `encrypt.key-secret`, or `backing.…encrypt.key-secret`): a `json:{...}` pseudo-filename, against
 * which no relative backing name can be resolved. Undefined when QEMU keeps the plain file name.
 */
function optionsFilename(arg: string, imageOpts: boolean, img: BlockDriver): string | undefined {
  if (!imageOpts) return undefined;
  const spec = resolveImageArg(arg, { imageOpts });
  const keys = splitBackingKeySecrets(arg).keys;
  if (spec.keySecret !== undefined) keys.set(0, spec.keySecret);
  if (!keys.size) return undefined;
  const deepest = Math.max(...keys.keys());
  // QEMU's QDict happens to print these keys in this order.
  const node = (drv: BlockDriver, depth: number, filename: string): string => {
    const parts: string[] = [];
    if (depth < deepest && drv.backing) parts.push(`"backing": ${node(drv.backing, depth + 1, drv.backing.filename)}`);
    const key = keys.get(depth);
    if (key !== undefined) parts.push(`"encrypt.key-secret": ${JSON.stringify(key)}`);
    parts.push(`"driver": ${JSON.stringify(drv.format)}`);
    parts.push(`"file": {"driver": "file", "filename": ${JSON.stringify(filename)}}`);
    return `{${parts.join(', ')}}`;
  };
  return `json:${node(img, 0, spec.filename)}`;
}

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
  const objects: string[] = [];
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
      case 'object':
        objects.push(o.value!);
        break;
      default:
        break; // -U
    }
  }
  const secrets = secretsFromObjects(objects);
  if (quiet) progress = false;
  if (operands.length !== 1) throw new UsageError('Expecting one image file name');
  if (!unsafe && backing === undefined) throw new UsageError('Must specify backing file (-b) or use unsafe mode (-u)');
  const file = operands[0]!;
  const bar = new ProgressPrinter(io.out, progress, 2.0, 'absolute');
  bar.report(0, 100);
  if (cache !== undefined) checkCacheMode(cache, false);
  if (srcCache !== undefined) checkCacheMode(srcCache, true);
  if (imageOpts && format !== undefined) throw new CliError('--image-opts and --format are mutually exclusive');

  const img = await openWritable(
    file,
    { imageOpts, noBacking: unsafe, ...(format !== undefined ? { format } : {}), ...(secrets ? { secrets } : {}) },
    io,
  );
  let newBacking: BlockDriver | undefined;
  try {
    if (backingFormat !== undefined && !QEMU_FORMATS.has(backingFormat)) {
      throw new CliError(`Invalid format name: '${backingFormat}'`);
    }
    const name = backing ?? '';
    if (!unsafe && name) {
      const json = optionsFilename(file, imageOpts, img);
      if (json !== undefined && !name.startsWith('/')) {
        throw new CliError(`Could not resolve backing filename: Cannot use relative backing file names for '${json}'`);
      }
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
      // qemu-img opens the new backing file with no options but its format: an encrypted one
      // (or one over an encrypted backing file) cannot be given its key.
      await requireKeys(newBacking, `Could not open new backing file '${name}': `);
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
