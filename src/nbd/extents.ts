/**
 * From the driver's block status to what NBD clients see: `base:allocation` flags (HOLE/ZERO),
 * `qemu:allocation-depth` values (0 = unallocated, 1 = this image, 2 = its backing file, ...), and
 * the data/hole plan of a structured READ. Only metadata is consulted, never data.
 */
import type { BlockDriver, Extent } from '../core/block-driver.js';
import * as C from './constants.js';

/** One NBD block descriptor. */
export interface NbdExtent {
  length: number;
  flags: number;
}

/** A piece of a READ reply: data to read, or a run that reads as zeros. */
export interface ReadSegment {
  offset: number;
  length: number;
  hole: boolean;
  /** Where a data segment lies plainly, in one piece, in one file (from block status). */
  host?: { file: string; offset: number };
}

export function allocationFlags(e: Extent): number {
  switch (e.kind) {
    case 'data':
      return e.zeroData ? C.STATE_ZERO : 0;
    case 'zero':
    case 'unallocated':
      return C.STATE_HOLE | C.STATE_ZERO;
  }
}

/** The chain layer `level` steps below `top` (0 = top). */
function layer(top: BlockDriver, level: number): BlockDriver | undefined {
  let d: BlockDriver | undefined = top;
  for (let i = 0; i < level && d; i++) d = d.backing;
  return d;
}

/**
 * qemu's allocation depth. Allocated (data or zero) at chain level d → d + 1. Unallocated
 * everywhere → 0, except that a range past the end of a shorter backing file counts as allocated
 * by that backing file (as QEMU reports it): the driver's depth for an unallocated extent names the
 * deepest level consulted, and if that level has a backing file the range lay past its end.
 */
export function allocationDepth(top: BlockDriver, e: Extent): number {
  if (e.kind !== 'unallocated') return e.depth + 1;
  const deepest = layer(top, e.depth);
  return deepest?.backing ? e.depth + 2 : 0;
}

/**
 * Driver extents covering `[offset, offset + length)` from its start; stops early once `limit`
 * extents were collected (the last one may then end before the range does).
 */
export async function collectExtents(driver: BlockDriver, offset: number, length: number, limit: number): Promise<Extent[]> {
  const out: Extent[] = [];
  const end = offset + length;
  let pos = offset;
  const inDriver = Math.min(end, driver.size);
  while (pos < inDriver && out.length < limit) {
    const ext = await driver.blockStatus(pos, inDriver - pos);
    if (!ext.length) throw new Error(`block status returned nothing at offset ${pos}`);
    for (const e of ext) {
      const s = Math.max(e.offset, pos);
      const t = Math.min(e.offset + e.length, inDriver);
      if (s !== pos || t <= s) throw new Error(`block status returned an inconsistent extent at offset ${pos}`);
      out.push(s === e.offset && t === e.offset + e.length ? e : { ...e, offset: s, length: t - s });
      pos = t;
      if (pos >= inDriver) break;
    }
  }
  // The export is padded up to a multiple of 512 bytes: the padding reads as zeros.
  if (pos >= driver.size && pos < end && out.length < limit) {
    out.push({ offset: pos, length: end - pos, kind: 'zero', depth: 0 });
  }
  return out;
}

/** Merge runs with equal values into NBD descriptors; at most `max` descriptors. */
export function toDescriptors(runs: Array<{ length: number; value: number }>, max: number): NbdExtent[] {
  const out: NbdExtent[] = [];
  for (const r of runs) {
    if (r.length <= 0) continue;
    const last = out[out.length - 1];
    if (last && last.flags === r.value && last.length + r.length <= 0xffffffff) {
      last.length += r.length;
      continue;
    }
    if (out.length >= max) break;
    out.push({ length: r.length, flags: r.value });
  }
  return out;
}

/** A READ's pieces: runs that read as zeros become holes, the rest data (adjacent runs merged). */
export function readSegments(extents: Extent[]): ReadSegment[] {
  const out: ReadSegment[] = [];
  for (const e of extents) {
    const hole = e.kind !== 'data' || e.zeroData === true;
    const host = !hole && e.hostOffset !== undefined && e.file !== undefined ? { file: e.file, offset: e.hostOffset } : undefined;
    const last = out[out.length - 1];
    if (last && last.hole === hole && last.offset + last.length === e.offset) {
      // still one host run only if this extent continues it in the same file
      if (last.host && !(host && host.file === last.host.file && host.offset === last.host.offset + last.length)) delete last.host;
      last.length += e.length;
    } else out.push(host ? { offset: e.offset, length: e.length, hole, host } : { offset: e.offset, length: e.length, hole });
  }
  return out;
}
