/**
 * The transmission phase: read requests, validate them (command, flags, lengths, range,
 * read-only), run them concurrently against the export (bounded per connection in count and in
 * bytes), and send simple or structured replies. READ uses hole chunks where block status says
 * the range reads as zeros; BLOCK_STATUS answers one chunk per selected context.
 */
import * as C from './constants.js';
import { NbdError, toNbdError } from './export.js';
import type { Channel, Negotiated } from './handshake.js';
import { Semaphore } from './sync.js';
import {
  blockStatusChunk,
  dataChunkHeader,
  drained,
  errorChunk,
  holeChunk,
  noneChunk,
  sendMessage,
  sendMessageFlushed,
  simpleReplyHeader,
} from './wire.js';

interface Request {
  flags: number;
  type: number;
  handle: Buffer;
  offset: number;
  length: number;
  payload?: Buffer;
}

/** Flags each command accepts besides FUA (always accepted: SEND_FUA is advertised). */
function allowedFlags(type: number, structured: boolean): number {
  switch (type) {
    case C.CMD_READ:
      return structured ? C.CMD_FLAG_DF : 0;
    case C.CMD_WRITE_ZEROES:
      return C.CMD_FLAG_NO_HOLE | C.CMD_FLAG_FAST_ZERO;
    case C.CMD_BLOCK_STATUS:
      return C.CMD_FLAG_REQ_ONE;
    default:
      return 0;
  }
}

const KNOWN = new Set([C.CMD_READ, C.CMD_WRITE, C.CMD_FLUSH, C.CMD_TRIM, C.CMD_CACHE, C.CMD_WRITE_ZEROES, C.CMD_BLOCK_STATUS]);

export class Transmission {
  private readonly slots = new Semaphore(C.MAX_REQUESTS_IN_FLIGHT);
  private readonly bytes = new Semaphore(C.MAX_BYTES_IN_FLIGHT);
  private inFlight = 0;
  private idleWaiters: Array<() => void> = [];
  private stopping = false;

  constructor(
    private readonly ch: Channel,
    private readonly neg: Negotiated,
    private readonly onError: (msg: string) => void = () => {},
  ) {}

  /** Stop reading requests; resolves when the ones in flight have been answered. */
  stop(): Promise<void> {
    this.stopping = true;
    this.ch.reader.abort();
    return this.idle();
  }

  private idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /**
   * Serve until the client disconnects (soft or hard) or stop() is called; either way the requests
   * in flight are finished (and answered, if the client still listens) before this returns.
   */
  async run(): Promise<void> {
    try {
      await this.loop();
    } finally {
      await this.idle();
    }
  }

  private async loop(): Promise<void> {
    const { reader } = this.ch;
    while (!this.stopping) {
      const w = await this.slots.acquire(1);
      // Replies the client does not read stop us from reading more requests.
      await drained(this.ch.stream, C.MAX_UNSENT_REPLY_BYTES);
      let head: Buffer;
      try {
        head = await reader.read(28);
      } catch (e) {
        this.slots.release(w);
        throw e;
      }
      if (head.readUInt32BE(0) !== C.REQUEST_MAGIC) {
        this.slots.release(w);
        throw new Error('bad request magic');
      }
      const offsetBig = head.readBigUInt64BE(16);
      const req: Request = {
        flags: head.readUInt16BE(4),
        type: head.readUInt16BE(6),
        handle: Buffer.from(head.subarray(8, 16)),
        offset: offsetBig > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(offsetBig),
        length: head.readUInt32BE(24),
      };
      if (req.type === C.CMD_DISC) {
        this.slots.release(w);
        await this.idle();
        return;
      }
      let budget = 0;
      if (req.type === C.CMD_WRITE) {
        if (req.length > C.MAX_BUFFER) {
          // The payload cannot be skipped cheaply: answer, then drop the connection (as qemu-nbd).
          this.replyError(req, new NbdError(C.EINVAL, `request length ${req.length} exceeds ${C.MAX_BUFFER}`));
          this.slots.release(w);
          await this.idle();
          throw new Error('oversized write request');
        }
        budget = await this.bytes.acquire(req.length);
        try {
          req.payload = await reader.read(req.length);
        } catch (e) {
          this.bytes.release(budget);
          this.slots.release(w);
          throw e;
        }
      } else if (req.type === C.CMD_READ && req.length <= C.MAX_BUFFER) {
        budget = await this.bytes.acquire(req.length);
      }
      if (this.stopping) {
        this.replyError(req, new NbdError(C.ESHUTDOWN, 'server is shutting down'));
        this.bytes.release(budget);
        this.slots.release(w);
        return;
      }
      this.inFlight++;
      void this.handle(req).finally(() => {
        this.bytes.release(budget);
        this.slots.release(w);
        if (--this.inFlight === 0) for (const r of this.idleWaiters.splice(0)) r();
      });
    }
  }

