/**
 * Bytes on the wire: an exact-length reader over a socket (with backpressure and a clean way to
 * hand the socket over to TLS), a writer that keeps each message contiguous, and the encoders for
 * option replies, simple replies and structured reply chunks.
 */
import type { Duplex } from 'node:stream';
import * as C from './constants.js';
import { BATCH_MAX, batch, flushBatch, waitForLane } from './send-lane.js';

export { flushBatch };

/** The peer went away (end of stream, reset, or our own close). */
export class ConnectionClosed extends Error {
  constructor(message = 'connection closed') {
    super(message);
    this.name = 'ConnectionClosed';
  }
}

/**
 * Reads exact byte counts from a stream. Only one read may be pending at a time (the protocol
 * loops are sequential). The stream is paused while more than `highWater` bytes wait unread.
 */
export class StreamReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private pending?: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void };
  private failure?: Error;
  private readonly onData = (chunk: Buffer) => {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    this.satisfy();
    if (this.buffered > this.highWater && this.buffered >= (this.pending?.n ?? 0)) this.stream.pause();
  };
  private readonly onEnd = () => this.fail(new ConnectionClosed());
  private readonly onError = (e: Error) => this.fail(new ConnectionClosed(e.message));

  constructor(
    readonly stream: Duplex,
    private readonly highWater = 256 * 1024,
  ) {
    stream.on('data', this.onData);
    stream.on('end', this.onEnd);
    stream.on('close', this.onEnd);
    stream.on('error', this.onError);
  }

  /** Exactly `n` bytes (n must be bounded by the caller). */
  read(n: number): Promise<Buffer> {
    if (this.pending) return Promise.reject(new Error('StreamReader: concurrent read'));
    if (this.buffered >= n) return Promise.resolve(this.take(n));
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.pending = { n, resolve, reject };
      this.stream.resume();
    });
  }

  /** Exactly `n` bytes if they are already buffered (no promise), else undefined. */
  tryRead(n: number): Buffer | undefined {
    return !this.pending && this.buffered >= n ? this.take(n) : undefined;
  }

  /** Read and discard `n` bytes without holding them all in memory. */
  async skip(n: number): Promise<void> {
    while (n > 0) {
      const step = Math.min(n, 1 << 20);
      await this.read(step);
      n -= step;
    }
  }

  /** Fail the pending and all later reads (the server stops listening to this client). */
  abort(): void {
    this.fail(new ConnectionClosed('stopped'));
  }

  /** Stop listening; return what was buffered and not yet read. */
  detach(): Buffer {
    this.stream.off('data', this.onData);
    this.stream.off('end', this.onEnd);
    this.stream.off('close', this.onEnd);
    this.stream.off('error', this.onError);
    const rest = Buffer.concat(this.chunks);
    this.chunks = [];
    this.buffered = 0;
    return rest;
  }

  private fail(e: Error): void {
    this.failure ??= e;
    const p = this.pending;
    if (p && this.buffered < p.n) {
      this.pending = undefined;
      p.reject(this.failure);
    }
  }

  private satisfy(): void {
    const p = this.pending;
    if (p && this.buffered >= p.n) {
      this.pending = undefined;
      p.resolve(this.take(p.n));
    }
  }

  private take(n: number): Buffer {
    let out: Buffer;
    const first = this.chunks[0];
    if (n === 0) return Buffer.alloc(0);
    if (first && first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let got = 0;
      while (got < n) {
        const c = this.chunks[0]!;
        const k = Math.min(c.length, n - got);
        c.copy(out, got, 0, k);
        got += k;
        if (k === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(k);
      }
    }
    this.buffered -= n;
    if (this.buffered <= this.highWater && this.stream.isPaused()) this.stream.resume();
    return out;
  }
}

