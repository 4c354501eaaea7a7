/** The raw format: guest offset = file offset. Block status from SEEK_DATA/SEEK_HOLE where available. */
import type { BlockDriver, DriverInfo, Extent } from '../../core/block-driver.js';
import { readInto, type ByteIO } from '../../core/byte-io.js';
import { QcowError } from '../../core/errors.js';
import { alignUp } from '../../core/util.js';

const ZERO_CHUNK = 1 << 20;

export class RawDriver implements BlockDriver {
  readonly format = 'raw';
  readonly readOnly: boolean;
  size: number;
  private io: ByteIO;

  private constructor(io: ByteIO, size: number, readOnly: boolean) {
    this.io = io;
    this.size = size;
    this.readOnly = readOnly;
  }

  static async open(io: ByteIO, opts: { readOnly: boolean }): Promise<RawDriver> {
    // Like QEMU, the virtual size is the file size rounded up to whole 512-byte sectors (the
    // tail past the end of the file reads as zeros).
    return new RawDriver(io, alignUp(await io.size(), 512), opts.readOnly);
  }

  get filename(): string {
    return this.io.name;
  }

  private check(offset: number, length: number) {
    if (offset < 0 || length < 0 || offset + length > this.size) {
      throw new QcowError('EINVAL', `Request [${offset}, +${length}) is past the end of '${this.filename}' (${this.size} bytes)`);
    }
  }

  private checkWritable() {
    if (this.readOnly) throw new QcowError('EPERM', `Image '${this.filename}' is opened read-only`);
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const buf = new Uint8Array(length);
    await this.readInto(buf, offset);
    return buf;
  }

  async readInto(buf: Uint8Array, offset: number): Promise<void> {
    this.check(offset, buf.length);
    await readInto(this.io, buf, offset);
  }

  async readIntoScanned(buf: Uint8Array, offset: number, runs: Uint32Array): Promise<void> {
    this.check(offset, buf.length);
    if (this.io.readScanned) {
      await this.io.readScanned(buf, offset, runs);
      return;
    }
    runs[0] = 0;
    await readInto(this.io, buf, offset);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.checkWritable();
    this.check(offset, data.length);
    await this.io.write(data, offset);
  }

  async writeZeroes(offset: number, length: number, opts?: { mayUnmap?: boolean }): Promise<void> {
    this.checkWritable();
    this.check(offset, length);
    if (opts?.mayUnmap && this.io.punchHole) {
      await this.io.punchHole(offset, length);
      return;
    }
    const zeros = new Uint8Array(Math.min(length, ZERO_CHUNK));
    for (let done = 0; done < length; ) {
      const n = Math.min(zeros.length, length - done);
      await this.io.write(n === zeros.length ? zeros : zeros.subarray(0, n), offset + done);
      done += n;
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    this.checkWritable();
    this.check(offset, length);
    if (this.io.punchHole) await this.io.punchHole(offset, length);
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.check(offset, length);
    if (length === 0) return [];
    const runs = this.io.dataRuns ? await this.io.dataRuns(offset, length) : undefined;
    const file = this.io.name;
    if (!runs || runs.length === 0) {
      return [{ offset, length, kind: 'data', depth: 0, hostOffset: offset, file }];
    }
    return runs.map((r) => ({
      offset: r.offset,
      length: r.length,
      kind: r.data ? ('data' as const) : ('zero' as const),
      depth: 0,
      hostOffset: r.offset,
      file,
    }));
  }

  /** Grow or shrink the file (resize). */
  async truncate(size: number): Promise<void> {
    this.checkWritable();
    await this.io.truncate(size);
    this.size = size;
  }

  async flush(): Promise<void> {
    if (!this.readOnly) await this.io.flush();
  }

  async close(): Promise<void> {
    await this.io.close();
  }

  info(): DriverInfo {
    return { dirty: false };
  }

  async actualSize(): Promise<number | undefined> {
    return this.io.allocatedSize ? this.io.allocatedSize() : undefined;
  }
}
