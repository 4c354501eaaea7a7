/** `qcowkit map`: qemu-img map's human table or JSON lines. */
import { mapImage, type MapEntry } from '../ops/map.js';
import { CliError, HelpRequested, UsageError } from './errors.js';
import { getopt } from './getopt.js';
import { parseOutputFormat, parseSizeArg, type OutputFormat } from './common.js';
import { secretsFromObjects } from './open.js';
import { openChainForCli } from './toolbox-common.js';
import type { Io } from './output.js';

const hex = (n: number) => (n === 0 ? '0' : `0x${n.toString(16)}`);

export function mapJsonLine(e: MapEntry): string {
  return (
    `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, ` +
    `"zero": ${e.zero}, "data": ${e.data}${e.offset !== undefined ? `, "offset": ${e.offset}` : ''}}`
  );
}

export const MAP_HUMAN_HEADER = `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`;

/** A human table line; '' for entries the table leaves out; throws for unmappable data. */
export function mapHumanLine(e: MapEntry): string {
  if (e.data && e.offset === undefined) throw new CliError('File contains external, encrypted or compressed clusters.');
  if (!e.data || e.zero) return '';
  return `${hex(e.start).padEnd(16)}${hex(e.length).padEnd(16)}${hex(e.offset ?? 0).padEnd(16)}${e.filename ?? ''}\n`;
}

export async function cmdMap(argv: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(argv, {
    short: ':f:hU',
    long: {
      help: false,
      format: true,
      output: true,
      object: true,
      'image-opts': false,
      'force-share': false,
      'start-offset': true,
      'max-length': true,
    },
  });
  let format: string | undefined;
  let outputArg = 'human';
  let imageOpts = false;
  let start = 0;
  let maxLength: number | undefined;
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
      case 'image-opts':
        imageOpts = true;
        break;
      case 'object':
        objects.push(o.value!);
        break;
      case 'start-offset':
        start = parseSizeArg('start offset', o.value!);
        break;
      case 'max-length':
        maxLength = parseSizeArg('max length', o.value!);
        break;
      default:
        break; // -U
    }
  }
  if (operands.length !== 1) throw new UsageError('Expecting one image file name');
  const output: OutputFormat = parseOutputFormat(outputArg);
  if (imageOpts && format !== undefined) throw new CliError('--image-opts and --format are mutually exclusive');
  const secrets = secretsFromObjects(objects);
  const drv = await openChainForCli(operands[0]!, {
    imageOpts,
    needKey: true,
    ...(format !== undefined ? { format } : {}),
    ...(secrets ? { secrets } : {}),
  });
  try {
    const entries = mapImage(drv, { start, ...(maxLength !== undefined ? { length: maxLength } : {}) });
    if (output === 'json') {
      let first = true;
      for await (const e of entries) {
        await io.out.writeSoon(`${first ? '[' : ',\n'}${mapJsonLine(e)}`);
        first = false;
      }
      if (first) {
        io.out.write(`[${mapJsonLine({ start, length: 0, depth: 0, present: false, zero: false, data: false })}`);
      }
      io.out.write(']\n');
    } else {
      io.out.write(MAP_HUMAN_HEADER);
      for await (const e of entries) await io.out.writeSoon(mapHumanLine(e));
    }
  } finally {
    await io.out.flush();
    await drv.close();
  }
  return 0;
}
