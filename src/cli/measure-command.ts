/**
 * `qcowkit measure [--output=human|json] [-O FMT] [-o OPTIONS] [--size N | [--object OBJ] [--image-opts] [-f FMT] [-l SNAPSHOT] FILE]`:
 * qemu-img 7.2's measure — how big a new image (raw by default, or qcow2 with its -o options) would
 * be for an empty disk of N bytes or for an image's content. Human text or JSON (QEMU key order);
 * "bitmaps" is reported when both the source (qcow2 v3) and the target (qcow2 compat 1.1) support
 * persistent bitmaps.
 */
import type { BlockDriver } from '../core/block-driver.js';
import { qjson } from '../core/qjson.js';
import { CreateOptions, isValidOptionList, mergedOpts } from '../formats/qcow2/create-options.js';
import { QCOW_MAX_L1_SIZE } from '../formats/qcow2/constants.js';
import { Qcow2Driver } from '../formats/qcow2/driver.js';
import { measure, type BitmapInfo, type MeasureTarget } from '../ops/measure.js';
import { parseOutputFormat } from './common.js';
import { parseSnapshotParam } from './convert.js';
import { CliError, HelpRequested, messageOf } from './errors.js';
import { getopt } from './getopt.js';
import { closeAll, secretsFromObjects } from './open.js';
import { openChainForCli } from './toolbox-common.js';
import { parseEncryptCreateChoice, resolveEncryptCreate } from '../formats/crypto/options.js';
import { checkLuksKeyMaterial, luksHeaderLength } from '../formats/crypto/luks.js';
import type { Io } from './output.js';
import { QEMU_FORMATS } from './rebase-command.js';
import { cvtnum } from './toolbox-common.js';

const SIZE_HINT_ONE_LINE =
  ' Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, respectively.';
const SIZE_HINT = '\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.';

