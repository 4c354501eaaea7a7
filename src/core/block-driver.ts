/**
 * The BlockDriver contract: every format driver implements it and every operation speaks it.
 * Offsets and lengths are bytes at any alignment.
 */
export type ExtentKind = 'data' | 'zero' | 'unallocated';

export interface Extent {
  offset: number;
  length: number;
  /**
   * data: bytes stored in some layer; zero: allocated as zeros in some layer;
   * unallocated: no layer of the chain holds it (reads as zeros).
   */
  kind: ExtentKind;
  /** Chain level that supplies the bytes (0 = this image). For unallocated: the deepest level consulted. */
  depth: number;
  /** Host offset where the range is stored plainly (uncompressed, unencrypted) in `file`. */
  hostOffset?: number;
  /** Name of the file that holds `hostOffset`. */
  file?: string;
  /** A data extent whose storage is known to read as zeros (e.g. preallocated over a file hole). */
  zeroData?: boolean;
}

export interface SnapshotInfo {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  /** Instruction count; undefined when icount was off (-1 on disk). */
  icount?: number;
  /** Virtual disk size recorded with the snapshot. */
  diskSize?: number;
}

/** What `info` shows about one image, gathered by its driver. */
export interface DriverInfo {
  clusterSize?: number;
  dirty: boolean;
  encrypted?: boolean;
  /** Backing name as stored in the image. */
  backingFilename?: string;
  /** Backing name resolved against the image's folder. */
  fullBackingFilename?: string;
  backingFormat?: string;
  snapshots?: SnapshotInfo[];
  /** Format-specific block in QEMU's ImageInfoSpecific shape and key order. */
  formatSpecific?: { type: string; data: Record<string, unknown> };
}

export interface BlockDriver {
  /** Format name as qemu-img reports it: 'qcow2', 'raw', 'qcow'. */
  readonly format: string;
  /** Name of the image as opened. */
  readonly filename: string;
  /** Virtual size in bytes. */
  readonly size: number;
  readonly readOnly: boolean;
  /** The backing image, if any (already opened). */
  readonly backing?: BlockDriver;
  read(offset: number, length: number): Promise<Uint8Array>;
  /** Read into a caller buffer (avoids an allocation on hot paths). */
  readInto(buf: Uint8Array, offset: number): Promise<void>;
  /**
   * Optional: readInto that may also describe the 512-byte sectors of `buf` as runs of data and
   * of zeros (done where the bytes were read, off the main thread): `runs[0]` is then their count
   * and `runs[1..]` their lengths in sectors, data first (maybe 0), alternating; `runs` holds
   * sectors + 2 entries. `runs[0]` is 0 when they were not made.
   */
  readIntoScanned?(buf: Uint8Array, offset: number, runs: Uint32Array): Promise<void>;
  write(offset: number, data: Uint8Array): Promise<void>;
  writeZeroes(offset: number, length: number, opts?: { mayUnmap?: boolean }): Promise<void>;
  discard(offset: number, length: number): Promise<void>;
  /**
   * Consecutive extents covering `[offset, offset+length)` (possibly fewer bytes than asked, never
   * zero), resolved through the backing chain. Costs only metadata reads.
   */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  flush(): Promise<void>;
  close(): Promise<void>;
  /** Facts for `info`. */
  info(): DriverInfo;
  /** Bytes of storage used by this image's own files (qemu-img's "disk size"); undefined if unknown. */
  actualSize(): Promise<number | undefined>;
}

/** Everything a driver needs to know about how it is opened. */
export interface OpenOptions {
  readOnly?: boolean;
  /** Format of this image; probed when absent. */
  format?: string;
  /** Do not open the backing file (like qemu-img info / -u). */
  noBacking?: boolean;
  /** Read the content of this internal snapshot (by id or name). */
  snapshot?: { id?: string; name?: string };
  /** External data file name override (`data-file` open option). */
  dataFile?: string;
  /** Encryption: secrets by id (`--object secret,id=ID,...`), raw bytes. */
  secrets?: Map<string, Uint8Array>;
  /** Encryption: `encrypt.key-secret`, the id of the secret holding the image's password. */
  keySecret?: string;
}
