/**
 * The few file-system calls qcowkit's file I/O needs, as promises over node:fs's callback API.
 * Not fs.promises: loading it (with the readline and watcher modules it pulls in) is a few ms of
 * every command's start-up, and its FileHandle costs more per call than a plain descriptor.
 */
import * as fs from 'node:fs';

function call<T>(fn: (cb: (err: NodeJS.ErrnoException | null, v: T) => void) => void): Promise<T> {
  return new Promise((resolve, reject) => fn((err, v) => (err ? reject(err) : resolve(v))));
}

/**
 * Whether the quick calls — open, close, stat, fstat, ftruncate, and reads up to QUICK_READ
 * bytes — are made on the calling thread (node:fs's synchronous calls) rather than on the thread
 * pool. A trip through the pool is two thread wake-ups, 0.1–0.5 ms on a busy virtual machine:
 * far more than these calls take on a local file. A short command makes a few dozen of them one
 * after the other (opening images: probe, header, tables), each one waiting for the last. Off by
 * default (a library in a server must not block its event loop); the command line turns it on,
 * except for the NBD server, and off where a copy starts (its reads should overlap).
 */
let quickOnThisThread = false;

export function setQuickCallsOnThisThread(on: boolean): void {
  quickOnThisThread = on;
}

/** Reads up to this long are quick calls. */
export const QUICK_READ = 64 * 1024;

function now<T>(fn: () => T): Promise<T> {
  try {
    return Promise.resolve(fn());
  } catch (e) {
    return Promise.reject(e);
  }
}

export const open = (name: string, flags: number, mode?: number): Promise<number> =>
  quickOnThisThread ? now(() => fs.openSync(name, flags, mode)) : call((cb) => fs.open(name, flags, mode, cb));
export const close = (fd: number): Promise<void> =>
  quickOnThisThread ? now(() => fs.closeSync(fd)) : call((cb) => fs.close(fd, (e) => cb(e, undefined)));
export const fstat = (fd: number): Promise<fs.Stats> => (quickOnThisThread ? now(() => fs.fstatSync(fd)) : call((cb) => fs.fstat(fd, cb)));
export const stat = (name: string): Promise<fs.Stats> => (quickOnThisThread ? now(() => fs.statSync(name)) : call((cb) => fs.stat(name, cb)));
export const ftruncate = (fd: number, size: number): Promise<void> =>
  quickOnThisThread ? now(() => fs.ftruncateSync(fd, size)) : call((cb) => fs.ftruncate(fd, size, (e) => cb(e, undefined)));

/** pread into all of `buf` (or less at the end of the file); returns the bytes read. */
export function read(fd: number, buf: Uint8Array, offset: number): Promise<number> {
  if (quickOnThisThread && buf.length <= QUICK_READ) return now(() => fs.readSync(fd, buf, 0, buf.length, offset));
  // fs.read with a callback costs about half of FileHandle.read per call (Node 20): it matters
  // for many small reads (the NBD server's 4 KiB random reads).
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, 0, buf.length, offset, (err, n) => (err ? reject(err) : resolve(n)));
  });
}
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