/** Write one message (several buffers) contiguously; false when the socket is gone. */
export function sendMessage(stream: Duplex, parts: Uint8Array[]): boolean {
  if (stream.destroyed || stream.writableEnded) return false;
  if (waitForLane(stream, () => sendMessage(stream, parts))) return true;
  batch(stream);
  for (const p of parts) if (p.length) stream.write(p);
  return true;
}

/**
 * Reusable reply buffers (header + data), by exact size: a busy connection reading 4 KiB blocks
 * would otherwise allocate (and later collect) a fresh ArrayBuffer per request. A buffer comes back
 * once the socket has taken its bytes; every byte of a reused buffer is rewritten before it is sent.
 */
export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  /** Bytes held by free buffers (bounded by maxBytes). */
  private held = 0;

  constructor(
    private readonly maxSize = 256 * 1024 + 64,
    private readonly maxBytes = 16 * 1024 * 1024,
  ) {}

  take(size: number): Buffer {
    const buf = this.free.get(size)?.pop();
    if (!buf) return Buffer.allocUnsafeSlow(size);
    this.held -= size;
    return buf;
  }

  give(buf: Buffer): void {
    if (buf.length > this.maxSize || this.held + buf.length > this.maxBytes) return;
    if (buf.byteOffset !== 0 || buf.buffer.byteLength !== buf.length) return;
    let list = this.free.get(buf.length);
    if (!list) {
      if (this.free.size >= 16) return; // a few sizes only (4 KiB, 64 KiB, ... with their headers)
      list = [];
      this.free.set(buf.length, list);
    }
    list.push(buf);
    this.held += buf.length;
  }
}

/**
 * Write a pooled buffer as one message; it returns to `pool` and the promise resolves once the
 * socket has taken it (or the socket is gone).
 */
export function sendPooled(stream: Duplex, buf: Buffer, pool: BufferPool): Promise<void> {
  if (stream.destroyed || stream.writableEnded) return Promise.resolve();
  return new Promise((resolve) => {
    if (waitForLane(stream, () => void sendPooled(stream, buf, pool).then(resolve))) return;
    // Small replies wait for the batch; a large one goes now (after what is batched), so the
    // client starts on it while the next ones are read.
    if (buf.length < BATCH_MAX) batch(stream);
    else flushBatch(stream);
    stream.write(buf, (err) => {
      if (!err) pool.give(buf);
      resolve();
    });
  });
}

/** Resolve once fewer than `limit` bytes wait in the socket's write buffer (or it is gone). */
export function drained(stream: Duplex, limit = 0): Promise<void> {
  if (stream.destroyed || (limit ? stream.writableLength <= limit : !stream.writableNeedDrain)) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      stream.off('drain', done);
      stream.off('close', done);
      resolve();
    };
    // 'drain' fires only once the buffer is empty, which is below any limit.
    stream.on('drain', done);
    stream.on('close', done);
  });
}

// ---- encoders ----

export function u16(v: number): Buffer {
  const b = Buffer.allocUnsafe(2);
  b.writeUInt16BE(v);
  return b;
}

export function u32(v: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}

export function u64(v: number | bigint): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
}

