/**
 * Concurrency control of the write engine: one FIFO metadata lock, plus the guest-cluster ranges
 * of data writes in flight. A data write plans under the lock (clusters chosen), writes its data
 * without it, and links it under the lock again; while in flight its clusters are off limits to
 * other requests. Operations that may change any mapping (`exclusive`) wait until nothing is in
 * flight, and while they wait no new data write starts.
 */

/** The guest clusters `[first, end)` of a data write between planning and linking. */
export interface InflightRun {
  first: number;
  end: number;
  settled: Promise<void>;
}

export class RequestLock {
  private lock: Promise<void> = Promise.resolve();
  private readonly inflight = new Set<InflightRun>();
  private exclusiveWaiting = 0;
  private gate?: { promise: Promise<void>; open: () => void };

  /** Run `fn` alone: no data write in flight, no other metadata change. */
  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    this.exclusiveWaiting++;
    let release!: () => void;
    try {
      for (;;) {
        while (this.inflight.size) await Promise.all([...this.inflight].map((r) => r.settled));
        release = await this.acquire();
        if (!this.inflight.size) break;
        release();
      }
    } finally {
      if (--this.exclusiveWaiting === 0) this.openGate();
    }
    try {
      return await fn();
    } finally {
      release();
    }
  }

  /** The metadata lock itself (FIFO); resolves to its release. */
  async acquire(): Promise<() => void> {
    const prev = this.lock;
    let release!: () => void;
    this.lock = new Promise((r) => (release = r));
    await prev;
    return release;
  }

  /**
   * Phase 1 of a data write touching guest clusters `[first, end)`: once no exclusive operation
   * waits and no run in flight overlaps them, run `plan` under the lock and register the clusters
   * it returns as in flight. `done` (call it after linking) releases them.
   */
  async reserve<P>(first: number, end: number, plan: () => Promise<{ plan: P; first: number; end: number }>): Promise<{ plan: P; done: () => void }> {
    for (;;) {
      while (this.exclusiveWaiting) await this.waitGate();
      const release = await this.acquire();
      let blocker: InflightRun | undefined;
      try {
        if (this.exclusiveWaiting) continue;
        blocker = this.overlapping(first, end);
        if (!blocker) {
          const p = await plan();
          let settle!: () => void;
          const run: InflightRun = { first: p.first, end: p.end, settled: new Promise<void>((r) => (settle = r)) };
          this.inflight.add(run);
          return {
            plan: p.plan,
            done: () => {
              this.inflight.delete(run);
              settle();
            },
          };
        }
      } finally {
        release();
      }
      await blocker.settled;
    }
  }

  private overlapping(first: number, end: number): InflightRun | undefined {
    for (const r of this.inflight) if (r.first < end && first < r.end) return r;
    return undefined;
  }

  private waitGate(): Promise<void> {
    if (!this.gate) {
      let open!: () => void;
      const promise = new Promise<void>((r) => (open = r));
      this.gate = { promise, open };
    }
    return this.gate.promise;
  }

  private openGate(): void {
    this.gate?.open();
    this.gate = undefined;
  }
}
