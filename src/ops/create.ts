/**
 * `create`: a new qcow2 or raw image, following qemu-img 7.2's bdrv_img_create step by step —
 * option parsing, backing file checks (the backing image is opened read-only to validate it and to
 * take its size when none is given), the "Formatting ..." line, then the format's creation. Every
 * message carries qemu-img's "<filename>: " prefix. A failure after the file was created removes it
 * (qemu-img removes the qcow2 file — and its data file — even when they existed before).
 */
import { writeZeroRange, type ByteIO, type IOProvider } from '../core/byte-io.js';
import { QcowError } from '../core/errors.js';
import { openImage } from '../block/open.js';
import {
  CreateOptions,
  OTHER_QEMU_FORMATS,
  formattingLine,
  mergedOpts,
  qcow2ParamsFromOptions,
  rawPreallocation,
  type CreateFormat,
  type Preallocation,
  type Qcow2CreateParams,
} from '../formats/qcow2/create-options.js';
import { computeQcow2Layout, writeQcow2Layout, type WriteLayoutExtra } from '../formats/qcow2/create.js';
import { parseEncryptCreateChoice, resolveEncryptCreate } from '../formats/crypto/options.js';
import { createQcow, QCOW_CREATE_OPTS } from '../formats/qcow/create.js';
import { buildQcow2LuksHeader } from '../formats/crypto/qcow2.js';

export interface CreateImageRequest {
  filename: string;
  /** `-f` (default raw). */
  format?: string;
  /** The SIZE argument, already parsed (undefined when not given). */
  size?: bigint;
  /** Each `-o` argument, in order. */
  options?: string[];
  /** `-b` */
  backingFile?: string;
  /** `-F` */
  backingFormat?: string;
  /** `-u`: do not open the backing image (a size is then required). */
  noBackingOpen?: boolean;
  /** Called with qemu-img's "Formatting '...', fmt=..." line before the image is written. */
  onFormatting?: (line: string) => void;
  /** Non-fatal warnings (qemu-img's "warning: ..." lines), without prefix. */
  onWarning?: (message: string) => void;
  /** Secrets by id (`--object secret,...`), for `encrypt.key-secret`. */
  secrets?: ReadonlyMap<string, Uint8Array>;
}

export interface CreateImageResult {
  format: CreateFormat | 'qcow';
  /** Virtual size as given/derived (before rounding). */
  size: bigint;
  formatting: string;
  qcow2?: Qcow2CreateParams;
  /** `encrypt.key-secret` of an encrypted image (what opening it needs). */
  keySecret?: string;
}

const U64_MAX = (1n << 64n) - 1n;

/** qemu's path_combine: a relative name is taken relative to the folder of `base`. */
export function combinePath(base: string, name: string): string {
  if (name.startsWith('/')) return name;
  const i = base.lastIndexOf('/');
  return i < 0 ? name : base.slice(0, i + 1) + name;
}

function prefixed(filename: string, e: unknown): QcowError {
  const msg = e instanceof Error ? e.message : String(e);
  const code = e instanceof QcowError ? e.code : 'EIO';
  return new QcowError(code, `${filename}: ${msg}`);
}

function errno(e: unknown): string | undefined {
  return (e as NodeJS.ErrnoException | undefined)?.code;
}

