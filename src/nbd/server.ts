/**
 * The NBD server: TCP and Unix socket listeners, one Connection per client (handshake, then
 * transmission), qemu-nbd's connection policy (--shared limit, exit after the last client unless
 * --persistent), and a graceful shutdown that lets requests in flight finish before the exports
 * are flushed and closed.
 */
import { EventEmitter } from 'node:events';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as C from './constants.js';
import type { NbdExport } from './export.js';
import { HardDisconnect, negotiate, type Channel, type NegotiationHost } from './handshake.js';
import type { TlsConfig } from './tls.js';
import { Transmission } from './transmission.js';
import { ConnectionClosed, StreamReader } from './wire.js';

export interface ServerOptions {
  exports: NbdExport[];
  tls?: TlsConfig;
  /** Most clients served at once (qemu-nbd -e); 0 = no limit. Others wait in a queue. */
  shared: number;
  /** Keep running after the last client disconnects (qemu-nbd -t). */
  persistent: boolean;
  handshakeTimeoutMs?: number;
  /** On shutdown, how long a client may take to read its last replies (default 5 s). */
  shutdownGraceMs?: number;
  /** Most connections waiting for a free slot; more are refused. */
  maxQueued?: number;
  log?: (message: string) => void;
}

export type ListenTarget = { host?: string; port: number } | { path: string };

class Connection {
  private transmission?: Transmission;
  private closed = false;
  negotiated = false;
  readonly done: Promise<void>;

  constructor(
    private readonly socket: net.Socket,
    private readonly host: NegotiationHost,
    private readonly handshakeTimeoutMs: number,
    private readonly log: (m: string) => void,
  ) {
    socket.on('error', () => {});
    socket.setNoDelay(true);
    this.done = this.serve();
  }

  private async serve(): Promise<void> {
    const ch: Channel = { raw: this.socket, stream: this.socket, reader: new StreamReader(this.socket) };
    const timer = setTimeout(() => this.destroy(), this.handshakeTimeoutMs);
    try {
      const neg = await negotiate(ch, this.host).finally(() => clearTimeout(timer));
      if (!neg) return;
      this.negotiated = true;
      if (this.closed) return;
      this.transmission = new Transmission(ch, neg, this.log);
      await this.transmission.run();
    } catch (e) {
      if (e instanceof HardDisconnect) this.log(`Disconnecting client: ${e.message}`);
      else if (!(e instanceof ConnectionClosed) && !this.closed) this.log(`Disconnecting client: ${(e as Error).message}`);
    } finally {
      const t = this.transmission;
      if (t?.zeroCopyReplies) {
        this.log(`${t.zeroCopyReplies} read replies (${t.zeroCopyBytes} bytes) sent zero-copy, ${t.zeroCopyWaited} finished by a thread waiting for the client`);
      }
      await this.endStream(ch);
    }
  }

  private async endStream(ch: Channel): Promise<void> {
    this.closed = true;
    ch.reader.detach();
    ch.stream.on('error', () => {});
    if (!ch.stream.destroyed) {
      // Let queued replies reach the client, then close; never wait long for a stuck peer.
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 2000);
        ch.stream.end(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    ch.stream.destroy();
    this.socket.destroy();
  }

  /**
   * Graceful: stop reading requests, finish those in flight, send their replies, then close. A
   * client that does not read its replies gets `graceMs` before its socket is torn down (requests
   * in flight still complete against the image; only their replies are lost).
   */
  async shutdown(graceMs: number): Promise<void> {
    if (this.transmission) {
      const timer = setTimeout(() => this.destroy(), graceMs);
      await this.transmission.stop();
      clearTimeout(timer);
    } else this.destroy();
    await this.done;
  }

  destroy(): void {
    this.closed = true;
    this.socket.destroy();
  }
}

export class NbdServer extends EventEmitter {
  private readonly byName = new Map<string, NbdExport>();
  private readonly servers: net.Server[] = [];
  private readonly socketPaths: string[] = [];
  private readonly active = new Set<Connection>();
  private readonly queued: net.Socket[] = [];
  private stopping = false;
  private everNegotiated = false;
  private readonly host: NegotiationHost;
  private readonly log: (m: string) => void;

