/**
 * A ByteIO that records every write, truncate and flush, and can rebuild the file as a disk might
 * hold it after a power cut at any point of the recording.
 *
 * Model of the disk: a flush makes every write completed before it durable. Writes issued after
 * the last completed flush sit in a volatile cache: at the cut each of them may have reached the
 * medium or not, and in any order (overlapping writes may land oldest-last). Optionally a write
 * may also be torn at sector granularity (some of its 512-byte sectors written, others not).
 *
 * Reads see every write so far, so code running on top behaves exactly as on the wrapped storage.
 * Library code: no Node imports.
 */
import type { ByteIO } from '../core/byte-io.js';
import { MemoryIO } from './memory.js';

export type RecordedOp =
  | { readonly kind: 'write'; readonly offset: number; readonly data: Uint8Array }
  | { readonly kind: 'truncate'; readonly size: number }
  | { readonly kind: 'flush' };

/**
 * How the volatile writes (after the last flush before the cut) reach the medium:
 * - `all`: every one, in issue order (the state right at the cut);
 * - `none`: none of them (the state at the last flush);
 * - `reverse`: every one, newest first (older data wins where they overlap);
 * - `random`: a seeded random subset, in a seeded random order;
 * - `drop-one`: all but the one at position `index` of the volatile list (in issue order);
 * - `torn`: like `random`, but each write is split at sector boundaries and every piece is kept or
 *   dropped on its own.
 */
export type ReplayStrategy = 'all' | 'none' | 'reverse' | 'random' | 'drop-one' | 'torn';

export interface ReplayOptions {
  strategy?: ReplayStrategy;
  /** Seed for `random` and `torn` (default 1). */
  seed?: number;
  /** `random`/`torn`: probability that a volatile write (piece) survives (default 0.5). */
  keep?: number;
  /** `drop-one`: which volatile op to drop (index into `volatileOps(cut)`). */
  index?: number;
  /** `torn`: sector size in bytes (default 512). */
  sectorSize?: number;
}

/** A write or truncate to apply while rebuilding. */
type Piece = { kind: 'write'; offset: number; data: Uint8Array } | { kind: 'truncate'; size: number };

export class RecordingIO implements ByteIO {
  readonly name: string;
  readonly readOnly: boolean;
  private readonly log: RecordedOp[] = [];

  private constructor(
    private readonly inner: ByteIO,
    /** Content of the storage when recording started. */
    readonly initial: Uint8Array,
  ) {
    this.name = inner.name;
    this.readOnly = inner.readOnly;
  }

  /** Record on top of an in-memory copy of `bytes`. */
  static fromBytes(name: string, bytes: Uint8Array): RecordingIO {
    return new RecordingIO(new MemoryIO(name, bytes), bytes.slice());
  }

  /** Record the operations passed on to `inner` (its current content is snapshotted first). */
  static async wrap(inner: ByteIO): Promise<RecordingIO> {
    const size = await inner.size();
    const snap = new Uint8Array(size);
    let done = 0;
    while (done < size) {
      const n = await inner.read(snap.subarray(done), done);
      if (n <= 0) break;
      done += n;
    }
    return new RecordingIO(inner, snap);
  }

  /** Every recorded operation, in issue order. */
  get ops(): readonly RecordedOp[] {
    return this.log;
  }

  /** Number of operations recorded so far (a cut index: `replay(mark())` is the current state). */
  mark(): number {
    return this.log.length;
  }

  size(): Promise<number> {
    return this.inner.size();
  }

  read(buf: Uint8Array, offset: number): Promise<number> {
    return this.inner.read(buf, offset);
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    await this.inner.write(buf, offset);
    this.log.push({ kind: 'write', offset, data: buf.slice() });
  }

  async flush(): Promise<void> {
    await this.inner.flush();
    this.log.push({ kind: 'flush' });
  }

  async truncate(size: number): Promise<void> {
    await this.inner.truncate(size);
    this.log.push({ kind: 'truncate', size });
  }

  async close(): Promise<void> {
    await this.inner.close();
  }

  /** Index of the last flush among ops `[0, cut)`, or -1. Everything before it is durable at `cut`. */
  lastFlushBefore(cut: number): number {
    this.checkCut(cut);
    for (let i = cut - 1; i >= 0; i--) if (this.log[i]!.kind === 'flush') return i;
    return -1;
  }

  /** Indexes of the volatile ops at `cut`: writes and truncates after the last flush, before `cut`. */
  volatileOps(cut: number): number[] {
    const out: number[] = [];
    for (let i = this.lastFlushBefore(cut) + 1; i < cut; i++) if (this.log[i]!.kind !== 'flush') out.push(i);
    return out;
  }

