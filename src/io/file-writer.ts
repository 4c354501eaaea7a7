/**
 * The writes of a file, done one after the other by a thread of their own (native/writer.c), as
 * qemu-img's ordered writes are. Buffered writes to one file serialise in the kernel anyway (the
 * inode lock): issued several at once from the libuv pool, the waiting ones spin on that lock and
 * take CPU from the copy. The thread also goes straight from one write to the next, without a trip
 * through the event loop in between.
 *
 * Large writes first fallocate(2) their range: writing into allocated blocks costs the file
 * system (ext4: delayed allocation, block by block) noticeably less CPU than writing into a hole.
 * The bytes on disk are the same: exactly the written range is allocated.
 *
 * Where the addon is not built, or `QCOWKIT_WRITER_THREAD=0`, callers keep using fs writes.
 */
import { loadNativeAddon } from './native-addon.js';

interface WriterAddon {
  open(fd: number): object;
  write(w: object, buf: Uint8Array, offset: number, allocate: boolean): Promise<void>;
  close(w: object): void;
}

/** Writes at least this long allocate their range first. */
export const ALLOCATE_FROM = 256 * 1024;

let addon: WriterAddon | null | undefined;

function load(): WriterAddon | null {
  if (addon !== undefined) return addon;
  addon = null;
  if (process.env.QCOWKIT_WRITER_THREAD === '0') return addon;
  const mod = loadNativeAddon<WriterAddon>('qcowkit_writer'); // (undefined: not built, or built for another platform)
  if (mod && typeof mod.open === 'function' && typeof mod.write === 'function' && typeof mod.close === 'function') addon = mod as WriterAddon;
  return addon;
}

export class FileWriter {
  private constructor(
    private readonly a: WriterAddon,
    private readonly handle: object,
  ) {}

  /** A writer thread for the open descriptor `fd` (which stays the caller's), or undefined. */
  static open(fd: number): FileWriter | undefined {
    const a = load();
    if (!a) return undefined;
    try {
      return new FileWriter(a, a.open(fd));
    } catch {
      return undefined; // no thread to be had: fs writes do
    }
  }

  /** pwrite of all of `buf` at `offset`; `buf` must not change until this settles. */
  write(buf: Uint8Array, offset: number): Promise<void> {
    return this.a.write(this.handle, buf, offset, buf.length >= ALLOCATE_FROM);
  }

  /** Waits for the writes in progress, then stops the thread. */
  close(): void {
    this.a.close(this.handle);
  }
}
