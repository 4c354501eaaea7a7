/**
 * Read-only byte I/O over HTTP(S) range requests with the global `fetch` (Node 20 and browsers),
 * as QEMU's curl driver reads `http://` and `https://` images.
 *
 * The length comes from a HEAD request (or, when HEAD gives none, from the `Content-Range` of a
 * `Range: bytes=0-0` GET). Every read is a `Range: bytes=a-b` GET that must be answered with
 * 206: a server that answers 200 ignores ranges, and the read fails instead of downloading the
 * whole resource. Small reads (qcow2 headers, L1/L2 and refcount tables, compressed clusters) go
 * through a bounded LRU cache of 64 KiB blocks, adjacent missing blocks are fetched with one
 * request, and concurrent reads of a block share its request; large reads bypass the cache and
 * go out as one request each.
 */
import type { ByteIO, IOProvider } from '../core/byte-io.js';
import { QcowError } from '../core/errors.js';

export interface HttpIOOptions {
  /** Bytes per cached block (default 64 KiB). */
  blockSize?: number;
  /** Most bytes the block cache holds (default 4 MiB). */
  cacheSize?: number;
  /** Reads of at least this many bytes bypass the cache (default: the block size). */
  directReadSize?: number;
  /** Extra request headers (e.g. `Authorization`). */
  headers?: Record<string, string>;
  /** Fail a request that has not completed after this many milliseconds (default 60 000; 0: never). */
  timeoutMs?: number;
  /** The fetch function (default: the global `fetch`). */
  fetch?: typeof fetch;
}

/** Counters of one open resource: requests made (size probe included), body bytes received, block cache hits. */
export interface HttpStats {
  requests: number;
  bytes: number;
  cacheHits: number;
}

const KiB = 1024;

/** `http://` or `https://` (case-insensitive): the names qemu-img's curl driver opens. */
export function isHttpUrl(name: string): boolean {
  return /^https?:\/\//i.test(name);
}

/** `http` or `https`: the protocol driver QEMU would name. */
export function urlProtocol(name: string): string {
  return name.slice(0, name.indexOf(':')).toLowerCase();
}

/** A URL's text for messages: no password. */
function shown(url: string): string {
  try {
    const u = new URL(url);
    if (!u.password) return url;
    u.password = '***';
    return u.href;
  } catch {
    return url;
  }
}

/** The request URL without credentials (fetch refuses them) and the Basic authorization they make. */
function splitCredentials(url: string): { href: string; auth?: string } {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new QcowError('EINVAL', `Invalid URL '${url}'`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') {
    throw new QcowError('EINVAL', `Unsupported protocol '${u.protocol.slice(0, -1)}' in '${shown(url)}' (http and https only)`);
  }
  if (!u.username && !u.password) return { href: u.href };
  const user = decodeURIComponent(u.username);
  const pass = decodeURIComponent(u.password);
  u.username = '';
  u.password = '';
  const bytes = new TextEncoder().encode(`${user}:${pass}`);
  let bin = '';
  for (const b of bytes) bin += String.fromCharCode(b);
  return { href: u.href, auth: `Basic ${btoa(bin)}` };
}

function statusLine(res: Response): string {
  return `HTTP ${res.status}${res.statusText ? ` ${res.statusText}` : ''}`;
}

const READ_ONLY = 'Read-only file system (HTTP images cannot be written)';

function readOnlyError(name: string): QcowError {
  return new QcowError('EPERM', `Cannot write to '${shown(name)}': ${READ_ONLY}`);
}

/** qemu-img's words for creating an image with a protocol driver that cannot. */
function cannotCreate(name: string): QcowError {
  return new QcowError('EPERM', `Protocol driver '${urlProtocol(name) || 'http'}' does not support image creation`);
}

/** Drop a response body we will not read (so the connection is not kept busy downloading it). */
function discard(res: Response): void {
  res.body?.cancel().catch(() => {});
}

export class HttpIO implements ByteIO {
  readonly name: string;
  readonly readOnly = true;
  readonly stats: HttpStats = { requests: 0, bytes: 0, cacheHits: 0 };
  private readonly href: string;
  private readonly headers: Record<string, string>;
  private readonly blockSize: number;
  private readonly cacheSize: number;
  private readonly directReadSize: number;
  private readonly timeoutMs: number;
  private readonly fetchFn: typeof fetch;
  private length = 0;
  private closed = false;
  /** Block index → bytes, least recently used first (Map keeps insertion order). */
  private readonly cache = new Map<number, Uint8Array>();
  private cachedBytes = 0;
  private readonly inflight = new Map<number, Promise<Uint8Array>>();

