/**
 * How a connection's messages leave: one after the other, whole. Most are written to the socket's
 * stream (which keeps their order), batched per turn of the event loop. A zero-copy reply
 * (zero-copy.ts) goes to the socket itself once the stream has nothing pending; while it is being
 * sent, the stream must stay silent: messages made meanwhile wait in the connection's lane, in
 * order, and follow once its data has gone.
 */
import type { Duplex } from 'node:stream';
import { read } from 'node:fs';
import { readPolicy } from './file-io.js';
import { holdPoolThread, releasePoolThread, sendOnPool, socketFd, trySend, zeroCopySupported } from './zero-copy.js';

interface Lane {
  /** A zero-copy reply is being sent: the stream must not be written. */
  busy: boolean;
  /** Writes (and zero-copy replies) waiting for the lane, in order. */
  queue: Array<() => void>;
  /** Set when the connection closes: a send waiting for the socket gives up. */
  cancel: Int32Array;
  sock: number;
}

const lanes = new WeakMap<Duplex, Lane>();

/**
 * Streams corked until the end of this turn of the event loop: replies finished in the same turn
 * (several requests completing together) leave in one writev instead of one syscall each.
 */
const corked = new WeakSet<Duplex>();
/** Messages this large are not held back for a batch. */
export const BATCH_MAX = 64 * 1024;

export function batch(stream: Duplex): void {
  if (corked.has(stream)) return;
  corked.add(stream);
  stream.cork();
  setImmediate(() => {
    // ...and does nothing (a later batch has its own cork and its own setImmediate).
    if (corked.delete(stream)) stream.uncork();
  });
}

/** Send what is batched now (before the socket changes hands, e.g. to TLS). */
export function flushBatch(stream: Duplex): void {
  if (!corked.delete(stream)) return;
  stream.uncork(); // the pending setImmediate then finds the stream no longer in the set...
}

/** Whether writes to `stream` must wait (then `later` is queued, to run in turn, and true returned). */
export function waitForLane(stream: Duplex, later: () => void): boolean {
  const lane = lanes.get(stream);
  // Not busy: the queue is empty (it is drained, in order, as soon as a send ends).
  if (!lane?.busy) return false;
  lane.queue.push(later);
  return true;
}

function laneFor(stream: Duplex, sock: number): Lane {
  let lane = lanes.get(stream);
  if (!lane) {
    const l: Lane = { busy: false, queue: [], cancel: new Int32Array(1), sock };
    stream.once('close', () => {
      l.cancel[0] = 1;
    });
    lanes.set(stream, l);
    lane = l;
  }
  return lane;
}

function drain(lane: Lane): void {
  while (!lane.busy && lane.queue.length) lane.queue.shift()!();
}

/**
 * How a zero-copy reply left: all at once on the event loop, finished by a pool thread that
 * waited for the client, or finished through a buffer.
 */
export type SendPath = 'now' | 'pool' | 'buffered';

/**
 * Send a reply made of `header` and `length` bytes of the read-only file `fd` from `offset`,
 * the bytes sent by the kernel straight from the page cache. Resolves once all has left (with how),
 * or false at once when zero-copy is not possible here (nothing was sent: the caller sends the
 * reply the buffered way). A failure midway leaves the connection unusable: it is destroyed.
 *
 * When the stream has nothing pending and the cache is warm, the reply goes out on the event
 * loop, at once. Whatever the socket could not take yet (it is full) is sent by a pool thread
 * that waits for room while the lane holds back the connection's other messages; with no pool
 * thread to spare, the rest is read into a buffer and written through the stream.
 */
export function sendFileReply(stream: Duplex, header: Uint8Array, fd: number, offset: number, length: number): Promise<SendPath> | false {
  if (stream.destroyed || stream.writableEnded || !zeroCopySupported()) return false;
  const sock = socketFd(stream);
  if (sock === undefined) return false;
  const lane = laneFor(stream, sock);
  const total = header.length + length;
  return new Promise<SendPath>((resolve) => {
    let path: SendPath = 'now';
    const finish = () => {
      lane.busy = false;
      resolve(path);
      drain(lane);
    };
    const fail = (e: unknown) => {
      stream.destroy(e instanceof Error ? e : new Error(String(e)));
      finish();
    };
    /** Send from `done` on (the lane is busy and the stream has nothing pending). */
    const rest = (done: number) => {
      if (stream.destroyed) return finish();
      if (readPolicy.cacheWarm()) {
        const t0 = process.hrtime.bigint();
        try {
          done = trySend(sock, header, fd, offset, length, done);
        } catch (e) {
          return fail(e);
        }
        readPolicy.observe(length, Number(process.hrtime.bigint() - t0));
        if (done === total) return finish();
      }
      if (holdPoolThread()) {
        path = 'pool';
        sendOnPool(sock, header, fd, offset, length, done, lane.cancel)
          .then(finish, fail)
          .finally(releasePoolThread);
        return;
      }
      path = 'buffered';
      buffered(done).then(finish, fail);
    };
    /** The rest through a buffer and the stream (which keeps it in order). */
    const buffered = async (done: number) => {
      const out = Buffer.alloc(total - done);
      const h = Math.max(0, header.length - done);
      out.set(header.subarray(header.length - h), 0);
      const at = done - header.length + h;
      for (let got = 0; got < length - at; ) {
        const n = await readAt(fd, out, h + got, offset + at + got);
        if (n === 0) break; // past the end of the file: zeros (the buffer is zeroed)
        got += n;
      }
      if (!stream.destroyed) stream.write(out);
    };
    const run = () => {
      lane.busy = true;
      if (stream.destroyed || stream.writableEnded) return finish();
      flushBatch(stream);
      if (stream.writableLength === 0) return rest(0);
      // Earlier messages still wait in the stream: the header follows them; its callback runs
      // once it is in the socket, and the data then follows it.
      stream.write(header, (err) => (err ? finish() : rest(header.length)));
    };
    if (lane.busy) lane.queue.push(run);
    else run();
  });
}

function readAt(fd: number, buf: Buffer, at: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => read(fd, buf, at, buf.length - at, position, (e, n) => (e ? reject(e) : resolve(n))));
}
