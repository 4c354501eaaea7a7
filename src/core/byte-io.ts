/**
 * Byte-level storage under a format driver: a file, a memory buffer, an HTTP resource, a Blob.
 * Implementations live in `io/`; the contract lives here so format code never imports Node.
 */
export interface ByteIO {
  /** Name shown to users (file path or URL). */
  readonly name: string;
  readonly readOnly: boolean;
  /** Current length in bytes. */
  size(): Promise<number>;
  /**
   * Positional read into `buf` starting at `offset`. Returns the number of bytes read; fewer than
   * `buf.length` only at end of file. Never reads past the end.
   */
  read(buf: Uint8Array, offset: number): Promise<number>;
  /**
   * Optional: like `read`, but fills all of `buf` (zeros past the end of file) and may describe
   * its sectors as data/zero runs into `runs` (see BlockDriver.readIntoScanned; `runs[0]` is 0
   * when it did not). Returns the bytes read from the file.
   */
  readScanned?(buf: Uint8Array, offset: number, runs: Uint32Array): Promise<number>;
  /** Positional write of the whole buffer. */
  write(buf: Uint8Array, offset: number): Promise<void>;
  /** Make every completed write durable. */
  flush(): Promise<void>;
  truncate(size: number): Promise<void>;
  close(): Promise<void>;
  /**
   * Where the platform can tell (SEEK_DATA/SEEK_HOLE): the allocation of `[offset, offset+length)`
   * as runs of data and holes, covering the range or (where it has many runs) a prefix of it.
   * Undefined when unknown.
   */
  dataRuns?(offset: number, length: number): Promise<Array<{ offset: number; length: number; data: boolean }> | undefined>;
  /** Bytes of storage actually used (st_blocks * 512 for files). */
  allocatedSize?(): Promise<number>;
  /** Punch a hole (deallocate) so the range reads as zeros; optional. */
  punchHole?(offset: number, length: number): Promise<void>;
  /** Allocate storage for the range (fallocate); false where the platform cannot. Optional. */
  allocate?(offset: number, length: number): Promise<boolean>;
}

/** Opens other files relative to an image: backing files, external data files. */
export interface IOProvider {
  open(name: string, opts: { readOnly: boolean }): Promise<ByteIO>;
  /** Resolve `name` relative to the folder holding `base` (QEMU's rule for backing names). */
  resolve(base: string, name: string): string;
  /** Create (or truncate) a file for writing. */
  create?(name: string): Promise<ByteIO>;
  remove?(name: string): Promise<void>;
  exists?(name: string): Promise<boolean>;
}

/** Read exactly `length` bytes at `offset`; bytes past the end of the storage read as zeros. */
export async function readFully(io: ByteIO, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  await readInto(io, buf, offset);
  return buf;
}

/**
 * Fill `buf` from `offset`; bytes past end of storage are zero (buf must start zeroed or be cleared
 * here). Returns how many bytes came from the storage.
 */
export async function readInto(io: ByteIO, buf: Uint8Array, offset: number): Promise<number> {
  let done = 0;
  while (done < buf.length) {
    const n = await io.read(done === 0 ? buf : buf.subarray(done), offset + done);
    if (n <= 0) {
      buf.fill(0, done);
      return done;
    }
    done += n;
  }
  return done;
}

const ZERO_CHUNK = 4 * 1024 * 1024;

/** Write zeros over `[offset, offset + length)` in chunks of at most 4 MiB (one zero buffer). */
export async function writeZeroRange(io: ByteIO, offset: number, length: number): Promise<void> {
  if (length <= 0) return;
  const zeros = new Uint8Array(Math.min(ZERO_CHUNK, length));
  const end = offset + length;
  for (let off = offset; off < end; ) {
    const n = Math.min(zeros.length, end - off);
    await io.write(n === zeros.length ? zeros : zeros.subarray(0, n), off);
    off += n;
  }
}

/**
 * QEMU's `cache=unsafe`: every file opened through the result ignores flush requests (writes still
 * happen in the same order). For targets that are worthless until the command completes anyway,
 * such as a fresh `convert` output, as qemu-img does by default.
 */
export function ignoringFlushes(provider: IOProvider): IOProvider {
  const wrap = (io: ByteIO): ByteIO => ({
    name: io.name,
    readOnly: io.readOnly,
    size: () => io.size(),
    read: (buf, offset) => io.read(buf, offset),
    write: (buf, offset) => io.write(buf, offset),
    flush: async () => {},
    truncate: (size) => io.truncate(size),
    close: () => io.close(),
    ...(io.dataRuns ? { dataRuns: (offset: number, length: number) => io.dataRuns!(offset, length) } : {}),
    ...(io.allocatedSize ? { allocatedSize: () => io.allocatedSize!() } : {}),
    ...(io.punchHole ? { punchHole: (offset: number, length: number) => io.punchHole!(offset, length) } : {}),
    ...(io.allocate ? { allocate: (offset: number, length: number) => io.allocate!(offset, length) } : {}),
  });
  return {
    ...provider,
    resolve: (base, name) => provider.resolve(base, name),
    open: async (name, opts) => wrap(await provider.open(name, opts)),
    ...(provider.create ? { create: async (name: string) => wrap(await provider.create!(name)) } : {}),
  };
}
