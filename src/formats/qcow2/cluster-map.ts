/**
 * Cluster mapping: guest offset → what backs it (L1 → L2 slice → entry, with extended-L2 subclusters).
 * Mirrors the spec's classification: unallocated, zero (plain / with a host cluster), normal,
 * compressed, and invalid subcluster bitmaps.
 */
import { QcowError } from '../../core/errors.js';
import type { L2Cache } from './l2-cache.js';

export type SubclusterType =
  | 'unallocated' // read from backing / zeros
  | 'unallocated-alloc' // extended L2: host cluster present but subcluster not allocated (read from backing)
  | 'zero-plain'
  | 'zero-alloc'
  | 'normal'
  | 'compressed'
  | 'invalid';

export interface Mapping {
  type: SubclusterType;
  /** Bytes from the asked offset that share this type (and host contiguity). Never 0. */
  bytes: number;
  /** Host offset of the asked guest offset (normal, zero-alloc, unallocated-alloc). */
  hostOffset?: number;
  /** For compressed clusters: where the compressed bytes are. */
  compressed?: { offset: number; length: number };
  /** For invalid entries: the reason. */
  problem?: string;
}

export interface Geometry {
  clusterBits: number;
  clusterSize: number;
  extendedL2: boolean;
  /** Bytes per L2 entry (8 or 16). */
  entryBytes: number;
  l2Entries: number;
  /** Guest bytes covered by one L1 entry. */
  l1Coverage: number;
  subclusterSize: number;
  subclustersPerCluster: number;
  /** External data file: L2 offsets must equal guest offsets; "offset 0 + COPIED" is allocated. */
  dataFile: boolean;
}

export function geometry(clusterBits: number, extendedL2: boolean, dataFile: boolean): Geometry {
  const clusterSize = 2 ** clusterBits;
  const entryBytes = extendedL2 ? 16 : 8;
  const l2Entries = clusterSize / entryBytes;
  const sc = extendedL2 ? 32 : 1;
  return {
    clusterBits,
    clusterSize,
    extendedL2,
    entryBytes,
    l2Entries,
    l1Coverage: l2Entries * clusterSize,
    subclusterSize: clusterSize / sc,
    subclustersPerCluster: sc,
    dataFile,
  };
}

const TWO32 = 0x100000000;

/** Host offset bits 9..55 of a descriptor given as two 32-bit halves. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);
}

export function corruption(msg: string): QcowError {
  return new CorruptionError(msg);
}

/** Metadata found invalid while using the image (QEMU's "corruption event"). */
export class CorruptionError extends QcowError {
  readonly detail: string;
  constructor(detail: string) {
    super('EIO', `Image is corrupt: ${detail}`);
    this.detail = detail;
  }
}

export class ClusterMap {
  constructor(
    readonly g: Geometry,
    /** L1 table as raw big-endian bytes. */
    public l1: Uint8Array,
    private cache: L2Cache,
  ) {}

  get l1Size(): number {
    return this.l1.length / 8;
  }

  /** L2 table offset for L1 index i (0 = none). Throws on an unaligned offset. */
  l2Offset(i: number): number {
    if (i >= this.l1Size) return 0;
    const dv = new DataView(this.l1.buffer, this.l1.byteOffset + i * 8, 8);
    const off = entryOffset(dv.getUint32(0), dv.getUint32(4));
    if (off % this.g.clusterSize !== 0) {
      throw corruption(`L2 table offset 0x${off.toString(16)} unaligned (L1 index: 0x${i.toString(16)})`);
    }
    return off;
  }

