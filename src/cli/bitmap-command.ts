/**
 * `qcowkit bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]]
 *  [-g GRANULARITY] [--object OBJ] [--image-opts | -f FMT] FILE BITMAP`:
 * qemu-img 7.2's persistent dirty bitmap command. The operations run in the order given; the
 * first failure stops ("Operation OP on bitmap NAME failed: REASON", exit 1) and what was done
 * before it stays done, as with qemu-img.
 */
import type { BlockDriver } from '../core/block-driver.js';
import { BME_FLAG_IN_USE, BME_MAX_NAME_SIZE } from '../formats/qcow2/bitmap-directory.js';
import { Qcow2Driver } from '../formats/qcow2/driver.js';
import { CliError, HelpRequested, messageOf } from './errors.js';
import { getopt } from './getopt.js';
import { closeAll, openForCli, secretsFromObjects } from './open.js';
import type { Io } from './output.js';
import { cvtnum, lockError, openWritable, sameFile } from './toolbox-common.js';

type Op = { act: 'add' | 'remove' | 'clear' | 'enable' | 'disable' } | { act: 'merge'; src: string };

class OpFailure extends Error {}

/** QEMU's default granularity for a new bitmap: the cluster size, clamped to 4 KiB..64 KiB. */
export function defaultGranularity(drv: BlockDriver): number {
  const cs = drv.info().clusterSize;
  if (!cs) return 65536;
  return Math.min(65536, Math.max(4096, cs));
}

export async function cmdBitmap(argv: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(argv, {
    short: ':b:f:F:g:h',
    long: {
      help: false,
      object: true,
      'image-opts': false,
      add: false,
      remove: false,
      clear: false,
      enable: false,
      disable: false,
      merge: true,
      granularity: true,
    },
  });
  let srcFile: string | undefined;
  let format: string | undefined;
  let srcFormat: string | undefined;
  let granularity = 0n;
  let imageOpts = false;
  const objects: string[] = [];
  const ops: Op[] = [];
  for (const o of options) {
    switch (o.name) {
      case 'h':
      case 'help':
        throw new HelpRequested();
      case 'b':
        srcFile = o.value!;
        break;
      case 'f':
        format = o.value!;
        break;
      case 'F':
        srcFormat = o.value!;
        break;
      case 'g':
      case 'granularity':
        granularity = cvtnum('granularity', o.value!);
        break;
      case 'add':
      case 'remove':
      case 'clear':
      case 'enable':
      case 'disable':
        ops.push({ act: o.name });
        break;
      case 'merge':
        ops.push({ act: 'merge', src: o.value! });
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
  if (!ops.length) throw new CliError('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
  if (granularity && !ops.some((o) => o.act === 'add')) throw new CliError('granularity only supported with --add');
  if (srcFormat !== undefined && srcFile === undefined) throw new CliError('-F only supported with -b');
  if (srcFile !== undefined && !ops.some((o) => o.act === 'merge')) {
    throw new CliError('Merge bitmap source file only supported with --merge');
  }
  if (operands.length !== 2) throw new CliError('Expecting filename and bitmap name');
  if (imageOpts && format !== undefined) throw new CliError('--image-opts and --format are mutually exclusive');
  const [file, name] = [operands[0]!, operands[1]!];

  const drv = await openWritable(
    file,
    { imageOpts, noBacking: true, ...(format !== undefined ? { format } : {}), ...(secrets ? { secrets } : {}) },
    io,
  );
  let src: BlockDriver | undefined;
  try {
    if (srcFile !== undefined) {
      if (await sameFile(srcFile, drv.filename)) throw lockError(`Could not open '${srcFile}': `, srcFile);
      // qemu-img opens the source by name and format only: an encrypted one cannot get its key.
      src = await openForCli(srcFile, { noBacking: true, needKey: true, ...(srcFormat !== undefined ? { format: srcFormat } : {}) });
    }
    for (const op of ops) {
      try {
        await runOp(drv, src ?? drv, op, name, granularity);
      } catch (e) {
        throw new CliError(`Operation ${op.act} on bitmap ${name} failed: ${messageOf(e)}`);
      }
    }
    const s = src;
    src = undefined;
    await s?.close();
    await drv.close();
  } catch (e) {
    await closeAll([src, drv]);
    throw e;
  }
  return 0;
}

function notFound(name: string): OpFailure {
  return new OpFailure(`Dirty bitmap '${name}' not found`);
}

function inconsistent(name: string): OpFailure {
  return new OpFailure(
    `Bitmap '${name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk`,
  );
}

async function runOp(drv: BlockDriver, src: BlockDriver, op: Op, name: string, granularity: bigint): Promise<void> {
  const q = drv instanceof Qcow2Driver ? drv : undefined;
  const find = (d: BlockDriver, n: string) => (d instanceof Qcow2Driver ? d.bitmaps.find((b) => b.name === n) : undefined);
  switch (op.act) {
    case 'add': {
      if (name === '') throw new OpFailure('Bitmap name cannot be empty');
      let gran: number;
      if (granularity) {
        const g32 = Number(granularity & 0xffffffffn); // qemu passes it as a uint32
        if (g32 < 512 || (g32 & (g32 - 1)) !== 0) throw new OpFailure('Granularity must be power of 2 and at least 512');
        gran = g32;
      } else gran = defaultGranularity(drv);
      if (!q) throw new OpFailure(`Can't store persistent bitmaps to ${drv.filename}: Operation not supported`);
      const where = `Can't make bitmap '${name}' persistent in '${drv.filename}': `;
      if (q.header.version < 3) throw new OpFailure(`${where}Cannot store dirty bitmaps in qcow2 v2 files`);
      if (new TextEncoder().encode(name).length > BME_MAX_NAME_SIZE) {
        throw new OpFailure(`${where}Name length exceeds maximum (${BME_MAX_NAME_SIZE} characters)`);
      }
      if (q.bitmaps.length >= 65535) throw new OpFailure(`${where}Maximum number of persistent bitmaps is already reached`);
      if (find(q, name)) throw new OpFailure(`Bitmap already exists: ${name}`);
      await q.bitmapOps().add(name, { granularity: gran });
      return;
    }
    case 'remove':
      if (!q || !find(q, name)) throw notFound(name);
      await q.bitmapOps().remove(name);
      return;
    case 'clear':
    case 'enable':
    case 'disable': {
      const b = q ? find(q, name) : undefined;
      if (!q || !b) throw notFound(name);
      if (b.flags & BME_FLAG_IN_USE) throw inconsistent(name);
      if (op.act === 'clear') await q.bitmapOps().clear(name);
      else await q.bitmapOps().setEnabled(name, op.act === 'enable');
      return;
    }
    case 'merge': {
      const dst = q ? find(q, name) : undefined;
      if (!q || !dst) throw notFound(name);
      const s = find(src, op.src);
      if (!s) throw notFound(op.src);
      if (dst.flags & BME_FLAG_IN_USE) throw inconsistent(name);
      if (s.flags & BME_FLAG_IN_USE) throw inconsistent(op.src);
      if (src.size !== drv.size) {
        throw new OpFailure(
          `Bitmaps are of different sizes (destination size is ${drv.size}, source size is ${src.size}) and can't be merged`,
        );
      }
      const bits = await (src as Qcow2Driver).bitmapOps().readBits(op.src);
      await q.bitmapOps().merge(name, bits);
      return;
    }
  }
}
