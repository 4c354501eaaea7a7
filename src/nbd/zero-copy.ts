/**
 * Zero-copy READ replies: the data of a reply that lies plainly in a file (block status gives its
 * host offset) goes from the page cache to the socket with sendfile(2), instead of being read into
 * a buffer and written from it. Both copies through user space go: the kernel hands the cached
 * pages to the socket (Unix sockets and TCP take them by reference), which is most of a
 * sequential reader's cost on the server (nbdcopy). qemu-nbd reads and writes through a buffer.
 *
 * Safe only where the bytes cannot change while the socket still holds the pages: files this
 * process opened read-only (a read-only image, backing files), never one it writes. The reply is
 * written in turn with the connection's other messages (wire.ts's lane). A pool thread waits for
 * the socket while the client is slow to read: at most half the pool does so at once (file reads
 * need the rest), past that replies go the buffered way.
 */
import type { Duplex } from 'node:stream';
import { loadNativeAddon } from '../io/native-addon.js';

interface SendfileAddon {
  supported: boolean;
  trySend?(socketFd: number, header: Uint8Array, fileFd: number, offset: number, length: number, done: number): number;
  sendFile?(socketFd: number, header: Uint8Array, fileFd: number, offset: number, length: number, done: number, cancel: Int32Array): Promise<number>;
}

/** Replies at least this long go zero-copy (shorter reads are served from the cache synchronously). */
export const ZERO_COPY_MIN = 64 * 1024 + 1;

let addon: SendfileAddon | null | undefined;

function load(): SendfileAddon | null {
  if (addon !== undefined) return addon;
  addon = null;
  if (process.env.QCOWKIT_NBD_ZERO_COPY === '0') return addon;
  const mod = loadNativeAddon<SendfileAddon>('qcowkit_sendfile'); // (undefined: not built; replies go through buffers)
  if (mod && mod.supported && typeof mod.sendFile === 'function' && typeof mod.trySend === 'function') addon = mod as SendfileAddon;
  return addon;
}

/** Files open read-only by the server, by the name block status reports them under. */
const readOnlyFiles = new Map<string, number>();

/** Make a read-only file's data eligible for zero-copy replies (nbd/file-io.ts opens them). */
export function registerReadOnlyFile(name: string, fd: number): void {
  if (load()) readOnlyFiles.set(name, fd);
}

export function unregisterFile(name: string, fd: number): void {
  if (readOnlyFiles.get(name) === fd) readOnlyFiles.delete(name);
}

/** The descriptor of a registered read-only file, if `name` is one. */
export function readOnlyFileFd(name: string | undefined): number | undefined {
  return name === undefined ? undefined : readOnlyFiles.get(name);
}

/** The socket's descriptor when the stream is a plain socket (not TLS), else undefined. */
export function socketFd(stream: Duplex): number | undefined {
  const fd = (stream as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 && !(stream as { encrypted?: boolean }).encrypted ? fd : undefined;
}

const POOL = Math.max(1, Number(process.env.UV_THREADPOOL_SIZE) || 4);
/** Zero-copy sends that may wait for their socket on a pool thread at once (file reads need the rest). */
const MAX_HOLDERS = Math.max(1, Math.floor(POOL / 2));
let holders = 0;

/** Take one of the pool threads zero-copy sends may use; false when none is free (or no addon). */
export function holdPoolThread(): boolean {
  if (holders >= MAX_HOLDERS || !load()) return false;
  holders++;
  return true;
}

export function releasePoolThread(): void {
  holders--;
}

/** Whether zero-copy sends are possible at all (Linux, addon built, not turned off). */
export function zeroCopySupported(): boolean {
  return load() !== null;
}

/**
 * Send `header` then `length` bytes of `fd` from `offset` to the socket `sock`, past the first
 * `done` bytes (header included), until all is sent or the socket is full; returns the new `done`.
 */
export function trySend(sock: number, header: Uint8Array, fd: number, offset: number, length: number, done: number): number {
  return load()!.trySend!(sock, header, fd, offset, length, done);
}

/** The same on a pool thread, waiting for the socket while it is full; stops when `cancel[0]` is set. */
export async function sendOnPool(sock: number, header: Uint8Array, fd: number, offset: number, length: number, done: number, cancel: Int32Array): Promise<void> {
  await load()!.sendFile!(sock, header, fd, offset, length, done, cancel);
}
