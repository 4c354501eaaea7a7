/**
 * `qemu-img create -o` options for qcow2 and raw: the option tables (names, types, help texts, defaults
 * in the order qemu-img 7.2 prints them), the `-o` list syntax, typed parsing with qemu-img's messages,
 * the `-o help` text, the "Formatting ..." line and the qcow2 option validation (same checks, same
 * order, same words as qemu-img 7.2 — captured by running it; see /work/shared/qcow-notes.md §9).
 * Pure code: no I/O.
 */
import { QcowError } from '../../core/errors.js';
import { parseEncryptCreateChoice, type EncryptCreateChoice } from '../crypto/options.js';
import { luksHeaderLength } from '../crypto/luks.js';

export type OptType = 'string' | 'size' | 'number' | 'bool';

export interface OptDesc {
  name: string;
  type: OptType;
  help: string;
  /** Default printed in the "Formatting" line when the option is not given. */
  def?: string;
}

const STR = 'string' as const;
const SIZE = 'size' as const;
const NUM = 'number' as const;
const BOOL = 'bool' as const;

/** qcow2 format options, in the order qemu-img prints them in its "Formatting" line. */
export const QCOW2_CREATE_OPTS: readonly OptDesc[] = [
  { name: 'encryption', type: BOOL, help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)" },
  { name: 'encrypt.format', type: STR, help: "Encrypt the image, format choices: 'aes', 'luks'" },
  { name: 'encrypt.key-secret', type: STR, help: 'ID of secret providing qcow AES key or LUKS passphrase' },
  { name: 'encrypt.cipher-alg', type: STR, help: 'Name of encryption cipher algorithm' },
  { name: 'encrypt.cipher-mode', type: STR, help: 'Name of encryption cipher mode' },
  { name: 'encrypt.ivgen-alg', type: STR, help: 'Name of IV generator algorithm' },
  { name: 'encrypt.ivgen-hash-alg', type: STR, help: 'Name of IV generator hash algorithm' },
  { name: 'encrypt.hash-alg', type: STR, help: 'Name of encryption hash algorithm' },
  { name: 'encrypt.iter-time', type: NUM, help: 'Time to spend in PBKDF in milliseconds' },
  { name: 'cluster_size', type: SIZE, help: 'qcow2 cluster size', def: '65536' },
  { name: 'extended_l2', type: BOOL, help: 'Extended L2 tables', def: 'off' },
  { name: 'preallocation', type: STR, help: 'Preallocation mode (allowed values: off, metadata, falloc, full)' },
  { name: 'compression_type', type: STR, help: 'Compression method used for image cluster compression', def: 'zlib' },
  { name: 'size', type: SIZE, help: 'Virtual disk size' },
  { name: 'compat', type: STR, help: 'Compatibility level (v2 [0.10] or v3 [1.1])' },
  { name: 'backing_file', type: STR, help: 'File name of a base image' },
  { name: 'backing_fmt', type: STR, help: 'Image format of the base image' },
  { name: 'data_file', type: STR, help: 'File name of an external data file' },
  { name: 'data_file_raw', type: BOOL, help: 'The external data file must stay valid as a raw image' },
  { name: 'lazy_refcounts', type: BOOL, help: 'Postpone refcount updates', def: 'off' },
  { name: 'refcount_bits', type: NUM, help: 'Width of a reference count entry in bits', def: '16' },
];

export const RAW_CREATE_OPTS: readonly OptDesc[] = [{ name: 'size', type: SIZE, help: 'Virtual disk size' }];

/** Options of the protocol layer (a local file), appended after the format's own. */
export const FILE_CREATE_OPTS: readonly OptDesc[] = [
  { name: 'size', type: SIZE, help: 'Virtual disk size' },
  { name: 'preallocation', type: STR, help: 'Preallocation mode (allowed values: off, falloc, full)' },
  { name: 'nocow', type: BOOL, help: 'Turn off copy-on-write (valid only on btrfs)' },
  { name: 'extent_size_hint', type: SIZE, help: 'Extent size hint for the image file, 0 to disable' },
];

export type CreateFormat = 'qcow2' | 'raw';

/** Formats qemu-img knows but qcowkit cannot create (yet). */
export const OTHER_QEMU_FORMATS = [
  'qcow', 'luks', 'vmdk', 'vdi', 'vhdx', 'vpc', 'qed', 'parallels', 'dmg', 'bochs', 'cloop', 'vvfat', 'blkdebug',
];

export function formatOpts(format: CreateFormat): readonly OptDesc[] {
  return format === 'qcow2' ? QCOW2_CREATE_OPTS : RAW_CREATE_OPTS;
}

