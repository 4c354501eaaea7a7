/**
 * Which parts of a data buffer convert writes and which it leaves as holes, reproducing qemu-img
 * convert's rules so the output has the same holes: the buffer is classified by 512-byte sector;
 * run ends are moved to boundaries of the sparse size (-S, rounded down to a power of two) in the
 * target; once data started, zero runs shorter than the sparse size are written as data.
 */
import { SECTOR, SectorScanner } from './bytes.js';

export interface Run {
  /** First sector of the run, relative to the buffer. */
  start: number;
  /** Sectors. */
  count: number;
  data: boolean;
}

/** The leading run of sectors `[from, from+n)` with the same zero-ness, end aligned to 4 KiB. */
function leadingRun(scan: SectorScanner, from: number, n: number, targetSector: number, align: number): { data: boolean; count: number } {
  const { zero: firstZero, count } = scan.run(from, n);
  let i = count;
  if (i === n) return { data: !firstZero, count: n };
  let zero = firstZero;
  const tail = (targetSector + i) % align;
  if (tail) {
    // a short zero run that does not reach an aligned boundary counts as data
    if (zero && i <= tail) zero = false;
    if (zero) i -= tail;
    else i = Math.min(i + align - tail, n);
  }
  return { data: !zero, count: i };
}

/** Leading run where, after data, zero runs shorter than `min` sectors stay part of the data. */
function leadingRunMin(
  scan: SectorScanner,
  from: number,
  n: number,
  targetSector: number,
  minSectors: number,
  align: number,
): { data: boolean; count: number } {
  const min = Math.min(minSectors, n);
  const r = leadingRun(scan, from, n, targetSector, align);
  if (!r.data) return r;
  let used = r.count;
  let checked = r.count;
  while (checked < n) {
    const next = leadingRun(scan, from + checked, n - checked, targetSector + checked, align);
    checked += next.count;
    if (next.data) used = checked;
    else if (next.count >= min) break;
  }
  return { data: true, count: used };
}

/**
 * Split `sectors` sectors of `buf` (to be written at target sector `targetSector`) into data runs
 * and zero runs; `minSparse` in bytes (0: everything is data). `scanned`: the sectors' data/zero
 * runs when made already (see SectorScanner).
 */
export function sparseRuns(buf: Uint8Array, sectors: number, targetSector: number, minSparse: number, scanned?: Uint32Array): Run[] {
  if (minSparse === 0) return [{ start: 0, count: sectors, data: true }];
  const scan = new SectorScanner(buf, scanned);
  const min = Math.max(1, Math.floor(minSparse / SECTOR));
  const align = 2 ** Math.floor(Math.log2(min));
  const runs: Run[] = [];
  for (let i = 0; i < sectors; ) {
    const r = leadingRunMin(scan, i, sectors - i, targetSector + i, min, align);
    const last = runs[runs.length - 1];
    if (last && last.data === r.data) last.count += r.count;
    else runs.push({ start: i, count: r.count, data: r.data });
    i += r.count;
  }
  return runs;
}
