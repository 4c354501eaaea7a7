/**
 * One NBD export: a BlockDriver plus the serving policy (read-only, discard, detect-zeroes,
 * allocation depth, multi-conn). Every NBD command lands here as a driver call, under a
 * reader/writer lock (reads and block status share it, anything that modifies takes it alone).
 */
import type { BlockDriver } from '../core/block-driver.js';
import { QcowError } from '../core/errors.js';
import { isZero } from '../core/util.js';
import * as C from './constants.js';
import { allocationDepth, allocationFlags, collectExtents, readSegments, toDescriptors, type NbdExtent, type ReadSegment } from './extents.js';
import { availableContexts, type ContextSource, type MetaContext } from './meta-context.js';
import type { DirtyBitmapView } from './dirty-bitmap.js';
import { RWLock } from './sync.js';
import { CowOverlay } from './cow-overlay.js';
import { looksLikeImageHeader } from './probe-guard.js';

export type DiscardMode = 'ignore' | 'unmap';
export type DetectZeroesMode = 'off' | 'on' | 'unmap';

export interface ExportOptions {
  name: string;
  description?: string;
  readOnly: boolean;
  discard: DiscardMode;
  detectZeroes: DetectZeroesMode;
  allocationDepth: boolean;
  /** Advertise NBD_FLAG_CAN_MULTI_CONN (only safe when read-only). */
  multiConn: boolean;
  /**
   * The image is raw by probing, not by -f: like QEMU, advertise 512-byte requests and refuse
   * writes that would make the first sector look like another format.
   */
  probedRaw?: boolean;
  /** Dirty bitmaps exported as `qemu:dirty-bitmap:NAME` (qemu-nbd -B), in context order. */
  bitmaps?: DirtyBitmapView[];
}

/** An error to send to the client: an NBD error number and a message. */
export class NbdError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
    this.name = 'NbdError';
  }
}

/** Map any error from the driver to an NBD error number. */
export function toNbdError(e: unknown): NbdError {
  if (e instanceof NbdError) return e;
  const message = e instanceof Error ? e.message : String(e);
  if (e instanceof QcowError) {
    const map: Record<string, number> = {
      EINVAL: C.EINVAL,
      ERANGE: C.EINVAL,
      EPERM: C.EPERM,
      ENOTSUP: C.ENOTSUP,
      EFBIG: C.ENOSPC,
    };
    return new NbdError(map[e.code] ?? C.EIO, message);
  }
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (code === 'ENOSPC' || code === 'EDQUOT' || code === 'EFBIG') return new NbdError(C.ENOSPC, message);
  if (code === 'EPERM' || code === 'EACCES' || code === 'EROFS') return new NbdError(C.EPERM, message);
  return new NbdError(C.EIO, message);
}

export class NbdExport {
  readonly name: string;
  readonly description: string | undefined;
  /** Size seen by clients: the driver's size rounded up to 512 bytes (as QEMU does). */
  readonly size: number;
  readonly lock = new RWLock();
  private readonly clusterSize: number | undefined;
  private readonly zeroClusters: boolean;
  private closed = false;

  constructor(
    readonly driver: BlockDriver,
    readonly opts: ExportOptions,
  ) {
    this.name = opts.name;
    this.description = opts.description;
    this.size = Math.ceil(driver.size / 512) * 512;
    let info: ReturnType<BlockDriver['info']> | undefined;
    try {
      info = driver.info();
    } catch {
      info = undefined;
    }
    this.clusterSize = info?.clusterSize;
    const compat = (info?.formatSpecific?.data as Record<string, unknown> | undefined)?.compat;
    this.zeroClusters = driver.format === 'qcow2' && (compat === undefined || compat === '1.1');
  }

  get readOnly(): boolean {
    return this.opts.readOnly;
  }

  /** Transmission flags as qemu-nbd sends them (SEND_DF only with structured replies). */
  transmissionFlags(structured: boolean): number {
    let f = C.FLAG_HAS_FLAGS | C.FLAG_SEND_FLUSH | C.FLAG_SEND_FUA | C.FLAG_SEND_CACHE;
    if (this.opts.readOnly) {
      f |= C.FLAG_READ_ONLY;
      if (this.opts.multiConn) f |= C.FLAG_CAN_MULTI_CONN;
    } else {
      f |= C.FLAG_SEND_TRIM | C.FLAG_SEND_WRITE_ZEROES | C.FLAG_SEND_FAST_ZERO;
    }
    if (structured) f |= C.FLAG_SEND_DF;
    return f;
  }

  /** Smallest request size advertised with NBD_INFO_BLOCK_SIZE. */
  get minimumBlockSize(): number {
    return this.opts.probedRaw ? 512 : C.BLOCK_SIZE_MIN;
  }

  contextSource(): ContextSource {
    return { allocationDepth: this.opts.allocationDepth, bitmaps: (this.opts.bitmaps ?? []).map((b) => b.name) };
  }

  contexts(): MetaContext[] {
    return availableContexts(this.contextSource());
  }

  /**
   * Run a reading driver call under the shared lock. A read-only export never takes the exclusive
   * lock while serving (nothing modifies it; close() runs once no request is in flight), so its
   * reads skip the lock and the promises it costs.
   */
  private reading<T>(fn: () => Promise<T>): Promise<T> {
    return this.opts.readOnly ? fn() : this.lock.shared(fn);
  }

