/**
 * The qcow2 header and its extensions: decoding, validation against QEMU's limits, encoding.
 * Pure structure code: no I/O.
 */
import { QcowError } from '../../core/errors.js';
import * as C from './constants.js';

export interface FeatureName {
  type: number; // 0 incompatible, 1 compatible, 2 autoclear
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

export interface HeaderExtension {
  type: number;
  data: Uint8Array;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Bytes between the fields we know and header_length, kept verbatim. */
  unknownHeaderFields: Uint8Array;
  backingFormat?: string;
  featureNames: FeatureName[];
  bitmaps?: BitmapsExtension;
  cryptoHeader?: { offset: number; length: number };
  dataFile?: string;
  /** Extensions we do not know, preserved in order. */
  unknownExtensions: HeaderExtension[];
  backingFile?: string;
}

const dec = new TextDecoder('utf-8', { fatal: false });

function u64(dv: DataView, off: number): number {
  const hi = dv.getUint32(off);
  const lo = dv.getUint32(off + 4);
  return hi * 0x100000000 + lo;
}

function badImage(msg: string): QcowError {
  return new QcowError('ECORRUPT', msg);
}

/** Validate a table location like QEMU's validate_table_offset (alignment, no 63-bit overflow). */
export function tableOffsetValid(offset: number, entries: number, entryLen: number, clusterSize: number): boolean {
  const size = entries * entryLen;
  if (offset + size > 2 ** 63 - 1) return false;
  return offset % clusterSize === 0;
}

/** Fixed-size fields. `buf` holds at least the first cluster (or the whole file if smaller). */
export function decodeHeader(buf: Uint8Array): Qcow2Header {
  if (buf.length < C.V2_HEADER_LENGTH) throw badImage('Image is not in qcow2 format');
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (dv.getUint32(0) !== C.QCOW_MAGIC) throw badImage('Image is not in qcow2 format');
  const version = dv.getUint32(4);
  if (version < 2 || version > 3) throw new QcowError('ENOTSUP', `Unsupported qcow2 version ${version}`);
  const clusterBits = dv.getUint32(20);
  if (clusterBits < C.MIN_CLUSTER_BITS || clusterBits > C.MAX_CLUSTER_BITS) {
    throw badImage(`Unsupported cluster size: 2^${clusterBits}`);
  }
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version: version as 2 | 3,
    backingFileOffset: u64(dv, 8),
    backingFileSize: dv.getUint32(16),
    clusterBits,
    size: u64(dv, 24),
    cryptMethod: dv.getUint32(32),
    l1Size: dv.getUint32(36),
    l1TableOffset: u64(dv, 40),
    refcountTableOffset: u64(dv, 48),
    refcountTableClusters: dv.getUint32(56),
    nbSnapshots: dv.getUint32(60),
    snapshotsOffset: u64(dv, 64),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: C.V2_HEADER_LENGTH,
    compressionType: 0,
    unknownHeaderFields: new Uint8Array(0),
    featureNames: [],
    unknownExtensions: [],
  };
  if (version === 3) {
    if (buf.length < C.V3_HEADER_LENGTH) throw badImage('qcow2 header too short');
    h.incompatibleFeatures = dv.getBigUint64(72);
    h.compatibleFeatures = dv.getBigUint64(80);
    h.autoclearFeatures = dv.getBigUint64(88);
    h.refcountOrder = dv.getUint32(96);
    h.headerLength = dv.getUint32(100);
    if (h.headerLength < C.V3_HEADER_LENGTH) throw badImage('qcow2 header too short');
    if (h.headerLength > clusterSize) throw badImage('qcow2 header exceeds cluster size');
    if (h.headerLength > buf.length) throw badImage('qcow2 header exceeds the end of the file');
    if (h.headerLength > C.V3_HEADER_LENGTH) {
      h.compressionType = buf[104]!;
      const known = Math.min(h.headerLength, C.V3_HEADER_LENGTH_WITH_COMPRESSION);
      h.unknownHeaderFields = buf.slice(known, h.headerLength);
    }
  }
  if (h.backingFileOffset > clusterSize) throw badImage('Invalid backing file offset');
  return h;
}

/**
 * Parse header extensions from the first cluster. Called after decodeHeader; fills in the
 * extension fields and the backing file name. Mirrors qcow2_read_extensions' checks.
 */
