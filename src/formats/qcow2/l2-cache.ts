/**
 * A bounded LRU cache of L2 table slices. Like QEMU, tables are cached in slices (4 KiB, or the
 * cluster if smaller), so a small cache covers a large image. Concurrent loads of the same slice
 * share one read.
 */
export type SliceLoader = (offset: number, length: number) => Promise<Uint8Array>;

export const DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024;

export class L2Cache {
  readonly sliceBytes: number;
  private readonly maxSlices: number;
  private slices = new Map<number, Uint8Array>();
  private loading = new Map<number, Promise<Uint8Array>>();
  /** Slices changed in memory and not yet written (never evicted). */
  readonly dirty = new Set<number>();

  constructor(
    private load: SliceLoader,
    clusterSize: number,
    maxBytes = DEFAULT_L2_CACHE_BYTES,
  ) {
    this.sliceBytes = Math.min(4096, clusterSize);
    this.maxSlices = Math.max(16, Math.floor(maxBytes / this.sliceBytes));
  }

  /** The slice starting at host byte offset `sliceOffset` (aligned to sliceBytes). */
  async get(sliceOffset: number): Promise<Uint8Array> {
    const hit = this.slices.get(sliceOffset);
    if (hit) {
      // refresh LRU position
      this.slices.delete(sliceOffset);
      this.slices.set(sliceOffset, hit);
      return hit;
    }
    let p = this.loading.get(sliceOffset);
    if (!p) {
      p = this.load(sliceOffset, this.sliceBytes).then(
        (data) => {
          this.loading.delete(sliceOffset);
          this.insert(sliceOffset, data);
          return data;
        },
        (err) => {
          this.loading.delete(sliceOffset);
          throw err;
        },
      );
      this.loading.set(sliceOffset, p);
    }
    return p;
  }

  /** Replace (or add) a slice after the writer updated it on disk. */
  insert(sliceOffset: number, data: Uint8Array): void {
    this.slices.delete(sliceOffset);
    this.slices.set(sliceOffset, data);
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
    for (let o = tableOffset; o < tableOffset + clusterSize; o += this.sliceBytes) {
      this.slices.delete(o);
      this.dirty.delete(o);
    }
  }

  clear(): void {
    this.slices.clear();
  }
}