/** The format's options followed by the file protocol's (duplicates keep the format's entry). */
export function mergedOpts(format: CreateFormat): OptDesc[] {
  const out = [...formatOpts(format)];
  for (const d of FILE_CREATE_OPTS) if (!out.some((o) => o.name === d.name)) out.push(d);
  return out;
}

// ------------------------------------------------------------------------------------------------
// The `-o` list syntax: `key=value,key2=value2`; `,,` is a literal comma inside a value; a bare `key`
// means key=on and `nokey` means key=off.

export interface OptionItem {
  name: string;
  value: string;
  /** Given without `=` (a flag). */
  flag: boolean;
}

/** qemu-img's check on each `-o` argument: not empty, no leading comma, no odd run of trailing commas. */
export function isValidOptionList(s: string): boolean {
  if (s.length === 0 || s[0] === ',') return false;
  let i = s.length;
  while (i > 0 && s[i - 1] === ',') i--;
  return (s.length - i) % 2 === 0;
}

export function splitOptionList(s: string): OptionItem[] {
  const items: OptionItem[] = [];
  let i = 0;
  const n = s.length;
  while (i < n) {
    let j = i;
    while (j < n && s[j] !== '=' && s[j] !== ',') j++;
    const name = s.slice(i, j);
    if (j < n && s[j] === '=') {
      let value = '';
      let k = j + 1;
      while (k < n) {
        if (s[k] === ',') {
          if (s[k + 1] === ',') {
            value += ',';
            k += 2;
            continue;
          }
          break;
        }
        value += s[k++];
      }
      items.push({ name, value, flag: false });
      i = k + 1;
    } else {
      if (name === 'help' || name === '?') items.push({ name, value: 'on', flag: true });
      else if (name.startsWith('no')) items.push({ name: name.slice(2), value: 'off', flag: true });
      else items.push({ name, value: 'on', flag: true });
      i = j + 1;
    }
  }
  return items;
}

/** True when the list asks for help (`help` or `?` given as a bare item). */
export function hasHelpOption(s: string): boolean {
  return splitOptionList(s).some((it) => it.flag && (it.name === 'help' || it.name === '?'));
}

function typeLabel(t: OptType): string {
  switch (t) {
    case 'string':
      return '<str>';
    case 'size':
      return '<size>';
    case 'number':
      return '<num>';
    case 'bool':
      return '<bool (on/off)>';
  }
}

/**
 * The `-o help` text. With a filename qemu-img lists the format's and the file protocol's options
 * under "Supported options:"; without one only the format's, plus a hint about the protocol level.
 */
export function optionsHelp(format: CreateFormat, withFilename: boolean): string {
  const list = withFilename ? mergedOpts(format) : [...formatOpts(format)];
  list.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const lines = [withFilename ? 'Supported options:' : `Supported ${format} options:`];
  for (const d of list) lines.push(`  ${`${d.name}=${typeLabel(d.type)}`.padEnd(22)} - ${d.help}`);
  if (!withFilename) {
    lines.push('', 'The protocol level may support further options.', 'Specify the target filename to include those options.');
  }
  return `${lines.join('\n')}\n`;
}

// ------------------------------------------------------------------------------------------------
// Typed values

const SIZE_HINT =
  'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, respectively.';
const U64_MAX = (1n << 64n) - 1n;
const I64_MAX = (1n << 63n) - 1n;

export class SizeParseError extends Error {
  constructor(readonly kind: 'invalid' | 'range') {
    super(kind);
  }
}

const SIZE_RE = /^[ \t\n\v\f\r]*\+?(?:(0[xX][0-9a-fA-F]+)|([0-9]+)(\.[0-9]*)?)([bBkKmMgGtTpPeE]?)$/;
const SHIFT: Record<string, bigint> = { '': 0n, b: 0n, k: 10n, m: 20n, g: 30n, t: 40n, p: 50n, e: 60n };

/**
 * A size as qemu parses it (qemu_strtosz): decimal (optionally with a fraction, which needs a unit
 * suffix) or hex, optional k/M/G/T/P/E suffix (powers of 1024), result below 2^64.
 * `warnings` receives the deprecation notice for a suffix on a hex number.
 */
