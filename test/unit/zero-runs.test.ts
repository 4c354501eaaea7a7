import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { SectorScanner, sliceRuns, zeroRunsJs } from '../../src/ops/bytes.js';
import { nativeReadScan, nativeZeroRuns } from '../../src/io/sparse.js';
import { FileIO } from '../../src/io/file.js';
import { RawDriver } from '../../src/formats/raw/driver.js';

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

describe('runs made by the read (readScan, sliceRuns)', () => {
  it('sliceRuns gives the runs of any window of sectors', () => {
    fc.assert(
      fc.property(buffers.filter((b) => b.length >= 512), fc.nat(), fc.nat(), (buf, a, b) => {
        const want = flags(buf);
        const all = new Uint32Array(want.length + 2);
        all[0] = zeroRunsJs(buf, all.subarray(1));
        const from = a % want.length;
        const n = 1 + (b % (want.length - from));
        const part = sliceRuns(all, from, n);
        expect(expand(part, part.length)).toEqual(want.slice(from, from + n));
        for (let i = 1; i < part.length; i++) expect(part[i]).toBeGreaterThan(0);
      }),
      { numRuns: 300 },
    );
  });

  it('FileIO.readScanned and RawDriver.readIntoScanned: the bytes, zeros past the end, and their runs', async () => {
    expect(nativeReadScan()).toBeTypeOf('function');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowkit-readscan-'));
    try {
      const name = path.join(dir, 'f.raw');
      const content = new Uint8Array(3 * 1024 * 1024 + 700); // ends mid-sector
      for (let i = 0; i < content.length; i += 4096) if ((i >> 12) % 3 !== 1) content.fill(1 + ((i >> 12) & 0x7f), i, i + 100);
      fs.writeFileSync(name, content);
      const io = await FileIO.open(name, { readOnly: true });
      const raw = await RawDriver.open(io, { readOnly: true });
      try {
        for (const [offset, length] of [[0, 1 << 20], [4096 * 5 + 512, 1 << 20], [3 * 1024 * 1024, raw.size - 3 * 1024 * 1024]] as const) {
          const buf = new Uint8Array(length).fill(0xee);
          const runs = new Uint32Array(Math.ceil(length / 512) + 2);
          await raw.readIntoScanned(buf, offset, runs);
          const want = new Uint8Array(length);
          want.set(content.subarray(offset, Math.min(content.length, offset + length)));
          expect(Buffer.from(buf).equals(Buffer.from(want))).toBe(true);
          expect(runs[0]).toBeGreaterThan(0);
          expect(expand(runs.subarray(1), runs[0]!)).toEqual(flags(want));
        }
      } finally {
        await raw.close();
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
