/**
 * `compare`: are two images' contents equal? Ranges both images know to be zero are skipped
 * without reading; data is compared in large chunks. Semantics follow qemu-img compare: the first
 * difference is reported at 512-byte sector granularity; when the sizes differ, the tail of the
 * larger image must read as zeros; strict mode also requires equal sizes and allocation.
 */
import type { BlockDriver, Extent } from '../core/block-driver.js';
import { SECTOR, allocIoBuffer, firstDifference, firstNonZero } from './bytes.js';
import type { ProgressFn } from './progress.js';

export interface CompareOptions {
  /** Strict mode (-s): sizes and block status must match too. */
  strict?: boolean;
  /** Bytes of the larger image's size examined so far. */
  onProgress?: ProgressFn;
  /** Called once the sizes differ and the larger image's tail is examined (qemu-img's warning goes here). */
  onSizeMismatch?: () => void;
  /** Names used in error messages (default: the drivers' file names). */
  names?: [string, string];
  /** Bytes read per request (default 2 MiB, qemu-img's buffer: progress steps match). */
  chunkSize?: number;
  /** Steps read ahead while earlier ones are compared (default 4). */
  readAhead?: number;
}

export type CompareResult =
  | { identical: true; sizeMismatch: boolean }
  | {
      identical: false;
      /** What differed: data, block status (strict), or size (strict). */
      reason: 'content' | 'block-status' | 'size';
      /** Where (absent for 'size'). */
      offset?: number;
      /** The sizes differ (and, for 'content', the difference was found in the larger image's tail). */
      sizeMismatch: boolean;
    };

/** A failure that is not a difference: qemu-img exits 3 (block status) or 4 (read). */
export class CompareFailure extends Error {
  constructor(
    readonly kind: 'block-status' | 'read',
    message: string,
  ) {
    super(message);
    this.name = 'CompareFailure';
  }
}

/** Walks an image's extents in order, asking block status for large ranges at a time. */
class ExtentCursor {
  private list: Extent[] = [];
  private idx = 0;
  constructor(
    private readonly drv: BlockDriver,
    private readonly name: string,
  ) {}

  /** The extent covering `pos` (clipped to `[pos, end)`). */
  async at(pos: number, end: number): Promise<Extent> {
    for (;;) {
      while (this.idx < this.list.length && this.list[this.idx]!.offset + this.list[this.idx]!.length <= pos) this.idx++;
      const e = this.list[this.idx];
      if (e && e.offset <= pos) {
        const len = Math.min(e.offset + e.length, end) - pos;
        return e.offset === pos && len === e.length ? e : { ...e, offset: pos, length: len };
      }
      try {
        this.list = await this.drv.blockStatus(pos, end - pos);
      } catch {
        throw new CompareFailure('block-status', `Sector allocation test failed for ${this.name}`);
      }
      this.idx = 0;
      if (this.list.length === 0 || this.list[0]!.offset > pos) {
        throw new CompareFailure('block-status', `Sector allocation test failed for ${this.name}`);
      }
    }
  }
}

const allocated = (e: Extent) => e.kind !== 'unallocated';
const readsZero = (e: Extent) => e.kind !== 'data' || e.zeroData === true;
/** The parts of a block status qemu-img's strict mode compares. */
const statusKey = (e: Extent) => `${e.kind}/${e.zeroData === true}/${e.hostOffset !== undefined}`;

async function readChunk(drv: BlockDriver, name: string, buf: Uint8Array, offset: number): Promise<void> {
  try {
    await drv.readInto(buf, offset);
  } catch (e) {
    throw new CompareFailure('read', `Error while reading offset ${offset} of ${name}: ${e instanceof Error ? e.message : String(e)}`);
  }
}

const sectorFloor = (n: number) => n - (n % SECTOR);

/**
 * One step of the comparison, as qemu-img takes them: a range where both block statuses stay the
 * same, cut to the buffer size when it has to be read.
 */
type Step =
  | { kind: 'skip'; pos: number; len: number }
  | { kind: 'both'; pos: number; len: number }
  | { kind: 'one'; pos: number; len: number; drv: BlockDriver; name: string; sizeMismatch: boolean }
  | { kind: 'status-mismatch'; pos: number }
  | { kind: 'tail' };

/**
 * Where the last answer QEMU's block-status call gives for `drv` starts: from there on the answer
 * reaches the end of the image and carries BDRV_BLOCK_EOF, which strict mode compares too. QEMU
 * answers at most one L2 slice per call for qcow2 (one cluster for compressed data), one cluster for
 * qcow, whole extents for raw files; through a backing chain, every layer down to the one that
 * supplies the data limits the answer.
 */
async function eofRunStart(drv: BlockDriver, name: string): Promise<number> {
  const size = drv.size;
  if (size === 0) return 0;
  const cur = new ExtentCursor(drv, name);
  let last: Extent | undefined;
  for (let pos = 0; pos < size; pos = last.offset + last.length) last = await cur.at(pos, size);
  const e = last!;
  let start = e.offset;
  const lastByte = size - 1;
  let layer: BlockDriver | undefined = drv;
  for (let d = 0; layer && d <= e.depth; d++, layer = layer.backing) {
    const info = layer.info();
    const cs = info.clusterSize;
    if (!cs || lastByte >= layer.size) continue;
    let unit = 0;
    if (layer.format === 'qcow2') {
      const extended = info.formatSpecific?.data['extended-l2'] === true;
      unit = (Math.min(4096, cs) / (extended ? 16 : 8)) * cs;
      const compressed = d === e.depth && e.kind === 'data' && e.hostOffset === undefined && !info.encrypted;
      if (compressed) unit = cs;
    } else if (layer.format === 'qcow') unit = cs;
    if (unit) start = Math.max(start, lastByte - (lastByte % unit));
  }
  return start;
}

