/**
 * `qcowkit dd [--image-opts] [-U] [-f FMT] [-O OUTPUT_FMT] [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT`:
 * qemu-img 7.2's dd — creates OUTPUT (raw by default; qcow2 and qcow can be created too) and
 * copies the input range into it, with qemu-img's operand parsing, messages and arithmetic.
 */
import type { BlockDriver } from '../core/block-driver.js';
import { FileIO } from '../io/file.js';
import { fileProvider } from '../io/file.js';
import { createQcow } from '../formats/qcow/create.js';
import { createImage } from '../ops/create.js';
import { ddCopy, planDd } from '../ops/dd.js';
import { CliError, HelpRequested, messageOf } from './errors.js';
import { getopt } from './getopt.js';
import { closeAll, openForCli, secretsFromObjects } from './open.js';
import type { Io } from './output.js';
import { QEMU_FORMATS } from './rebase-command.js';
import { blockLength } from './resize-command.js';
import { cvtnum, openChainForCli, sameFile } from './toolbox-common.js';

const INT_MAX = 2147483647n;

/** Create the output image (qemu-img's bdrv_create with only a size). */
async function createOutput(file: string, format: string, size: number): Promise<void> {
  if (format === 'qcow') {
    const f = await FileIO.create(file);
    try {
      await createQcow(f, { size: Math.ceil(size / 512) * 512 });
    } finally {
      await f.close();
    }
    return;
  }
  try {
    await createImage({ filename: file, format, size: BigInt(size) }, fileProvider);
  } catch (e) {
    // createImage prefixes "FILE: "; qemu-img dd words it "FILE: error while creating output image: ..."
    const msg = messageOf(e);
    throw new Error(msg.startsWith(`${file}: `) ? msg.slice(file.length + 2) : msg);
  }
}

export async function cmdDd(argv: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(argv, {
    short: ':hf:O:U',
    long: { help: false, 'image-opts': false, 'force-share': false, object: true },
  });
  let format: string | undefined;
  let outFormat = 'raw';
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
      case 'O':
        outFormat = o.value!;
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
  let bs = 512n;
  let count: bigint | undefined;
  let skip: bigint | undefined;
  let input: string | undefined;
  let output: string | undefined;
  for (const arg of operands) {
    const eq = arg.indexOf('=');
    if (eq < 0) throw new CliError(`unrecognized operand ${arg}`);
    const key = arg.slice(0, eq);
    const value = arg.slice(eq + 1);
    switch (key) {
      case 'bs':
        bs = cvtnum('bs', value, 1n, INT_MAX);
        break;
      case 'count':
        count = cvtnum('count', value);
        break;
      case 'skip':
        skip = cvtnum('skip', value);
        break;
      case 'if':
        input = value;
        break;
      case 'of':
        output = value;
        break;
      default:
        throw new CliError(`unrecognized operand ${key}`);
    }
  }
  if (input === undefined || output === undefined) throw new CliError('Must specify both input and output files');
  if (imageOpts && format !== undefined) throw new CliError('--image-opts and --format are mutually exclusive');

  const src = await openChainForCli(input, { imageOpts, needKey: true, ...(format !== undefined ? { format } : {}), ...(secrets ? { secrets } : {}) });
  let dst: BlockDriver | undefined;
  try {
    if (!QEMU_FORMATS.has(outFormat)) throw new CliError('Unknown file format');
    if (outFormat !== 'raw' && outFormat !== 'qcow2' && outFormat !== 'qcow') {
      throw new CliError(`${output}: error while creating output image: creating '${outFormat}' images is not supported by qcowkit yet`);
    }
    const plan = planDd({ inputLength: blockLength(src), bs, ...(count !== undefined ? { count } : {}), ...(skip !== undefined ? { skip } : {}) });
    if (await sameFile(output, src.filename)) {
      throw new CliError(`${output}: error while creating output image: Failed to get "write" lock\nIs another process using the image [${output}]?`);
    }
    try {
      await createOutput(output, outFormat, plan.outSize);
    } catch (e) {
      throw new CliError(`${output}: error while creating output image: ${messageOf(e)}`);
    }
    dst = await openForCli(output, { writable: true, format: outFormat });
    if (plan.skipBeyondEnd) io.err.write(`qcowkit: ${input}: cannot skip to specified offset\n`);
    try {
      await ddCopy(src, dst, plan.from, plan.to);
    } catch (e) {
      throw new CliError(messageOf(e));
    }
    const d = dst;
    dst = undefined;
    await d.close();
  } finally {
    await closeAll([dst, src]);
  }
  return 0;
}