  /** Fill `buf` with the export's bytes at `offset` (the 512-byte padding reads as zeros). */
  async readInto(buf: Buffer, offset: number): Promise<void> {
    const inDriver = Math.max(0, Math.min(buf.length, this.driver.size - offset));
    if (inDriver === buf.length && this.opts.readOnly) return this.driver.readInto(buf, offset); // the common case
    if (inDriver > 0) {
      const part = inDriver === buf.length ? buf : buf.subarray(0, inDriver);
      await this.reading(() => this.driver.readInto(part, offset));
    }
    if (inDriver < buf.length) buf.fill(0, inDriver);
  }

  /** Data and hole pieces of `[offset, offset+length)` from block status. */
  readPlan(offset: number, length: number): Promise<ReadSegment[]> {
    return this.reading(() => collectExtents(this.driver, offset, length, Number.MAX_SAFE_INTEGER)).then(readSegments);
  }

  async write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    if (this.opts.detectZeroes !== 'off' && isZero(data)) {
      const mayUnmap = this.opts.detectZeroes === 'unmap' && this.opts.discard === 'unmap';
      await this.modify(offset, data.length, fua, async (end) => {
        if (end > offset) await this.driver.writeZeroes(offset, end - offset, { mayUnmap });
      });
      return;
    }
    await this.modify(offset, data.length, fua, async (end) => {
      if (this.opts.probedRaw && offset < 512 && end > offset) await this.guardFirstSector(offset, data);
      if (end === offset + data.length) await this.driver.write(offset, data);
      else {
        if (!isZero(data.subarray(end - offset))) throw new NbdError(C.ENOSPC, 'write past the end of the image');
        if (end > offset) await this.driver.write(offset, data.subarray(0, end - offset));
      }
    });
  }

  async writeZeroes(offset: number, length: number, flags: { noHole: boolean; fastZero: boolean; fua: boolean }): Promise<void> {
    const mayUnmap = !flags.noHole && this.opts.discard === 'unmap';
    if (flags.fastZero && !this.canZeroFast(offset, length)) {
      throw new NbdError(C.ENOTSUP, 'fast zeroing is not possible for this range');
    }
    await this.modify(offset, length, flags.fua, async (end) => {
      if (end > offset) await this.driver.writeZeroes(offset, end - offset, { mayUnmap });
    });
  }

  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    if (this.opts.discard !== 'unmap') return; // --discard=ignore: accepted, nothing done
    await this.modify(offset, length, fua, async (end) => {
      if (end > offset) await this.driver.discard(offset, end - offset);
    });
  }

  async flush(): Promise<void> {
    if (this.opts.readOnly) return;
    await this.lock.exclusive(() => this.driver.flush());
  }

  /** NBD_CMD_CACHE: a prefetch hint; the range was validated, nothing else to do. */
  async cache(_offset: number, _length: number): Promise<void> {}

  /**
   * Block status for each selected context. Returns descriptors per context id, none longer in
   * total than `length`; at most one each with `reqOne`.
   */
  async blockStatus(offset: number, length: number, contexts: MetaContext[], reqOne: boolean): Promise<Map<number, NbdExtent[]>> {
    const max = reqOne ? 1 : C.MAX_BLOCK_STATUS_EXTENTS;
    const needExtents = contexts.some((c) => c.kind !== 'qemu:dirty-bitmap');
    const ext = needExtents ? await this.reading(() => collectExtents(this.driver, offset, length, max)) : [];
    const out = new Map<number, NbdExtent[]>();
    for (const ctx of contexts) {
      if (ctx.kind === 'qemu:dirty-bitmap') {
        out.set(ctx.id, this.opts.bitmaps![ctx.bitmap!]!.extents(offset, length, max));
        continue;
      }
      const runs =
        ctx.kind === 'base:allocation'
          ? ext.map((e) => ({ length: e.length, value: allocationFlags(e) }))
          : ext.map((e) => ({ length: e.length, value: allocationDepth(this.driver, e) }));
      out.set(ctx.id, toDescriptors(runs, max));
    }
    return out;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.lock.exclusive(() => this.driver.close());
  }

  /** EPERM when the write would give a probed raw image another format's header. */
  private async guardFirstSector(offset: number, data: Buffer): Promise<void> {
    const sector = Buffer.alloc(Math.min(512, this.driver.size));
    await this.driver.readInto(sector, 0);
    sector.set(data.subarray(0, Math.max(0, sector.length - offset)), offset);
    if (looksLikeImageHeader(sector)) {
      throw new NbdError(C.EPERM, 'writing an image header into the first sector of a probed raw image is not allowed');
    }
  }

  /**
   * Whether zeroing needs no data writes: qcow2 with zero clusters over whole clusters. Anything
   * else (raw files, partial clusters, qcow2 v2) would fall back to writing zeros.
   */
  private canZeroFast(offset: number, length: number): boolean {
    if (this.driver instanceof CowOverlay) return true;
    if (!this.zeroClusters || !this.clusterSize) return false;
    const cs = this.clusterSize;
    const end = offset + length;
    return offset % cs === 0 && (end % cs === 0 || end >= this.driver.size);
  }

  /**
   * Run a modifying driver call under the exclusive lock; `fn` gets the end of the range clipped
   * to the driver's size (the padding up to 512 bytes is not stored). FUA → flush.
   */
  private async modify(offset: number, length: number, fua: boolean, fn: (end: number) => Promise<void>): Promise<void> {
    if (this.opts.readOnly) throw new NbdError(C.EPERM, 'export is read-only');
    await this.lock.exclusive(async () => {
      await fn(Math.max(offset, Math.min(offset + length, this.driver.size)));
      // Like QEMU, a completed write, zeroing or discard marks the whole request range.
      if (this.opts.bitmaps) for (const b of this.opts.bitmaps) if (b.live) b.mark(offset, length);
      if (fua) await this.driver.flush();
    });
  }
}
