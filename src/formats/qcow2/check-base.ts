/**
 * Foundations of the qcow2 check (no I/O): results and failures as QEMU counts and words them,
 * 64-bit fields as two 32-bit halves (exact where JS numbers are not), printf-style hex, and the
 * packed in-memory refcount array.
 */
import { be32 } from '../../core/be.js';

// ------------------------------------------------------------------------------------------------
// Results and failures

/** QEMU's BdrvCheckResult. */
export interface CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

export function emptyResult(): CheckResult {
  return {
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
  };
}

/** Repair modes (QEMU's BdrvCheckMode bits). */
export const FIX_LEAKS = 1;
export const FIX_ERRORS = 2;

export type Errno = 'EIO' | 'EFBIG' | 'EINVAL' | 'ENOMEM' | 'ERANGE' | 'ENOSPC';

const STRERROR: Record<Errno, string> = {
  EIO: 'Input/output error',
  EFBIG: 'File too large',
  EINVAL: 'Invalid argument',
  ENOMEM: 'Cannot allocate memory',
  ERANGE: 'Numerical result out of range',
  ENOSPC: 'No space left on device',
};

export function strerror(e: Errno): string {
  return STRERROR[e];
}

/** The check could not complete (qemu-img: "Check failed: <strerror>", exit 1). */
export class CheckFailure extends Error {
  constructor(readonly errno: Errno) {
    super(STRERROR[errno]);
    this.name = 'CheckFailure';
  }
}

/**
 * Where check messages go (QEMU prints them on stderr). `line` has no newline. kind 'report':
 * a QEMU error_report()/warn_report() line (the CLI prefixes it with its name); 'partial': text
 * QEMU prints without a trailing newline; default: a plain fprintf(stderr) line.
 */
export type CheckLog = (line: string, kind?: 'report' | 'partial') => void;

// ------------------------------------------------------------------------------------------------
// Number helpers (64-bit fields as two 32-bit halves; exact where JS numbers are not)

const TWO32 = 0x100000000;

/** Big-endian u32 at `p`. */
export const u32 = be32;

/** (hi & hiMask, lo & loMask) as a number when exact, else as a bigint. */
export function masked(hi: number, lo: number, hiMask: number, loMask: number): number | bigint {
  const h = (hi & hiMask) >>> 0;
  const l = (lo & loMask) >>> 0;
  if (h < 0x200000) return h * TWO32 + l;
  return (BigInt(h) << 32n) | BigInt(l);
}

/** %PRIx64 of a 64-bit value given as halves. */
export function hex64(hi: number, lo: number): string {
  hi >>>= 0;
  lo >>>= 0;
  return hi ? hi.toString(16) + lo.toString(16).padStart(8, '0') : lo.toString(16);
}

export function hex(v: number | bigint): string {
  return v.toString(16);
}

/** C's "%#x": "0x..." except for zero, which prints as "0". */
export function hexAlt(v: number | bigint): string {
  return v == 0 ? '0' : `0x${v.toString(16)}`;
}

// ------------------------------------------------------------------------------------------------
// The in-memory refcount array (QEMU's "imrt"): entries of the image's own refcount width, packed
// exactly like a refcount block, the buffer always a whole number of clusters so that slices can
// be written as refcount blocks.

export class RefcountArray {
  buf: Uint8Array;
  /** Number of entries in use (QEMU's nb_clusters). */
  size = 0;
  readonly max: number;

  constructor(
    readonly order: number,
    readonly clusterSize: number,
  ) {
    this.buf = new Uint8Array(0);
    this.max = order >= 6 ? Number.POSITIVE_INFINITY : 2 ** (1 << order) - 1;
  }

  private byteSize(entries: number): number {
    const bytes = Math.ceil((entries * (1 << this.order)) / 8);
    return Math.ceil(bytes / this.clusterSize) * this.clusterSize;
  }