/** qcow2_measure's reading of the creation options, with its messages and order. */
function qcow2Target(o: CreateOptions, secrets?: Map<string, Uint8Array>): MeasureTarget & { version: number; luks: boolean; luksBytes: number } {
  const fail = (m: string) => new CliError(m);
  const extendedL2 = o.bool('extended_l2');
  const cs = o.big('cluster_size') ?? 65536n;
  if (cs < 512n || cs > 2n * 1024n * 1024n || (cs & (cs - 1n)) !== 0n) {
    throw fail('Cluster size must be a power of two between 512 and 2048k');
  }
  if (extendedL2 && cs < 16384n) throw fail('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  const compat = o.str('compat');
  let version = 3;
  if (compat === '0.10') version = 2;
  else if (compat !== undefined && compat !== '1.1') throw fail(`Invalid compatibility level: '${compat}'`);
  const rb = o.has('refcount_bits') ? o.big('refcount_bits')! : 16n;
  if (rb > 64n || rb === 0n || (rb & (rb - 1n)) !== 0n) throw fail('Refcount width must be a power of two and may not exceed 64 bits');
  if (version < 3 && rb !== 16n) {
    throw fail('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  const p = o.str('preallocation') ?? 'off';
  if (!['off', 'metadata', 'falloc', 'full'].includes(p)) throw fail(`invalid parameter value: ${p}`);
  const luks = o.str('encrypt.format') === 'luks';
  let luksBytes = 0;
  if (luks) {
    // The LUKS header's clusters (QEMU makes a header to measure it: the secret must exist).
    try {
      const choice = parseEncryptCreateChoice((k) => o.str(k));
      if (choice?.format === 'luks') {
        resolveEncryptCreate(choice, secrets);
        checkLuksKeyMaterial(choice.luks);
        luksBytes = Math.ceil(luksHeaderLength(choice.luks) / Number(cs)) * Number(cs);
      }
    } catch (e) {
      throw fail(messageOf(e));
    }
  }
  return {
    format: 'qcow2',
    clusterSize: Number(cs),
    refcountBits: Number(rb),
    extendedL2,
    preallocation: p as MeasureTarget['preallocation'] & string,
    version,
    luks,
    luksBytes,
  };
}

export async function cmdMeasure(argv: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(argv, {
    short: ':hf:O:o:l:U',
    long: { help: false, 'image-opts': false, object: true, output: true, size: true, 'force-share': false },
  });
  let format: string | undefined;
  let outFormat = 'raw';
  const lists: string[] = [];
  let snapshot: { id?: string; name?: string } | undefined;
  let outputArg = 'human';
  let size: bigint | undefined;
  let imageOpts = false;
  const objects: string[] = [];
  for (const o of options) {
    const v = o.value!;
    switch (o.name) {
      case 'h':
      case 'help':
        throw new HelpRequested();
      case 'f':
        format = v;
        break;
      case 'O':
        outFormat = v;
        break;
      case 'o':
        if (!isValidOptionList(v)) throw new CliError(`Invalid option list: ${v}`);
        lists.push(v);
        break;
      case 'l':
        snapshot = parseSnapshotParam(v);
        break;
      case 'output':
        parseOutputFormat(v);
        outputArg = v;
        break;
      case 'size':
        size = cvtnum('image size', v);
        break;
      case 'image-opts':
        imageOpts = true;
        break;
      case 'object':
        objects.push(v);
        break;
      default:
        break; // -U
    }
  }
  const output = parseOutputFormat(outputArg);
  if (operands.length > 1) throw new CliError('At most one filename argument is allowed.');
  const file = operands[0];
  if (file === undefined && (imageOpts || format !== undefined || snapshot)) {
    throw new CliError('--image-opts, -f, and -l require a filename argument.');
  }
  if (file !== undefined && size !== undefined) throw new CliError('--size N cannot be used together with a filename.');
  if (file === undefined && size === undefined) throw new CliError('Either --size N or one filename must be specified.');
  if (imageOpts && format !== undefined) throw new CliError('--image-opts and --format are mutually exclusive');

  const secrets = secretsFromObjects(objects);
  let src: BlockDriver | undefined;
  try {
    if (file !== undefined) {
      src = await openChainForCli(file, {
        imageOpts,
        ...(format !== undefined ? { format } : {}),
        ...(snapshot ? { snapshot } : {}),
        ...(secrets ? { secrets } : {}),
      });
    }
    if (!QEMU_FORMATS.has(outFormat)) throw new CliError(`Unknown file format '${outFormat}'`);
    if (outFormat !== 'raw' && outFormat !== 'qcow2') {
      throw new CliError(`Block driver '${outFormat}' does not support size measurement`);
    }
    const opts = new CreateOptions(mergedOpts(outFormat));
    if (lists.length) {
      try {
        opts.parse(lists.join(','));
      } catch (e) {
        throw new CliError(`${messageOf(e).replace(SIZE_HINT_ONE_LINE, SIZE_HINT)}\nqcowkit: Invalid options for file format '${outFormat}'`);
      }
    }
    let target: MeasureTarget;
    let bitmapsSupported = false;
    let luksBytes = 0;
    if (outFormat === 'qcow2') {
      const t = qcow2Target(opts, secrets);
      luksBytes = t.luksBytes;
      target = t;
      bitmapsSupported = t.version >= 3;
    } else target = { format: 'raw' };

    if (target.format === 'qcow2') {
      const cs = BigInt(target.clusterSize!);
      const e = target.extendedL2 ? 16n : 8n;
      const v = ((src ? BigInt(src.size) : size!) + cs - 1n) / cs;
      const l2Tables = (v + cs / e - 1n) / (cs / e);
      if (l2Tables * e > BigInt(QCOW_MAX_L1_SIZE)) throw new CliError('The image size is too large (try using a larger cluster size)');
    }
    let result;
    try {
      if (src) {
        let bitmaps: BitmapInfo[] | undefined;
        if (bitmapsSupported && src instanceof Qcow2Driver && src.header.version >= 3) {
          bitmaps = src.bitmaps.map((b) => ({ name: b.name, granularity: 2 ** b.granularityBits }));
        }
        result = await measure(target, { driver: src, ...(bitmaps ? { bitmaps } : {}) });
      } else {
        result = await measure(target, { size: Number(size!) });
      }
    } catch (e) {
      throw e instanceof CliError ? e : new CliError(messageOf(e));
    }
    result = { ...result, required: result.required + luksBytes, fullyAllocated: result.fullyAllocated + luksBytes };
    if (output === 'json') {
      const out: Record<string, number> = { required: result.required, 'fully-allocated': result.fullyAllocated };
      if (result.bitmaps !== undefined) out.bitmaps = result.bitmaps;
      io.out.write(`${qjson(out)}\n`);
    } else {
      io.out.write(`required size: ${result.required}\nfully allocated size: ${result.fullyAllocated}\n`);
      if (result.bitmaps !== undefined) io.out.write(`bitmaps size: ${result.bitmaps}\n`);
    }
  } finally {
    await closeAll([src]);
  }
  return 0;
}
