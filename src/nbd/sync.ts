/** Small async coordination primitives: a fair reader/writer lock and a counting semaphore. */

type Waiter = { exclusive: boolean; resolve: () => void };

/**
 * Many shared holders or one exclusive holder; first come, first served (a waiting writer holds
 * back later readers, so neither side starves).
 */
export class RWLock {
  private readers = 0;
  private writer = false;
  private queue: Waiter[] = [];

  async shared<T>(fn: () => Promise<T>): Promise<T> {
    await this.acquire(false);
    try {
      return await fn();
    } finally {
      this.readers--;
      this.wake();
    }
  }

  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    await this.acquire(true);
    try {
      return await fn();
    } finally {
      this.writer = false;
      this.wake();
    }
  }

  private acquire(exclusive: boolean): Promise<void> {
    if (this.queue.length === 0 && !this.writer && (!exclusive || this.readers === 0)) {
      if (exclusive) this.writer = true;
      else this.readers++;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.queue.push({ exclusive, resolve }));
  }

  private wake(): void {
    while (this.queue.length && !this.writer) {
      const next = this.queue[0]!;
      if (next.exclusive) {
        if (this.readers > 0) return;
        this.queue.shift();
        this.writer = true;
        next.resolve();
        return;
      }
      this.queue.shift();
      this.readers++;
      next.resolve();
    }
  }
}

/** A counting semaphore with weighted acquisition (weights above the capacity are clamped). */
export class Semaphore {
  private available: number;
  private queue: Array<{ n: number; resolve: () => void }> = [];

  constructor(private readonly capacity: number) {
    this.available = capacity;
  }

  acquire(n = 1): Promise<number> {
    const w = Math.min(Math.max(n, 0), this.capacity);
    if (this.queue.length === 0 && this.available >= w) {
      this.available -= w;
      return Promise.resolve(w);
    }
    return new Promise((resolve) => this.queue.push({ n: w, resolve: () => resolve(w) }));
  }

  /** Take `n` at once if that needs no waiting (the common case: no await, no microtask). */
  tryAcquire(n = 1): number | undefined {
    const w = Math.min(Math.max(n, 0), this.capacity);
    if (this.queue.length === 0 && this.available >= w) {
      this.available -= w;
      return w;
    }
    return undefined;
  }

  release(w: number): void {
    this.available += w;
    while (this.queue.length && this.available >= this.queue[0]!.n) {
      const next = this.queue.shift()!;
      this.available -= next.n;
      next.resolve();
    }
  }

  /** True when nothing is held. */
  get idle(): boolean {
    return this.available === this.capacity && this.queue.length === 0;
  }
}
