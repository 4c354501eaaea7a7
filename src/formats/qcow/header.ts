/**
 * qcow version 1 ("qcow") on-disk header: pure encode / decode / validation, L2 entry decoding and
 * the layout qemu-img 7.2 uses for new images. No I/O here.
 *
 * Header (48 bytes, big-endian):
 *   0 magic "QFI\xfb" | 4 version (1) | 8 backing_file_offset u64 | 16 backing_file_size u32 |
 *   20 mtime u32 | 24 size u64 | 32 cluster_bits u8 | 33 l2_bits u8 | 34 padding u16 |
 *   36 crypt_method u32 | 40 l1_table_offset u64
 *
 * Validation follows QEMU 7.2's open checks, in QEMU's order and with its messages (captured by
 * poking headers and running `qemu-img info`), plus two checks of our own that keep hostile images
 * from causing huge allocations: the virtual size must be a safe integer and the L1 table must lie
 * inside the file.
 */
import { QcowError } from '../../core/errors.js';

export const QCOW_MAGIC = 0x514649fb;
export const QCOW_VERSION = 1;
export const QCOW_HEADER_SIZE = 48;
export const QCOW_CRYPT_NONE = 0;
export const QCOW_CRYPT_AES = 1;
export const QCOW_MIN_CLUSTER_BITS = 9;
export const QCOW_MAX_CLUSTER_BITS = 16;
export const QCOW_MIN_L2_BITS = 6;
export const QCOW_MAX_L2_BITS = 13;
export const QCOW_MAX_BACKING_FILE_NAME = 1023;
/** QEMU refuses L1 tables with more entries than INT_MAX / 8. */
export const QCOW_MAX_L1_ENTRIES = Math.floor(0x7fffffff / 8);
/** Defaults of `qemu-img create -f qcow`: without / with a backing file. */
export const QCOW_DEFAULT_CLUSTER_BITS = 12;
export const QCOW_DEFAULT_L2_BITS = 9;
export const QCOW_BACKED_CLUSTER_BITS = 9;
export const QCOW_BACKED_L2_BITS = 12;

const SECTOR = 512;
const U64_MAX = (1n << 64n) - 1n;

/** The header fields exactly as stored. */
export interface QcowHeader {
  magic: number;
  version: number;
  backingFileOffset: bigint;
  backingFileSize: number;
  mtime: number;
  size: bigint;
  clusterBits: number;
  l2Bits: number;
  cryptMethod: number;
  l1TableOffset: bigint;
}

/** What the driver needs, derived from a validated header. */
export interface QcowGeometry {
  clusterBits: number;
  clusterSize: number;
  l2Bits: number;
  /** Entries per L2 table. */
  l2Entries: number;
  /** Bytes of one L2 table (l2Entries * 8). */
  l2TableBytes: number;
  /** Guest bytes covered by one L1 entry. */
  l1Coverage: number;
  l1Size: number;
  l1TableOffset: number;
  /** Virtual size as QEMU reports it: the header size rounded down to whole sectors. */
  size: number;
  cryptMethod: number;
  /** Where the backing file name is stored (0 = no backing file). */
  backingFileOffset: number;
  backingFileSize: number;
}

function badImage(msg: string): QcowError {
  return new QcowError('ECORRUPT', msg);
}

/** Decode the 48-byte header. A shorter buffer is treated as zero-padded (what QEMU reads). */
export function decodeQcowHeader(bytes: Uint8Array): QcowHeader {
  const b = new Uint8Array(QCOW_HEADER_SIZE);
  b.set(bytes.subarray(0, QCOW_HEADER_SIZE));
  const dv = new DataView(b.buffer);
  return {
    magic: dv.getUint32(0),
    version: dv.getUint32(4),
    backingFileOffset: dv.getBigUint64(8),
    backingFileSize: dv.getUint32(16),
    mtime: dv.getUint32(20),
    size: dv.getBigUint64(24),
    clusterBits: dv.getUint8(32),
    l2Bits: dv.getUint8(33),
    cryptMethod: dv.getUint32(36),
    l1TableOffset: dv.getBigUint64(40),
  };
}

