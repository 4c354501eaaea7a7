import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { SectorScanner, zeroRunsJs } from '../../src/ops/bytes.js';
import { nativeZeroRuns } from '../../src/io/sparse.js';

/** Per-sector zero flags, the plain way. */
function flags(buf: Uint8Array): boolean[] {
  const out: boolean[] = [];
  for (let s = 0; s < buf.length; s += 512) out.push(buf.subarray(s, s + 512).every((b) => b === 0));
  return out;
}

function expand(runs: Uint32Array, n: number): boolean[] {
  const out: boolean[] = [];
  for (let i = 0; i < n; i++) for (let k = 0; k < runs[i]!; k++) out.push(i % 2 === 1);
  return out;
}

/** Buffers of sectors that are zero, data, or zero but for one byte somewhere; any length and offset. */
const buffers = fc
  .record({
    sectors: fc.array(fc.constantFrom('zero', 'data', 'late', 'early'), { maxLength: 40 }),
    tail: fc.integer({ min: 0, max: 511 }),
    shift: fc.integer({ min: 0, max: 7 }),
    at: fc.integer({ min: 0, max: 511 }),
  })
  .map(({ sectors, tail, shift, at }) => {
    const len = sectors.length * 512 + tail;
    const backing = new Uint8Array(len + shift);
    const buf = backing.subarray(shift);
    sectors.forEach((k, i) => {
      if (k === 'data') buf.fill(0xa5, i * 512, (i + 1) * 512);
      if (k === 'late') buf[i * 512 + at] = 1;
      if (k === 'early') buf[i * 512] = 1;
    });
    if (tail && at % 2) buf[sectors.length * 512 + (at % tail)] = 7;
    return buf;
  });

describe('zero runs (convert zero detection)', () => {
  const native = nativeZeroRuns();

  it('the native scan is built', () => {
    expect(native).toBeTypeOf('function');
  });

  it('the portable and the native scans agree with a sector-by-sector test', () => {
    fc.assert(
      fc.property(buffers, (buf) => {
        const want = flags(buf);
        for (const scan of native ? [zeroRunsJs, native] : [zeroRunsJs]) {
          const out = new Uint32Array(want.length + 1);
          const n = scan(buf, out);
          expect(expand(out, n)).toEqual(want);
          // alternating, only the first run may be empty
          for (let i = 1; i < n; i++) expect(out[i]).toBeGreaterThan(0);
        }
      }),
      { numRuns: 300 },
    );
  });

  it('SectorScanner.run walks the runs forward and back', () => {
    fc.assert(
      fc.property(buffers.filter((b) => b.length > 0), fc.array(fc.nat(), { minLength: 1, maxLength: 20 }), (buf, probes) => {
        const want = flags(buf);
        const scan = new SectorScanner(buf);
        for (const p of probes) {
          const from = p % want.length;
          const n = want.length - from;
          const r = scan.run(from, n);
          expect(r.zero).toBe(want[from]);
          let k = 1;
          while (k < n && want[from + k] === want[from]) k++;
          expect(r.count).toBe(k);
        }
      }),
      { numRuns: 300 },
    );
  });

  it('the native scan refuses bad arguments instead of overrunning', () => {
    if (!native) return;
    expect(() => native(new Uint8Array(2048), new Uint32Array(2))).toThrow(/sectors \+ 1/);
    expect(() => (native as unknown as (a: unknown, b: unknown) => number)(new Uint8Array(4), new Uint8Array(4))).toThrow(TypeError);
  });
});
