/**
 * A pool of worker threads that compress clusters (one worker per core by default). Callers bound
 * the work in flight (see `inFlightLimit`); each worker handles one job at a time.
 */
import type { Worker } from 'node:worker_threads';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { QcowError } from '../core/errors.js';

interface Pending {
  resolve: (v: Uint8Array | undefined) => void;
  reject: (e: Error) => void;
}

export class CompressPool {
  private workers: Worker[] = [];
  private idle: Worker[] = [];
  private queue: Array<{ id: number; data: Uint8Array; limit: number }> = [];
  private pending = new Map<number, Pending>();
  private nextId = 1;

  constructor(
    readonly type: 'zlib' | 'zstd',
    threads = availableParallelism(),
  ) {
    const url = new URL('./compress-worker.js', import.meta.url);
    // loaded here, not at start-up: only compressing commands need it (~2 ms to load)
    const { Worker } = createRequire(import.meta.url)('node:worker_threads') as typeof import('node:worker_threads');
    for (let i = 0; i < Math.max(1, threads); i++) {
      const w = new Worker(url);
      w.on('message', (msg: { id: number; data?: Uint8Array; error?: string }) => {
        const p = this.pending.get(msg.id);
        this.pending.delete(msg.id);
        this.idle.push(w);
        this.pump();
        if (!p) return;
        if (msg.error) p.reject(new QcowError('EIO', `Compression failed: ${msg.error}`));
        else p.resolve(msg.data);
      });
      w.on('error', (e) => {
        for (const p of this.pending.values()) p.reject(new QcowError('EIO', `Compression worker failed: ${e.message}`));
        this.pending.clear();
      });
      this.workers.push(w);
      this.idle.push(w);
    }
  }

  /** How many jobs a caller should keep in flight to keep every worker busy. */
  get inFlightLimit(): number {
    return this.workers.length * 2;
  }

  /** Compressed bytes, or undefined when the result would not be smaller than `limit`. */
  compress(data: Uint8Array, limit: number): Promise<Uint8Array | undefined> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.queue.push({ id, data, limit });
      this.pump();
    });
  }

  private pump(): void {
    while (this.idle.length && this.queue.length) {
      const w = this.idle.pop()!;
      const job = this.queue.shift()!;
      w.postMessage({ id: job.id, type: this.type, data: job.data, limit: job.limit });
    }
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
    this.workers = [];
    this.idle = [];
  }
}