export function parseQemuSize(text: string, warnings?: string[]): bigint {
  const m = SIZE_RE.exec(text);
  if (!m) throw new SizeParseError('invalid');
  const suffix = m[4]!.toLowerCase();
  const shift = SHIFT[suffix]!;
  const mul = 1n << shift;
  if (m[1] !== undefined) {
    if (suffix !== '' && suffix !== 'b') warnings?.push(`Using a multiplier suffix on hex numbers is deprecated: ${text}`);
    const v = BigInt(m[1]) * mul;
    if (v > U64_MAX) throw new SizeParseError('range');
    return v;
  }
  const int = BigInt(m[2]!);
  let frac = 0n;
  if (m[3] !== undefined && m[3].length > 1) {
    const f = Number(`0${m[3]}`);
    // A power-of-two multiple of a double is exact, as is its floor.
    frac = BigInt(Math.floor(f * 2 ** Number(shift)));
    if (f !== 0 && mul === 1n) throw new SizeParseError('invalid');
  }
  if (int > (U64_MAX - frac) / mul) throw new SizeParseError('range');
  return int * mul + frac;
}

/** qemu's strtou64 with base 0 (decimal, 0x hex, leading-0 octal); a leading '-' wraps like C. */
function parseQemuNumber(text: string): bigint | 'invalid' | 'range' {
  const m = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(text);
  if (!m) return 'invalid';
  const digits = m[2]!;
  let v: bigint;
  if (/^0[xX]/.test(digits)) v = BigInt(digits);
  else if (digits.length > 1 && digits[0] === '0') v = BigInt(`0o${digits.slice(1)}`);
  else v = BigInt(digits);
  if (v > U64_MAX) return 'range';
  if (m[1] === '-') v = (U64_MAX + 1n - v) & U64_MAX;
  return v;
}

const BOOL_ON = new Set(['on', 'yes', 'true']);
const BOOL_OFF = new Set(['off', 'no', 'false']);

export interface OptValue {
  desc: OptDesc;
  /** The text as given (what the "Formatting" line prints for strings and booleans). */
  str: string;
  /** Parsed value: bigint for sizes and numbers (u64), boolean, or the string. */
  value: bigint | boolean | string;
  /** For numbers: the text given was negative or above INT64_MAX (QAPI's int64 check). */
  notInt64?: boolean;
}

export class CreateOptions {
  readonly list: readonly OptDesc[];
  private values = new Map<string, OptValue>();

  constructor(list: readonly OptDesc[]) {
    this.list = list;
  }

  has(name: string): boolean {
    return this.values.has(name);
  }
  get(name: string): OptValue | undefined {
    return this.values.get(name);
  }
  str(name: string): string | undefined {
    const v = this.values.get(name);
    return v === undefined ? undefined : v.str;
  }
  bool(name: string, def = false): boolean {
    const v = this.values.get(name);
    return v === undefined ? def : (v.value as boolean);
  }
  big(name: string): bigint | undefined {
    const v = this.values.get(name);
    return v === undefined ? undefined : (v.value as bigint);
  }
  delete(name: string): void {
    this.values.delete(name);
  }

  /** Set one option from its text, checking its type with qemu-img's messages. */
  set(name: string, str: string, warnings?: string[]): void {
    const desc = this.list.find((d) => d.name === name);
    if (!desc) throw new QcowError('EINVAL', `Invalid parameter '${name}'`);
    switch (desc.type) {
      case 'string':
        this.values.set(name, { desc, str, value: str });
        return;
      case 'bool':
        if (BOOL_ON.has(str)) this.values.set(name, { desc, str, value: true });
        else if (BOOL_OFF.has(str)) this.values.set(name, { desc, str, value: false });
        else throw new QcowError('EINVAL', `Parameter '${name}' expects 'on' or 'off'`);
        return;
      case 'number': {
        const v = parseQemuNumber(str);
        if (v === 'invalid') throw new QcowError('EINVAL', `Parameter '${name}' expects a number`);
        if (v === 'range') throw new QcowError('EINVAL', `Value '${str}' is too large for parameter '${name}'`);
        const neg = /^[ \t\n\v\f\r]*-/.test(str);
        this.values.set(name, { desc, str, value: v, notInt64: !neg && v > I64_MAX });
        return;
      }
      case 'size': {
        let v: bigint;
        try {
          v = parseQemuSize(str, warnings);
        } catch (e) {
          if (e instanceof SizeParseError && e.kind === 'range') {
            throw new QcowError('EINVAL', `Value '${str}' is out of range for parameter '${name}'`);
          }
          throw new QcowError('EINVAL', `Parameter '${name}' expects a non-negative number below 2^64 ${SIZE_HINT}`);
        }
        this.values.set(name, { desc, str, value: v });
        return;
      }
    }
  }