  /** QEMU's realloc_refcount_array: grow (or shrink) to `entries`, new space zeroed. */
  resize(entries: number): void {
    const newBytes = this.byteSize(entries);
    if (newBytes !== this.buf.length) {
      let nb: Uint8Array;
      try {
        nb = new Uint8Array(newBytes);
      } catch {
        throw new CheckFailure('ENOMEM');
      }
      nb.set(newBytes >= this.buf.length ? this.buf : this.buf.subarray(0, newBytes));
      this.buf = nb;
    }
    this.size = entries;
  }

  clear(): void {
    this.buf.fill(0);
  }

  get(i: number): number {
    return getPacked(this.buf, i, this.order);
  }

  set(i: number, v: number): void {
    setPacked(this.buf, i, this.order, v);
  }

  /** +1 on entry `i` (< size); false, changing nothing, when it is already at the maximum. */
  inc(i: number): boolean {
    const b = this.buf;
    if (this.order === 4) {
      const p = 2 * i;
      const v = (b[p]! << 8) | b[p + 1]!;
      if (v === 0xffff) return false;
      b[p] = (v + 1) >>> 8;
      b[p + 1] = (v + 1) & 0xff;
      return true;
    }
    const v = getPacked(b, i, this.order);
    if (v === this.max) return false;
    setPacked(b, i, this.order, v + 1);
    return true;
  }
}

/** Store refcount `v` at index `i` of a packed refcount buffer (block layout). */
export function setPacked(b: Uint8Array, i: number, order: number, v: number): void {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << order;
      const per = 8 >> order;
      const byte = Math.floor(i / per);
      const shift = (i % per) * bits;
      const mask = ((1 << bits) - 1) << shift;
      b[byte] = (b[byte]! & ~mask) | ((v << shift) & mask);
      return;
    }
    case 3:
      b[i] = v;
      return;
    case 4:
      b[2 * i] = v >>> 8;
      b[2 * i + 1] = v & 0xff;
      return;
    case 5:
      b[4 * i] = v >>> 24;
      b[4 * i + 1] = (v >>> 16) & 0xff;
      b[4 * i + 2] = (v >>> 8) & 0xff;
      b[4 * i + 3] = v & 0xff;
      return;
    default: {
      const hi = Math.floor(v / TWO32);
      const lo = v >>> 0;
      const p = 8 * i;
      b[p] = hi >>> 24;
      b[p + 1] = (hi >>> 16) & 0xff;
      b[p + 2] = (hi >>> 8) & 0xff;
      b[p + 3] = hi & 0xff;
      b[p + 4] = lo >>> 24;
      b[p + 5] = (lo >>> 16) & 0xff;
      b[p + 6] = (lo >>> 8) & 0xff;
      b[p + 7] = lo & 0xff;
    }
  }
}

/** Read refcount `i` of a packed refcount block. */
export function getPacked(b: Uint8Array, i: number, order: number): number {
  switch (order) {
    case 0:
      return (b[i >>> 3]! >> (i & 7)) & 1;
    case 1:
      return (b[i >>> 2]! >> ((i & 3) * 2)) & 3;
    case 2:
      return (b[i >>> 1]! >> ((i & 1) * 4)) & 15;
    case 3:
      return b[i]!;
    case 4:
      return (b[2 * i]! << 8) | b[2 * i + 1]!;
    case 5:
      return ((b[4 * i]! << 24) | (b[4 * i + 1]! << 16) | (b[4 * i + 2]! << 8) | b[4 * i + 3]!) >>> 0;
    default: {
      const p = 8 * i;
      const hi = ((b[p]! << 24) | (b[p + 1]! << 16) | (b[p + 2]! << 8) | b[p + 3]!) >>> 0;
      const lo = ((b[p + 4]! << 24) | (b[p + 5]! << 16) | (b[p + 6]! << 8) | b[p + 7]!) >>> 0;
      return hi * TWO32 + lo;
    }
  }
}

/** Exact decimal text of a 64-bit refcount that does not fit a JS number exactly. */
export function refcountText(v: number): string {
  return Number.isSafeInteger(v) ? String(v) : BigInt(v).toString();
}

