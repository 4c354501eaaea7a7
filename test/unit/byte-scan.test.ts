import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { firstDifference, firstNonZero, lastNonZero } from '../../src/core/byte-scan.js';

/** Mostly-zero buffers with a few set bytes anywhere, across the 64 KiB blocks the scan uses. */
const sparse = fc
  .record({
    length: fc.oneof(fc.integer({ min: 0, max: 100 }), fc.integer({ min: 0, max: 200_000 })),
    marks: fc.array(fc.tuple(fc.double({ min: 0, max: 1, noNaN: true }), fc.integer({ min: 1, max: 255 })), { maxLength: 5 }),
  })
  .map(({ length, marks }) => {
    const b = new Uint8Array(length);
    for (const [where, v] of marks) if (length) b[Math.min(length - 1, Math.floor(where * length))] = v;
    return b;
  });

describe('byte scans', () => {
  it('first and last non-zero byte, as a byte loop finds them', () => {
    fc.assert(
      fc.property(sparse, (b) => {
        expect(firstNonZero(b)).toBe(b.findIndex((x) => x !== 0));
        expect(lastNonZero(b)).toBe(b.findLastIndex((x) => x !== 0));
        const half = b.length >> 1;
        expect(firstNonZero(b, half)).toBe(b.subarray(0, half).findIndex((x) => x !== 0));
        expect(lastNonZero(b, half)).toBe(b.subarray(0, half).findLastIndex((x) => x !== 0));
      }),
      { numRuns: 300 },
    );
  });

  it('first difference, as a byte loop finds it (also on views at odd offsets)', () => {
    fc.assert(
      fc.property(sparse, fc.integer({ min: 0, max: 3 }), (d, shift) => {
        const base = new Uint8Array(d.length + shift).fill(9);
        const a = base.subarray(shift);
        const b = new Uint8Array(a);
        for (let i = 0; i < d.length; i++) b[i] = (b[i]! ^ d[i]!) & 0xff;
        const want = d.findIndex((x) => x !== 0);
        expect(firstDifference(a, b)).toBe(want);
      }),
      { numRuns: 300 },
    );
  });
});
