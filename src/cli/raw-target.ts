/** A raw file as a convert target (Node). */
import type { ByteIO } from '../core/byte-io.js';
import type { ConvertTarget } from '../ops/convert.js';

const ZERO_BLOCK = new Uint8Array(1024 * 1024);

export class RawFileTarget implements ConvertTarget {
  readonly zeroInit: boolean;
  constructor(
    readonly file: ByteIO,
    private readonly opts: {
      /** The file reads as zeros where not written (freshly created). */
      zeroInit: boolean;
      /** fsync at the end (qemu-img convert's default cache mode, unsafe, does not). */
      sync: boolean;
      /** Zero ranges may become holes (not with -S 0 or preallocation). */
      unmap: boolean;
    },
  ) {
    this.zeroInit = opts.zeroInit;
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.file.write(data, offset);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    if (this.opts.unmap && this.file.punchHole) {
      await this.file.punchHole(offset, length);
      return;
    }
    for (let done = 0; done < length; ) {
      const n = Math.min(ZERO_BLOCK.length, length - done);
      await this.file.write(n === ZERO_BLOCK.length ? ZERO_BLOCK : ZERO_BLOCK.subarray(0, n), offset + done);
      done += n;
    }
  }

  async flush(): Promise<void> {
    if (this.opts.sync) await this.file.flush();
  }
}