export async function createImage(req: CreateImageRequest, provider: IOProvider): Promise<CreateImageResult> {
  const fn = req.filename;
  const fail = (msg: string, code: QcowError['code'] = 'EINVAL') => new QcowError(code, `${fn}: ${msg}`);
  const fmt = req.format ?? 'raw';
  if (fmt !== 'qcow2' && fmt !== 'raw' && fmt !== 'qcow') {
    if (OTHER_QEMU_FORMATS.includes(fmt)) throw fail(`Creating '${fmt}' images is not supported by qcowkit yet`, 'ENOTSUP');
    throw fail(`Unknown file format '${fmt}'`);
  }
  const format: CreateFormat | 'qcow' = fmt;
  const opts = new CreateOptions(format === 'qcow' ? QCOW_CREATE_OPTS : mergedOpts(format));
  const warnings: string[] = [];
  try {
    for (const o of req.options ?? []) opts.parse(o, warnings);
  } catch (e) {
    throw prefixed(fn, e);
  } finally {
    for (const w of warnings) req.onWarning?.(w);
  }
  // size=2^64-1 is qemu's "no size" marker.
  if (opts.big('size') === U64_MAX) opts.delete('size');
  if (opts.has('size')) {
    if (req.size !== undefined) throw fail('The image size must be specified only once');
  } else if (req.size !== undefined) opts.setNumber('size', req.size);

  if (req.backingFile !== undefined) {
    if (format === 'raw') throw fail("Backing file not supported for file format 'raw'");
    opts.set('backing_file', req.backingFile);
  }
  if (req.backingFormat !== undefined) {
    if (format === 'raw') throw fail("Backing file format not supported for file format 'raw'");
    opts.set('backing_fmt', req.backingFormat);
  }
  const backing = opts.str('backing_file');
  const backingFmt = opts.str('backing_fmt');
  if (backing !== undefined) {
    if (backing === fn) throw fail('Error: Trying to create an image with the same filename as the backing file');
    if (backing === '') throw fail('Expected backing file name, got empty string');
  }

  let size = opts.big('size');
  if (backing !== undefined && !req.noBackingOpen) {
    const full = combinePath(fn, backing);
    let backingSize: number;
    let detected: string;
    try {
      if (backingFmt !== undefined && backingFmt !== 'qcow2' && backingFmt !== 'raw' && backingFmt !== 'qcow') {
        throw new QcowError('EINVAL', `Unknown driver '${backingFmt}'`);
      }
      const drv = await openImage(full, { io: provider, format: backingFmt, readOnly: true, noBacking: true });
      // qemu sees lengths in 512-byte sectors: a raw file's length rounds up, a qcow2 size down.
      backingSize = drv.format === 'raw' ? Math.ceil(drv.size / 512) * 512 : Math.floor(drv.size / 512) * 512;
      detected = drv.format;
      await drv.close();
    } catch (e) {
      let msg = e instanceof Error ? e.message : String(e);
      if (/: Is a directory$/.test(msg)) msg = `'file' driver requires '${full}' to be a regular file`;
      throw fail(`${msg} Could not open backing image.`);
    }
    if (backingFmt === undefined) throw fail(`Backing file specified without backing format Detected format of ${detected}.`);
    if (size === undefined) {
      size = BigInt(backingSize);
      opts.setNumber('size', size);
    }
  } else if (backing !== undefined && backingFmt === undefined) {
    throw fail('Backing file specified without backing format');
  }
  if (size === undefined) throw fail('Image creation needs a size parameter');

  const formatting = formattingLine(fn, format, opts);
  req.onFormatting?.(formatting);
  // The format driver parses the options again (and warns again).
  for (const w of warnings) req.onWarning?.(w);

  const hint = opts.big('extent_size_hint');
  if (hint !== undefined && hint > 0xffffffffn) throw fail('Extent size hint is too large');

  if (format === 'qcow') return createQcowImage(req, provider, opts, formatting, size);

  if (format === 'raw') {
    let mode: Exclude<Preallocation, 'metadata'>;
    try {
      mode = rawPreallocation(opts); // checked before the file is touched
    } catch (e) {
      throw prefixed(fn, e);
    }
    const io = await openForCreate(provider, fn);
    try {
      await createRawFile(io, size, mode, 'raw');
      await io.flush();
      await io.close();
    } catch (e) {
      await io.close().catch(() => {});
      await provider.remove?.(fn).catch(() => {});
      throw prefixed(fn, e);
    }
    return { format, size, formatting };
  }

  // qcow2: qemu-img creates the file(s) first and removes them on any failure.
  const dataFile = opts.str('data_file');
  const cleanup = async () => {
    await provider.remove?.(fn).catch(() => {});
    if (dataFile !== undefined) await provider.remove?.(dataFile).catch(() => {});
  };
  let params: Qcow2CreateParams;
  let layout: ReturnType<typeof computeQcow2Layout>;
  try {
    params = qcow2ParamsFromOptions(opts);
    layout = computeQcow2Layout(params);
  } catch (e) {
    await cleanup();
    throw prefixed(fn, e);
  }
  let io: ByteIO | undefined;
  let dio: ByteIO | undefined;
  try {
    // Encryption: the secret is looked up and the LUKS header made (PBKDF2 calibration) only now,
    // as QEMU does after the file exists; a failure removes the file like any other.
    const extra: WriteLayoutExtra = {};
    if (params.encryption) {
      const spec = resolveEncryptCreate(params.encryption, req.secrets);
      if (spec.format === 'luks') extra.cryptoBlob = (await buildQcow2LuksHeader(layout.clusterSize, spec.luks)).blob;
    }
    if (dataFile !== undefined) {
      dio = await provider.create!(dataFile);
      const mode = params.preallocation === 'metadata' ? 'off' : params.preallocation;
      await createRawFile(dio, size, mode, 'qcow2');
      if (layout.dataFileLength !== undefined) await extendFile(dio, layout.dataFileLength, mode);
      await dio.flush();
      await dio.close();
      dio = undefined;
    }
    io = await openForCreate(provider, fn);
    await writeQcow2Layout(io, layout, extra);
    await io.flush();
    await io.close();
    io = undefined;
  } catch (e) {
    await dio?.close().catch(() => {});
    await io?.close().catch(() => {});
    await cleanup();
    throw prefixed(fn, e);
  }
  return {
    format,
    size,
    formatting,
    qcow2: params,
    ...(params.encryption?.keySecret !== undefined ? { keySecret: params.encryption.keySecret } : {}),
  };
}