  /** Describe the guest range starting at `offset`, at most `maxBytes` long. */
  async lookup(offset: number, maxBytes: number): Promise<Mapping> {
    const g = this.g;
    const l1Index = Math.floor(offset / g.l1Coverage);
    const l2Off = this.l2Offset(l1Index);
    if (l2Off === 0) {
      // Skip consecutive empty L1 entries in one step.
      let end = (l1Index + 1) * g.l1Coverage;
      let i = l1Index + 1;
      while (end - offset < maxBytes && i < this.l1Size && this.l2Offset(i) === 0) {
        end += g.l1Coverage;
        i++;
      }
      if (i >= this.l1Size) end = Infinity;
      return { type: 'unallocated', bytes: Math.min(maxBytes, end - offset) };
    }
    const l2Index = Math.floor(offset / g.clusterSize) % g.l2Entries;
    const sliceEntries = this.cache.sliceBytes / g.entryBytes;
    const sliceStart = l2Index - (l2Index % sliceEntries);
    const slice = await this.cache.get(l2Off + sliceStart * g.entryBytes);
    const dv = new DataView(slice.buffer, slice.byteOffset, slice.byteLength);
    const inCluster = offset % g.clusterSize;
    const firstSc = Math.floor(inCluster / g.subclusterSize);
    const guestClusterStart = offset - inCluster;

    const type = this.classify(dv, l2Index - sliceStart, firstSc, guestClusterStart, l2Off, l2Index);
    if (type === 'compressed' || type === 'invalid') {
      return { ...this.special!, bytes: Math.min(maxBytes, g.clusterSize - inCluster) };
    }
    const firstHost = this.host;
    // Extend while the type stays the same and host offsets stay contiguous.
    let nextHost = firstHost >= 0 ? firstHost + g.subclusterSize : -1;
    let bytes = g.subclusterSize - (inCluster % g.subclusterSize);
    let idx = l2Index - sliceStart;
    let sc = firstSc + 1;
    let clusterStart = guestClusterStart;
    if (!g.extendedL2 && !g.dataFile) {
      // Whole entries, one subcluster each: compare the raw entries (hot in scans of big tables).
      const host = firstHost >= 0;
      const zero = type === 'zero-alloc' || type === 'zero-plain' ? 1 : 0;
      const last = Math.min(sliceEntries, g.l2Entries - sliceStart);
      while (bytes < maxBytes && ++idx < last) {
        const hi = dv.getUint32(idx * 8);
        const lo = dv.getUint32(idx * 8 + 4);
        if (hi & 0x40000000 || (lo & 1) !== zero) break;
        if (entryOffset(hi, lo) !== (host ? nextHost : 0)) break;
        if (host) nextHost += g.clusterSize;
        bytes += g.clusterSize;
      }
      return { type, bytes: Math.min(bytes, maxBytes), hostOffset: host ? firstHost + inCluster : undefined };
    }
    while (bytes < maxBytes) {
      if (sc >= g.subclustersPerCluster) {
        idx++;
        sc = 0;
        clusterStart += g.clusterSize;
        if (idx >= sliceEntries || sliceStart + idx >= g.l2Entries) break;
      }
      if (this.classify(dv, idx, sc, clusterStart, l2Off, sliceStart + idx) !== type) break;
      if (nextHost >= 0) {
        if (this.host !== nextHost) break;
        nextHost += g.subclusterSize;
      }
      bytes += g.subclusterSize;
      sc++;
    }
    return {
      type,
      bytes: Math.min(bytes, maxBytes),
      hostOffset: firstHost >= 0 ? firstHost + (inCluster % g.subclusterSize) : undefined,
    };
  }

  /** Host offset of the subcluster classify() last saw (-1: none); set by every call. */
  private host = -1;
  /** What classify() found for a compressed or invalid entry. */
  private special: Mapping | undefined;

  /**
   * Classify subcluster `sc` of entry `idx` in the slice; `this.host` becomes the host offset of the
   * start of that subcluster (-1 if none), `this.special` the details of a compressed or invalid
   * entry. No object is made for the common types: scans classify every entry of every table.
   */
  private classify(dv: DataView, idx: number, sc: number, guestCluster: number, l2Off: number, l2Index: number): SubclusterType {
    const g = this.g;
    this.host = -1;
    const base = idx * g.entryBytes;
    const hi = dv.getUint32(base);
    const lo = dv.getUint32(base + 4);
    // Only error paths name the entry: building this text for every entry cost more than the rest.
    const where = () => `(L2 offset: 0x${l2Off.toString(16)}, L2 index: 0x${l2Index.toString(16)})`;
    if (hi & 0x40000000) {
      if (g.dataFile) return this.invalid(`Compressed cluster entry found in image with external data file ${where()}`);
      const x = 70 - g.clusterBits; // bits 0..x-1: byte offset
      const offHiBits = x - 32;
      const coff = (hi & ((1 << offHiBits) - 1)) * TWO32 + (lo >>> 0);
      const nbAdditional = (hi >>> offHiBits) & ((1 << (g.clusterBits - 8)) - 1);
      const length = (nbAdditional + 1) * 512 - (coff % 512);
      this.special = { type: 'compressed', bytes: 0, compressed: { offset: coff, length } };
      return 'compressed';
    }
    const host = entryOffset(hi, lo);
    const copied = (hi & 0x80000000) !== 0;
    const allocated = host !== 0 || (g.dataFile && copied);
    if (allocated) {
      if (host % g.clusterSize !== 0) {
        return this.invalid(`Cluster allocation offset 0x${host.toString(16)} unaligned ${where()}`);
      }
      if (g.dataFile && host !== guestCluster) {
        return this.invalid(
          `External data file host cluster offset 0x${host.toString(16)} does not match guest cluster offset: 0x${guestCluster.toString(16)}`,
        );
      }
    }
    if (!g.extendedL2) {
      if (allocated) this.host = host;
      if (lo & 1) return allocated ? 'zero-alloc' : 'zero-plain';
      return allocated ? 'normal' : 'unallocated';
    }
    const allocBits = dv.getUint32(base + 12) >>> 0; // bits 0..31 of the bitmap
    const zeroBits = dv.getUint32(base + 8) >>> 0; // bits 32..63
    const bit = (1 << sc) >>> 0;
    const scHost = host + sc * g.subclusterSize;
    if (allocated) {
      if ((allocBits & zeroBits) !== 0) return this.invalid(`Invalid cluster entry found ${where()}`);
      this.host = scHost;
      if (zeroBits & bit) return 'zero-alloc';
      if (allocBits & bit) return 'normal';
      return 'unallocated-alloc';
    }
    if (allocBits !== 0) return this.invalid(`Invalid cluster entry found ${where()}`);
    if (zeroBits & bit) return 'zero-plain';
    return 'unallocated';
  }

  private invalid(problem: string): 'invalid' {
    this.special = { type: 'invalid', bytes: 0, problem };
    return 'invalid';
  }
}
