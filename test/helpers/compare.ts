/** Comparing our CLI's outcome with qemu-img's. */
import { expect } from 'vitest';
import { describeResult, type RunResult } from './proc.js';

/** Deep copy of an `info --output=json` value without `actual-size` (which may legitimately differ). */
export function withoutActualSize(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(withoutActualSize);
  if (v && typeof v === 'object') {
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v as Record<string, unknown>)) {
      if (k === 'actual-size') continue;
      out[k] = withoutActualSize(x);
    }
    return out;
  }
  return v;
}

/** All actual-size values in document order. */
export function actualSizes(v: unknown, out: number[] = []): number[] {
  if (Array.isArray(v)) v.forEach((x) => actualSizes(x, out));
  else if (v && typeof v === 'object') {
    for (const [k, x] of Object.entries(v as Record<string, unknown>)) {
      if (k === 'actual-size' && typeof x === 'number') out.push(x);
      else actualSizes(x, out);
    }
  }
  return out;
}

export function maskActualSizeText(s: string): string {
  return s.replace(/"actual-size": \d+/g, '"actual-size": N');
}

/** Human `info` without the `disk size:` line (allocated bytes may differ). */
export function maskDiskSizeLines(s: string): string {
  return s
    .split('\n')
    .filter((l) => !/^disk size: /.test(l))
    .join('\n');
}

/** The message of an error line without the program prefix ("qemu-img: ", "qcowkit: "). */
export function errorMessage(stderr: string): string {
  const line = stderr.trim().split('\n').pop() ?? '';
  return line.replace(/^(qemu-img|qemu-io|qcowkit): /, '');
}

/** Assert a failure is reported the way the brief requires: one line on stderr, no stack trace. */
export function expectCleanFailure(r: RunResult, expectedCode = 1, stderrLines = 1): void {
  const ctx = describeResult(r);
  expect(r.timedOut, `timed out\n${ctx}`).toBe(false);
  expect(r.signal, `killed by signal\n${ctx}`).toBeNull();
  expect(r.code, `exit code\n${ctx}`).toBe(expectedCode);
  const lines = r.stderr.split('\n').filter((l) => l.length > 0);
  expect(lines.length, `exactly ${stderrLines} stderr line(s) expected\n${ctx}`).toBe(stderrLines);
  expect(lines[0]!.trim().length, `empty error message\n${ctx}`).toBeGreaterThan(0);
  expect(/^\s+at /m.test(r.stderr), `stack trace on stderr\n${ctx}`).toBe(false);
  expect(/^\s+at /m.test(r.stdout), `stack trace on stdout\n${ctx}`).toBe(false);
}

export function expectNoStackTrace(r: RunResult): void {
  const ctx = describeResult(r);
  expect(/^\s+at /m.test(r.stderr), `stack trace on stderr\n${ctx}`).toBe(false);
  expect(/^\s+at /m.test(r.stdout), `stack trace on stdout\n${ctx}`).toBe(false);
}

/** Where two multi-line texts first differ, for readable failure messages. */
export function firstLineDiff(ours: string, expected: string): string {
  const a = ours.split('\n');
  const b = expected.split('\n');
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    if (a[i] !== b[i]) return `first difference at line ${i + 1}:\n  ours:     ${JSON.stringify(a[i])}\n  qemu-img: ${JSON.stringify(b[i])}`;
  }
  return 'texts are equal';
}

export interface OutcomeOptions {
  /** How to compare stdout when qemu-img succeeded (default exact). */
  stdout?: 'exact' | 'json' | ((ours: string, theirs: string) => void);
  /** Also compare stdout when qemu-img failed (e.g. compare's "Content mismatch" with exit 1). */
  stdoutOnFailure?: boolean;
}

/**
 * Our result must match qemu-img's: same exit code; on success the same stdout (and no stderr noise
 * if qemu-img had none); on failure one clean stderr line containing qemu-img's message.
 */
export function expectSameOutcome(ours: RunResult, theirs: RunResult, opts: OutcomeOptions = {}): void {
  const ctx = `ours:\n${describeResult(ours)}\nqemu-img:\n${describeResult(theirs)}`;
  expect(ours.timedOut, `timed out\n${ctx}`).toBe(false);
  expectNoStackTrace(ours);
  expect(ours.code, `exit code differs from qemu-img\n${ctx}`).toBe(theirs.code);
  const cmp = opts.stdout ?? 'exact';
  if (theirs.code === 0 || opts.stdoutOnFailure) {
    if (cmp === 'exact')
      expect(ours.stdout, `stdout differs from qemu-img; ${firstLineDiff(ours.stdout, theirs.stdout)}\n${ctx}`).toBe(theirs.stdout);
    else if (cmp === 'json') {
      let parsed: unknown;
      try {
        parsed = JSON.parse(ours.stdout);
      } catch (e) {
        throw new Error(`our stdout is not JSON: ${(e as Error).message}\n${ctx}`);
      }
      expect(parsed, `JSON differs from qemu-img\n${ctx}`).toEqual(JSON.parse(theirs.stdout));
    } else cmp(ours.stdout, theirs.stdout);
  }
  if (theirs.code === 0 || theirs.stderr.trim() === '') {
    // Success, or a verdict rather than an error (compare's exit 1 "Content mismatch"): no stderr noise.
    if (theirs.stderr.trim() === '') expect(ours.stderr, `unexpected stderr\n${ctx}`).toBe('');
  } else {
    // One line, like qemu-img's errors; usage errors are two lines in qemu-img ("Try ... --help").
    const theirLines = theirs.stderr.split('\n').filter((l) => l.length > 0);
    expectCleanFailure(ours, theirs.code ?? 1, Math.max(1, theirLines.length));
    const want = errorMessage(theirLines[0] ?? '');
    expect(errorMessage(ours.stderr.split('\n')[0] ?? '').toLowerCase(), `error message should contain qemu-img's\n${ctx}`).toContain(
      want.toLowerCase(),
    );
  }
}

/** Our file's bytes are the expected ones (qemu-img's): same length, then every byte. */
export function expectSameBytes(ours: Uint8Array, expected: Uint8Array): void {
  expect(ours.length).toBe(expected.length);
  expect(Buffer.from(ours.buffer, ours.byteOffset, ours.length).equals(expected)).toBe(true);
}
