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
    while (this.slices.size > this.maxSlices) {
      const oldest = this.slices.keys().next().value as number;
      this.slices.delete(oldest);
    }
  }

  /** Forget every slice of the table at `tableOffset` (table freed or moved). */
  dropTable(tableOffset: number, clusterSize: number): void {
    for (let o = tableOffset; o < tableOffset + clusterSize; o += this.sliceBytes) this.slices.delete(o);
  }

  clear(): void {
    this.slices.clear();
  }
}
