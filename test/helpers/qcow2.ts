/**
 * Just enough independent qcow2 parsing for tests to locate metadata they want to corrupt
 * (header offsets per the qcow2 specification; see /work/shared/qcow-notes.md §1-2).
 */
import * as fs from 'node:fs';
import { readAt, readU32, readU64 } from './files.js';

export const H = {
  magic: 0,
  version: 4,
  backingFileOffset: 8,
  backingFileSize: 16,
  clusterBits: 20,
  size: 24,
  cryptMethod: 32,
  l1Size: 36,
  l1TableOffset: 40,
  refcountTableOffset: 48,
  refcountTableClusters: 56,
  nbSnapshots: 60,
  snapshotsOffset: 64,
  incompatibleFeatures: 72,
  compatibleFeatures: 80,
  autoclearFeatures: 88,
  refcountOrder: 96,
  headerLength: 100,
  compressionType: 104,
} as const;

export interface Header {
  version: number;
  clusterBits: number;
  clusterSize: number;
  size: bigint;
  l1Size: number;
  l1TableOffset: number;
  incompat: bigint;
  headerLength: number;
  extendedL2: boolean;
}

export function readHeader(file: string): Header {
  const version = readU32(file, H.version);
  const clusterBits = readU32(file, H.clusterBits);
  const incompat = version >= 3 ? readU64(file, H.incompatibleFeatures) : 0n;
  return {
    version,
    clusterBits,
    clusterSize: 2 ** clusterBits,
    size: readU64(file, H.size),
    l1Size: readU32(file, H.l1Size),
    l1TableOffset: Number(readU64(file, H.l1TableOffset)),
    incompat,
    headerLength: version >= 3 ? readU32(file, H.headerLength) : 72,
    extendedL2: (incompat & (1n << 4n)) !== 0n,
  };
}

export interface L2Slot {
  /** Guest offset of the cluster this entry maps. */
  guestOffset: number;
  /** Where the (first u64 of the) entry lives in the file. */
  fileOffset: number;
  entry: bigint;
  /** Extended L2 bitmap (second u64), if any. */
  bitmap?: bigint;
}

const L2_OFFSET_MASK = 0x00fffffffffffe00n;
const L1_OFFSET_MASK = 0x00fffffffffffe00n;
export const OFLAG_COPIED = 1n << 63n;
export const OFLAG_COMPRESSED = 1n << 62n;
export const OFLAG_ZERO = 1n;

/** Active L1 entries (index, file offset of the entry, L2 table offset). */
export function l1Entries(file: string): Array<{ index: number; fileOffset: number; entry: bigint; l2Offset: number }> {
  const h = readHeader(file);
  const raw = readAt(file, h.l1TableOffset, h.l1Size * 8);
  const out = [];
  for (let i = 0; i < h.l1Size; i++) {
    const entry = raw.readBigUInt64BE(i * 8);
    out.push({ index: i, fileOffset: h.l1TableOffset + i * 8, entry, l2Offset: Number(entry & L1_OFFSET_MASK) });
  }
  return out;
}

/** All non-zero L2 entries reachable from the active L1 table. */
export function l2Slots(file: string): L2Slot[] {
  const h = readHeader(file);
  const entrySize = h.extendedL2 ? 16 : 8;
  const perL2 = h.clusterSize / entrySize;
  const out: L2Slot[] = [];
  for (const l1 of l1Entries(file)) {
    if (l1.l2Offset === 0) continue;
    const table = readAt(file, l1.l2Offset, h.clusterSize);
    for (let j = 0; j < perL2; j++) {
      const entry = table.readBigUInt64BE(j * entrySize);
      const bitmap = h.extendedL2 ? table.readBigUInt64BE(j * entrySize + 8) : undefined;
      if (entry === 0n && !bitmap) continue;
      out.push({
        guestOffset: (l1.index * perL2 + j) * h.clusterSize,
        fileOffset: l1.l2Offset + j * entrySize,
        entry,
        bitmap,
      });
    }
  }
  return out;
}

/** Decode a compressed L2 entry per the spec: offset in the low x bits, additional sectors above. */
export function compressedFields(entry: bigint, clusterBits: number): { offset: bigint; sectors: bigint; x: number; countBits: number } {
  const x = 62 - (clusterBits - 8);
  const countBits = clusterBits - 8;
  const offset = entry & ((1n << BigInt(x)) - 1n);
  const sectors = (entry >> BigInt(x)) & ((1n << BigInt(countBits)) - 1n);
  return { offset, sectors, x, countBits };
}

export function compressedEntry(offset: bigint, sectors: bigint, clusterBits: number): bigint {
  const x = 62 - (clusterBits - 8);
  return OFLAG_COMPRESSED | (sectors << BigInt(x)) | offset;
}

export function stdOffset(entry: bigint): number {
  return Number(entry & L2_OFFSET_MASK);
}

export function fileSize(file: string): number {
  return fs.statSync(file).size;
}

export interface HeaderExtension {
  type: number;
  /** File offset of the extension header (type field). */
  offset: number;
  data: Buffer;
}

/** Header extensions of a qcow2 image, in file order (END excluded). */
export function headerExtensions(file: string): HeaderExtension[] {
  const h = readHeader(file);
  const bfo = Number(readU64(file, H.backingFileOffset));
  const end = bfo > 0 ? bfo : h.clusterSize;
  const area = readAt(file, 0, end);
  const out: HeaderExtension[] = [];
  let off = h.headerLength;
  while (off + 8 <= end) {
    const type = area.readUInt32BE(off);
    const len = area.readUInt32BE(off + 4);
    if (type === 0) break;
    out.push({ type, offset: off, data: area.subarray(off + 8, off + 8 + len) });
    off += 8 + Math.ceil(len / 8) * 8;
  }
  return out;
}

/** Rewrite the extension area without extensions of `type` (the freed bytes become zero). */
export function removeHeaderExtension(file: string, type: number): void {
  const h = readHeader(file);
  const exts = headerExtensions(file);
  const kept = exts.filter((e) => e.type !== type);
  const parts: Buffer[] = [];
  for (const e of kept) {
    const hdr = Buffer.alloc(8);
    hdr.writeUInt32BE(e.type, 0);
    hdr.writeUInt32BE(e.data.length, 4);
    parts.push(hdr, Buffer.from(e.data), Buffer.alloc(Math.ceil(e.data.length / 8) * 8 - e.data.length));
  }
  parts.push(Buffer.alloc(8)); // END
  const oldEnd = exts.length ? exts[exts.length - 1]!.offset + 8 + Math.ceil(exts[exts.length - 1]!.data.length / 8) * 8 + 8 : h.headerLength + 8;
  const buf = Buffer.concat(parts);
  const padded = Buffer.concat([buf, Buffer.alloc(Math.max(0, oldEnd - h.headerLength - buf.length))]);
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, padded, 0, padded.length, h.headerLength);
  } finally {
    fs.closeSync(fd);
  }
}

export const EXT = {
  backingFormat: 0xe2792aca,
  featureTable: 0x6803f857,
  bitmaps: 0x23852875,
  dataFile: 0x44415441,
} as const;