  constructor(private readonly opts: ServerOptions) {
    super();
    for (const e of opts.exports) {
      if (this.byName.has(e.name)) throw new Error(`Duplicate export name '${e.name}'`);
      this.byName.set(e.name, e);
    }
    this.log = opts.log ?? (() => {});
    this.host = {
      findExport: (name) => this.byName.get(name),
      listExports: () => [...this.byName.values()],
      tls: opts.tls,
      shuttingDown: () => this.stopping,
    };
  }

  /** Start listening; resolves once the socket accepts connections. */
  async listen(target: ListenTarget): Promise<void> {
    const server = net.createServer({ pauseOnConnect: true }, (s) => this.accept(s));
    server.on('error', (e) => this.log(`listener error: ${e.message}`));
    if ('path' in target) {
      try {
        if (fs.lstatSync(target.path).isSocket()) fs.unlinkSync(target.path);
      } catch {
        // not there
      }
    }
    await new Promise<void>((resolve, reject) => {
      const onErr = (e: Error) => reject(e);
      server.once('error', onErr);
      const done = () => {
        server.off('error', onErr);
        resolve();
      };
      if ('path' in target) server.listen({ path: target.path, backlog: 511 }, done);
      else server.listen({ port: target.port, host: target.host, backlog: 511 }, done);
    });
    this.servers.push(server);
    if ('path' in target) this.socketPaths.push(target.path);
  }

  /** Addresses actually bound (useful with port 0). */
  addresses(): Array<net.AddressInfo | string | null> {
    return this.servers.map((s) => s.address());
  }

  get connectionCount(): number {
    return this.active.size;
  }

  private accept(socket: net.Socket): void {
    socket.on('error', () => {});
    if (this.stopping) {
      socket.destroy();
      return;
    }
    if (this.opts.shared > 0 && this.active.size >= this.opts.shared) {
      if (this.queued.length >= (this.opts.maxQueued ?? 1024)) {
        socket.destroy();
        return;
      }
      this.queued.push(socket);
      socket.once('close', () => {
        const i = this.queued.indexOf(socket);
        if (i >= 0) this.queued.splice(i, 1);
      });
      return;
    }
    this.start(socket);
  }

  private start(socket: net.Socket): void {
    socket.resume();
    const conn = new Connection(socket, this.host, this.opts.handshakeTimeoutMs ?? C.HANDSHAKE_TIMEOUT_MS, this.log);
    this.active.add(conn);
    void conn.done.then(() => this.closed(conn));
  }

  private closed(conn: Connection): void {
    this.active.delete(conn);
    if (conn.negotiated) this.everNegotiated = true;
    if (this.stopping) return;
    while (this.queued.length && (this.opts.shared === 0 || this.active.size < this.opts.shared)) {
      const next = this.queued.shift()!;
      if (!next.destroyed) this.start(next);
    }
    if (!this.opts.persistent && conn.negotiated && this.active.size === 0) this.emit('last-client');
  }

  /**
   * Stop accepting, let requests in flight finish, close every connection, then flush and close
   * the exports. Safe to call more than once.
   */
  async shutdown(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    // close() stops accepting at once; its callback fires when the last connection is gone.
    const listenersClosed = Promise.all(this.servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
    for (const p of this.socketPaths) {
      try {
        fs.unlinkSync(p);
      } catch {
        // already gone
      }
    }
    for (const s of this.queued.splice(0)) s.destroy();
    await Promise.all([...this.active].map((c) => c.shutdown(this.opts.shutdownGraceMs ?? 5000)));
    await listenersClosed;
    const errors: string[] = [];
    for (const e of this.byName.values()) {
      try {
        await e.close();
      } catch (err) {
        errors.push(`${e.name || '(default export)'}: ${(err as Error).message}`);
      }
    }
    if (errors.length) throw new Error(`Failed to close the image: ${errors.join('; ')}`);
  }
}
