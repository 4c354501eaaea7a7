/**
 * The NBD server's files: FileIO, except that reads are done synchronously while they come from
 * the page cache.
 *
 * A read through libuv's thread pool costs a thread wake-up and a completion event on top of the
 * pread itself — for a 4 KiB read of cached data several times the copy, and the largest part of
 * the server's CPU time per request. qemu-nbd pays a similar hop but has no JavaScript around it.
 * So reads up to SYNC_MAX bytes use pread on the event loop as long as they are fast; a read that
 * was slow (it went to the disk) switches every file of the process back to the thread pool for a
 * while, so cold reads keep their concurrency and the event loop is blocked by at most one of
 * them per back-off period.
 */
import { readSync } from 'node:fs';
import type { ByteIO, IOProvider } from '../core/byte-io.js';
import { FileIO, fileProvider } from '../io/file.js';
import { registerReadOnlyFile, unregisterFile } from './zero-copy.js';

/**
 * Largest read done synchronously. Larger reads (nbdcopy asks 256 KiB at a time) go to the thread
 * pool: there the copy itself dominates, and it then overlaps with the event loop sending earlier
 * replies, using a second core as qemu-nbd's I/O threads do.
 */
const SYNC_MAX = 64 * 1024;
/**
 * A synchronous read slower than this (plus the copy at 512 MB/s) did not come from the cache
 * (or the process was preempted: a false alarm costs one back-off period of pool reads).
 */
const SLOW_NS = 4_000_000;
/** How long reads go back to the thread pool after a slow one. */
const BACKOFF_MS = 250;

class ReadPolicy {
  private asyncUntil = 0;
  /** Reads done synchronously, and slow ones seen (for tests and diagnostics). */
  syncReads = 0;
  slowReads = 0;

  useSync(length: number): boolean {
    return length <= SYNC_MAX && this.cacheWarm();
  }

  /** No slow read lately: reads (and zero-copy sends) may run on the event loop. */
  cacheWarm(): boolean {
    return this.asyncUntil === 0 || Date.now() >= this.asyncUntil;
  }

  observe(length: number, ns: number): void {
    this.syncReads++;
    if (ns > SLOW_NS + length * 2) {
      this.slowReads++;
      this.asyncUntil = Date.now() + BACKOFF_MS;
    } else this.asyncUntil = 0;
  }
}

export const readPolicy = new ReadPolicy();

class CacheFirstFileIO implements ByteIO {
  /** Forwarded when the file supports them (discard and zeroing that may unmap, preallocation). */
  readonly punchHole?: (offset: number, length: number) => Promise<void>;
  readonly allocate?: (offset: number, length: number) => Promise<boolean>;

  constructor(private readonly inner: FileIO) {
    const io: ByteIO = inner;
    if (io.punchHole) this.punchHole = io.punchHole.bind(inner);
    if (io.allocate) this.allocate = io.allocate.bind(inner);
    // Bytes of a file the server never writes may go to clients zero-copy.
    if (inner.readOnly) registerReadOnlyFile(inner.name, inner.fd);
  }

  get name(): string {
    return this.inner.name;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get fd(): number {
    return this.inner.fd;
  }

  read(buf: Uint8Array, offset: number): Promise<number> {
    if (!readPolicy.useSync(buf.length)) return this.inner.read(buf, offset);
    const t0 = process.hrtime.bigint();
    let n: number;
    try {
      n = readSync(this.inner.fd, buf, 0, buf.length, offset);
    } catch (e) {
      return Promise.reject(e as Error);
    }
    readPolicy.observe(buf.length, Number(process.hrtime.bigint() - t0));
    return Promise.resolve(n);
  }

  size(): Promise<number> {
    return this.inner.size();
  }
  write(buf: Uint8Array, offset: number): Promise<void> {
    return this.inner.write(buf, offset);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  truncate(size: number): Promise<void> {
    return this.inner.truncate(size);
  }
  close(): Promise<void> {
    unregisterFile(this.inner.name, this.inner.fd);
    return this.inner.close();
  }
  dataRuns(offset: number, length: number) {
    return this.inner.dataRuns(offset, length);
  }
  allocatedSize(): Promise<number> {
    return this.inner.allocatedSize();
  }
}

/** fileProvider, with cache-first reads for every file it opens (image, backing files, data file). */
export const nbdFileProvider: IOProvider = {
  ...fileProvider,
  open: async (name, opts) => new CacheFirstFileIO(await FileIO.open(name, opts)),
};
