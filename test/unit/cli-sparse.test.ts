/** convert's zero detection (qemu-img's rules, cross-checked against qemu-img output layouts). */
import { describe, expect, it } from 'vitest';
import { sparseRuns } from '../../src/ops/sparse-scan.js';
import { firstDifference, firstNonZero, allocIoBuffer } from '../../src/ops/bytes.js';

const S = 512;
/** A buffer from a pattern: 'd' = data sector, '.' = zero sector. */
function sectors(pattern: string): Uint8Array {
  const b = new Uint8Array(pattern.length * S);
  [...pattern].forEach((c, i) => {
    if (c === 'd') b[i * S + 100] = 1;
  });
  return b;
}
const runs = (pattern: string, minSparse = 4096, target = 0) =>
  sparseRuns(sectors(pattern), pattern.length, target, minSparse).map((r) => `${r.data ? 'D' : 'Z'}${r.count}`).join(' ');

describe('sparseRuns', () => {
  it('keeps short zero runs inside data and aligns run ends to the sparse size', () => {
    expect(runs('dddddddd' + '.'.repeat(16) + 'dddddddd')).toBe('D8 Z16 D8');
    expect(runs('ddd' + '.'.repeat(13) + 'dddddddd')).toBe('D8 Z8 D8'); // data end rounded up to 4 KiB
    expect(runs('dddddddd' + '....' + 'dddddddd')).toBe('D20'); // 2 KiB of zeros stay data
  });

  it('leading zeros become a hole whatever their length once aligned', () => {
    expect(runs('........dddddddd')).toBe('Z8 D8');
    expect(runs('....dddddddddddd')).toBe('D16'); // unaligned short zero head is rewritten anyway
  });

  it('a buffer shorter than the sparse size that is all zero is a hole', () => {
    expect(runs('...', 4096)).toBe('Z3');
    expect(runs('...d', 4096)).toBe('D4');
  });

  it('bigger -S values align to their power of two', () => {
    const p = 'd'.repeat(40) + '.'.repeat(200) + 'd'.repeat(16);
    expect(runs(p, 8192)).toBe('D48 Z192 D16');
    expect(runs(p, 65536)).toBe('D256');
  });

  it('-S 0 writes everything', () => {
    expect(runs('....dddd....', 0)).toBe('D12');
  });
});

describe('byte scans', () => {
  it('find the first difference and the first non-zero byte', () => {
    const a = allocIoBuffer(200000);
    const b = allocIoBuffer(200000);
    expect(firstDifference(a, b)).toBe(-1);
    expect(firstNonZero(a)).toBe(-1);
    b[150001] = 7;
    expect(firstDifference(a, b)).toBe(150001);
    expect(firstNonZero(b)).toBe(150001);
  });
});
