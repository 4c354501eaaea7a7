/**
 * `map`: the allocation of an image (through its backing chain) as qemu-img's MapEntry list —
 * consecutive entries, adjacent ones merged exactly when qemu-img merges them.
 */
import type { BlockDriver, Extent } from '../core/block-driver.js';

export interface MapEntry {
  start: number;
  length: number;
  /** Chain level that answered (0 = the image itself). */
  depth: number;
  /** Allocated somewhere in the chain. */
  present: boolean;
  /** Reads as zeros. */
  zero: boolean;
  /** Holds data (not just a zero flag). */
  data: boolean;
  /** Where the bytes lie, plainly stored, in `filename`. */
  offset?: number;
  filename?: string;
}

export interface MapOptions {
  /** First byte to map (default 0). */
  start?: number;
  /** Bytes to map from `start` (default: to the end of the image). */
  length?: number;
}

/** Name of the image at `depth` in the chain of `drv`. */
function chainFilename(drv: BlockDriver, depth: number): string {
  let d: BlockDriver | undefined = drv;
  for (let i = 0; i < depth && d?.backing; i++) d = d.backing;
  return (d ?? drv).filename;
}

/** One block-status extent as a map entry (the qemu-img field rules). */
export function extentToEntry(drv: BlockDriver, e: Extent): MapEntry {
  const entry: MapEntry = {
    start: e.offset,
    length: e.length,
    depth: e.depth,
    present: e.kind !== 'unallocated',
    zero: e.kind !== 'data' || e.zeroData === true,
    data: e.kind === 'data',
  };
  if (e.hostOffset !== undefined) {
    entry.offset = e.hostOffset;
    entry.filename = e.file ?? chainFilename(drv, e.depth);
  }
  return entry;
}

/** qemu-img merges two entries when everything matches and the host offsets continue. */
export function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.length === 0) return false;
  if (a.zero !== b.zero || a.data !== b.data || a.depth !== b.depth || a.present !== b.present) return false;
  if ((a.filename === undefined) !== (b.filename === undefined) || a.filename !== b.filename) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  if (a.offset !== undefined && a.offset + a.length !== b.offset) return false;
  return a.start + a.length === b.start;
}

/** The merged map of `[start, start+length)` clipped to the image size; nothing for an empty range. */
export async function* mapImage(drv: BlockDriver, opts: MapOptions = {}): AsyncGenerator<MapEntry> {
  const start = opts.start ?? 0;
  const end = opts.length === undefined ? drv.size : Math.min(drv.size, start + opts.length);
  let curr: MapEntry | undefined;
  let pos = start;
  while (pos < end) {
    const before = pos;
    const extents = await drv.blockStatus(pos, end - pos);
    if (extents.length === 0) throw new Error(`block status of '${drv.filename}' returned nothing at offset ${pos}`);
    for (const e of extents) {
      const s = Math.max(e.offset, pos);
      const eEnd = Math.min(e.offset + e.length, end);
      if (eEnd <= s) continue;
      const clipped: Extent = s === e.offset && eEnd === e.offset + e.length ? e : { ...e, offset: s, length: eEnd - s };
      if (clipped !== e && e.hostOffset !== undefined) clipped.hostOffset = e.hostOffset + (s - e.offset);
      const next = extentToEntry(drv, clipped);
      if (curr && mergeable(curr, next)) curr.length += next.length;
      else {
        if (curr) yield curr;
        curr = next;
      }
      pos = eEnd;
    }
    if (pos === before) throw new Error(`block status of '${drv.filename}' made no progress at offset ${pos}`);
  }
  if (curr) yield curr;
}
