/**
 * A bounded LRU cache of L2 table slices. Like QEMU, tables are cached in slices (4 KiB, or the
 * cluster if smaller), so a small cache covers a large image. Concurrent loads of the same slice
 * share one read. A miss reads ahead: the following slices of the same table (up to
 * READ_AHEAD_BYTES, stopping at one already cached or loading) come with it in one read, since
 * scans (convert, map, check) walk tables in order and one round trip per 4 KiB cost more than
 * the bytes.
 */
export type SliceLoader = (offset: number, length: number) => Promise<Uint8Array>;

export const DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024;

/** Most bytes one miss reads (the requested slice and the ones after it in its table). */
export const READ_AHEAD_BYTES = 64 * 1024;

export class L2Cache {
  readonly sliceBytes: number;
  private readonly maxSlices: number;
  private slices = new Map<number, Uint8Array>();
  private loading = new Map<number, Promise<Uint8Array | undefined>>();
  /** Count of dropTable calls: a load that saw one happen while it ran does not cache its bytes. */
  private drops = 0;
  /** Slices changed in memory and not yet written (never evicted). */
  readonly dirty = new Set<number>();

  constructor(
    private load: SliceLoader,
    private readonly clusterSize: number,
    maxBytes = DEFAULT_L2_CACHE_BYTES,
  ) {
    this.sliceBytes = Math.min(4096, clusterSize);
    this.maxSlices = Math.max(16, Math.floor(maxBytes / this.sliceBytes));
  }

  /** The slice starting at host byte offset `sliceOffset` (aligned to sliceBytes). */
  async get(sliceOffset: number): Promise<Uint8Array> {
    for (;;) {
      const hit = this.getNow(sliceOffset);
      if (hit) return hit;
      const data = await (this.loading.get(sliceOffset) ?? this.startLoad(sliceOffset));
      if (data) return data;
      // it was part of a read-ahead that failed: now read it as the slice asked for
    }
  }

  /**
   * Read the slice and those after it in its table not cached or loading yet, in one read. The
   * slice asked for resolves to its data (or rejects); read-ahead ones to undefined if the read
   * failed (say, a table running past the end of a damaged file): whoever waits reads them alone.
   */
  private startLoad(sliceOffset: number): Promise<Uint8Array | undefined> {
    const sb = this.sliceBytes;
    const tableEnd = sliceOffset - (sliceOffset % this.clusterSize) + this.clusterSize;
    const limit = Math.min(tableEnd, sliceOffset + Math.max(sb, READ_AHEAD_BYTES));
    let end = sliceOffset + sb;
    while (end < limit && !this.slices.has(end) && !this.loading.has(end)) end += sb;
    const span = end - sliceOffset;
    const whole = span > sb ? this.load(sliceOffset, span).catch(() => undefined) : undefined;
    const drops = this.drops;
    let first: Promise<Uint8Array | undefined> | undefined;
    for (let o = sliceOffset; o < end; o += sb) {
      // (assigned before the first await inside can let `finally` run)
      let p!: Promise<Uint8Array | undefined>;
      p = (async () => {
        try {
          const all = whole ? await whole : undefined;
          let data = all?.subarray(o - sliceOffset, o - sliceOffset + sb);
          if (!data && o === sliceOffset) data = await this.load(o, sb);
          // Not over a slice the writer put in meanwhile, nor for a table dropped meanwhile
          // (freed, and its clusters maybe reused): those bytes may be older than the cache.
          if (data && this.drops === drops && !this.slices.has(o)) this.insert(o, data);
          return data;
        } finally {
          if (this.loading.get(o) === p) this.loading.delete(o);
        }
      })();
      this.loading.set(o, p);
      first ??= p;
    }
    return first!;
  }

  /**
   * The slice if it is cached (now the most recently used), else undefined, without waiting:
   * entry-by-entry walks take this path and go to `get` only on a miss.
   */
  getNow(sliceOffset: number): Uint8Array | undefined {
    const hit = this.slices.get(sliceOffset);
    if (hit && this.mru !== sliceOffset) {
      this.slices.delete(sliceOffset);
      this.slices.set(sliceOffset, hit);
      this.mru = sliceOffset;
    }
    return hit;
  }

  /** The last slice put at the recent end of the LRU order (whose refresh would change nothing). */
  private mru = -1;

  /** Replace (or add) a slice after the writer updated it on disk. */
  insert(sliceOffset: number, data: Uint8Array): void {
    this.slices.delete(sliceOffset);
    this.slices.set(sliceOffset, data);
    this.mru = sliceOffset;
    if (this.slices.size <= this.maxSlices) return;
    for (const k of this.slices.keys()) {
      if (this.slices.size <= this.maxSlices) break;
      if (!this.dirty.has(k)) this.slices.delete(k);
    }
  }

  /** Mark a cached slice as changed. */
  markDirty(sliceOffset: number): void {
    this.dirty.add(sliceOffset);
  }

  /** The cached content of a slice (must be present). */
  peek(sliceOffset: number): Uint8Array | undefined {
    return this.slices.get(sliceOffset);
  }

  /** True when dirty slices take more than half the cache (time to write them out). */
  get pressure(): boolean {
    return this.dirty.size * 2 > this.maxSlices;
  }

  /** Forget every slice of the table at `tableOffset` (table freed or moved). */
  dropTable(tableOffset: number, clusterSize: number): void {
    this.drops++;
    for (let o = tableOffset; o < tableOffset + clusterSize; o += this.sliceBytes) {
      this.slices.delete(o);
      this.dirty.delete(o);
      if (o === this.mru) this.mru = -1;
    }
  }

  clear(): void {
    this.drops++;
    this.slices.clear();
    this.mru = -1;
  }
}