/** The server's greeting: NBDMAGIC, IHAVEOPT, handshake flags. */
export function greeting(handshakeFlags: number): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(C.NBDMAGIC, 0);
  b.writeBigUInt64BE(C.IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export function optionReply(option: number, type: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(20 + data.length);
  b.writeBigUInt64BE(C.OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  b.set(data, 20);
  return b;
}

export function simpleReplyHeader(error: number, handle: Buffer): Buffer {
  const b = Buffer.allocUnsafe(16);
  writeSimpleReplyHeader(b, error, handle);
  return b;
}

/** A simple reply header into the first 16 bytes of `b`. */
export function writeSimpleReplyHeader(b: Buffer, error: number, handle: Buffer): void {
  b.writeUInt32BE(C.SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  handle.copy(b, 8, 0, 8);
}

export function chunkHeader(flags: number, type: number, handle: Buffer, length: number): Buffer {
  const b = Buffer.allocUnsafe(20);
  writeChunkHeader(b, flags, type, handle, length);
  return b;
}

function writeChunkHeader(b: Buffer, flags: number, type: number, handle: Buffer, length: number): void {
  b.writeUInt32BE(C.STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  handle.copy(b, 8, 0, 8);
  b.writeUInt32BE(length, 16);
}

/** Offsets below 2^53 as two 32-bit halves (no BigInt on the hot path). */
function writeU64(b: Buffer, v: number, at: number): void {
  b.writeUInt32BE(Math.floor(v / 0x100000000), at);
  b.writeUInt32BE(v >>> 0, at + 4);
}

/** An NBD_REPLY_TYPE_ERROR chunk (always the final chunk here). */
export function errorChunk(handle: Buffer, error: number, message: string): Buffer {
  const msg = Buffer.from(truncateUtf8(message, C.MAX_STRING));
  const payload = Buffer.allocUnsafe(6 + msg.length);
  payload.writeUInt32BE(error, 0);
  payload.writeUInt16BE(msg.length, 4);
  msg.copy(payload, 6);
  return Buffer.concat([chunkHeader(C.REPLY_FLAG_DONE, C.REPLY_TYPE_ERROR, handle, payload.length), payload]);
}

export function noneChunk(handle: Buffer): Buffer {
  return chunkHeader(C.REPLY_FLAG_DONE, C.REPLY_TYPE_NONE, handle, 0);
}

export function holeChunk(handle: Buffer, final: boolean, offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(32);
  writeChunkHeader(b, final ? C.REPLY_FLAG_DONE : 0, C.REPLY_TYPE_OFFSET_HOLE, handle, 12);
  writeU64(b, offset, 20);
  b.writeUInt32BE(length, 28);
  return b;
}

/** The 28-byte header of an OFFSET_DATA chunk into the start of `b` (the data goes after it). */
export function writeDataChunkHeader(b: Buffer, handle: Buffer, final: boolean, offset: number, length: number): void {
  writeChunkHeader(b, final ? C.REPLY_FLAG_DONE : 0, C.REPLY_TYPE_OFFSET_DATA, handle, 8 + length);
  writeU64(b, offset, 20);
}

/** An NBD_REPLY_TYPE_BLOCK_STATUS chunk for one context. */
export function blockStatusChunk(handle: Buffer, final: boolean, contextId: number, extents: Array<{ length: number; flags: number }>): Buffer {
  const payloadLen = 4 + 8 * extents.length;
  const b = Buffer.allocUnsafe(20 + payloadLen);
  chunkHeader(final ? C.REPLY_FLAG_DONE : 0, C.REPLY_TYPE_BLOCK_STATUS, handle, payloadLen).copy(b, 0);
  b.writeUInt32BE(contextId, 20);
  let p = 24;
  for (const e of extents) {
    b.writeUInt32BE(e.length, p);
    b.writeUInt32BE(e.flags >>> 0, p + 4);
    p += 8;
  }
  return b;
}

/** Cut a string so its UTF-8 encoding fits in `max` bytes (on a character boundary). */
export function truncateUtf8(s: string, max: number): string {
  let b = Buffer.from(s);
  if (b.length <= max) return s;
  b = b.subarray(0, max);
  let end = b.length;
  while (end > 0 && (b[end - 1]! & 0xc0) === 0x80) end--;
  if (end > 0 && b[end - 1]! >= 0xc0) end--;
  return b.subarray(0, end).toString();
}

/** A cursor over an option payload; every read is bounds-checked. */
export class PayloadCursor {
  pos = 0;
  constructor(readonly buf: Buffer) {}
  get remaining(): number {
    return this.buf.length - this.pos;
  }
  u16(): number | undefined {
    if (this.remaining < 2) return undefined;
    const v = this.buf.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }
  u32(): number | undefined {
    if (this.remaining < 4) return undefined;
    const v = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  bytes(n: number): Buffer | undefined {
    if (this.remaining < n) return undefined;
    const v = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return v;
  }
}