export function encodeQcowHeader(h: QcowHeader): Uint8Array {
  const b = new Uint8Array(QCOW_HEADER_SIZE);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, h.magic >>> 0);
  dv.setUint32(4, h.version >>> 0);
  dv.setBigUint64(8, BigInt.asUintN(64, h.backingFileOffset));
  dv.setUint32(16, h.backingFileSize >>> 0);
  dv.setUint32(20, h.mtime >>> 0);
  dv.setBigUint64(24, BigInt.asUintN(64, h.size));
  dv.setUint8(32, h.clusterBits);
  dv.setUint8(33, h.l2Bits);
  dv.setUint32(36, h.cryptMethod >>> 0);
  dv.setBigUint64(40, BigInt.asUintN(64, h.l1TableOffset));
  return b;
}

/**
 * Validate a header like QEMU 7.2's qcow driver does when opening (same order, same messages), and
 * derive the geometry. `fileSize`, when given, also requires the L1 table to lie inside the file.
 */
export function validateQcowHeader(h: QcowHeader, fileSize?: number): QcowGeometry {
  if (h.magic !== QCOW_MAGIC) throw badImage('Image not in qcow format');
  if (h.version !== QCOW_VERSION) {
    throw new QcowError('ENOTSUP', `qcow (v1) does not support qcow version ${h.version}. Try the 'qcow2' driver instead.`);
  }
  if (h.clusterBits < QCOW_MIN_CLUSTER_BITS || h.clusterBits > QCOW_MAX_CLUSTER_BITS) {
    throw badImage('Cluster size must be between 512 and 64k');
  }
  // The L2 table is (1 << l2_bits) * 8 bytes: 512 B .. 64 KiB.
  if (h.l2Bits < QCOW_MIN_L2_BITS || h.l2Bits > QCOW_MAX_L2_BITS) {
    throw badImage('L2 table size must be between 512 and 64k');
  }
  if (h.size <= 1n) throw badImage('Image size is too small (must be at least 2 bytes)');
  if (h.cryptMethod > QCOW_CRYPT_AES) throw badImage('invalid encryption method in qcow header');
  const shift = h.clusterBits + h.l2Bits;
  const coverage = 1n << BigInt(shift);
  if (h.size > U64_MAX - coverage) throw new QcowError('EFBIG', 'Image too large');
  const l1Size = (h.size + coverage - 1n) >> BigInt(shift);
  if (l1Size > BigInt(QCOW_MAX_L1_ENTRIES)) throw new QcowError('EFBIG', 'Image too large');
  // QEMU stops here; a virtual size past 2^53 cannot be addressed with JS numbers.
  if (h.size > BigInt(Number.MAX_SAFE_INTEGER)) throw new QcowError('EFBIG', 'Image too large');
  let backingFileOffset = 0;
  let backingFileSize = 0;
  if (h.backingFileOffset !== 0n) {
    if (h.backingFileSize > QCOW_MAX_BACKING_FILE_NAME) throw badImage('Backing file name too long');
    // An offset past the end of the file reads as an empty name (no backing file), like QEMU.
    backingFileOffset = h.backingFileOffset > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(h.backingFileOffset);
    backingFileSize = h.backingFileSize;
  }
  const l1Bytes = Number(l1Size) * 8;
  if (fileSize !== undefined && (h.l1TableOffset > BigInt(fileSize) || Number(h.l1TableOffset) + l1Bytes > fileSize)) {
    throw badImage(
      `L1 table (offset 0x${h.l1TableOffset.toString(16)}, ${l1Bytes} bytes) is past the end of the file (${fileSize} bytes)`,
    );
  }
  const clusterSize = 2 ** h.clusterBits;
  const l2Entries = 2 ** h.l2Bits;
  const size = Number(h.size);
  return {
    clusterBits: h.clusterBits,
    clusterSize,
    l2Bits: h.l2Bits,
    l2Entries,
    l2TableBytes: l2Entries * 8,
    l1Coverage: clusterSize * l2Entries,
    l1Size: Number(l1Size),
    l1TableOffset: Number(h.l1TableOffset),
    size: size - (size % SECTOR),
    cryptMethod: h.cryptMethod,
    backingFileOffset,
    backingFileSize,
  };
}

const utf8 = new TextDecoder('utf-8', { fatal: false });
const utf8enc = new TextEncoder();

/** The backing file name from its stored bytes: up to the first NUL; empty means none (as in QEMU). */
export function decodeBackingName(bytes: Uint8Array): string | undefined {
  let end = bytes.indexOf(0);
  if (end < 0) end = bytes.length;
  return end === 0 ? undefined : utf8.decode(bytes.subarray(0, end));
}

