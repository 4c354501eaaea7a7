/** Unit tests of the check's building blocks: number formatting, report shape, refcount arrays, allocation. */
import { describe, expect, it } from 'vitest';
import { qjson } from '../../src/core/qjson.js';
import { allocClustersImrt } from '../../src/formats/qcow2/check-rebuild.js';
import { RefcountArray, getPacked, hex64, hexAlt, setPacked, emptyResult } from '../../src/formats/qcow2/check-base.js';
import { encodeCheckSnapshots } from '../../src/formats/qcow2/check-snapshots.js';
import { getRefcount, setRefcount } from '../../src/formats/qcow2/refcount.js';
import { checkExitCode, humanImageCheck, percent2, repairedBanner, toImageCheck } from '../../src/ops/check.js';

describe('percent2 (C "%0.2f")', () => {
  it('rounds the exact binary value, ties to even', () => {
    const cases: Array<[number, string]> = [
      [12.5, '12.50'],
      [0.125, '0.12'], // exact tie: to even (JS toFixed would say 0.13)
      [0.375, '0.38'],
      [100, '100.00'],
      [(2 / 3) * 100, '66.67'],
      [0.005, '0.01'], // the double is slightly above .005
      [1.005, '1.00'], // the double is slightly below 1.005
      [99.995, '100.00'],
      [(5 * 100) / 1024, '0.49'],
      [0, '0.00'],
      [99.999, '100.00'],
    ];
    for (const [v, s] of cases) expect([v, percent2(v)]).toEqual([v, s]);
  });
});

describe('ImageCheck report', () => {
  it('omits zero counters (but not check-errors) and prints keys in QEMU order', () => {
    const r = { ...emptyResult(), imageEndOffset: 458752, compressedClusters: 7, totalClusters: 1024, allocatedClusters: 8, fragmentedClusters: 7 };
    const text = qjson(toImageCheck('comp.qcow2', 'qcow2', r));
    expect(text).toBe(
      [
        '{',
        '    "image-end-offset": 458752,',
        '    "compressed-clusters": 7,',
        '    "total-clusters": 1024,',
        '    "check-errors": 0,',
        '    "allocated-clusters": 8,',
        '    "filename": "comp.qcow2",',
        '    "format": "qcow2",',
        '    "fragmented-clusters": 7',
        '}',
      ].join('\n'),
    );
  });

  it('human text: errors, leaks, internal errors, statistics, end offset', () => {
    const r = { ...emptyResult(), corruptions: 2, leaks: 1, checkErrors: 1, imageEndOffset: 524288, totalClusters: 1024, allocatedClusters: 3, fragmentedClusters: 2 };
    expect(humanImageCheck(toImageCheck('x', 'qcow2', r))).toBe(
      '\n2 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n' +
        '\n1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n' +
        '\n1 internal errors have occurred during the check.\n' +
        '3/1024 = 0.29% allocated, 66.67% fragmented, 0.00% compressed clusters\n' +
        'Image end offset: 524288\n',
    );
    expect(humanImageCheck(toImageCheck('x', 'qcow2', { ...emptyResult(), imageEndOffset: 65536 }))).toBe(
      'No errors were found on the image.\nImage end offset: 65536\n',
    );
    expect(repairedBanner({ ...emptyResult(), leaksFixed: 5, corruptionsFixed: 1 })).toBe(
      'The following inconsistencies were found and repaired:\n\n    5 leaked clusters\n    1 corruptions\n\nDouble checking the fixed image now...\n',
    );
  });

  it('exit codes', () => {
    expect(checkExitCode(emptyResult())).toBe(0);
    expect(checkExitCode({ ...emptyResult(), leaks: 1 })).toBe(3);
    expect(checkExitCode({ ...emptyResult(), leaks: 1, corruptions: 1 })).toBe(2);
    expect(checkExitCode({ ...emptyResult(), corruptions: 1, checkErrors: 1 })).toBe(1);
  });

  it('hex formatting like printf', () => {
    expect(hex64(0x80000000, 0x50000)).toBe('8000000000050000');
    expect(hex64(0, 0x60000)).toBe('60000');
    expect(hexAlt(0)).toBe('0');
    expect(hexAlt(0x70001)).toBe('0x70001');
  });
});

describe('in-memory refcount array', () => {
  for (let order = 0; order <= 6; order++) {
    it(`order ${order}: same packing as refcount blocks, whole clusters, grows zeroed`, () => {
      const cs = 512;
      const a = new RefcountArray(order, cs);
      a.resize(100);
      expect(a.buf.length % cs).toBe(0);
      const max = order === 6 ? 2 ** 40 : 2 ** (1 << order) - 1;
      for (let i = 0; i < 100; i++) a.set(i, (i * 7) % (max + 1));
      for (let i = 0; i < 100; i++) {
        expect(a.get(i)).toBe((i * 7) % (max + 1));
        expect(getRefcount(a.buf, i, order)).toBe(a.get(i));
      }
      const b = new Uint8Array(cs);
      setRefcount(b, 3, order, 1);
      expect(getPacked(b, 3, order)).toBe(1);
      setPacked(b, 4, order, 1);
      expect(getRefcount(b, 4, order)).toBe(1);
      a.resize(100000);
      expect(a.get(99999)).toBe(0);
      expect(a.get(99)).toBe((99 * 7) % (max + 1));
      expect(a.max).toBe(order === 6 ? Number.POSITIVE_INFINITY : max);
    });
  }
});

describe('allocClustersImrt (rebuild allocator)', () => {
  it('first fit from the hint, growing the array past the end', () => {
    const a = new RefcountArray(4, 65536);
    a.resize(8);
    for (const c of [0, 1, 3, 5, 6, 7]) a.set(c, 1);
    const hint = { v: 0 };
    expect(allocClustersImrt(a, 1, hint)).toBe(2);
    expect(hint.v).toBe(2);
    expect(allocClustersImrt(a, 2, { v: 0 })).toBe(8); // 4 alone is too small; append
    expect(a.size).toBe(10);
    expect(allocClustersImrt(a, 1, { v: 0 })).toBe(4);
    expect([8, 9, 4].map((c) => a.get(c))).toEqual([1, 1, 1]);
  });
});

describe('snapshot table encoding for repairs', () => {
  it('writes at least 24 bytes of extra data, keeps unknown extra data, pads entries to 8', () => {
    const sn = {
      l1TableOffset: 0x80000,
      l1Size: 1,
      idStr: '1',
      name: 'snap',
      dateSec: 1,
      dateNsec: 2,
      vmClockNsec: 3n,
      vmStateSize: 0n,
      extraDataSize: 8,
      diskSize: 67108864n,
      icount: 0xffffffffffffffffn,
      unknownExtra: new Uint8Array(0),
    };
    const withUnknown = { ...sn, idStr: '2', extraDataSize: 32, unknownExtra: new Uint8Array(8).fill(0x11) };
    const { bytes, size } = encodeCheckSnapshots([sn, withUnknown]);
    const dv = new DataView(bytes.buffer);
    expect(dv.getUint32(36)).toBe(24);
    expect(dv.getBigUint64(48)).toBe(67108864n);
    expect(dv.getBigUint64(56)).toBe(0xffffffffffffffffn);
    const second = Math.ceil((40 + 24 + 1 + 4) / 8) * 8;
    expect(dv.getUint32(second + 36)).toBe(32);
    expect([...bytes.subarray(second + 64, second + 72)]).toEqual(new Array(8).fill(0x11));
    expect(size).toBe(second + 40 + 32 + 1 + 4); // the last entry is not padded
  });
});
