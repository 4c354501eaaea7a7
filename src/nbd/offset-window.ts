/** `qemu-nbd -o OFFSET`: export the image from byte OFFSET on (a window onto another driver). */
import type { BlockDriver, DriverInfo, Extent } from '../core/block-driver.js';
import { QcowError } from '../core/errors.js';

export class OffsetWindow implements BlockDriver {
  readonly format: string;
  readonly filename: string;
  readonly readOnly: boolean;
  readonly size: number;
  /** The inner driver's backing file, so chain levels keep their meaning. */
  readonly backing?: BlockDriver;

  constructor(
    private readonly inner: BlockDriver,
    private readonly start: number,
  ) {
    const containing = Math.ceil(inner.size / 512) * 512;
    if (!Number.isSafeInteger(start) || start < 0 || start > containing) {
      throw new QcowError('EINVAL', `Offset (${start}) cannot be greater than size of the containing file (${containing})`);
    }
    this.format = inner.format;
    this.filename = inner.filename;
    this.readOnly = inner.readOnly;
    this.size = Math.max(0, inner.size - start);
    this.backing = inner.backing;
  }

  read(offset: number, length: number): Promise<Uint8Array> {
    return this.inner.read(this.start + offset, length);
  }
  readInto(buf: Uint8Array, offset: number): Promise<void> {
    return this.inner.readInto(buf, this.start + offset);
  }
  write(offset: number, data: Uint8Array): Promise<void> {
    return this.inner.write(this.start + offset, data);
  }
  writeZeroes(offset: number, length: number, opts?: { mayUnmap?: boolean }): Promise<void> {
    return this.inner.writeZeroes(this.start + offset, length, opts);
  }
  discard(offset: number, length: number): Promise<void> {
    return this.inner.discard(this.start + offset, length);
  }
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const ext = await this.inner.blockStatus(this.start + offset, length);
    return ext.map((e) => ({ ...e, offset: e.offset - this.start }));
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
  info(): DriverInfo {
    return this.inner.info();
  }
  actualSize(): Promise<number | undefined> {
    return this.inner.actualSize();
  }
}