// ------------------------------------------------------------------------------------------------
// L2 entries. 0 = unallocated; bit 63 = compressed, where the low (63 - cluster_bits) bits are the
// host byte offset and the next cluster_bits bits the compressed length in bytes; otherwise the
// host offset of a normal cluster.

export type QcowEntry =
  | { type: 'unallocated' }
  | { type: 'normal'; offset: number }
  | { type: 'compressed'; offset: number; length: number };

const TWO32 = 0x100000000;

/** Decode an L2 entry given as its two big-endian 32-bit halves. */
export function decodeL2Entry(hi: number, lo: number, clusterBits: number): QcowEntry {
  if (hi === 0 && lo === 0) return { type: 'unallocated' };
  if (hi & 0x80000000) {
    const offBits = 63 - clusterBits; // 47..54
    const v = (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
    const offset = Number(v & ((1n << BigInt(offBits)) - 1n));
    const length = Number((v >> BigInt(offBits)) & BigInt(2 ** clusterBits - 1));
    return { type: 'compressed', offset, length };
  }
  return { type: 'normal', offset: (hi >>> 0) * TWO32 + (lo >>> 0) };
}

/** Encode a compressed-cluster L2 entry as [hi, lo]. */
export function encodeCompressedEntry(offset: number, length: number, clusterBits: number): [number, number] {
  const v = (1n << 63n) | (BigInt(length) << BigInt(63 - clusterBits)) | BigInt(offset);
  return [Number(v >> 32n) >>> 0, Number(v & 0xffffffffn) >>> 0];
}

export function encodeOffsetEntry(offset: number): [number, number] {
  return [Math.floor(offset / TWO32) >>> 0, offset % TWO32 >>> 0];
}

// ------------------------------------------------------------------------------------------------
// New images.

export interface QcowCreateLayout {
  header: QcowHeader;
  /** Encoded header followed by the backing file name. */
  headerBytes: Uint8Array;
  l1Offset: number;
  l1Size: number;
  /** File size after creation: the L1 table is written as whole zeroed 512-byte sectors. */
  fileSize: number;
  /** Virtual size (rounded up to whole sectors). */
  size: number;
}

/** The image `qemu-img create -f qcow` writes: header, backing name, 8-aligned L1 in zeroed sectors. */
export function qcowCreateLayout(p: { size: number; backingFile?: string; clusterBits?: number; l2Bits?: number }): QcowCreateLayout {
  if (!Number.isSafeInteger(p.size) || p.size < 0) throw new QcowError('EINVAL', 'Invalid image size specified');
  const size = Math.ceil(p.size / SECTOR) * SECTOR;
  if (size === 0) throw new QcowError('EINVAL', 'Image size is too small, cannot be zero length');
  const name = p.backingFile ? utf8enc.encode(p.backingFile) : new Uint8Array(0);
  const backed = name.length > 0;
  const clusterBits = p.clusterBits ?? (backed ? QCOW_BACKED_CLUSTER_BITS : QCOW_DEFAULT_CLUSTER_BITS);
  const l2Bits = p.l2Bits ?? (backed ? QCOW_BACKED_L2_BITS : QCOW_DEFAULT_L2_BITS);
  if (name.length > QCOW_MAX_BACKING_FILE_NAME) throw new QcowError('EINVAL', 'Backing file name too long');
  const shift = clusterBits + l2Bits;
  const l1Size = Math.ceil(size / 2 ** shift);
  if (l1Size > QCOW_MAX_L1_ENTRIES) throw new QcowError('EFBIG', 'Image too large');
  const l1Offset = Math.ceil((QCOW_HEADER_SIZE + name.length) / 8) * 8;
  const header: QcowHeader = {
    magic: QCOW_MAGIC,
    version: QCOW_VERSION,
    backingFileOffset: backed ? BigInt(QCOW_HEADER_SIZE) : 0n,
    backingFileSize: name.length,
    mtime: 0,
    size: BigInt(size),
    clusterBits,
    l2Bits,
    cryptMethod: QCOW_CRYPT_NONE,
    l1TableOffset: BigInt(l1Offset),
  };
  const headerBytes = new Uint8Array(QCOW_HEADER_SIZE + name.length);
  headerBytes.set(encodeQcowHeader(header));
  headerBytes.set(name, QCOW_HEADER_SIZE);
  const fileSize = l1Offset + Math.ceil((l1Size * 8) / SECTOR) * SECTOR;
  return { header, headerBytes, l1Offset, l1Size, fileSize, size };
}