  private constructor(url: string, opts: HttpIOOptions) {
    const { href, auth } = splitCredentials(url);
    this.name = url;
    this.href = href;
    this.headers = { 'Accept-Encoding': 'identity', ...(auth ? { Authorization: auth } : {}), ...opts.headers };
    this.blockSize = Math.max(512, opts.blockSize ?? 64 * KiB);
    this.cacheSize = Math.max(this.blockSize, opts.cacheSize ?? 4096 * KiB);
    this.directReadSize = Math.max(1, opts.directReadSize ?? this.blockSize);
    this.timeoutMs = opts.timeoutMs ?? 60_000;
    if (!opts.fetch && typeof (globalThis as { fetch?: unknown }).fetch !== 'function') {
      throw new QcowError('ENOTSUP', 'HTTP images need the global fetch (Node 18 or newer, or a browser)');
    }
    // not `this.fetchFn = fetch`: browsers refuse a fetch called on another `this` ("Illegal invocation")
    this.fetchFn = opts.fetch ?? ((input, init) => globalThis.fetch(input, init));
  }

  /** Open `url` read-only: its length is asked for here (a missing resource fails the open). */
  static async open(url: string, opts: HttpIOOptions = {}): Promise<HttpIO> {
    const io = new HttpIO(url, opts);
    io.length = await io.probeSize();
    return io;
  }

  async size(): Promise<number> {
    return this.length;
  }

