/**
 * SEEK_DATA / SEEK_HOLE for files. Node has no lseek; a tiny native addon provides it when built.
 * Returns undefined where the platform cannot tell (callers fall back to zero detection).
 *
 * The addon lives in `native/` and is built by `npm run build:native` (part of `npm run build`,
 * so `npm ci` builds it through `prepare`). If it failed to build, or this platform has no
 * SEEK_DATA, everything here quietly answers undefined.
 */
import type { ZeroRunScan } from '../ops/bytes.js';
import { loadNativeAddon } from './native-addon.js';

interface SparseAddon {
  /** lseek(fd, offset, whence); -1 on ENXIO, throws (with `code`) on any other error. */
  seek(fd: number, offset: number, whence: number): number;
  SEEK_DATA: number;
  SEEK_HOLE: number;
  /** fallocate(2) on the thread pool: mode 0 allocates, 1 punches a hole (Linux builds only). */
  fallocate?(fd: number, mode: 0 | 1, offset: number, length: number): Promise<void>;
}

/**
 * Most runs one call returns (they then cover a prefix of the range; callers ask again from its
 * end). Small, so that a copy starts after a few lseeks, not after walking the whole file: QEMU
 * asks for one extent at a time, as it goes.
 */
export const MAX_RUNS = 128;

/** errno codes meaning "this file/file system cannot answer", not "something is wrong". */
const UNSUPPORTED = new Set(['EINVAL', 'ENOTSUP', 'EOPNOTSUPP', 'ENOSYS', 'ESPIPE']);

let addon: SparseAddon | null | undefined;
type ReadScan = (fd: number, buf: Uint8Array, offset: number, runs: Uint32Array) => Promise<number>;

/** Everything the addon may export (what a platform lacks is absent). */
let addonModule: (Partial<SparseAddon> & { zeroRuns?: ZeroRunScan; readScan?: ReadScan }) | null | undefined;

function loadModule(): typeof addonModule {
  if (addonModule !== undefined) return addonModule;
  addonModule = null;
  // (not built, or built for another platform: no sparse support)
  addonModule = loadNativeAddon<NonNullable<typeof addonModule>>('qcowkit_sparse') ?? null;
  return addonModule;
}

function loadAddon(): SparseAddon | null {
  if (addon !== undefined) return addon;
  addon = null;
  const mod = loadModule();
  if (mod && typeof mod.seek === 'function' && typeof mod.SEEK_DATA === 'number' && typeof mod.SEEK_HOLE === 'number') {
    addon = mod as SparseAddon;
  }
  return addon;
}

/** The addon's read-and-scan (ByteIO.readScanned on the thread pool), where it is built. */
export function nativeReadScan(): ReadScan | undefined {
  const f = loadModule()?.readScan;
  return typeof f === 'function' ? f : undefined;
}

/** The addon's zero-run scan (convert's zero detection in native code), where it is built. */
export function nativeZeroRuns(): ZeroRunScan | undefined {
  const f = loadModule()?.zeroRuns;
  return typeof f === 'function' ? f : undefined;
}

/** Whether the native SEEK_DATA/SEEK_HOLE addon is loaded (the file system may still not support it). */
export function sparseSupported(): boolean {
  return loadAddon() !== null;
}

/**
 * The allocation of `[offset, offset + length)` in the file open as `fd`: consecutive runs, in
 * order, of data (`data: true`) and holes (`data: false`), covering that range from its start.
 * Bytes past end of file count as a hole. Adjacent runs never have the same kind.
 *
 * At most {@link MAX_RUNS} runs are returned: if the range has more, they cover only a prefix of
 * it, ending where the file's allocation really changes (so asking again from there splits no
 * extent).
 *
 * Undefined when the addon is not available or the file/file system cannot tell (lseek fails
 * with EINVAL, ENOTSUP, ESPIPE, ...). Other errors (EBADF, EIO) are thrown.
 *
 * File systems without real hole support typically answer "all data up to EOF", which is correct
 * but tells nothing. The descriptor's file position is moved; qcowkit only does positional I/O.
 */
export async function sparseRuns(
  fd: number,
  offset: number,
  length: number,
): Promise<Array<{ offset: number; length: number; data: boolean }> | undefined> {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0 ||
      !Number.isSafeInteger(offset + length)) {
    throw new RangeError(`sparseRuns: bad range offset=${offset} length=${length}`);
  }
  const a = loadAddon();
  if (!a) return undefined;
  const runs: Array<{ offset: number; length: number; data: boolean }> = [];
  if (length === 0) return runs;
  const end = offset + length;

  const push = (start: number, stop: number, data: boolean) => {
    const last = runs[runs.length - 1];
    if (last && last.data === data) last.length += stop - start;
    else runs.push({ offset: start, length: stop - start, data });
  };

  try {
    let pos = offset;
    while (pos < end) {
      if (runs.length >= MAX_RUNS) break; // the caller asks again from pos
      const d = a.seek(fd, pos, a.SEEK_DATA);
      if (d < 0) {
        // ENXIO: no data at or after pos (includes pos >= EOF).
        push(pos, end, false);
        break;
      }
      if (d < pos) {
        // Not meant to happen; don't trust the answer.
        push(pos, end, true);
        break;
      }
      if (d > pos) {
        const stop = Math.min(d, end);
        push(pos, stop, false);
        pos = stop;
        continue;
      }
      // pos is in data: find where it ends.
      const h = a.seek(fd, pos, a.SEEK_HOLE);
      if (h <= pos) {
        // ENXIO (file shrank under us) or no progress: report data, which is always safe.
        push(pos, end, true);
        break;
      }
      const stop = Math.min(h, end);
      push(pos, stop, true);
      pos = stop;
    }
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code && UNSUPPORTED.has(code)) return undefined;
    throw e;
  }
  return runs;
}

/**
 * fallocate(2): allocate `[offset, offset + length)` of the file (`punch` false) or deallocate it,
 * keeping the size, so it reads as zeros (`punch` true). Resolves false where the platform or the
 * file system cannot (no addon, EOPNOTSUPP): callers then fall back (leave sparse, write zeros).
 */
export async function fallocateFile(fd: number, punch: boolean, offset: number, length: number): Promise<boolean> {
  if (length <= 0) return true;
  const a = loadAddon();
  if (!a?.fallocate) return false;
  try {
    await a.fallocate(fd, punch ? 1 : 0, offset, length);
    return true;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code && UNSUPPORTED.has(code)) return false;
    throw e;
  }
}