  /** The file content after a power cut once ops `[0, cut)` were issued. */
  replay(cut: number, opts: ReplayOptions = {}): Uint8Array {
    return this.replayer().at(cut, opts);
  }

  /**
   * A rebuilder that keeps the durable state between calls, so visiting cut points in increasing
   * order costs about one pass over the log.
   */
  replayer(): Replayer {
    return new Replayer(this);
  }

  /** @internal */
  checkCut(cut: number): void {
    if (!Number.isInteger(cut) || cut < 0 || cut > this.log.length) {
      throw new RangeError(`cut ${cut} outside [0, ${this.log.length}]`);
    }
  }
}

export class Replayer {
  /** Durable content after applying ops `[0, upTo)` (writes and truncates). */
  private durable: GrowableBytes;
  private upTo = 0;

  constructor(private readonly rec: RecordingIO) {
    this.durable = new GrowableBytes(rec.initial);
  }

  at(cut: number, opts: ReplayOptions = {}): Uint8Array {
    const f = this.rec.lastFlushBefore(cut);
    const durableEnd = f + 1; // ops [0, durableEnd) are durable (the flush itself included)
    if (durableEnd < this.upTo) {
      this.durable = new GrowableBytes(this.rec.initial);
      this.upTo = 0;
    }
    const ops = this.rec.ops;
    for (; this.upTo < durableEnd; this.upTo++) this.durable.apply(ops[this.upTo]!);
    const pieces = select(
      this.rec.volatileOps(cut).map((i) => ops[i]! as Piece),
      opts,
    );
    if (!pieces.length) return this.durable.bytes();
    const out = new GrowableBytes(this.durable.view());
    for (const p of pieces) out.apply(p);
    return out.bytes();
  }
}

/** A file image being rebuilt: positional writes (zero-filling gaps) and truncates. */
class GrowableBytes {
  private buf: Uint8Array;
  private len: number;
  constructor(initial: Uint8Array) {
    this.buf = initial.slice();
    this.len = initial.length;
  }
  private ensure(cap: number): void {
    if (cap <= this.buf.length) return;
    const next = new Uint8Array(Math.max(cap, this.buf.length * 2, 4096));
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
  }
  apply(op: RecordedOp | Piece): void {
    if (op.kind === 'write') {
      const end = op.offset + op.data.length;
      this.ensure(end);
      if (op.offset > this.len) this.buf.fill(0, this.len, op.offset);
      this.buf.set(op.data, op.offset);
      if (end > this.len) this.len = end;
    } else if (op.kind === 'truncate') {
      if (op.size > this.len) {
        this.ensure(op.size);
        this.buf.fill(0, this.len, op.size);
      }
      this.len = op.size;
    }
  }
  /** The content (shared, do not modify). */
  view(): Uint8Array {
    return this.buf.subarray(0, this.len);
  }
  /** The content (a copy). */
  bytes(): Uint8Array {
    return this.buf.slice(0, this.len);
  }
}

/** Choose and order the volatile pieces that reach the medium. */
function select(vol: Piece[], opts: ReplayOptions): Piece[] {
  const strategy = opts.strategy ?? 'all';
  const rng = mulberry32(opts.seed ?? 1);
  const keep = opts.keep ?? 0.5;
  switch (strategy) {
    case 'all':
      return vol;
    case 'none':
      return [];
    case 'reverse':
      return [...vol].reverse();
    case 'drop-one': {
      const i = opts.index ?? 0;
      return vol.filter((_, k) => k !== i);
    }
    case 'random':
      return shuffle(
        vol.filter(() => rng() < keep),
        rng,
      );
    case 'torn': {
      const sector = opts.sectorSize ?? 512;
      const pieces: Piece[] = [];
      for (const p of vol) {
        if (p.kind !== 'write') {
          if (rng() < keep) pieces.push(p);
          continue;
        }
        let pos = p.offset;
        const end = p.offset + p.data.length;
        while (pos < end) {
          const next = Math.min(end, (Math.floor(pos / sector) + 1) * sector);
          if (rng() < keep) pieces.push({ kind: 'write', offset: pos, data: p.data.subarray(pos - p.offset, next - p.offset) });
          pos = next;
        }
      }
      return shuffle(pieces, rng);
    }
    default:
      throw new RangeError(`unknown replay strategy '${String(strategy)}'`);
  }
}

function shuffle<T>(a: T[], rng: () => number): T[] {
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(rng() * (i + 1));
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a;
}

/** Small seeded PRNG (mulberry32): deterministic replays from a seed. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
