/**
 * A bounded LRU cache of whole qcow L2 tables (512 B .. 64 KiB each), keyed by host offset.
 * Concurrent loads of one table share a read. Tables changed in memory and not yet written are
 * "dirty" and never evicted; the driver writes them out (in order) on flush.
 */
export type TableLoader = (offset: number) => Promise<Uint8Array>;

export const DEFAULT_QCOW_L2_CACHE_BYTES = 16 * 1024 * 1024;

export class QcowL2Cache {
  private readonly maxTables: number;
  private tables = new Map<number, Uint8Array>();
  private loading = new Map<number, Promise<Uint8Array>>();
  readonly dirty = new Set<number>();

  constructor(
    private load: TableLoader,
    tableBytes: number,
    maxBytes = DEFAULT_QCOW_L2_CACHE_BYTES,
  ) {
    this.maxTables = Math.max(8, Math.floor(maxBytes / tableBytes));
  }

  get(offset: number): Promise<Uint8Array> {
    const hit = this.tables.get(offset);
    if (hit) {
      this.tables.delete(offset);
      this.tables.set(offset, hit);
      return Promise.resolve(hit);
    }
    let p = this.loading.get(offset);
    if (!p) {
      p = this.load(offset).then(
        (data) => {
          this.loading.delete(offset);
          // A write may have installed the table meanwhile: keep that one.
          const now = this.tables.get(offset);
          if (now) return now;
          this.insert(offset, data);
          return data;
        },
        (err: unknown) => {
          this.loading.delete(offset);
          throw err;
        },
      );
      this.loading.set(offset, p);
    }
    return p;
  }

  /** Add or replace a table; evicts clean tables beyond the bound. */
  insert(offset: number, data: Uint8Array): void {
    this.tables.delete(offset);
    this.tables.set(offset, data);
    if (this.tables.size <= this.maxTables) return;
    for (const k of this.tables.keys()) {
      if (this.tables.size <= this.maxTables) break;
      if (!this.dirty.has(k)) this.tables.delete(k);
    }
  }

  peek(offset: number): Uint8Array | undefined {
    return this.tables.get(offset);
  }

  markDirty(offset: number): void {
    this.dirty.add(offset);
  }

  /** Dirty tables take more than half the cache: time to write them out. */
  get pressure(): boolean {
    return this.dirty.size * 2 > this.maxTables;
  }

  clear(): void {
    for (const k of [...this.tables.keys()]) if (!this.dirty.has(k)) this.tables.delete(k);
  }
}
