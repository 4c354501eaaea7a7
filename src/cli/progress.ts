/**
 * qemu-img's simple progress display: `    (12.34/100%)` followed by a carriage return, printed
 * when the value moved by more than `minSkip` points (and always at 0 and 100); a newline at the end.
 */
import type { Output } from './output.js';

export class ProgressPrinter {
  private last = 0;
  private current = 0;
  private lastDone = 0;
  private calls = 0;
  constructor(
    private readonly out: Output,
    private readonly enabled: boolean,
    private readonly minSkip: number,
    /**
     * How qemu-img computes the value (in C floats): 'absolute' = done/total (convert),
     * 'incremental' = a running sum of each step's share (compare).
     */
    private readonly mode: 'absolute' | 'incremental',
  ) {}

  /** Report `done` of `total` (an ops ProgressFn). */
  readonly report = (done: number, total: number): void => {
    let value: number;
    const first = this.calls++ === 0;
    if (this.mode === 'absolute') {
      // (0, 0) twice = an empty job: started, then finished
      value = total === 0 ? (first ? 0 : 100) : Math.fround((100 * done) / total);
    } else if (done === 0) value = this.current;
    else if (total === 0) return;
    else {
      const delta = done - this.lastDone;
      const share = Math.fround(Math.fround(Math.fround(delta) / Math.fround(total)) * 100);
      value = Math.fround(this.current + Math.fround(Math.fround(share / 100) * 100));
    }
    this.lastDone = done;
    this.show(value);
  };

  private show(value: number): void {
    this.current = value;
    if (!this.enabled) return;
    if (value > this.last + this.minSkip || value < this.last - this.minSkip || value === 0 || value === 100) {
      this.last = value;
      this.out.write(`    (${formatPercent(value)}/100%)\r`);
      void this.out.flush();
    }
  }

  end(): void {
    if (this.enabled) this.out.write('\n');
  }
}

/**
 * `%.2f` of the value as qemu holds it (a C float), rounded like glibc's printf: from the exact
 * binary value, ties to even (so 15.625 prints as 15.62, where toFixed would give 15.63).
 */
export function formatPercent(v: number): string {
  const x = Math.fround(v);
  if (!Number.isFinite(x) || x < 0) return x.toFixed(2);
  const dv = new DataView(new ArrayBuffer(8));
  dv.setFloat64(0, x);
  const hi = dv.getUint32(0);
  const lo = dv.getUint32(4);
  const bexp = (hi >>> 20) & 0x7ff;
  let mant = (BigInt(hi & 0xfffff) << 32n) | BigInt(lo);
  let exp: number;
  if (bexp === 0) exp = -1074;
  else {
    mant |= 1n << 52n;
    exp = bexp - 1075;
  }
  let q: bigint;
  const scaled = mant * 100n;
  if (exp >= 0) q = scaled << BigInt(exp);
  else {
    const sh = BigInt(-exp);
    q = scaled >> sh;
    const r = scaled - (q << sh);
    const half = 1n << (sh - 1n);
    if (r > half || (r === half && (q & 1n) === 1n)) q += 1n;
  }
  const s = q.toString().padStart(3, '0');
  return `${s.slice(0, -2)}.${s.slice(-2)}`;
}
