import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { freeRunEnd, getRefcount, setRefcount } from '../../src/formats/qcow2/refcount.js';

/** The first entry in [from, to) with a refcount other than 0, entry by entry. */
function naive(block: Uint8Array, from: number, to: number, order: number): number {
  for (let i = from; i < to; i++) if (getRefcount(block, i, order) !== 0) return i;
  return to;
}

describe('freeRunEnd (free clusters found by scanning a refcount block)', () => {
  it('agrees with reading entry by entry, for every refcount width', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 6 }),
        fc.array(fc.nat(), { maxLength: 6 }),
        fc.nat(),
        fc.nat(),
        (order, used, a, b) => {
          const entries = 4096;
          const block = new Uint8Array((entries << order) / 8);
          const max = order === 6 ? 2 ** 40 : 2 ** (1 << order) - 1;
          for (const u of used) setRefcount(block, u % entries, order, 1 + (u % max));
          const from = a % (entries + 1);
          const to = from + (b % (entries + 1 - from));
          expect(freeRunEnd(block, from, to, order)).toBe(naive(block, from, to, order));
        },
      ),
      { numRuns: 500 },
    );
  });

  it('finds an in-use entry at either end of the range and in a long free run', () => {
    for (let order = 0; order <= 6; order++) {
      const entries = 65536;
      const block = new Uint8Array((entries << order) / 8);
      expect(freeRunEnd(block, 0, entries, order)).toBe(entries);
      setRefcount(block, entries - 1, order, 1);
      expect(freeRunEnd(block, 0, entries, order)).toBe(entries - 1);
      expect(freeRunEnd(block, entries - 1, entries, order)).toBe(entries - 1);
      setRefcount(block, 12345, order, 1);
      expect(freeRunEnd(block, 0, entries, order)).toBe(12345);
      expect(freeRunEnd(block, 12346, entries, order)).toBe(entries - 1);
      expect(freeRunEnd(block, 100, 100, order)).toBe(100);
    }
  });
});