  private validate(req: Request): NbdError | undefined {
    const exp = this.neg.export;
    if (!KNOWN.has(req.type)) return new NbdError(C.EINVAL, `unsupported command ${req.type}`);
    const allowed = C.CMD_FLAG_FUA | allowedFlags(req.type, this.neg.structured);
    if (req.flags & ~allowed) return new NbdError(C.EINVAL, `unsupported flags 0x${req.flags.toString(16)} for command ${req.type}`);
    const writes = req.type === C.CMD_WRITE || req.type === C.CMD_WRITE_ZEROES || req.type === C.CMD_TRIM;
    if (writes && exp.readOnly) return new NbdError(C.EPERM, 'export is read-only');
    if ((req.type === C.CMD_READ || req.type === C.CMD_WRITE) && req.length > C.MAX_BUFFER) {
      return new NbdError(C.EINVAL, `request length ${req.length} exceeds ${C.MAX_BUFFER}`);
    }
    if (req.type === C.CMD_FLUSH) return undefined;
    if (req.offset > exp.size || req.length > exp.size - req.offset) {
      const past = req.type === C.CMD_WRITE || req.type === C.CMD_WRITE_ZEROES;
      return new NbdError(past ? C.ENOSPC : C.EINVAL, 'operation past EOF');
    }
    if (req.type === C.CMD_BLOCK_STATUS) {
      if (!this.neg.contexts.length) return new NbdError(C.EINVAL, 'no metadata context was negotiated');
      if (req.length === 0) return new NbdError(C.EINVAL, 'need non-zero length');
    }
    return undefined;
  }

  private async handle(req: Request): Promise<void> {
    const bad = this.validate(req);
    if (bad) return this.replyError(req, bad);
    const exp = this.neg.export;
    const fua = (req.flags & C.CMD_FLAG_FUA) !== 0;
    try {
      switch (req.type) {
        case C.CMD_READ:
          return await this.read(req);
        case C.CMD_WRITE:
          await exp.write(req.offset, req.payload!, fua);
          break;
        case C.CMD_WRITE_ZEROES:
          await exp.writeZeroes(req.offset, req.length, {
            noHole: (req.flags & C.CMD_FLAG_NO_HOLE) !== 0,
            fastZero: (req.flags & C.CMD_FLAG_FAST_ZERO) !== 0,
            fua,
          });
          break;
        case C.CMD_TRIM:
          await exp.trim(req.offset, req.length, fua);
          break;
        case C.CMD_FLUSH:
          await exp.flush();
          break;
        case C.CMD_CACHE:
          await exp.cache(req.offset, req.length);
          break;
        case C.CMD_BLOCK_STATUS:
          return await this.blockStatus(req);
      }
      sendMessage(this.ch.stream, [simpleReplyHeader(0, req.handle)]);
    } catch (e) {
      const err = toNbdError(e);
      if (err.errno === C.EIO) this.onError(`${err.message}`);
      this.replyError(req, err);
    }
  }

  private replyError(req: Request, err: NbdError): void {
    if (this.neg.structured) sendMessage(this.ch.stream, [errorChunk(req.handle, err.errno, err.message)]);
    else sendMessage(this.ch.stream, [simpleReplyHeader(err.errno, req.handle)]);
  }

  private async read(req: Request): Promise<void> {
    const exp = this.neg.export;
    const { offset, length, handle } = req;
    if (!this.neg.structured) {
      const buf = Buffer.allocUnsafe(length);
      await exp.readInto(buf, offset);
      await sendMessageFlushed(this.ch.stream, [simpleReplyHeader(0, handle), buf]);
      return;
    }
    if (length === 0) {
      sendMessage(this.ch.stream, [noneChunk(handle)]);
      return;
    }
    if (req.flags & C.CMD_FLAG_DF) {
      const buf = Buffer.allocUnsafe(length);
      await exp.readInto(buf, offset);
      await sendMessageFlushed(this.ch.stream, [dataChunkHeader(handle, true, offset, length), buf]);
      return;
    }
    const plan = await exp.readPlan(offset, length);
    const sent: Array<Promise<void>> = [];
    for (let i = 0; i < plan.length; i++) {
      const seg = plan[i]!;
      const final = i === plan.length - 1;
      if (seg.hole) {
        sendMessage(this.ch.stream, [holeChunk(handle, final, seg.offset, seg.length)]);
      } else {
        const buf = Buffer.allocUnsafe(seg.length);
        await exp.readInto(buf, seg.offset);
        sent.push(sendMessageFlushed(this.ch.stream, [dataChunkHeader(handle, final, seg.offset, seg.length), buf]));
      }
    }
    // Hold this request's memory budget until its data has left.
    await Promise.all(sent);
  }

  private async blockStatus(req: Request): Promise<void> {
    const ctxs = this.neg.contexts;
    const reqOne = (req.flags & C.CMD_FLAG_REQ_ONE) !== 0;
    const result = await this.neg.export.blockStatus(req.offset, req.length, ctxs, reqOne);
    const parts = ctxs.map((ctx, i) => blockStatusChunk(req.handle, i === ctxs.length - 1, ctx.id, result.get(ctx.id)!));
    sendMessage(this.ch.stream, parts);
  }
}
