/**
 * Byte work for compare/convert: zero detection by 512-byte sector, I/O buffers; equality and
 * first difference (core/byte-scan.ts).
 */

export const SECTOR = 512;

export { firstDifference, firstNonZero } from '../core/byte-scan.js';

/**
 * Split a buffer's 512-byte sectors (the last one may be shorter) into alternating run lengths,
 * in sectors: data, zero, data, ... (the first may be 0). Stores them in `out` (room for
 * sectors + 1) and returns how many. Node installs a native one (setZeroRunScan).
 */
export type ZeroRunScan = (buf: Uint8Array, out: Uint32Array) => number;

/** The portable scan: most data sectors have a non-zero first word, so they cost one read. */
export const zeroRunsJs: ZeroRunScan = (buf, out) => {
  const sectors = Math.ceil(buf.length / SECTOR);
  const words = buf.byteOffset % 4 === 0 ? new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2) : undefined;
  let count = 0;
  let zero = false;
  let run = 0;
  for (let i = 0; i < sectors; i++) {
    const start = i * SECTOR;
    const end = Math.min(start + SECTOR, buf.length);
    let z = true;
    if (words && end - start === SECTOR) {
      for (let k = start >>> 2, kEnd = k + SECTOR / 4; k < kEnd; k++) {
        if (words[k] !== 0) {
          z = false;
          break;
        }
      }
    } else {
      for (let j = start; j < end; j++) {
        if (buf[j] !== 0) {
          z = false;
          break;
        }
      }
    }
    if (z !== zero) {
      out[count++] = run;
      run = 0;
      zero = z;
    }
    run++;
  }
  out[count++] = run;
  return count;
};

let zeroRunScan: ZeroRunScan = zeroRunsJs;
let zeroRunProvider: (() => ZeroRunScan | undefined) | undefined;

/**
 * Install a faster zero-run scan, asked for on first use (so that loading it costs nothing to
 * commands that never scan); undefined from the provider keeps the portable one.
 */
export function setZeroRunScan(provider: () => ZeroRunScan | undefined): void {
  zeroRunProvider = provider;
}

function currentZeroRunScan(): ZeroRunScan {
  if (zeroRunProvider) {
    const p = zeroRunProvider;
    zeroRunProvider = undefined;
    try {
      zeroRunScan = p() ?? zeroRunsJs;
    } catch {
      zeroRunScan = zeroRunsJs;
    }
  }
  return zeroRunScan;
}

let scratch = new Uint32Array(0);

/**
 * The runs of sectors `[from, from + sectors)` of a buffer whose runs were made whole, as a read
 * that scanned left them (`scanned[0]` their count, `scanned[1..]` the runs, data first):
 * alternating again, data first (maybe 0).
 */
export function sliceRuns(scanned: Uint32Array, from: number, sectors: number): Uint32Array {
  const out: number[] = [];
  const end = from + sectors;
  let pos = 0;
  for (let i = 0; i < scanned[0]! && pos < end; i++) {
    const len = scanned[1 + i]!;
    const a = Math.max(pos, from);
    const b = Math.min(pos + len, end);
    pos += len;
    if (b <= a) continue;
    const zero = i % 2 === 1;
    if (out.length === 0 && zero) out.push(0);
    if (out.length % 2 === (zero ? 1 : 0)) out.push(b - a);
    else out[out.length - 1]! += b - a;
  }
  if (pos < end) throw new RangeError(`sectors ${from}+${sectors} are past the scanned ones`);
  return Uint32Array.from(out.length ? out : [0]);
}

/** A buffer's sectors as runs of data and of zeros, walked from the start (see `run`). */
export class SectorScanner {
  private readonly runs: Uint32Array;
  /** Cursor: index of a run and its first sector (calls mostly move forward). */
  private ri = 0;
  private riStart = 0;

  /** `runs`: the buffer's runs made already (by a read that scanned, see sliceRuns). */
  constructor(buf: Uint8Array, runs?: Uint32Array) {
    if (runs) {
      this.runs = runs;
      return;
    }
    const need = Math.ceil(buf.length / SECTOR) + 1;
    if (scratch.length < need) scratch = new Uint32Array(need);
    const n = currentZeroRunScan()(buf, scratch);
    this.runs = scratch.slice(0, n);
  }

  /** From sector `from`: whether it is all zeros, and how many sectors (at most `n`) are alike. */
  run(from: number, n: number): { zero: boolean; count: number } {
    const runs = this.runs;
    if (from < this.riStart) {
      this.ri = 0;
      this.riStart = 0;
    }
    while (this.riStart + runs[this.ri]! <= from) {
      this.riStart += runs[this.ri]!;
      if (++this.ri >= runs.length) throw new RangeError(`sector ${from} is past the buffer`);
    }
    return { zero: (this.ri & 1) === 1, count: Math.min(n, this.riStart + runs[this.ri]! - from) };
  }
}

const WASM_PAGE = 64 * 1024;

/**
 * A zeroed buffer whose memory starts on a page boundary (WebAssembly memory is mmap'd), else a
 * plain one. The kernel copies page-cache data to and from page-aligned buffers several times
 * faster than to malloc'd ones (which are offset by a few bytes): this is most of the system
 * time of a convert or compare.
 */
export function allocIoBuffer(size: number): Uint8Array {
  const Memory = (globalThis as unknown as { WebAssembly?: { Memory: new (d: { initial: number }) => { buffer: ArrayBuffer } } })
    .WebAssembly?.Memory;
  if (Memory && size >= WASM_PAGE) {
    try {
      return new Uint8Array(new Memory({ initial: Math.ceil(size / WASM_PAGE) }).buffer, 0, size);
    } catch {
      // no memory for it this way: fall through
    }
  }
  return new Uint8Array(size);
}
