/** `qcowkit convert`: qemu-img convert's options and messages; raw output for now. */
import * as fsCalls from '../io/fs-calls.js';
import type { BlockDriver } from '../core/block-driver.js';
import { FileIO } from '../io/file.js';
import { isHttpUrl, urlProtocol } from '../io/http.js';
import { ConvertFailure, convertImages, convertedSize } from '../ops/convert.js';
import { checkCacheMode, parseSizeArg } from './common.js';
import { CliError, HelpRequested, messageOf } from './errors.js';
import { getopt } from './getopt.js';
import { parseQemuOpts } from './image-opts.js';
import { closeAll, resolveImageArg, secretsFromObjects } from './open.js';
import { openChainForCli } from './toolbox-common.js';
import type { Io } from './output.js';
import { ProgressPrinter } from './progress.js';
import { RawFileTarget } from './raw-target.js';
import { convertToImage } from './convert-image.js';
import { checkSourceBitmaps } from './convert-bitmaps.js';
import { writeCreateOptionsHelp } from './create-command.js';

/** Formats qemu-img 7.2 knows; converting to any but raw is a later qcowkit feature. */
const KNOWN_FORMATS = new Set([
  'raw', 'qcow2', 'qcow', 'luks', 'vmdk', 'vdi', 'vhdx', 'vpc', 'qed', 'parallels', 'dmg', 'bochs', 'cloop', 'file',
]);
const MAX_SPARSE = 16 * 1024 * 1024;

interface ConvertArgs {
  format?: string;
  outFormat?: string;
  quiet: boolean;
  progress: boolean;
  skipCreate: boolean;
  targetIsZero: boolean;
  compress: boolean;
  backing?: string;
  backingFormat?: string;
  createOpts: string[];
  snapshot?: { id?: string; name?: string };
  minSparse: number;
  coroutines: number;
  cache?: string;
  imageOpts: boolean;
  targetImageOpts: boolean;
  bitmaps: boolean;
  skipBrokenBitmaps: boolean;
  objects: string[];
}

/** `-l`: `snapshot.id=ID,snapshot.name=NAME` or a bare ID-or-name. */
export function parseSnapshotParam(text: string): { id?: string; name?: string } {
  if (!text.includes('=')) return { name: text };
  const out: { id?: string; name?: string } = {};
  for (const [k, v] of parseQemuOpts(text)) {
    if (k === 'snapshot.id') out.id = v;
    else if (k === 'snapshot.name') out.name = v;
    else throw new CliError(`Invalid parameter '${k}'\nqcowkit: Failed in parsing snapshot param '${text}'`);
  }
  return out;
}

function parseArgs(argv: string[]): { args: ConvertArgs; operands: string[] } {
  const { options, operands } = getopt(argv, {
    short: ':hf:O:B:F:Cco:l:S:pt:T:qnm:WUr:',
    long: {
      help: false,
      object: true,
      'image-opts': false,
      'target-image-opts': false,
      salvage: false,
      'target-is-zero': false,
      'force-share': false,
      bitmaps: false,
      'skip-broken-bitmaps': false,
    },
  });
  const a: ConvertArgs = {
    quiet: false, progress: false, skipCreate: false, targetIsZero: false, compress: false, createOpts: [],
    minSparse: 4096, coroutines: 8, imageOpts: false, targetImageOpts: false, bitmaps: false, skipBrokenBitmaps: false, objects: [],
  };
  for (const o of options) {
    const v = o.value!;
    switch (o.name) {
      case 'h': case 'help': throw new HelpRequested();
      case 'f': a.format = v; break;
      case 'O': a.outFormat = v; break;
      case 'B': a.backing = v; break;
      case 'F': a.backingFormat = v; break;
      case 'c': a.compress = true; break;
      case 'o': a.createOpts.push(v); break;
      case 'l': a.snapshot = parseSnapshotParam(v); break;
      case 'S': {
        const n = parseSizeArg('buffer size for sparse output', v);
        if (n % 512 !== 0 || n > MAX_SPARSE) {
          throw new CliError(
            `Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to ${MAX_SPARSE}. ` +
              'Select 0 to disable sparse detection (fully allocates output).',
          );
        }
        a.minSparse = n;
        break;
      }
      case 'p': a.progress = true; break;
      case 'q': a.quiet = true; break;
      case 'n': a.skipCreate = true; break;
      case 't': checkCacheMode(v, false); a.cache = v; break;
      case 'T': checkCacheMode(v, true); break;
      case 'm': {
        const n = /^[0-9]+$/.test(v) ? Number(v) : NaN;
        if (!(n >= 1 && n <= 16)) throw new CliError('Invalid number of coroutines. Allowed number of coroutines is between 1 and 16');
        a.coroutines = n;
        break;
      }
      case 'r': parseSizeArg('rate limit', v); break; // accepted; qcowkit does not throttle
      case 'image-opts': a.imageOpts = true; break;
      case 'target-image-opts': a.targetImageOpts = true; break;
      case 'target-is-zero': a.targetIsZero = true; break;
      case 'bitmaps': a.bitmaps = true; break;
      case 'skip-broken-bitmaps': a.skipBrokenBitmaps = true; break;
      case 'object': a.objects.push(v); break;
      default: break; // -C, -W, -U, --salvage
    }
  }
  if (a.quiet) a.progress = false;
  return { args: a, operands };
}

