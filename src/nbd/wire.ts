/**
 * Bytes on the wire: an exact-length reader over a socket (with backpressure and a clean way to
 * hand the socket over to TLS), a writer that keeps each message contiguous, and the encoders for
 * option replies, simple replies and structured reply chunks.
 */
import type { Duplex } from 'node:stream';
import * as C from './constants.js';

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
  if (parts.length === 1) {
    stream.write(parts[0]!);
    return true;
  }
  stream.cork();
  for (const p of parts) if (p.length) stream.write(p);
  stream.uncork();
  return true;
}

/**
 * Write one message contiguously; resolves once it has been handed to the operating system (or
 * the socket is gone), so callers can hold buffers' memory budget until then.
 */
export function sendMessageFlushed(stream: Duplex, parts: Uint8Array[]): Promise<void> {
  if (stream.destroyed || stream.writableEnded) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => resolve();
    stream.cork();
    for (let i = 0; i < parts.length; i++) {
      const p = parts[i]!;
      if (i === parts.length - 1) stream.write(p, done);
      else if (p.length) stream.write(p);
    }
    stream.uncork();
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
  b.writeUInt32BE(C.SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  handle.copy(b, 8, 0, 8);
  return b;
}

export function chunkHeader(flags: number, type: number, handle: Buffer, length: number): Buffer {
  const b = Buffer.allocUnsafe(20);
  b.writeUInt32BE(C.STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  handle.copy(b, 8, 0, 8);
  b.writeUInt32BE(length, 16);
  return b;
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
  chunkHeader(final ? C.REPLY_FLAG_DONE : 0, C.REPLY_TYPE_OFFSET_HOLE, handle, 12).copy(b, 0);
  b.writeBigUInt64BE(BigInt(offset), 20);
  b.writeUInt32BE(length, 28);
  return b;
}

/** Header (and offset) of an OFFSET_DATA chunk; the data follows separately. */
export function dataChunkHeader(handle: Buffer, final: boolean, offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(28);
  chunkHeader(final ? C.REPLY_FLAG_DONE : 0, C.REPLY_TYPE_OFFSET_DATA, handle, 8 + length).copy(b, 0);
  b.writeBigUInt64BE(BigInt(offset), 20);
  return b;
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
