/** `qcowkit info`: qemu-img info's human text or JSON, optionally for the whole backing chain. */
import type { BlockDriver } from '../core/block-driver.js';
import { qjson } from '../core/qjson.js';
import { collectBackingChainInfo, collectImageInfo, type ImageInfo } from '../ops/info.js';
import { parseOutputFormat } from './common.js';
import { CliError, HelpRequested, UsageError, messageOf } from './errors.js';
import { getopt } from './getopt.js';
import { humanImageInfo } from './info-format.js';
import { openForCli, secretsFromObjects } from './open.js';
import type { Io } from './output.js';

export async function cmdInfo(argv: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(argv, {
    short: ':f:hU',
    long: {
      help: false,
      format: true,
      output: true,
      'backing-chain': false,
      object: true,
      'image-opts': false,
      'force-share': false,
    },
  });
  let format: string | undefined;
  let outputArg = 'human';
  let chain = false;
  let imageOpts = false;
  const objects: string[] = [];
  for (const o of options) {
    switch (o.name) {
      case 'h':
      case 'help':
        throw new HelpRequested();
      case 'f':
      case 'format':
        format = o.value!;
        break;
      case 'output':
        outputArg = o.value!;
        break;
      case 'backing-chain':
        chain = true;
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
  if (operands.length !== 1) throw new UsageError('Expecting one image file name');
  const output = parseOutputFormat(outputArg);
  if (imageOpts && format !== undefined) throw new CliError('--image-opts and --format are mutually exclusive');
  const top = operands[0]!;
  const secrets = secretsFromObjects(objects);

  let infos: ImageInfo[];
  const openOne = (name: string, fmt: string | undefined): Promise<BlockDriver> =>
    openForCli(name, {
      noUnlock: true,
      noBacking: true,
      imageOpts: imageOpts && name === top,
      ...(secrets ? { secrets } : {}),
      ...(fmt !== undefined ? { format: fmt } : {}),
    });
  if (chain) {
    try {
      infos = await collectBackingChainInfo(top, format, openOne);
    } catch (e) {
      throw e instanceof CliError ? e : new CliError(messageOf(e));
    }
  } else {
    const drv = await openOne(top, format);
    try {
      infos = [await collectImageInfo(drv)];
    } finally {
      await drv.close();
    }
  }
  if (output === 'json') io.out.write(`${qjson(chain ? infos : infos[0])}\n`);
  else io.out.write(infos.map(humanImageInfo).join('\n'));
  return 0;
}