  /** Set a size/number option from a value (e.g. the SIZE argument). */
  setNumber(name: string, v: bigint): void {
    const desc = this.list.find((d) => d.name === name);
    if (!desc) throw new QcowError('EINVAL', `Invalid parameter '${name}'`);
    this.values.set(name, { desc, str: v.toString(), value: v });
  }

  /** Apply a whole `-o` list, item by item (a later item overrides an earlier one). */
  parse(text: string, warnings?: string[]): void {
    for (const it of splitOptionList(text)) this.set(it.name, it.value, warnings);
  }

  /** The options part of qemu-img's "Formatting 'x', fmt=F ..." line. */
  formattingFields(): string {
    const parts: string[] = [];
    for (const d of this.list) {
      const v = this.values.get(d.name);
      const text = v ? v.str : d.def;
      if (text === undefined) continue;
      if (d.type === 'string') parts.push(`${d.name}=${text.replace(/,/g, ',,')}`);
      else if ((d.type === 'size' || d.type === 'number') && v) parts.push(`${d.name}=${BigInt.asIntN(64, v.value as bigint)}`);
      else parts.push(`${d.name}=${text}`);
    }
    return parts.join(' ');
  }
}

export function formattingLine(filename: string, format: string, opts: CreateOptions): string {
  const fields = opts.formattingFields();
  return `Formatting '${filename}', fmt=${format}${fields ? ` ${fields}` : ''}`;
}

// ------------------------------------------------------------------------------------------------
// qcow2 validation (what qemu-img checks after printing "Formatting ...", in its order)

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

export interface Qcow2CreateParams {
  /** Virtual size in bytes (rounded up to 512 like qemu-img). */
  size: bigint;
  version: 2 | 3;
  clusterBits: number;
  refcountOrder: number;
  lazyRefcounts: boolean;
  extendedL2: boolean;
  compressionType: 0 | 1;
  preallocation: Preallocation;
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  dataFileRaw: boolean;
  /**
   * Encryption: legacy AES (crypt_method 1) or LUKS (crypt_method 2, whose header of
   * `luksHeaderLength` bytes gets clusters after everything else create allocates). The secret is
   * looked up later (`resolveEncryptCreate`), as QEMU does once the file exists.
   */
  encryption?: EncryptCreateChoice & { luksHeaderLength?: number };
}

const V3_ONLY = 'compatibility level 1.1 and above (use version=v3 or greater)';

function enumValue<T extends string>(param: string, v: string | undefined, allowed: readonly T[], def: T): T {
  if (v === undefined) return def;
  if (!(allowed as readonly string[]).includes(v)) {
    throw new QcowError('EINVAL', `Parameter '${param}' does not accept value '${v}'`);
  }
  return v as T;
}

/** Largest image length QEMU's block layer accepts (INT64_MAX rounded down to 1 GiB). */
export const BDRV_MAX_LENGTH = (1n << 63n) - (1n << 30n);

/** Largest L1 table QEMU creates, in entries (32 MiB / 8). */
const MAX_L1_ENTRIES = 0x2000000 / 8;

/**
 * Validate qcow2 options like qemu-img 7.2 (checks and messages in its order) and derive the
 * creation parameters. `size` must be set in `opts`.
 */
