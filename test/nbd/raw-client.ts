/**
 * A deliberately low-level NBD client for tests: raw bytes on a socket, so tests can send
 * truncated, oversized or nonsensical messages and read exactly what the server answers.
 */
import * as net from 'node:net';

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const REPLY_MAGIC = 0x3e889045565a9n;
export const REP_ACK = 1;
export const REP_ERR_UNSUP = 0x80000001;
export const REP_ERR_INVALID = 0x80000003;
export const REP_ERR_UNKNOWN = 0x80000006;
export const REP_ERR_TLS_REQD = 0x80000005;

export class RawClient {
  private buf = Buffer.alloc(0);
  private waiters: Array<() => void> = [];
  closed = false;
  readonly sock: net.Socket;

  private constructor(sock: net.Socket) {
    this.sock = sock;
    sock.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake();
    });
    sock.on('close', () => {
      this.closed = true;
      this.wake();
    });
    sock.on('error', () => {});
  }

  /** Connect to a TCP port on 127.0.0.1, or to a Unix socket path. */
  static connect(port: number | string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = typeof port === 'string' ? net.connect(port) : net.connect(port, '127.0.0.1');
      s.once('connect', () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  /** Exactly n bytes, or throws when the server closes first or `ms` pass. */
  async read(n: number, ms = 5000): Promise<Buffer> {
    const deadline = Date.now() + ms;
    while (this.buf.length < n) {
      if (this.closed) throw new Error(`closed by server (wanted ${n} bytes, had ${this.buf.length})`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** Resolves true once the server has closed the connection (false after `ms`). */
  async waitClosed(ms = 5000): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.closed && Date.now() < deadline) {
      await new Promise<void>((r) => {
        const t = setTimeout(r, 50);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    return this.closed;
  }

  write(b: Buffer): void {
    this.sock.write(b);
  }

  destroy(): void {
    this.sock.destroy();
  }

  /** Read the greeting and send client flags (fixed newstyle + no zeroes by default). */
  async greet(clientFlags = 3): Promise<number> {
    const g = await this.read(18);
    if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('bad greeting');
    this.write(u32(clientFlags));
    return g.readUInt16BE(16);
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(declaredLength >>> 0, 12);
    this.write(Buffer.concat([h, data]));
  }

  async readOptionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    if (h.readBigUInt64BE(0) !== REPLY_MAGIC) throw new Error('bad option reply magic');
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(len) };
  }

  /** Replies up to and including the final one (ACK or an error). */
  async readOptionReplies(): Promise<Array<{ option: number; type: number; data: Buffer }>> {
    const out = [];
    for (;;) {
      const r = await this.readOptionReply();
      out.push(r);
      if (r.type === REP_ACK || r.type >= 0x80000000) return out;
    }
  }

  /** Structured replies, then GO to `name`; returns the export size and flags. */
  async go(name = '', opts: { structured?: boolean; contexts?: string[] } = {}): Promise<{ size: bigint; flags: number }> {
    if (opts.structured !== false) {
      this.sendOption(8);
      const r = await this.readOptionReply();
      if (r.type !== REP_ACK) throw new Error('structured reply refused');
    }
    if (opts.contexts) {
      this.sendOption(10, metaPayload(name, opts.contexts));
      const r = await this.readOptionReplies();
      if (r[r.length - 1]!.type !== REP_ACK) throw new Error('SET_META_CONTEXT refused');
    }
    const n = Buffer.from(name);
    this.sendOption(7, Buffer.concat([u32(n.length), n, u16(0)]));
    let size = 0n;
    let flags = 0;
    for (const r of await this.readOptionReplies()) {
      if (r.type === 3 && r.data.readUInt16BE(0) === 0) {
        size = r.data.readBigUInt64BE(2);
        flags = r.data.readUInt16BE(10);
      }
      if (r.type >= 0x80000000) throw new Error(`GO refused: ${r.data.toString()}`);
    }
    return { size, flags };
  }

  sendRequest(type: number, offset: bigint | number, length: number, opts: { flags?: number; handle?: bigint; payload?: Buffer } = {}): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(opts.flags ?? 0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(opts.handle ?? 1n, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length >>> 0, 24);
    this.write(opts.payload ? Buffer.concat([h, opts.payload]) : h);
  }

  /** One reply: simple (error only, `dataLen` bytes of data on success) or one structured chunk. */
  async readReply(dataLen = 0): Promise<{ structured: boolean; error: number; handle: bigint; type?: number; flags?: number; payload: Buffer }> {
    const magic = (await this.read(4)).readUInt32BE(0);
    if (magic === 0x67446698) {
      const h = await this.read(12);
      const error = h.readUInt32BE(0);
      const payload = error === 0 && dataLen ? await this.read(dataLen) : Buffer.alloc(0);
      return { structured: false, error, handle: h.readBigUInt64BE(4), payload };
    }
    if (magic !== 0x668e33ef) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
    const h = await this.read(16);
    const flags = h.readUInt16BE(0);
    const type = h.readUInt16BE(2);
    const handle = h.readBigUInt64BE(4);
    const payload = await this.read(h.readUInt32BE(12));
    const error = type & 0x8000 ? payload.readUInt32BE(0) : 0;
    return { structured: true, error, handle, type, flags, payload };
  }

  /** All chunks of one structured reply (until the DONE flag). */
  async readChunks(): Promise<Array<{ error: number; type?: number; flags?: number; payload: Buffer; structured: boolean }>> {
    const out = [];
    for (;;) {
      const r = await this.readReply();
      out.push(r);
      if (!r.structured || (r.flags! & 1) !== 0) return out;
    }
  }
}

export function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  return b;
}

export function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}

export function metaPayload(name: string, queries: string[]): Buffer {
  const n = Buffer.from(name);
  const parts = [u32(n.length), n, u32(queries.length)];
  for (const q of queries) {
    const b = Buffer.from(q);
    parts.push(u32(b.length), b);
  }
  return Buffer.concat(parts);
}
