/**
 * The few file-system calls qcowkit's file I/O needs, as promises over node:fs's callback API.
 * Not fs.promises: loading it (with the readline and watcher modules it pulls in) is a few ms of
 * every command's start-up, and its FileHandle costs more per call than a plain descriptor.
 */
import * as fs from 'node:fs';

function call<T>(fn: (cb: (err: NodeJS.ErrnoException | null, v: T) => void) => void): Promise<T> {
  return new Promise((resolve, reject) => fn((err, v) => (err ? reject(err) : resolve(v))));
}

export const open = (name: string, flags: number, mode?: number): Promise<number> => call((cb) => fs.open(name, flags, mode, cb));
export const close = (fd: number): Promise<void> => call((cb) => fs.close(fd, (e) => cb(e, undefined)));
export const fstat = (fd: number): Promise<fs.Stats> => call((cb) => fs.fstat(fd, cb));
export const stat = (name: string): Promise<fs.Stats> => call((cb) => fs.stat(name, cb));
export const ftruncate = (fd: number, size: number): Promise<void> => call((cb) => fs.ftruncate(fd, size, (e) => cb(e, undefined)));
export const fdatasync = (fd: number): Promise<void> => call((cb) => fs.fdatasync(fd, (e) => cb(e, undefined)));

/** pwrite of all of `buf` at `offset`. */
export async function pwriteAll(fd: number, buf: Uint8Array, offset: number): Promise<void> {
  for (let done = 0; done < buf.length; ) {
    done += await call<number>((cb) => fs.write(fd, buf, done, buf.length - done, offset + done, cb));
  }
}

/** Remove a file; one that is not there is not an error. */
export async function removeFile(name: string): Promise<void> {
  try {
    await call((cb) => fs.unlink(name, (e) => cb(e, undefined)));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
}