/**
 * qcow (version 1), as qemu-img 7.2's qcow driver makes it: option checks that come before the
 * file (the `encryption` alias), then the file is created and, on a later failure (preallocation
 * mode, encryption format, secret), left behind empty as qemu-img leaves it. Legacy AES only sets
 * crypt_method (the key is the password; nothing else is stored).
 */
async function createQcowImage(
  req: CreateImageRequest,
  provider: IOProvider,
  opts: CreateOptions,
  formatting: string,
  size: bigint,
): Promise<CreateImageResult> {
  const fn = req.filename;
  let choice: ReturnType<typeof parseEncryptCreateChoice>;
  try {
    if (opts.has('encrypt.format') && opts.has('encryption')) {
      throw new QcowError('EINVAL', "'encrypt.format' and its alias 'encryption' can't be used at the same time");
    }
    choice = parseEncryptCreateChoice((k) => opts.str(k), opts.bool('encryption'));
  } catch (e) {
    throw prefixed(fn, e);
  }
  const rounded = (size + 511n) & ~511n;
  const io = await openForCreate(provider, fn);
  try {
    const prealloc = opts.str('preallocation');
    if (prealloc !== undefined && !['off', 'falloc', 'full'].includes(prealloc)) {
      throw new QcowError('EINVAL', prealloc === 'metadata' ? 'Unsupported preallocation mode: metadata' : `invalid parameter value: ${prealloc}`);
    }
    if (choice && opts.str('encrypt.format') === 'luks') throw new QcowError('EINVAL', 'Unsupported encryption format');
    if (choice) resolveEncryptCreate(choice, req.secrets);
    if (rounded > BigInt(Number.MAX_SAFE_INTEGER)) throw new QcowError('EFBIG', "The image size is too large for file format 'qcow'");
    const backingFile = opts.str('backing_file');
    await createQcow(io, { size: Number(rounded), ...(backingFile !== undefined ? { backingFile } : {}), ...(choice ? { encrypt: true } : {}) });
    await io.close();
  } catch (e) {
    await io.close().catch(() => {});
    throw prefixed(fn, e);
  }
  return {
    format: 'qcow',
    size,
    formatting,
    ...(choice?.keySecret !== undefined ? { keySecret: choice.keySecret } : {}),
  };
}

async function openForCreate(provider: IOProvider, name: string): Promise<ByteIO> {
  if (!provider.create) throw new QcowError('ENOTSUP', `Could not create '${name}': creating files is not supported here`);
  return provider.create(name);
}

/**
 * A raw file of `size` bytes (rounded up to 512 like qemu's file driver). off/falloc: a sparse
 * file whose first block (up to 4 KiB) is written with zeros, as qemu's file driver does so that
 * the first block is allocated; falloc then allocates the whole file (where the platform can).
 * full: zeros written everywhere.
 */
export async function createRawFile(
  io: ByteIO,
  size: bigint,
  mode: Exclude<Preallocation, 'metadata'>,
  formatForMessage: string,
): Promise<void> {
  const tooLarge = () =>
    new QcowError(
      'EFBIG',
      formatForMessage === 'qcow2'
        ? "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
        : `The image size is too large for file format '${formatForMessage}'`,
    );
  const rounded = (size + 511n) & ~511n;
  if (rounded > BigInt(Number.MAX_SAFE_INTEGER)) throw tooLarge();
  const len = Number(rounded);
  try {
    await io.truncate(0);
    await io.truncate(len);
  } catch (e) {
    if (errno(e) === 'EFBIG' || errno(e) === 'EINVAL') throw tooLarge();
    throw e;
  }
  if (mode === 'full') await writeZeroRange(io, 0, len);
  else if (len > 0) await io.write(new Uint8Array(Math.min(4096, len)), 0);
  if (mode === 'falloc' && len > 0) await io.allocate?.(0, len);
}

/** Grow a file to `length` with a preallocation mode (full writes zeros over the new part). */
async function extendFile(io: ByteIO, length: number, mode: Exclude<Preallocation, 'metadata'>): Promise<void> {
  const cur = await io.size();
  if (length <= cur) return;
  await io.truncate(length);
  if (mode === 'full') await writeZeroRange(io, cur, length - cur);
  else if (mode === 'falloc') await io.allocate?.(cur, length - cur);
}

