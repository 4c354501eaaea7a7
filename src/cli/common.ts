/** Option handling shared by the commands: output format, cache modes, sizes. */
import { CliError } from './errors.js';
import type { Io } from './output.js';

export type OutputFormat = 'human' | 'json';

export function parseOutputFormat(value: string): OutputFormat {
  if (value === 'human' || value === 'json') return value;
  throw new CliError('--output must be used with human or json as argument.');
}

const CACHE_MODES = new Set(['none', 'writeback', 'writethrough', 'directsync', 'unsafe']);

/** `-t` / `-T`: checked like qemu-img, then ignored (qcowkit has one I/O path). */
export function checkCacheMode(value: string, source: boolean): void {
  if (!CACHE_MODES.has(value)) throw new CliError(`Invalid ${source ? 'source ' : ''}cache option: ${value}`);
}

/**
 * A byte count as qemu-img's cvtnum: an integer or decimal with an optional k/M/G/T/P/E suffix
 * (1024-based). Invalid input gives qemu-img's two-line hint.
 */
export function parseSizeArg(what: string, value: string): number {
  const n = parseQemuSize(value);
  if (n === undefined) {
    throw new CliError(
      `Invalid ${what} specified. You may use k, M, G, T, P or E suffixes for\n` +
        'qcowkit: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    );
  }
  if (n > INT64_MAX) throw new CliError(`Invalid ${what} specified. Must be between 0 and ${INT64_MAX}.`);
  return Number(n);
}

const INT64_MAX = (1n << 63n) - 1n;
const SHIFTS: Record<string, bigint> = { '': 0n, b: 0n, k: 10n, m: 20n, g: 30n, t: 40n, p: 50n, e: 60n };

/**
 * qemu_strtosz: decimal (a fraction only together with a unit suffix) or 0x-hex, then an optional
 * b/k/M/G/T/P/E suffix (case-insensitive, 1024-based). Undefined when malformed.
 */
export function parseQemuSize(text: string): bigint | undefined {
  const m = /^\s*(?:0[xX]([0-9a-fA-F]+)|([0-9]+)(?:\.([0-9]*))?)([bBkKmMgGtTpPeE]?)$/.exec(text);
  if (!m) return undefined;
  const suffix = m[4]!.toLowerCase();
  const shift = SHIFTS[suffix]!;
  let v: bigint;
  if (m[1] !== undefined) v = BigInt('0x' + m[1]) << shift;
  else {
    const frac = m[3];
    if (frac !== undefined && shift === 0n) return undefined;
    v = BigInt(m[2]!) << shift;
    if (frac) v += (BigInt(frac) << shift) / 10n ** BigInt(frac.length);
  }
  return v;
}

/** qemu-img's qprintf: print unless quiet. */
export function qprint(io: Io, quiet: boolean, text: string): void {
  if (!quiet) io.out.write(text);
}
