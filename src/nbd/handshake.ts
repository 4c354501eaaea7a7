/**
 * The fixed newstyle handshake and option haggling: EXPORT_NAME, ABORT, LIST, STARTTLS, INFO,
 * GO, STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT. Every length from the client is
 * checked before anything is allocated; a client that breaks a MUST is disconnected.
 */
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import * as C from './constants.js';
import type { NbdExport } from './export.js';
import { matchContexts, type MetaContext } from './meta-context.js';
import { upgradeToTls, type TlsConfig } from './tls.js';
import { flushBatch, greeting, optionReply, PayloadCursor, sendMessage, StreamReader, u16, u32, u64 } from './wire.js';

/** The connection's byte channel; replaced by a TLS one after STARTTLS. */
export interface Channel {
  raw: Socket;
  stream: Duplex;
  reader: StreamReader;
}

export interface NegotiationHost {
  findExport(name: string): NbdExport | undefined;
  listExports(): NbdExport[];
  tls?: TlsConfig;
  shuttingDown(): boolean;
}

export interface Negotiated {
  export: NbdExport;
  structured: boolean;
  contexts: MetaContext[];
}

/** Thrown to drop the connection (hostile or broken client, or a forced disconnect). */
export class HardDisconnect extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'HardDisconnect';
  }
}

const TEXT = new TextDecoder('utf-8', { fatal: true });

function decodeString(b: Buffer): string | undefined {
  if (b.includes(0)) return undefined;
  try {
    return TEXT.decode(b);
  } catch {
    return undefined;
  }
}

class Negotiation {
  private structured = false;
  private tlsDone = false;
  private meta?: { exportName: string; contexts: MetaContext[] };

  constructor(
    private ch: Channel,
    private readonly host: NegotiationHost,
  ) {}

  private send(...parts: Uint8Array[]): void {
    sendMessage(this.ch.stream, parts);
  }

  private reply(option: number, type: number, data?: Uint8Array): void {
    this.send(optionReply(option, type, data));
  }

  private error(option: number, type: number, message: string): void {
    this.reply(option, type, Buffer.from(message));
  }