  async read(buf: Uint8Array, offset: number): Promise<number> {
    if (this.closed) throw new QcowError('EIO', `Cannot read '${shown(this.name)}': closed`);
    if (offset >= this.length || buf.length === 0) return 0;
    const n = Math.min(buf.length, this.length - offset);
    const bs = this.blockSize;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + n - 1) / bs);
    let allCached = true;
    for (let i = first; i <= last && allCached; i++) allCached = this.cache.has(i);
    if (!allCached && n >= this.directReadSize) {
      buf.set(await this.fetchRange(offset, offset + n));
      return n;
    }
    this.loadMissing(first, last);
    const blocks = await Promise.all(Array.from({ length: last - first + 1 }, (_, k) => this.block(first + k)));
    for (let k = 0; k < blocks.length; k++) {
      const start = (first + k) * bs;
      const from = Math.max(offset, start);
      const to = Math.min(offset + n, start + bs);
      buf.set(blocks[k]!.subarray(from - start, to - start), from - offset);
    }
    return n;
  }

  async write(): Promise<void> {
    throw readOnlyError(this.name);
  }

  async truncate(): Promise<void> {
    throw readOnlyError(this.name);
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    this.closed = true;
    this.cache.clear();
    this.cachedBytes = 0;
  }

  /** A cached block (moved to the most recently used end) or the request bringing it. */
  private block(i: number): Promise<Uint8Array> {
    const hit = this.cache.get(i);
    if (hit) {
      this.cache.delete(i);
      this.cache.set(i, hit);
      this.stats.cacheHits++;
      return Promise.resolve(hit);
    }
    const pending = this.inflight.get(i);
    if (!pending) throw new QcowError('EIO', `internal: block ${i} of '${shown(this.name)}' not requested`);
    return pending;
  }

  /** Start one request per run of adjacent blocks in [first, last] that are neither cached nor under way. */
  private loadMissing(first: number, last: number): void {
    let runStart = -1;
    for (let i = first; i <= last + 1; i++) {
      const missing = i <= last && !this.cache.has(i) && !this.inflight.has(i);
      if (missing && runStart < 0) runStart = i;
      if (!missing && runStart >= 0) {
        this.loadRun(runStart, i - 1);
        runStart = -1;
      }
    }
  }

  private loadRun(first: number, last: number): void {
    const bs = this.blockSize;
    const start = first * bs;
    const run = this.fetchRange(start, Math.min((last + 1) * bs, this.length));
    for (let i = first; i <= last; i++) {
      const p = run.then(
        (data) => {
          const block = data.slice((i - first) * bs, (i - first + 1) * bs);
          this.inflight.delete(i);
          this.remember(i, block);
          return block;
        },
        (e: unknown) => {
          this.inflight.delete(i);
          throw e;
        },
      );
      p.catch(() => {}); // the reader that started the run sees the error; others may never ask
      this.inflight.set(i, p);
    }
  }

  private remember(i: number, block: Uint8Array): void {
    if (this.closed) return;
    this.cache.set(i, block);
    this.cachedBytes += block.length;
    for (const [k, v] of this.cache) {
      if (this.cachedBytes <= this.cacheSize) break;
      this.cache.delete(k);
      this.cachedBytes -= v.length;
    }
  }

  /** One request of a fetch that may throw: network errors and timeouts become QcowErrors. */
  private async request(method: 'GET' | 'HEAD', range?: string): Promise<Response> {
    this.stats.requests++;
    const headers: Record<string, string> = { ...this.headers, ...(range ? { Range: `bytes=${range}` } : {}) };
    const init: RequestInit = { method, headers, redirect: 'follow' };
    if (this.timeoutMs > 0 && typeof AbortSignal !== 'undefined' && 'timeout' in AbortSignal) {
      init.signal = AbortSignal.timeout(this.timeoutMs);
    }
    try {
      return await this.fetchFn(this.href, init);
    } catch (e) {
      throw this.networkError(e);
    }
  }

  private networkError(e: unknown): QcowError {
    if (e instanceof QcowError) return e;
    const err = e as { name?: string; message?: string; cause?: { message?: string; code?: string } };
    if (err.name === 'TimeoutError' || err.name === 'AbortError') {
      return new QcowError('EIO', `HTTP request timed out after ${this.timeoutMs / 1000} s for ${shown(this.name)}`);
    }
    const why = err.cause?.message ?? err.message ?? String(e);
    return new QcowError('EIO', `HTTP request failed for ${shown(this.name)}: ${why}`);
  }

  private statusError(res: Response, what: string): QcowError {
    const code = res.status === 404 || res.status === 410 ? 'ENOENT' : 'EIO';
    return new QcowError(code, `${statusLine(res)} for ${shown(this.name)} (${what})`);
  }

  private rangeIgnored(res: Response, range: string): QcowError {
    return new QcowError(
      'ENOTSUP',
      `HTTP server does not support range requests: ${statusLine(res)} instead of 206 for bytes=${range} of ${shown(this.name)}`,
    );
  }

  /** The resource's length: HEAD's Content-Length, else the total of a bytes=0-0 GET's Content-Range. */
  private async probeSize(): Promise<number> {
    const head = await this.request('HEAD');
    discard(head);
    const len = head.headers.get('content-length');
    const encoded = (head.headers.get('content-encoding') ?? 'identity').toLowerCase() !== 'identity';
    if (head.ok && head.headers.get('accept-ranges')?.trim().toLowerCase() === 'none') {
      throw new QcowError('ENOTSUP', `HTTP server does not support range requests (Accept-Ranges: none) for ${shown(this.name)}`);
    }
    if (head.ok && len !== null && /^\d+$/.test(len.trim()) && !encoded) return this.checkedLength(len.trim());
    const res = await this.request('GET', '0-0');
    if (res.status === 200) {
      discard(res);
      throw this.rangeIgnored(res, '0-0');
    }
    if (res.status === 416) {
      discard(res); // an empty resource: no byte 0 to send
      const total = /\/(\d+)\s*$/.exec(res.headers.get('content-range') ?? '');
      if (total && Number(total[1]) === 0) return 0;
    }
    if (res.status !== 206) {
      discard(res);
      throw this.statusError(res, 'bytes=0-0');
    }
    this.stats.bytes += await this.bodyInto(res, new Uint8Array(1));
    const m = /^\s*bytes\s+\d+-\d+\/(\d+)\s*$/i.exec(res.headers.get('content-range') ?? '');
    if (!m) throw new QcowError('EIO', `HTTP server gave no length for ${shown(this.name)} (no Content-Length, no Content-Range total)`);
    return this.checkedLength(m[1]!);
  }

  /** A length from the server, refused past what a file offset can be here. */
  private checkedLength(text: string): number {
    const n = Number(text);
    if (!Number.isSafeInteger(n)) throw new QcowError('EIO', `HTTP server gave an impossible length (${text}) for ${shown(this.name)}`);
    return n;
  }

  /** Bytes [start, end) by one range request; exactly end - start bytes or an error. */
  private async fetchRange(start: number, end: number): Promise<Uint8Array> {
    const range = `${start}-${end - 1}`;
    const res = await this.request('GET', range);
    if (res.status === 200) {
      discard(res);
      throw this.rangeIgnored(res, range);
    }
    if (res.status !== 206) {
      discard(res);
      throw this.statusError(res, `bytes=${range}`);
    }
    const cr = res.headers.get('content-range');
    const m = cr === null ? null : /^\s*bytes\s+(\d+)-(\d+)\//i.exec(cr);
    if (cr !== null && (!m || Number(m[1]) !== start)) {
      discard(res);
      throw new QcowError('EIO', `HTTP server sent 'Content-Range: ${cr}' for bytes=${range} of ${shown(this.name)}`);
    }
    const want = end - start;
    const body = new Uint8Array(want);
    const got = await this.bodyInto(res, body);
    this.stats.bytes += got;
    if (got < want) {
      throw new QcowError('EIO', `HTTP response too short for bytes=${range} of ${shown(this.name)}: ${got} of ${want} bytes`);
    }
    return body;
  }

  /**
   * Read the body into `dst`, never more: a server that sends more than it was asked for (or
   * without end) is cut off once `dst` is full. Returns the bytes received.
   */
  private async bodyInto(res: Response, dst: Uint8Array): Promise<number> {
    if (!res.body) return 0;
    const reader = res.body.getReader();
    let got = 0;
    try {
      while (got < dst.length) {
        const { done, value } = await reader.read();
        if (done) break;
        const n = Math.min(value.length, dst.length - got);
        dst.set(n === value.length ? value : value.subarray(0, n), got);
        got += n;
      }
    } catch (e) {
      throw this.networkError(e);
    } finally {
      if (got >= dst.length) reader.cancel().catch(() => {});
      else reader.releaseLock();
    }
    return got;
  }
}