export function decodeExtensions(h: Qcow2Header, cluster0: Uint8Array): void {
  const clusterSize = 2 ** h.clusterBits;
  const start = h.headerLength;
  const end = Math.min(h.backingFileOffset ? h.backingFileOffset : clusterSize, cluster0.length);
  const dv = new DataView(cluster0.buffer, cluster0.byteOffset, cluster0.byteLength);
  let off = start;
  while (off < end) {
    if (end - off < 8) throw badImage('Header extension too large');
    const type = dv.getUint32(off);
    const len = dv.getUint32(off + 4);
    off += 8;
    if (len > end - off) throw badImage('Header extension too large');
    if (type === C.EXT_END) break;
    const data = cluster0.subarray(off, off + len);
    switch (type) {
      case C.EXT_BACKING_FORMAT:
        if (len >= 16) throw badImage(`ext_backing_format: len=${len} too large (>=16)`);
        h.backingFormat = dec.decode(data);
        break;
      case C.EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= len; i += 48) {
          const raw = data.subarray(i + 2, i + 48);
          const nul = raw.indexOf(0);
          h.featureNames.push({ type: data[i]!, bit: data[i + 1]!, name: dec.decode(nul < 0 ? raw : raw.subarray(0, nul)) });
        }
        break;
      case C.EXT_BITMAPS: {
        if (len !== 24) throw badImage('bitmaps_ext: Invalid extension length');
        const bdv = new DataView(data.buffer, data.byteOffset, 24);
        const nb = bdv.getUint32(0);
        if (bdv.getUint32(4) !== 0) throw badImage('bitmaps_ext: Reserved field is not zero');
        if (nb === 0) throw badImage('bitmaps_ext: found bitmaps extension with zero bitmaps');
        if (nb > C.QCOW2_MAX_BITMAPS) throw badImage('bitmaps_ext: Image has too many bitmaps');
        const dirSize = u64(bdv, 8);
        const dirOffset = u64(bdv, 16);
        if (dirSize > C.QCOW2_MAX_BITMAP_DIRECTORY_SIZE) throw badImage('bitmaps_ext: bitmap directory size exceeds the limit');
        if (dirOffset % clusterSize !== 0) throw badImage('bitmaps_ext: invalid bitmap directory offset');
        h.bitmaps = { nbBitmaps: nb, directorySize: dirSize, directoryOffset: dirOffset };
        break;
      }
      case C.EXT_CRYPTO_HEADER: {
        if (h.cryptMethod !== C.CRYPT_LUKS) throw badImage('CRYPTO header extension only expected with LUKS encryption method');
        if (len !== 16) throw badImage(`CRYPTO header extension size ${len}, but expected size 16`);
        const cdv = new DataView(data.buffer, data.byteOffset, 16);
        const coff = u64(cdv, 0);
        const clen = u64(cdv, 8);
        if (coff % clusterSize !== 0) throw badImage(`Encryption header offset '${coff}' is not a multiple of cluster size '${clusterSize}'`);
        h.cryptoHeader = { offset: coff, length: clen };
        break;
      }
      case C.EXT_DATA_FILE:
        h.dataFile = dec.decode(data);
        break;
      default:
        h.unknownExtensions.push({ type, data: data.slice() });
    }
    off += (len + 7) & ~7;
  }
  if (h.backingFileOffset) {
    const maxLen = Math.min(C.MAX_BACKING_FILE_NAME, clusterSize - h.backingFileOffset);
    if (h.backingFileSize > maxLen) throw badImage('Backing file name too long');
    if (h.backingFileOffset + h.backingFileSize > cluster0.length) throw badImage('Backing file name is past the end of the file');
    // An empty name means no backing file (as QEMU reads it).
    if (h.backingFileSize > 0) h.backingFile = dec.decode(cluster0.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize));
  }
}

/** "Unsupported qcow2 feature(s): ..." as QEMU words it, naming bits from the feature name table. */
export function unsupportedFeatureMessage(h: Qcow2Header, mask: bigint): string {
  const parts: string[] = [];
  let rest = mask;
  for (const f of h.featureNames) {
    if (f.type !== 0 || f.bit > 63) continue;
    const bit = 1n << BigInt(f.bit);
    if (rest & bit) {
      parts.push(f.name);
      rest &= ~bit;
    }
  }
  if (rest) parts.push(`Unknown incompatible feature: ${rest.toString(16)}`);
  return `Unsupported qcow2 feature(s): ${parts.join(', ')}`;
}

