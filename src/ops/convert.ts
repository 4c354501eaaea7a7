/**
 * `convert`: copy one or more images (concatenated) into a target, sparse. Ranges the sources
 * report as zero are never read; data is read in large chunks with several requests in flight and
 * zero runs inside it become holes (qemu-img's rules, see sparse-scan.ts). Memory: one buffer per
 * request in flight.
 */
import type { BlockDriver, Extent } from '../core/block-driver.js';
import { alignUp } from '../core/util.js';
import { SECTOR, allocIoBuffer, sliceRuns } from './bytes.js';
import type { ProgressFn } from './progress.js';
import { sparseRuns } from './sparse-scan.js';

/** Where converted bytes go: a raw file today, any BlockDriver later (see `driverTarget`). */
export interface ConvertTarget {
  /** Whether never-written ranges read as zeros (a new file): then zero ranges are skipped. */
  readonly zeroInit: boolean;
  /**
   * Hand writes over in guest order (each task's after the previous task's). An image target
   * allocates clusters in the order writes arrive: in order, its layout is qemu-img's, which
   * writes in order. The writes themselves still run concurrently.
   */
  readonly ordered?: boolean;
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Make the range read as zeros (may deallocate). */
  writeZeroes(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
}

/**
 * A BlockDriver (opened writable, already of the right size) as a convert target. Its writes are
 * handed to the driver in the order they are made, each once the one before was handed over —
 * or, when the two share a cluster, once the one before has completed (the driver would make the
 * second wait for the first, and let later writes allocate meanwhile). A write crossing an L2
 * table goes as one write per table (the driver plans those one after the other's data).
 */
export function driverTarget(drv: BlockDriver, zeroInit: boolean): ConvertTarget {
  const table = (drv as { g?: { l1Coverage?: number } }).g?.l1Coverage;
  const cluster = drv.info().clusterSize ?? 1;
  let handedOver: Promise<unknown> = Promise.resolve();
  let completed: Promise<unknown> = Promise.resolve();
  let lastCluster = -1;
  const inTurn = (offset: number, length: number, fn: () => Promise<void>): Promise<void> => {
    const after = Math.floor(offset / cluster) === lastCluster ? completed : handedOver;
    lastCluster = Math.floor((offset + length - 1) / cluster);
    let handed!: () => void;
    handedOver = new Promise<void>((r) => (handed = r));
    // (neither `after` can reject: `completed` swallows the failure, which `done` reports)
    const done = after.then(() => {
      try {
        return fn();
      } finally {
        handed();
      }
    });
    completed = done.catch(() => undefined);
    return done;
  };
  const write = (offset: number, data: Uint8Array): Promise<void> => {
    if (!table || Math.floor(offset / table) === Math.floor((offset + data.length - 1) / table)) return drv.write(offset, data);
    const pieces: Promise<void>[] = [];
    for (let o = 0; o < data.length; ) {
      const n = Math.min(data.length - o, table - ((offset + o) % table));
      pieces.push(drv.write(offset + o, data.subarray(o, o + n)));
      o += n;
    }
    return Promise.all(pieces).then(() => undefined);
  };
  return {
    zeroInit,
    ordered: true,
    write: (offset, data) => inTurn(offset, data.length, () => write(offset, data)),
    writeZeroes: (offset, length) => inTurn(offset, length, () => drv.writeZeroes(offset, length, { mayUnmap: true })),
    flush: () => drv.flush(),
  };
}

export interface ConvertOptions {
  /** Zero runs at least this long (bytes, multiple of 512) become holes; 0 writes everything (-S). */
  minSparse?: number;
  /** Requests in flight (qemu-img -m; default 8). */
  concurrency?: number;
  /** Unit of zero detection, as qemu-img's copy buffer (default 2 MiB). */
  chunkSize?: number;
  /** Bytes per read (a multiple of chunkSize; default 4 MiB). */
  readSize?: number;
  /** Bytes of data copied (out of all data; with minSparse 0, zero ranges count too). */
  onProgress?: ProgressFn;
}

/** Target size for these sources: each one rounded up to whole 512-byte sectors, like qemu-img. */
export function convertedSize(sources: readonly BlockDriver[]): number {
  return sources.reduce((n, s) => n + alignUp(s.size, SECTOR), 0);
}

/** A read, write or block-status failure, worded like qemu-img's convert errors. */
export class ConvertFailure extends Error {
  constructor(
    readonly kind: 'read' | 'write' | 'block-status',
    message: string,
  ) {
    super(message);
    this.name = 'ConvertFailure';
  }
}

const why = (e: unknown) => (e instanceof Error ? e.message : String(e));

interface Task {
  src: BlockDriver;
  /** Offset in the source. */
  from: number;
  /** Offset in the target. */
  to: number;
  length: number;
  data: boolean;
  /** Unit of zero detection and progress within the task (qemu-img's request size). */
  unit: number;
}

/**
 * qemu-img copies compressed clusters one at a time (their block status comes per cluster):
 * data with no plain host offset in an unencrypted image is handled in cluster units.
 */
function unitFor(src: BlockDriver, e: Extent, chunkSize: number): number {
  if (e.kind !== 'data' || e.hostOffset !== undefined) return chunkSize;
  let d: BlockDriver | undefined = src;
  for (let i = 0; i < e.depth && d; i++) d = d.backing;
  const info = (d ?? src).info();
  if (info.encrypted || !info.clusterSize || chunkSize % info.clusterSize !== 0) return chunkSize;
  return info.clusterSize;
}

/**
 * The work in target order: data ranges cut at `readSize` from each extent start, zero ranges
 * whole (or cut at `zeroSize`).
 */
async function* plan(sources: readonly BlockDriver[], readSize: number, chunkSize: number, zeroSize = Infinity): AsyncGenerator<Task> {
  let base = 0;
  for (const src of sources) {
    const padded = alignUp(src.size, SECTOR);
    for (let pos = 0; pos < src.size; ) {
      let extents;
      try {
        extents = await src.blockStatus(pos, src.size - pos);
      } catch (e) {
        throw new ConvertFailure('block-status', `error while reading block status of sector ${Math.floor(pos / SECTOR)}: ${why(e)}`);
      }
      const before = pos;
      for (const e of extents) {
        const s = Math.max(e.offset, pos);
        const end = Math.min(e.offset + e.length, src.size);
        if (end <= s) continue;
        const data = e.kind === 'data' && e.zeroData !== true;
        const stop = end === src.size ? padded : end;
        const cut = data ? readSize : zeroSize;
        const unit = unitFor(src, e, chunkSize);
        for (let o = s; o < stop; o += cut) yield { src, from: o, to: base + o, length: Math.min(cut, stop - o), data, unit };
        pos = end;
      }
      if (pos === before) throw new Error(`block status of '${src.filename}' made no progress at offset ${pos}`);
    }
    base += padded;
  }
}

/** Bytes of data (what progress counts), from block status only. */
async function dataBytes(sources: readonly BlockDriver[], countZero: boolean): Promise<number> {
  let n = 0;
  for await (const t of plan(sources, Number.MAX_SAFE_INTEGER, 1)) {
    if (t.data || countZero) n += t.length;
  }
  return n;
}

export async function convertImages(sources: readonly BlockDriver[], target: ConvertTarget, opts: ConvertOptions = {}): Promise<void> {
  const minSparse = opts.minSparse ?? 4096;
  const chunkSize = opts.chunkSize ?? 2 * 1024 * 1024;
  const readSize = Math.max(chunkSize, alignUp(opts.readSize ?? 4 * 1024 * 1024, chunkSize));
  const concurrency = Math.max(1, opts.concurrency ?? 8);
  const skipZero = target.zeroInit && minSparse > 0;
  const progress = opts.onProgress;

  let total = 0;
  if (progress) {
    total = await dataBytes(sources, minSparse === 0);
    progress(0, total);
  }
  const inOrder = new InOrderProgress(total, progress);

  // With -S 0 zero ranges are copied (and counted) in chunks too, as qemu-img does.
  const tasks = plan(sources, readSize, chunkSize, minSparse === 0 ? chunkSize : Infinity);
  let seq = 0;
  let failed = false;
  const gate = target.ordered ? new TurnGate() : undefined;
  const worker = async () => {
    let buf: Uint8Array | undefined;
    // the zero runs of a chunk, when the source makes them as it reads (readIntoScanned)
    let scanned: Uint32Array | undefined;
    for (;;) {
      if (failed) return;
      const step = await tasks.next();
      if (step.done) return;
      const t = step.value;
      const id = seq++;
      // Every task passes the gate (also when it fails), so that the next one is never held.
      let writes: Promise<unknown> | undefined;
      try {
        if (!t.data) {
          await gate?.turn(id);
          if (!skipZero) writes = guardedWrite(t.to, () => target.writeZeroes(t.to, t.length));
        } else {
          buf ??= allocIoBuffer(readSize);
          const chunk = buf.subarray(0, t.length);
          const readable = Math.min(t.length, t.src.size - t.from);
          const scan = readable === t.length && minSparse > 0 && t.src.readIntoScanned ? (scanned ??= new Uint32Array(readSize / SECTOR + 2)) : undefined;
          try {
            if (scan) await t.src.readIntoScanned!(chunk, t.from, scan);
            else await t.src.readInto(readable === t.length ? chunk : chunk.subarray(0, readable), t.from);
          } catch (e) {
            throw new ConvertFailure('read', `error while reading at byte ${t.to}: ${why(e)}`);
          }
          if (readable < t.length) chunk.fill(0, readable);
          await gate?.turn(id);
          writes = writeChunk(target, chunk, t.to, t.unit, minSparse, skipZero, scan?.[0] ? scan : undefined);
        }
      } finally {
        gate?.pass(id);
      }
      await writes;
      const parts: number[] = [];
      if (t.data) for (let o = 0; o < t.length; o += t.unit) parts.push(Math.min(t.unit, t.length - o));
      else if (minSparse === 0) parts.push(t.length);
      inOrder.complete(id, parts);
    }
  };
  const workers = Array.from({ length: concurrency }, () =>
    worker().catch((e) => {
      failed = true;
      throw e;
    }),
  );
  const results = await Promise.allSettled(workers);
  const err = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (err) throw err.reason;
  await target.flush();
  progress?.(total, total);
}

/**
 * Progress counted in target order (as qemu-img, whose writes are ordered): a finished task
 * counts once every task before it has finished; one report per chunk.
 */
class InOrderProgress {
  private done = 0;
  private next = 0;
  private readonly finished = new Map<number, number[]>();
  constructor(
    private readonly total: number,
    private readonly report: ProgressFn | undefined,
  ) {}