/**
 * QEMU's rule for a backing file name of an image opened by URL: an absolute URL (any scheme)
 * is kept, anything else is resolved against the image's URL (`new URL(name, base)`).
 */
export function resolveUrl(base: string, name: string): string {
  if (/^[a-z][a-z0-9+.-]*:/i.test(name)) return name;
  try {
    return new URL(name, base).href;
  } catch {
    return name;
  }
}

/** An IOProvider that opens http(s) URLs read-only; writing and creating are refused. */
export function createHttpProvider(opts: HttpIOOptions = {}): IOProvider {
  return {
    async open(name, o) {
      if (!o.readOnly) throw new QcowError('EPERM', READ_ONLY);
      return HttpIO.open(name, opts);
    },
    resolve: resolveUrl,
    async create(name) {
      throw cannotCreate(name);
    },
    async remove(name) {
      throw readOnlyError(name);
    },
    async exists(name) {
      try {
        await HttpIO.open(name, opts);
        return true;
      } catch {
        return false;
      }
    },
  };
}

/** Opens http(s) URLs read-only with the default options (64 KiB blocks, 4 MiB cache). */
export const httpProvider: IOProvider = createHttpProvider();

/**
 * Names that are http(s) URLs go to `http`, all others to `local` (as qemu-img picks its curl
 * driver by the filename's protocol); a backing name is resolved by the provider of its image.
 */
export function withHttp(local: IOProvider, http: IOProvider = httpProvider): IOProvider {
  const pick = (name: string): IOProvider => (isHttpUrl(name) ? http : local);
  const routed: IOProvider = {
    open: (name, o) => pick(name).open(name, o),
    resolve: (base, name) => (isHttpUrl(base) ? http.resolve(base, name) : local.resolve(base, name)),
    async create(name) {
      const p = pick(name);
      if (!p.create) throw cannotCreate(name);
      return p.create(name);
    },
  };
  if (local.remove) routed.remove = (name) => (isHttpUrl(name) ? Promise.reject(readOnlyError(name)) : local.remove!(name));
  if (local.exists) {
    routed.exists = (name) => {
      const p = pick(name);
      return p.exists ? p.exists(name) : Promise.resolve(false);
    };
  }
  return routed;
}