/** Checks QEMU makes at open time on the fixed fields (after extensions are read). */
export function validateHeader(h: Qcow2Header, opts: { readOnly: boolean; forCheck?: boolean }): void {
  const clusterSize = 2 ** h.clusterBits;
  const unknown = h.incompatibleFeatures & ~C.INCOMPAT_MASK;
  if (unknown) throw new QcowError('ENOTSUP', unsupportedFeatureMessage(h, unknown));
  if (h.incompatibleFeatures & C.INCOMPAT_CORRUPT && !opts.readOnly && !opts.forCheck) {
    throw new QcowError('EPERM', 'qcow2: Image is corrupt; cannot be opened read/write');
  }
  if (h.refcountOrder > 6) throw badImage('Reference count entry width too large; may not exceed 64 bits');
  if (h.cryptMethod > C.CRYPT_LUKS) throw new QcowError('ENOTSUP', `Unsupported encryption method ${h.cryptMethod}`);
  if (h.cryptMethod === C.CRYPT_LUKS && !h.cryptoHeader) throw badImage('LUKS-encrypted image is missing its encryption header extension');
  if (h.compressionType > 1) throw badImage(`qcow2: unknown compression type: ${h.compressionType}`);
  if (h.compressionType !== 0 && !(h.incompatibleFeatures & C.INCOMPAT_COMPRESSION)) {
    throw badImage('qcow2: Compression type incompatible feature bit must be set');
  }
  if (h.compressionType === 0 && h.incompatibleFeatures & C.INCOMPAT_COMPRESSION) {
    throw badImage('qcow2: Compression type incompatible feature bit must not be set');
  }
  if (h.incompatibleFeatures & C.INCOMPAT_EXTL2 && h.clusterBits < 14) {
    throw badImage('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  }
  if (h.l1Size > C.QCOW_MAX_L1_SIZE / 8) throw badImage('Active L1 table too large');
  const l2Bits = h.clusterBits - (h.incompatibleFeatures & C.INCOMPAT_EXTL2 ? 4 : 3);
  const l1Needed = Math.ceil(h.size / 2 ** (l2Bits + h.clusterBits));
  if (h.size > Number.MAX_SAFE_INTEGER || l1Needed > 0x7fffffff) throw new QcowError('EFBIG', 'Image is too big');
  if (h.l1Size < l1Needed) throw badImage('L1 table is too small');
  if (!tableOffsetValid(h.l1TableOffset, h.l1Size, 8, clusterSize)) throw badImage('Active L1 table offset invalid');
  const maxReftableClusters = C.QCOW_MAX_REFTABLE_SIZE / clusterSize;
  if (h.refcountTableClusters > Math.max(1, maxReftableClusters)) throw badImage('Reference count table too large');
  if (h.refcountTableClusters === 0 && !opts.forCheck) throw badImage('Image does not contain a reference count table');
  if (!tableOffsetValid(h.refcountTableOffset, h.refcountTableClusters * clusterSize, 1, clusterSize)) {
    throw badImage('Reference count table offset invalid');
  }
  if (h.nbSnapshots > C.QCOW_MAX_SNAPSHOTS) throw badImage('Snapshot table too large');
  if (!tableOffsetValid(h.snapshotsOffset, h.nbSnapshots, 40, clusterSize)) throw badImage('Snapshot table offset invalid');
  if (h.autoclearFeatures & C.AUTOCLEAR_DATA_FILE_RAW && !(h.incompatibleFeatures & C.INCOMPAT_DATA_FILE)) {
    // QEMU 7.2 tolerates this for read-only opens; refuse only writes.
    if (!opts.readOnly) throw badImage('data-file-raw requires a data file');
  }
}

export function featureNameTableBytes(names: FeatureName[]): Uint8Array {
  const out = new Uint8Array(names.length * 48);
  const enc = new TextEncoder();
  names.forEach((f, i) => {
    out[i * 48] = f.type;
    out[i * 48 + 1] = f.bit;
    out.set(enc.encode(f.name).subarray(0, 46), i * 48 + 2);
  });
  return out;
}

/**
 * Encode the header, its extensions and the backing file name into one cluster-0 image
 * (length = the bytes that must be written at offset 0). Extension order as QEMU writes it.
 * Sets backingFileOffset/backingFileSize from the content.
 */
/** Write the header's refcount table pointer (offset and cluster count, bytes 48..59) in place. */
export async function writeReftablePointer(io: { write(buf: Uint8Array, offset: number): Promise<void> }, offset: number, clusters: number): Promise<void> {
  const b = new Uint8Array(12);
  const dv = new DataView(b.buffer);
  dv.setBigUint64(0, BigInt(offset));
  dv.setUint32(8, clusters);
  await io.write(b, 48);
}

export function encodeHeader(h: Qcow2Header): Uint8Array {
  const clusterSize = 2 ** h.clusterBits;
  const enc = new TextEncoder();
  const exts: Array<{ type: number; data: Uint8Array }> = [];
  if (h.backingFormat) exts.push({ type: C.EXT_BACKING_FORMAT, data: enc.encode(h.backingFormat) });
  if (h.dataFile !== undefined) exts.push({ type: C.EXT_DATA_FILE, data: enc.encode(h.dataFile) });
  if (h.cryptoHeader) {
    const d = new Uint8Array(16);
    const dv = new DataView(d.buffer);
    dv.setBigUint64(0, BigInt(h.cryptoHeader.offset));
    dv.setBigUint64(8, BigInt(h.cryptoHeader.length));
    exts.push({ type: C.EXT_CRYPTO_HEADER, data: d });
  }
  if (h.version === 3 && h.featureNames.length) exts.push({ type: C.EXT_FEATURE_TABLE, data: featureNameTableBytes(h.featureNames) });
  if (h.bitmaps) {
    const d = new Uint8Array(24);
    const dv = new DataView(d.buffer);
    dv.setUint32(0, h.bitmaps.nbBitmaps);
    dv.setBigUint64(8, BigInt(h.bitmaps.directorySize));
    dv.setBigUint64(16, BigInt(h.bitmaps.directoryOffset));
    exts.push({ type: C.EXT_BITMAPS, data: d });
  }
  for (const u of h.unknownExtensions) exts.push(u);

  const headerLength = h.version === 3 ? h.headerLength : C.V2_HEADER_LENGTH;
  let extBytes = 8; // END
  for (const e of exts) extBytes += 8 + ((e.data.length + 7) & ~7);
  const backing = h.backingFile !== undefined ? enc.encode(h.backingFile) : undefined;
  const total = headerLength + extBytes + (backing ? backing.length : 0);
  if (total > clusterSize) throw new QcowError('EINVAL', 'Header and extensions do not fit in the first cluster');
  const buf = new Uint8Array(total);
  const dv = new DataView(buf.buffer);
  dv.setUint32(0, C.QCOW_MAGIC);
  dv.setUint32(4, h.version);
  const backingOffset = backing ? headerLength + extBytes : 0;
  dv.setBigUint64(8, BigInt(backingOffset));
  dv.setUint32(16, backing ? backing.length : 0);
  dv.setUint32(20, h.clusterBits);
  dv.setBigUint64(24, BigInt(h.size));
  dv.setUint32(32, h.cryptMethod);
  dv.setUint32(36, h.l1Size);
  dv.setBigUint64(40, BigInt(h.l1TableOffset));
  dv.setBigUint64(48, BigInt(h.refcountTableOffset));
  dv.setUint32(56, h.refcountTableClusters);
  dv.setUint32(60, h.nbSnapshots);
  dv.setBigUint64(64, BigInt(h.snapshotsOffset));
  if (h.version === 3) {
    dv.setBigUint64(72, h.incompatibleFeatures);
    dv.setBigUint64(80, h.compatibleFeatures);
    dv.setBigUint64(88, h.autoclearFeatures);
    dv.setUint32(96, h.refcountOrder);
    dv.setUint32(100, headerLength);
    if (headerLength > C.V3_HEADER_LENGTH) buf[104] = h.compressionType;
    if (h.unknownHeaderFields.length) buf.set(h.unknownHeaderFields, Math.min(headerLength, C.V3_HEADER_LENGTH_WITH_COMPRESSION));
  }
  let off = headerLength;
  for (const e of exts) {
    dv.setUint32(off, e.type);
    dv.setUint32(off + 4, e.data.length);
    buf.set(e.data, off + 8);
    off += 8 + ((e.data.length + 7) & ~7);
  }
  off += 8; // END (zeros)
  if (backing) buf.set(backing, off);
  h.backingFileOffset = backingOffset;
  h.backingFileSize = backing ? backing.length : 0;
  return buf;
}
