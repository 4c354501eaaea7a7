/** qcow2 on-disk constants and the limits QEMU enforces on untrusted images (block/qcow2.h). */
export const QCOW_MAGIC = 0x514649fb;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** Maximum size of an L1 table in bytes. */
export const QCOW_MAX_L1_SIZE = 0x2000000;
/** Maximum size of the refcount table in bytes. */
export const QCOW_MAX_REFTABLE_SIZE = 0x800000;
export const QCOW_MAX_SNAPSHOTS = 65536;
export const QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS;
export const QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024;
export const QCOW2_MAX_BITMAPS = 65535;
export const QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS;
export const MAX_BACKING_FILE_NAME = 1023;
/** Backing chains deeper than this are refused (QEMU's BDRV_BACKING_CHAIN limit for probing loops). */
export const MAX_BACKING_CHAIN_DEPTH = 1000;
export const V2_HEADER_LENGTH = 72;
export const V3_HEADER_LENGTH = 104;
/** header_length QEMU writes for new v3 images (with the compression_type field and padding). */
export const V3_HEADER_LENGTH_WITH_COMPRESSION = 112;

export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO_HEADER = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_MASK = 0x1fn;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;
export const AUTOCLEAR_MASK = 0x3n;

export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;

export const CRYPT_NONE = 0;
export const CRYPT_AES = 1;
export const CRYPT_LUKS = 2;

/** Names QEMU puts in the feature name table of new v3 images. */
export const QEMU_FEATURE_NAMES: Array<{ type: number; bit: number; name: string }> = [
  { type: 0, bit: 0, name: 'dirty bit' },
  { type: 0, bit: 1, name: 'corrupt bit' },
  { type: 0, bit: 2, name: 'external data file' },
  { type: 0, bit: 3, name: 'compression type' },
  { type: 0, bit: 4, name: 'extended L2 entries' },
  { type: 1, bit: 0, name: 'lazy refcounts' },
  { type: 2, bit: 0, name: 'bitmaps' },
  { type: 2, bit: 1, name: 'raw external data' },
];