export function qcow2ParamsFromOptions(opts: CreateOptions): Qcow2CreateParams {
  const fail = (msg: string) => new QcowError('EINVAL', msg);
  // Enumerations, in the order QEMU converts its options (version, encrypt, preallocation, compression).
  const compat = enumValue('version', opts.str('compat'), ['0.10', 'v2', '1.1', 'v3'], '1.1');
  const encryptFormat = opts.str('encrypt.format');
  const encryptKeys = opts.list.filter((d) => d.name.startsWith('encrypt.') && d.name !== 'encrypt.format' && opts.has(d.name));
  if (encryptFormat === undefined && encryptKeys.length > 0 && !opts.bool('encryption')) {
    throw fail("Parameter 'encrypt.format' is missing");
  }
  if (encryptFormat !== undefined) {
    if (opts.bool('encryption')) throw fail("'encrypt.format' and its alias 'encryption' can't be used at the same time");
    enumValue('format', encryptFormat, ['aes', 'luks'], 'aes');
  }
  const encryption = parseEncryptCreateChoice((k) => {
    const v = opts.get(k);
    if (v === undefined) return undefined;
    return typeof v.value === 'bigint' ? Number(BigInt.asIntN(64, v.value)) : v.str;
  }, opts.bool('encryption'));
  const refcountOpt = opts.get('refcount_bits');
  if (refcountOpt?.notInt64) throw fail("Parameter 'refcount-bits' expects integer");
  const preallocation = enumValue('preallocation', opts.str('preallocation'), ['off', 'metadata', 'falloc', 'full'], 'off');
  const compression = enumValue('compression-type', opts.str('compression_type'), ['zlib', 'zstd'], 'zlib');

  const version: 2 | 3 = compat === '0.10' || compat === 'v2' ? 2 : 3;
  const extendedL2 = opts.bool('extended_l2');
  const clusterSize = opts.big('cluster_size') ?? 65536n;
  const backingFile = opts.str('backing_file');
  const backingFormat = opts.str('backing_fmt');
  const dataFile = opts.str('data_file');
  const dataFileRaw = opts.bool('data_file_raw');
  const lazy = opts.bool('lazy_refcounts');
  const refcountBits = BigInt.asIntN(64, refcountOpt ? (refcountOpt.value as bigint) : 16n);

  if (version < 3 && extendedL2) throw fail(`Extended L2 entries are only supported with ${V3_ONLY}`);
  if (clusterSize < 512n || clusterSize > 2n * 1024n * 1024n || (clusterSize & (clusterSize - 1n)) !== 0n) {
    throw fail('Cluster size must be a power of two between 512 and 2048k');
  }
  const clusterBits = clusterSize.toString(2).length - 1;
  if (extendedL2 && clusterBits < 14) {
    throw fail('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  }
  if (backingFile !== undefined && preallocation !== 'off' && !extendedL2) {
    throw fail('Backing file and preallocation can only be used at the same time if extended_l2 is on');
  }
  if (backingFormat !== undefined && backingFile === undefined) throw fail('Backing format cannot be used without backing file');
  if (version < 3 && lazy) throw fail(`Lazy refcounts only supported with ${V3_ONLY}`);
  if (refcountBits < 1n || refcountBits > 64n || (refcountBits & (refcountBits - 1n)) !== 0n) {
    throw fail('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version < 3 && refcountBits !== 16n) {
    throw fail(`Different refcount widths than 16 bits require ${V3_ONLY.replace('and above', 'or above')}`);
  }
  if (dataFileRaw && backingFile !== undefined) throw fail('Backing file and data-file-raw cannot be used at the same time');
  if (dataFile !== undefined && version < 3) throw fail(`External data files are only supported with ${V3_ONLY}`);
  if (dataFileRaw && dataFile === undefined) throw fail('data-file-raw requires data-file');
  if (compression !== 'zlib' && version < 3) throw fail(`Non-zlib compression type is only supported with ${V3_ONLY}`);

  const rounded = BigInt.asIntN(64, ((opts.big('size') ?? 0n) + 511n) & ~511n);
  if (rounded < 0n) throw fail('Could not resize image: Image size cannot be negative');
  if (rounded > BDRV_MAX_LENGTH) {
    throw fail(`Could not resize image: offset(${rounded}) exceeds maximum(${BDRV_MAX_LENGTH})`);
  }
  const l2Bits = BigInt(clusterBits - (extendedL2 ? 4 : 3));
  const perL1 = 1n << (l2Bits + BigInt(clusterBits));
  if ((rounded + perL1 - 1n) / perL1 > BigInt(MAX_L1_ENTRIES)) {
    throw fail("The image size is too large for file format 'qcow2' (try using a larger cluster size)");
  }
  let enc: Qcow2CreateParams['encryption'];
  if (encryption?.format === 'luks') {
    enc = { ...encryption, luksHeaderLength: luksHeaderLength(encryption.luks) };
  } else if (encryption) enc = encryption;
  return {
    size: rounded,
    version,
    clusterBits,
    refcountOrder: refcountBits.toString(2).length - 1,
    lazyRefcounts: lazy,
    extendedL2,
    compressionType: compression === 'zstd' ? 1 : 0,
    // data-file-raw keeps the data file usable as a raw image: qemu-img preallocates the metadata.
    preallocation: dataFileRaw && preallocation === 'off' ? 'metadata' : preallocation,
    backingFile,
    backingFormat,
    dataFile,
    dataFileRaw,
    ...(enc ? { encryption: enc } : {}),
  };
}

/** raw: the preallocation mode with qemu-img's messages. */
export function rawPreallocation(opts: CreateOptions): Exclude<Preallocation, 'metadata'> {
  const p = opts.str('preallocation');
  if (p === undefined || p === 'off' || p === 'falloc' || p === 'full') return p ?? 'off';
  if (p === 'metadata') throw new QcowError('EINVAL', 'Unsupported preallocation mode: metadata');
  throw new QcowError('EINVAL', `invalid parameter value: ${p}`);
}
