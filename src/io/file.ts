import { constants as fsc } from 'node:fs';
import * as path from 'node:path';
import { readInto, writeZeroRange, type ByteIO, type IOProvider } from '../core/byte-io.js';
import { QcowError } from '../core/errors.js';
import { FileWriter } from './file-writer.js';
import * as fsCalls from './fs-calls.js';
import { fallocateFile, nativeReadScan, sparseRuns } from './sparse.js';

/** A file on the local file system: positional reads and writes, no buffering of its own. */
export class FileIO implements ByteIO {
  readonly name: string;
  readonly readOnly: boolean;
  private readonly descriptor: number;
  private closed = false;
  /** The file's writer thread, from its first write (null: none to be had, fs writes do). */
  private writer: FileWriter | null | undefined;

  private constructor(name: string, fd: number, readOnly: boolean) {
    this.name = name;
    this.descriptor = fd;
    this.readOnly = readOnly;
  }

  static async open(name: string, opts: { readOnly: boolean }): Promise<FileIO> {
    try {
      const fd = await fsCalls.open(name, opts.readOnly ? fsc.O_RDONLY : fsc.O_RDWR);
      let st;
      try {
        st = await fsCalls.fstat(fd);
      } catch (e) {
        await fsCalls.close(fd).catch(() => {});
        throw e;
      }
      if (st.isDirectory()) {
        await fsCalls.close(fd);
        throw new QcowError('EINVAL', `Could not open '${name}': Is a directory`);
      }
      return new FileIO(name, fd, opts.readOnly);
    } catch (e) {
      throw fileError(name, e);
    }
  }

  static async create(name: string): Promise<FileIO> {
    try {
      return new FileIO(name, await fsCalls.open(name, fsc.O_RDWR | fsc.O_CREAT | fsc.O_TRUNC, 0o644), false);
    } catch (e) {
      throw fileError(name, e, 'create');
    }
  }

  get fd(): number {
    return this.descriptor;
  }

  /**
   * The descriptor, for a call on it; refused once closed (the number may by then belong to
   * another file this process opened).
   */
  private live(): number {
    if (this.closed) throw new QcowError('EIO', `File '${this.name}' is closed`);
    return this.descriptor;
  }

  async size(): Promise<number> {
    return (await fsCalls.fstat(this.live())).size;
  }

  async allocatedSize(): Promise<number> {
    return (await fsCalls.fstat(this.live())).blocks * 512;
  }

  read(buf: Uint8Array, offset: number): Promise<number> {
    let fd: number;
    try {
      fd = this.live();
    } catch (e) {
      return Promise.reject(e);
    }
    return fsCalls.read(fd, buf, offset);
  }

  /** Read all of `buf` (zeros past the end), its zero runs made on the thread pool where possible. */
  async readScanned(buf: Uint8Array, offset: number, runs: Uint32Array): Promise<number> {
    const scan = nativeReadScan();
    if (scan) return scan(this.live(), buf, offset, runs);
    runs[0] = 0;
    return readInto(this, buf, offset);
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    if (this.readOnly) throw new QcowError('EPERM', `Cannot write to read-only file '${this.name}'`);
    if (this.closed) throw new QcowError('EIO', `Cannot write to closed file '${this.name}'`);
    if (this.writer === undefined) this.writer = FileWriter.open(this.live()) ?? null;
    if (this.writer) return this.writer.write(buf, offset);
    await fsCalls.pwriteAll(this.live(), buf, offset);
  }

  async flush(): Promise<void> {
    if (!this.readOnly) await fsCalls.fdatasync(this.live());
  }

  async truncate(size: number): Promise<void> {
    await fsCalls.ftruncate(this.live(), size);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.writer?.close();
    await fsCalls.close(this.descriptor);
  }

  async dataRuns(offset: number, length: number) {
    return sparseRuns(this.live(), offset, length);
  }

  /** Deallocate the range so it reads as zeros; writes zeros where the file system cannot punch. */
  async punchHole(offset: number, length: number): Promise<void> {
    if (this.readOnly) throw new QcowError('EPERM', `Cannot write to read-only file '${this.name}'`);
    if (await fallocateFile(this.live(), true, offset, length)) return;
    const end = Math.min(offset + length, await this.size()); // past the end already reads as zeros
    await writeZeroRange(this, offset, end - offset);
  }

  /** Allocate the range on disk (preallocation=falloc); false where the platform cannot. */
  async allocate(offset: number, length: number): Promise<boolean> {
    if (this.readOnly) throw new QcowError('EPERM', `Cannot write to read-only file '${this.name}'`);
    return fallocateFile(this.live(), false, offset, length);
  }
}

function fileError(name: string, e: unknown, verb = 'open'): Error {
  if (e instanceof QcowError) return e;
  const err = e as NodeJS.ErrnoException;
  const why: Record<string, string> = {
    ENOENT: 'No such file or directory',
    EACCES: 'Permission denied',
    EISDIR: 'Is a directory',
    EROFS: 'Read-only file system',
    ENOTDIR: 'Not a directory',
    EEXIST: 'File exists',
  };
  const reason = (err.code && why[err.code]) || err.message;
  return new QcowError(err.code === 'ENOENT' ? 'ENOENT' : 'EIO', `Could not ${verb} '${name}': ${reason}`);
}

/** Opens files on the local file system; names relative to an image resolve against its folder. */
export const fileProvider: IOProvider = {
  open: (name, opts) => FileIO.open(name, opts),
  create: (name) => FileIO.create(name),
  resolve(base: string, name: string): string {
    // QEMU's path_combine: the folder part of `base` + name, not normalised (names show as such).
    if (path.isAbsolute(name)) return name;
    const i = base.lastIndexOf('/');
    return i < 0 ? name : base.slice(0, i + 1) + name;
  },
  async remove(name: string) {
    await fsCalls.removeFile(name);
  },
  async exists(name: string) {
    try {
      await fsCalls.stat(name);
      return true;
    } catch {
      return false;
    }
  },
};