/** `-o` for a raw target: only what makes sense for a plain file. Returns whether to preallocate. */
function rawCreateOptions(list: string[]): boolean {
  let prealloc = false;
  for (const text of list) {
    for (const [k, v] of parseQemuOpts(text)) {
      if (k === 'preallocation') {
        if (!['off', 'falloc', 'full'].includes(v)) throw new CliError(`Invalid parameter '${v}'`);
        prealloc = v !== 'off';
      } else if (k !== 'size' && k !== 'extent_size_hint' && k !== 'nocow') throw new CliError(`Invalid parameter '${k}'`);
    }
  }
  return prealloc;
}

async function isDevice(name: string): Promise<boolean> {
  try {
    const st = await fsCalls.stat(name);
    return st.isBlockDevice() || st.isCharacterDevice();
  } catch {
    return false;
  }
}

async function sameFile(a: string, b: string): Promise<boolean> {
  try {
    const [x, y] = await Promise.all([fsCalls.stat(a), fsCalls.stat(b)]);
    return x.dev === y.dev && x.ino === y.ino;
  } catch {
    return false;
  }
}

export async function cmdConvert(argv: string[], io: Io): Promise<number> {
  const { args: a, operands } = parseArgs(argv);
  if (a.targetIsZero && !a.skipCreate) throw new CliError('--target-is-zero requires use of -n flag');
  if (a.targetImageOpts && !a.skipCreate) throw new CliError('--target-image-opts requires use of -n flag');
  if (a.skipCreate && a.createOpts.length) throw new CliError('-o has no effect when skipping image creation');
  if (a.imageOpts && a.format !== undefined) throw new CliError('--image-opts and --format are mutually exclusive');
  if (a.targetImageOpts && a.outFormat !== undefined) throw new CliError('--image-opts and --format are mutually exclusive');
  if (a.skipBrokenBitmaps && !a.bitmaps) throw new CliError('Use of --skip-broken-bitmaps requires --bitmaps');
  if (a.createOpts.length && createOptionsAskHelp(a.createOpts)) {
    // As create -f FMT -o help; the target's name (with at least one source) adds the file options.
    writeCreateOptionsHelp(io, a.outFormat ?? 'raw', operands.length >= 2);
    return 0;
  }
  if (operands.length < 2) throw new CliError('Must specify image file name');
  const srcArgs = operands.slice(0, -1);
  const dstArg = operands[operands.length - 1]!;
  if (a.snapshot && srcArgs.length > 1) throw new CliError('No support for concatenating multiple snapshot');

  const sources: BlockDriver[] = [];
  const secrets = secretsFromObjects(a.objects);
  try {
    for (const s of srcArgs) {
      sources.push(
        await openChainForCli(s, {
          imageOpts: a.imageOpts,
          needKey: true,
          ...(secrets ? { secrets } : {}),
          ...(a.format !== undefined ? { format: a.format } : {}),
          ...(a.snapshot ? { snapshot: a.snapshot } : {}),
        }),
      );
    }
    if (a.bitmaps) checkSourceBitmaps(sources, a.skipBrokenBitmaps);
    return await convertTo(a, sources, dstArg, io, secrets);
  } finally {
    await closeAll(sources);
  }
}

function createOptionsAskHelp(list: string[]): boolean {
  return list.some((t) => parseQemuOpts(t).some(([k]) => k === 'help' || k === '?'));
}

