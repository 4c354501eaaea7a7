/** `qcowkit compare`: qemu-img compare's messages and exit codes. */
import type { BlockDriver } from '../core/block-driver.js';
import { CompareFailure, compareImages } from '../ops/compare.js';
import { checkCacheMode, qprint } from './common.js';
import { CliError, HelpRequested, UsageError, messageOf } from './errors.js';
import { getopt } from './getopt.js';
import { closeAll, secretsFromObjects } from './open.js';
import { openChainForCli } from './toolbox-common.js';
import type { Io } from './output.js';
import { ProgressPrinter } from './progress.js';

export async function cmdCompare(argv: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(argv, {
    short: ':hf:F:T:pqsU',
    long: { help: false, object: true, 'image-opts': false, 'force-share': false },
  });
  let fmt1: string | undefined;
  let fmt2: string | undefined;
  let progress = false;
  let quiet = false;
  let strict = false;
  let imageOpts = false;
  let cache: string | undefined;
  const objects: string[] = [];
  for (const o of options) {
    switch (o.name) {
      case 'h':
      case 'help':
        throw new HelpRequested();
      case 'f':
        fmt1 = o.value!;
        break;
      case 'F':
        fmt2 = o.value!;
        break;
      case 'T':
        cache = o.value!;
        break;
      case 'p':
        progress = true;
        break;
      case 'q':
        quiet = true;
        break;
      case 's':
        strict = true;
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
  if (quiet) progress = false;
  if (operands.length !== 2) throw new UsageError('Expecting two image file names');
  if (imageOpts && (fmt1 !== undefined || fmt2 !== undefined)) {
    throw new CliError('--image-opts and --format are mutually exclusive', 2);
  }
  if (cache !== undefined) {
    try {
      checkCacheMode(cache, true);
    } catch (e) {
      throw new CliError(messageOf(e), 2);
    }
  }
  const [name1, name2] = [operands[0]!, operands[1]!];
  const bar = new ProgressPrinter(io.out, progress, 2.0, 'incremental');

  let a: BlockDriver | undefined;
  let b: BlockDriver | undefined;
  try {
    try {
      const secrets = secretsFromObjects(objects);
      const common = { imageOpts, needKey: true, ...(secrets ? { secrets } : {}) };
      a = await openChainForCli(name1, { ...common, ...(fmt1 !== undefined ? { format: fmt1 } : {}) });
      b = await openChainForCli(name2, { ...common, ...(fmt2 !== undefined ? { format: fmt2 } : {}) });
    } catch (e) {
      throw new CliError(messageOf(e), 2);
    }
    let result;
    try {
      result = await compareImages(a, b, {
        strict,
        onProgress: bar.report,
        onSizeMismatch: () => qprint(io, quiet, 'Warning: Image size mismatch!\n'),
        names: [name1, name2],
      });
    } catch (e) {
      if (e instanceof CompareFailure) throw new CliError(e.message, e.kind === 'read' ? 4 : 3);
      throw e;
    }
    let code: number;
    if (result.identical) {
      qprint(io, quiet, 'Images are identical.\n');
      code = 0;
    } else {
      if (result.reason === 'size') qprint(io, quiet, 'Strict mode: Image size mismatch!\n');
      else if (result.reason === 'block-status') qprint(io, quiet, `Strict mode: Offset ${result.offset} block status mismatch!\n`);
      else qprint(io, quiet, `Content mismatch at offset ${result.offset}!\n`);
      code = 1;
    }
    bar.end();
    return code;
  } finally {
    await closeAll([a, b]);
  }
}