  async run(): Promise<Negotiated | undefined> {
    this.send(greeting(C.FLAG_FIXED_NEWSTYLE | C.FLAG_NO_ZEROES));
    const clientFlags = (await this.ch.reader.read(4)).readUInt32BE(0);
    if (clientFlags & ~(C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES)) throw new HardDisconnect(`unknown client flags 0x${clientFlags.toString(16)}`);
    const fixed = (clientFlags & C.FLAG_C_FIXED_NEWSTYLE) !== 0;
    const noZeroes = (clientFlags & C.FLAG_C_NO_ZEROES) !== 0;

    for (;;) {
      const head = await this.ch.reader.read(16);
      if (head.readBigUInt64BE(0) !== C.IHAVEOPT) throw new HardDisconnect('bad option magic');
      const option = head.readUInt32BE(8);
      const length = head.readUInt32BE(12);
      if (length > C.MAX_OPTION_LENGTH) throw new HardDisconnect(`option length ${length} is too large`);
      if (!fixed && option !== C.OPT_EXPORT_NAME) throw new HardDisconnect('only NBD_OPT_EXPORT_NAME is valid without fixed newstyle');

      if (this.host.tls && !this.tlsDone && option !== C.OPT_STARTTLS) {
        await this.ch.reader.skip(length);
        if (option === C.OPT_EXPORT_NAME) throw new HardDisconnect('TLS is required');
        if (option === C.OPT_ABORT) {
          this.reply(option, C.REP_ACK);
          return undefined;
        }
        this.error(option, C.REP_ERR_TLS_REQD, `Option 0x${option.toString(16)} not permitted before TLS`);
        continue;
      }
      const data = await this.ch.reader.read(length);
      if (this.host.shuttingDown() && option !== C.OPT_ABORT) {
        if (option === C.OPT_EXPORT_NAME) throw new HardDisconnect('server is shutting down');
        this.error(option, C.REP_ERR_SHUTDOWN, 'Server is shutting down');
        continue;
      }

      switch (option) {
        case C.OPT_EXPORT_NAME: {
          const name = data.length <= C.MAX_STRING ? decodeString(data) : undefined;
          const exp = name === undefined ? undefined : this.host.findExport(name);
          if (!exp) throw new HardDisconnect(`export '${name ?? '?'}' not present`);
          const flags = exp.transmissionFlags(this.structured);
          this.send(u64(exp.size), u16(flags), noZeroes ? Buffer.alloc(0) : Buffer.alloc(124));
          return this.finish(exp);
        }
        case C.OPT_ABORT:
          this.reply(option, C.REP_ACK);
          return undefined;
        case C.OPT_LIST:
          if (length !== 0) {
            this.error(option, C.REP_ERR_INVALID, 'NBD_OPT_LIST must not have a payload');
            break;
          }
          for (const exp of this.host.listExports()) {
            const name = Buffer.from(exp.name);
            this.reply(option, C.REP_SERVER, Buffer.concat([u32(name.length), name, Buffer.from(exp.description ?? '')]));
          }
          this.reply(option, C.REP_ACK);
          break;
        case C.OPT_STARTTLS:
          await this.startTls(option, length);
          break;
        case C.OPT_INFO:
        case C.OPT_GO: {
          const exp = this.info(option, data);
          if (exp && option === C.OPT_GO) return this.finish(exp);
          break;
        }
        case C.OPT_STRUCTURED_REPLY:
          if (length !== 0) this.error(option, C.REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY must not have a payload');
          else if (this.structured) this.error(option, C.REP_ERR_INVALID, 'structured reply already negotiated');
          else {
            this.structured = true;
            this.reply(option, C.REP_ACK);
          }
          break;
        case C.OPT_LIST_META_CONTEXT:
        case C.OPT_SET_META_CONTEXT:
          this.metaContext(option, data);
          break;
        default:
          this.error(option, C.REP_ERR_UNSUP, `Unsupported option ${option} (${C.optionName(option)})`);
      }
    }
  }

  private finish(exp: NbdExport): Negotiated {
    const contexts = this.meta && this.meta.exportName === exp.name ? this.meta.contexts : [];
    return { export: exp, structured: this.structured, contexts };
  }

  private async startTls(option: number, length: number): Promise<void> {
    if (length !== 0) return this.error(option, C.REP_ERR_INVALID, 'NBD_OPT_STARTTLS must not have a payload');
    if (!this.host.tls) return this.error(option, C.REP_ERR_POLICY, 'TLS not configured');
    if (this.tlsDone) return this.error(option, C.REP_ERR_INVALID, 'TLS already enabled');
    this.reply(option, C.REP_ACK);
    flushBatch(this.ch.stream);
    const leftover = this.ch.reader.detach();
    if (leftover.length) throw new HardDisconnect('data sent before the TLS handshake');
    let tlsStream;
    try {
      tlsStream = await upgradeToTls(this.ch.raw, this.host.tls, C.HANDSHAKE_TIMEOUT_MS);
    } catch (e) {
      throw new HardDisconnect(`TLS handshake failed: ${(e as Error).message}`);
    }
    this.ch.stream = tlsStream;
    this.ch.reader = new StreamReader(tlsStream);
    this.tlsDone = true;
    // Anything negotiated in plain text is void after the upgrade.
    this.structured = false;
    this.meta = undefined;
  }

  /** NBD_OPT_INFO / NBD_OPT_GO: reply with the export's details; returns it on success. */
  private info(option: number, data: Buffer): NbdExport | undefined {
    const cur = new PayloadCursor(data);
    const nameLen = cur.u32();
    const nameBuf = nameLen !== undefined && nameLen <= C.MAX_STRING ? cur.bytes(nameLen) : undefined;
    const count = nameBuf ? cur.u16() : undefined;
    if (nameBuf === undefined || count === undefined || cur.remaining !== count * 2) {
      this.error(option, C.REP_ERR_INVALID, `Invalid payload for ${C.optionName(option)}`);
      return undefined;
    }
    const requests = new Set<number>();
    for (let i = 0; i < count; i++) requests.add(cur.u16()!);
    const name = decodeString(nameBuf);
    if (name === undefined) {
      this.error(option, C.REP_ERR_INVALID, 'Export name is not valid UTF-8');
      return undefined;
    }
    const exp = this.host.findExport(name);
    if (!exp) {
      this.error(option, C.REP_ERR_UNKNOWN, `export '${name}' not present`);
      return undefined;
    }
    if (requests.has(C.INFO_NAME)) {
      this.reply(option, C.REP_INFO, Buffer.concat([u16(C.INFO_NAME), Buffer.from(exp.name)]));
    }
    if (requests.has(C.INFO_DESCRIPTION) && exp.description) {
      this.reply(option, C.REP_INFO, Buffer.concat([u16(C.INFO_DESCRIPTION), Buffer.from(exp.description)]));
    }
    this.reply(
      option,
      C.REP_INFO,
      Buffer.concat([u16(C.INFO_BLOCK_SIZE), u32(exp.minimumBlockSize), u32(C.BLOCK_SIZE_PREFERRED), u32(C.BLOCK_SIZE_MAX)]),
    );
    this.reply(option, C.REP_INFO, Buffer.concat([u16(C.INFO_EXPORT), u64(exp.size), u16(exp.transmissionFlags(this.structured))]));
    this.reply(option, C.REP_ACK);
    return exp;
  }

  private metaContext(option: number, data: Buffer): void {
    const listing = option === C.OPT_LIST_META_CONTEXT;
    if (!this.structured) {
      return this.error(option, C.REP_ERR_INVALID, `request option '${C.optionName(option)}' when structured reply is not negotiated`);
    }
    const cur = new PayloadCursor(data);
    const nameLen = cur.u32();
    const nameBuf = nameLen !== undefined && nameLen <= C.MAX_STRING ? cur.bytes(nameLen) : undefined;
    const count = nameBuf ? cur.u32() : undefined;
    if (nameBuf === undefined || count === undefined || count > C.MAX_META_QUERIES) {
      return this.error(option, C.REP_ERR_INVALID, `Invalid payload for ${C.optionName(option)}`);
    }
    const queries: string[] = [];
    for (let i = 0; i < count; i++) {
      const len = cur.u32();
      const q = len !== undefined && len <= C.MAX_STRING ? cur.bytes(len) : undefined;
      const s = q === undefined ? undefined : decodeString(q);
      if (s === undefined) return this.error(option, C.REP_ERR_INVALID, `Invalid query in ${C.optionName(option)}`);
      queries.push(s);
    }
    const name = decodeString(nameBuf);
    if (cur.remaining !== 0 || name === undefined) {
      return this.error(option, C.REP_ERR_INVALID, `Invalid payload for ${C.optionName(option)}`);
    }
    const exp = this.host.findExport(name);
    if (!exp) return this.error(option, C.REP_ERR_UNKNOWN, `export '${name}' not present`);
    const found = matchContexts(exp.contextSource(), queries, listing);
    for (const ctx of found) {
      this.reply(option, C.REP_META_CONTEXT, Buffer.concat([u32(listing ? 0 : ctx.id), Buffer.from(ctx.name)]));
    }
    if (!listing) this.meta = { exportName: name, contexts: found };
    this.reply(option, C.REP_ACK);
  }
}

/**
 * Run the handshake on `ch` (which may be switched to TLS). Resolves with the chosen export, or
 * undefined when the client aborted; throws HardDisconnect / ConnectionClosed otherwise.
 */
export function negotiate(ch: Channel, host: NegotiationHost): Promise<Negotiated | undefined> {
  return new Negotiation(ch, host).run();
}