async function convertTo(a: ConvertArgs, sources: BlockDriver[], dstArg: string, io: Io, secrets?: Map<string, Uint8Array>): Promise<number> {
  const targetKeySecret = a.targetImageOpts ? resolveImageArg(dstArg, { imageOpts: true }).keySecret : undefined;
  const outFormat = a.targetImageOpts ? resolveImageArg(dstArg, { imageOpts: true }).format ?? 'raw' : a.outFormat ?? 'raw';
  const dstFile = a.targetImageOpts ? resolveImageArg(dstArg, { imageOpts: true }).filename : dstArg;
  if (!KNOWN_FORMATS.has(outFormat)) throw new CliError(`Unknown file format '${outFormat}'`);
  if (isHttpUrl(dstFile)) throw new CliError(`Protocol driver '${urlProtocol(dstFile)}' does not support image creation`);
  if (outFormat === 'qcow2' || outFormat === 'qcow') {
    for (const src of sources) {
      for (let d: BlockDriver | undefined = src; d; d = d.backing) {
        if (await sameFile(dstFile, d.filename)) {
          throw new CliError(`${dstArg}: error while converting ${outFormat}: Failed to get "write" lock\nIs another process using the image [${dstFile}]?`);
        }
      }
    }
    return convertToImage(
      {
        outFormat,
        dstFile,
        dstArg,
        createOpts: a.createOpts,
        ...(a.backing !== undefined ? { backing: a.backing } : {}),
        ...(a.backingFormat !== undefined ? { backingFormat: a.backingFormat } : {}),
        compress: a.compress,
        skipCreate: a.skipCreate,
        targetIsZero: a.targetIsZero,
        ...(a.bitmaps ? { bitmaps: { skipBroken: a.skipBrokenBitmaps } } : {}),
        minSparse: a.minSparse,
        coroutines: a.coroutines,
        progress: a.progress,
        ...(a.cache !== undefined ? { cache: a.cache } : {}),
        ...(secrets ? { secrets } : {}),
        ...(targetKeySecret !== undefined ? { targetKeySecret } : {}),
      },
      sources,
      io,
    );
  }
  if (outFormat !== 'raw') throw new CliError(`convert -O ${outFormat} is not supported yet`);
  if (a.compress) throw new CliError('Compression not supported for this file format');
  if (a.backing !== undefined) throw new CliError("Backing file not supported for file format 'raw'");
  if (a.bitmaps) throw new CliError("Format driver 'raw' does not support bitmaps");
  const prealloc = rawCreateOptions(a.createOpts);

  const inputs: string[] = [];
  for (const src of sources) for (let d: BlockDriver | undefined = src; d; d = d.backing) inputs.push(d.filename);
  for (const input of inputs) {
    if (await sameFile(dstFile, input)) {
      throw new CliError(
        `${dstArg}: error while converting raw: Failed to get "write" lock\nIs another process using the image [${dstFile}]?`,
      );
    }
  }

  const total = convertedSize(sources);
  let file: FileIO;
  let device = false;
  if (a.skipCreate) {
    try {
      file = await FileIO.open(dstFile, { readOnly: false });
    } catch (e) {
      throw new CliError(`Could not open '${dstArg}': ${messageOf(e)}`);
    }
    if ((await file.size()) < total) {
      await file.close();
      throw new CliError('output file is smaller than input file');
    }
  } else if (await isDevice(dstFile)) {
    // a block/character device is used as it is (QEMU's host_device driver): it cannot grow
    file = await FileIO.open(dstFile, { readOnly: false });
    if ((await file.size()) < total) {
      await file.close();
      throw new CliError(`${dstArg}: error while converting raw: Cannot grow device files`);
    }
    device = true;
  } else {
    let made: FileIO | undefined;
    try {
      made = await FileIO.create(dstFile);
      await made.truncate(total);
      // Like QEMU's file driver, allocate the first block of a new file (it probes alignment there).
      if (total > 0) await made.write(new Uint8Array(Math.min(4096, total)), 0);
    } catch (e) {
      if (made) {
        await made.close().catch(() => {});
        await fsCalls.removeFile(dstFile).catch(() => {});
      }
      throw new CliError(`${dstArg}: error while converting raw: ${messageOf(e)}`);
    }
    file = made;
  }

  const created = !a.skipCreate && !device;
  const fullAlloc = a.minSparse === 0 || prealloc;
  const target = new RawFileTarget(file, {
    zeroInit: (created && !prealloc) || a.targetIsZero,
    sync: a.cache !== undefined && a.cache !== 'unsafe',
    unmap: !fullAlloc,
  });
  const bar = new ProgressPrinter(io.out, a.progress, 1.0, 'absolute');
  try {
    // the copy's reads overlap on the thread pool (metadata reads too: measured slower on this thread)
    fsCalls.setQuickCallsOnThisThread(false);
    await convertImages(sources, target, {
      // preallocation: every byte is written, as with -S 0
      minSparse: prealloc ? 0 : a.minSparse,
      concurrency: a.coroutines,
      ...(a.progress ? { onProgress: bar.report } : {}),
    });
    await file.close();
  } catch (e) {
    await file.close().catch(() => {});
    if (created) await fsCalls.removeFile(dstFile).catch(() => {});
    if (e instanceof ConvertFailure) throw new CliError(e.message);
    throw e;
  }
  bar.end();
  return 0;
}
