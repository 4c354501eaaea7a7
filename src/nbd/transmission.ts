/**
 * The transmission phase: read requests, validate them (command, flags, lengths, range,
 * read-only), run them concurrently against the export (bounded per connection in count and in
 * bytes), and send simple or structured replies. READ uses hole chunks where block status says
 * the range reads as zeros; BLOCK_STATUS answers one chunk per selected context.
 */
import * as C from './constants.js';
import { NbdError, toNbdError } from './export.js';
import type { Channel, Negotiated } from './handshake.js';
import type { ReadSegment } from './extents.js';
import { sendFileReply } from './send-lane.js';
import { Semaphore } from './sync.js';
import { readOnlyFileFd, ZERO_COPY_MIN } from './zero-copy.js';
import {
  blockStatusChunk,
  drained,
  errorChunk,
  holeChunk,
  noneChunk,
  BufferPool,
  sendMessage,
  sendPooled,
  simpleReplyHeader,
  writeDataChunkHeader,
  writeSimpleReplyHeader,
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

/** Reply buffers shared by every connection of the process. */
const replyBuffers = new BufferPool();

const KNOWN = new Set([C.CMD_READ, C.CMD_WRITE, C.CMD_FLUSH, C.CMD_TRIM, C.CMD_CACHE, C.CMD_WRITE_ZEROES, C.CMD_BLOCK_STATUS]);

export class Transmission {
  private readonly slots = new Semaphore(C.MAX_REQUESTS_IN_FLIGHT);
  private readonly bytes = new Semaphore(C.MAX_BYTES_IN_FLIGHT);
  private inFlight = 0;
  private idleWaiters: Array<() => void> = [];
  private stopping = false;
  /** READ replies whose data went zero-copy, and their bytes (for -v). */
  zeroCopyReplies = 0;
  zeroCopyBytes = 0;
  /** ...of which a pool thread finished, waiting for the client to read. */
  zeroCopyWaited = 0;

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
      // Synchronous fast paths where nothing has to wait: no promise per request.
      const w = this.slots.tryAcquire(1) ?? (await this.slots.acquire(1));
      // Replies the client does not read stop us from reading more requests.
      if (this.ch.stream.writableLength > C.MAX_UNSENT_REPLY_BYTES) await drained(this.ch.stream, C.MAX_UNSENT_REPLY_BYTES);
      let head: Buffer;
      try {
        head = reader.tryRead(28) ?? (await reader.read(28));
      } catch (e) {
        this.slots.release(w);
        throw e;
      }
      if (head.readUInt32BE(0) !== C.REQUEST_MAGIC) {
        this.slots.release(w);
        throw new Error('bad request magic');
      }
      // Offsets past 2^53 are clamped (they are past any export's end and get refused).
      const hi = head.readUInt32BE(16);
      const req: Request = {
        flags: head.readUInt16BE(4),
        type: head.readUInt16BE(6),
        handle: head.subarray(8, 16),
        offset: hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 0x100000000 + head.readUInt32BE(20),
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
        budget = this.bytes.tryAcquire(req.length) ?? (await this.bytes.acquire(req.length));
      }
      if (this.stopping) {
        this.replyError(req, new NbdError(C.ESHUTDOWN, 'server is shutting down'));
        this.bytes.release(budget);
        this.slots.release(w);
        return;
      }
      this.inFlight++;
      const done = () => {
        this.bytes.release(budget);
        this.slots.release(w);
        if (--this.inFlight === 0) for (const r of this.idleWaiters.splice(0)) r();
      };
      // handle() answers its own errors; it never rejects.
      void this.handle(req).then(done, done);
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
    const stream = this.ch.stream;
    if (!this.neg.structured) {
      if (length >= ZERO_COPY_MIN && (await this.zeroCopy(handle, false, offset, length))) return;
      // Header and data in one (reused) buffer, read into in place: one write.
      const msg = replyBuffers.take(16 + length);
      writeSimpleReplyHeader(msg, 0, handle);
      await exp.readInto(msg.subarray(16), offset);
      await sendPooled(stream, msg, replyBuffers);
      return;
    }
    if (length === 0) {
      sendMessage(stream, [noneChunk(handle)]);
      return;
    }
    if (req.flags & C.CMD_FLAG_DF) {
      if (length >= ZERO_COPY_MIN && (await this.zeroCopy(handle, true, offset, length))) return;
      await this.sendData(handle, true, offset, length);
      return;
    }
    const plan = await exp.readPlan(offset, length);
    if (plan.length === 1) {
      const seg = plan[0]!;
      if (seg.hole) sendMessage(stream, [holeChunk(handle, true, seg.offset, seg.length)]);
      else if (!(length >= ZERO_COPY_MIN && (await this.zeroCopy(handle, true, offset, length, seg)))) await this.sendData(handle, true, seg.offset, seg.length);
      return;
    }
    // Read every data piece at once, then send the chunks in order: the one flagged DONE must
    // be the last to leave.
    const msgs = plan.map((seg, i) => {
      const final = i === plan.length - 1;
      if (seg.hole) return holeChunk(handle, final, seg.offset, seg.length);
      const msg = replyBuffers.take(28 + seg.length);
      writeDataChunkHeader(msg, handle, final, seg.offset, seg.length);
      return msg;
    });
    await Promise.all(plan.map((seg, i) => (seg.hole ? undefined : exp.readInto(msgs[i]!.subarray(28), seg.offset))));
    // Hold this request's memory budget until its data has left.
    await Promise.all(msgs.map((m, i) => (plan[i]!.hole ? sendMessage(stream, [m]) : sendPooled(stream, m, replyBuffers))));
  }

  /**
   * The whole range as one reply whose data the kernel sends from the file holding it
   * (zero-copy.ts): possible when block status has it in one plain run of a read-only file.
   * `chunk`: as one OFFSET_DATA chunk (structured), else a simple reply. False: not possible
   * (nothing was sent).
   */
  private async zeroCopy(handle: Buffer, chunk: boolean, offset: number, length: number, seg?: ReadSegment): Promise<boolean> {
    if (!seg) {
      const plan = await this.neg.export.readPlan(offset, length);
      if (plan.length !== 1 || plan[0]!.hole) return false;
      seg = plan[0]!;
    }
    const fd = readOnlyFileFd(seg.host?.file);
    if (fd === undefined || seg.offset !== offset || seg.length !== length) return false;
    const header = Buffer.allocUnsafe(chunk ? 28 : 16);
    if (chunk) writeDataChunkHeader(header, handle, true, offset, length);
    else writeSimpleReplyHeader(header, 0, handle);
    const sent = sendFileReply(this.ch.stream, header, fd, seg.host!.offset, length);
    if (sent === false) return false;
    if ((await sent) === 'pool') this.zeroCopyWaited++;
    this.zeroCopyReplies++;
    this.zeroCopyBytes += length;
    return true;
  }

  /**
   * One OFFSET_DATA chunk: header and data in one buffer (the data read in place), one write;
   * resolves once handed to the operating system.
   */
  private async sendData(handle: Buffer, final: boolean, offset: number, length: number): Promise<void> {
    const msg = replyBuffers.take(28 + length);
    writeDataChunkHeader(msg, handle, final, offset, length);
    try {
      await this.neg.export.readInto(msg.subarray(28), offset);
    } catch (e) {
      replyBuffers.give(msg);
      throw e;
    }
    await sendPooled(this.ch.stream, msg, replyBuffers);
  }

  private async blockStatus(req: Request): Promise<void> {
    const ctxs = this.neg.contexts;
    const reqOne = (req.flags & C.CMD_FLAG_REQ_ONE) !== 0;
    const result = await this.neg.export.blockStatus(req.offset, req.length, ctxs, reqOne);
    const parts = ctxs.map((ctx, i) => blockStatusChunk(req.handle, i === ctxs.length - 1, ctx.id, result.get(ctx.id)!));
    sendMessage(this.ch.stream, parts);
  }
}