async function* steps(a: BlockDriver, b: BlockDriver, names: [string, string], strict: boolean, chunkSize: number): AsyncGenerator<Step> {
  const total = Math.max(a.size, b.size);
  const common = Math.min(a.size, b.size);
  const curA = new ExtentCursor(a, names[0]);
  const curB = new ExtentCursor(b, names[1]);
  // Strict mode: the first offset where exactly one image's answer carries the EOF flag.
  let eofSplit = Infinity;
  if (strict) {
    const [fa, fb] = [await eofRunStart(a, names[0]), await eofRunStart(b, names[1])];
    if (fa !== fb) eofSplit = Math.min(fa, fb);
  }
  for (let pos = 0; pos < common; ) {
    const ea = await curA.at(pos, common);
    const eb = await curB.at(pos, common);
    const len = Math.min(ea.length, eb.length, pos < eofSplit ? eofSplit - pos : Infinity);
    if (strict && (statusKey(ea) !== statusKey(eb) || pos === eofSplit)) {
      yield { kind: 'status-mismatch', pos };
      return;
    }
    let step: Step;
    if ((readsZero(ea) && readsZero(eb)) || (allocated(ea) === allocated(eb) && !allocated(ea))) step = { kind: 'skip', pos, len };
    else if (allocated(ea) === allocated(eb)) step = { kind: 'both', pos, len: Math.min(len, chunkSize) };
    else {
      const [drv, name] = allocated(ea) ? [a, names[0]] : [b, names[1]];
      step = { kind: 'one', pos, len: Math.min(len, chunkSize), drv, name, sizeMismatch: false };
    }
    yield step;
    pos += step.len;
  }
  if (a.size === b.size) return;
  yield { kind: 'tail' };
  const [big, name, cur] = a.size > b.size ? [a, names[0], curA] : [b, names[1], curB];
  for (let pos = common; pos < total; ) {
    const e = await cur.at(pos, total);
    const step: Step = readsZero(e)
      ? { kind: 'skip', pos, len: e.length }
      : { kind: 'one', pos, len: Math.min(e.length, chunkSize), drv: big, name, sizeMismatch: true };
    yield step;
    pos += step.len;
  }
}

interface Pending {
  step: Step;
  bufs?: [Uint8Array, Uint8Array];
  /** Resolves to the read error, if any (never rejects: an abandoned read must not go unhandled). */
  read?: Promise<unknown>;
}

export async function compareImages(a: BlockDriver, b: BlockDriver, opts: CompareOptions = {}): Promise<CompareResult> {
  const names = opts.names ?? [a.filename, b.filename];
  const chunkSize = opts.chunkSize ?? 2 * 1024 * 1024;
  const depth = Math.max(1, opts.readAhead ?? 4);
  const total = Math.max(a.size, b.size);
  const sizeMismatch = a.size !== b.size;
  const progress = (done: number) => opts.onProgress?.(done, total);
  progress(0);
  if (opts.strict && sizeMismatch) return { identical: false, reason: 'size', sizeMismatch };

  const bufLen = Math.min(chunkSize, Math.max(total, SECTOR));
  const free: Array<[Uint8Array, Uint8Array]> = [];
  for (let i = 0; i < depth; i++) free.push([allocIoBuffer(bufLen), allocIoBuffer(bufLen)]);

  const start = (step: Step): Pending => {
    if (step.kind !== 'both' && step.kind !== 'one') return { step };
    const bufs = free.pop()!;
    const x = bufs[0].subarray(0, step.len);
    const reads =
      step.kind === 'both'
        ? [readChunk(a, names[0], x, step.pos), readChunk(b, names[1], bufs[1].subarray(0, step.len), step.pos)]
        : [readChunk(step.drv, step.name, x, step.pos)];
    return { step, bufs, read: Promise.all(reads).then(() => undefined, (e: unknown) => e ?? new Error('read failed')) };
  };

  const gen = steps(a, b, names, opts.strict === true, chunkSize);
  const queue: Pending[] = [];
  let exhausted = false;
  for (;;) {
    // keep up to `depth` reads in flight
    while (!exhausted && free.length > 0 && queue.length < depth * 4) {
      const next = await gen.next();
      if (next.done) exhausted = true;
      else queue.push(start(next.value));
    }
    const p = queue.shift();
    if (!p) break;
    const step = p.step;
    if (step.kind === 'status-mismatch') return { identical: false, reason: 'block-status', offset: step.pos, sizeMismatch };
    if (step.kind === 'tail') {
      opts.onSizeMismatch?.();
      continue;
    }
    if (p.read) {
      const err = await p.read;
      if (err) throw err;
      const [x, y] = p.bufs!;
      const i = step.kind === 'both' ? firstDifference(x, y, step.len) : firstNonZero(x, step.len);
      free.push(p.bufs!);
      if (i >= 0) {
        return { identical: false, reason: 'content', offset: step.pos + sectorFloor(i), sizeMismatch: step.kind === 'one' && step.sizeMismatch };
      }
    }
    progress(step.pos + step.len);
  }
  return { identical: true, sizeMismatch };
}