  complete(id: number, chunks: number[]): void {
    if (!this.report) return;
    this.finished.set(id, chunks);
    for (let c = this.finished.get(this.next); c !== undefined; c = this.finished.get(this.next)) {
      this.finished.delete(this.next++);
      for (const n of c) {
        this.done += n;
        this.report(this.done, this.total);
      }
    }
  }
}

/**
 * Write a chunk of data: its data runs as writes, its zero runs as holes (or zero writes). Runs
 * are found unit by unit (qemu-img's requests: where holes fall depends on them), then adjacent
 * runs of the same kind go out as one request.
 */
function writeChunk(
  target: ConvertTarget,
  chunk: Uint8Array,
  to: number,
  unit: number,
  minSparse: number,
  skipZero: boolean,
  scanned?: Uint32Array,
): Promise<unknown> {
  const writes: Promise<void>[] = [];
  let runStart = 0;
  let runEnd = 0;
  let runData = false;
  const issue = () => {
    if (runEnd === runStart) return;
    const a = runStart;
    const b = runEnd;
    if (runData) writes.push(guardedWrite(to + a, () => target.write(to + a, chunk.subarray(a, b))));
    else if (!skipZero) writes.push(guardedWrite(to + a, () => target.writeZeroes(to + a, b - a)));
  };
  for (let o = 0; o < chunk.length; o += unit) {
    const part = chunk.subarray(o, Math.min(chunk.length, o + unit));
    const sectors = Math.ceil(part.length / SECTOR);
    const runs = scanned && sliceRuns(scanned, o / SECTOR, sectors);
    for (const r of sparseRuns(part, sectors, Math.floor((to + o) / SECTOR), minSparse, runs)) {
      const a = o + r.start * SECTOR;
      const b = o + Math.min(part.length, (r.start + r.count) * SECTOR);
      if (r.data === runData && a === runEnd) {
        runEnd = b;
        continue;
      }
      issue();
      runStart = a;
      runEnd = b;
      runData = r.data;
    }
  }
  issue();
  return Promise.all(writes);
}

/**
 * Tasks take turns in the order of their ids (0, 1, 2, ...). A task that gives up its turn
 * early (it failed before it came) is passed over when its turn comes.
 */
class TurnGate {
  private next = 0;
  private readonly waiting = new Map<number, () => void>();
  private readonly passedEarly = new Set<number>();

  turn(id: number): Promise<void> | undefined {
    if (id === this.next) return undefined;
    return new Promise((resolve) => this.waiting.set(id, resolve));
  }

  pass(id: number): void {
    if (id !== this.next) {
      if (id > this.next) this.passedEarly.add(id);
      return;
    }
    this.next = id + 1;
    while (this.passedEarly.delete(this.next)) this.next++;
    const w = this.waiting.get(this.next);
    if (w) {
      this.waiting.delete(this.next);
      w();
    }
  }
}

async function guardedWrite(at: number, fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (e) {
    throw new ConvertFailure('write', `error while writing at byte ${at}: ${why(e)}`);
  }
}
