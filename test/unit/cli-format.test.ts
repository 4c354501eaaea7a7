/** Output formatting of the CLI layer: info text, snapshot table, map lines, progress, JSON order. */
import { describe, expect, it } from 'vitest';
import { humanImageInfo, snapshotHeader, snapshotLine, dumpObject } from '../../src/cli/info-format.js';
import { mapHumanLine, mapJsonLine, MAP_HUMAN_HEADER } from '../../src/cli/map.js';
import { formatPercent, ProgressPrinter } from '../../src/cli/progress.js';
import { Output } from '../../src/cli/output.js';
import { qjson } from '../../src/core/qjson.js';
import { combinePath, type ImageInfo } from '../../src/ops/info.js';
import { Writable } from 'node:stream';

const overlay: ImageInfo = {
  filename: 'qk/overlay.qcow2',
  format: 'qcow2',
  'dirty-flag': false,
  'actual-size': 397312,
  'virtual-size': 67108864,
  'cluster-size': 65536,
  'backing-filename': 'base.qcow2',
  'full-backing-filename': 'qk/base.qcow2',
  'backing-filename-format': 'qcow2',
  'format-specific': {
    type: 'qcow2',
    data: { compat: '1.1', 'compression-type': 'zlib', 'lazy-refcounts': false, 'refcount-bits': 16, corrupt: false, 'extended-l2': false },
  },
};

describe('info', () => {
  it('prints the human text of qemu-img 7.2', () => {
    expect(humanImageInfo(overlay)).toBe(
      [
        'image: qk/overlay.qcow2',
        'file format: qcow2',
        'virtual size: 64 MiB (67108864 bytes)',
        'disk size: 388 KiB',
        'cluster_size: 65536',
        'backing file: base.qcow2 (actual path: qk/base.qcow2)',
        'backing file format: qcow2',
        'Format specific information:',
        '    compat: 1.1',
        '    compression type: zlib',
        '    lazy refcounts: false',
        '    refcount bits: 16',
        '    corrupt: false',
        '    extended l2: false',
        '',
      ].join('\n'),
    );
  });

  it('prints JSON in QEMU key order', () => {
    const lines = qjson(overlay).split('\n');
    expect(lines[1]).toBe('    "backing-filename-format": "qcow2",');
    expect(lines[2]).toBe('    "virtual-size": 67108864,');
    expect(lines.at(-2)).toBe('    "dirty-flag": false');
  });

  it('dumps nested lists and dicts', () => {
    expect(dumpObject({ bitmaps: [{ flags: ['auto'], name: 'bm0', granularity: 65536 }] }, 1)).toBe(
      '    bitmaps:\n        [0]:\n            flags:\n                [0]: auto\n            name: bm0\n            granularity: 65536\n',
    );
  });

  it('formats the snapshot table', () => {
    expect(snapshotHeader()).toBe('ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n');
    const line = snapshotLine({
      id: '2',
      name: 'a_very_long_snapshot_name_here',
      'vm-state-size': 5368709127,
      'date-sec': 0,
      'date-nsec': 0,
      'vm-clock-sec': 399661,
      'vm-clock-nsec': 123456789,
    });
    expect(line.startsWith('2         a_very_long_snapshot_name_here    5 GiB ')).toBe(true);
    expect(line.endsWith('111:01:01.123           \n')).toBe(true);
  });

  it('combines backing paths like QEMU', () => {
    expect(combinePath('qk/overlay.qcow2', 'base.qcow2')).toBe('qk/base.qcow2');
    expect(combinePath('overlay.qcow2', 'base.qcow2')).toBe('base.qcow2');
    expect(combinePath('/a/b.qcow2', '/c/d')).toBe('/c/d');
  });
});

describe('map', () => {
  it('formats JSON and human lines', () => {
    const e = { start: 65536, length: 131072, depth: 1, present: true, zero: false, data: true, offset: 393216, filename: 'base.qcow2' };
    expect(mapJsonLine(e)).toBe('{ "start": 65536, "length": 131072, "depth": 1, "present": true, "zero": false, "data": true, "offset": 393216}');
    expect(MAP_HUMAN_HEADER).toBe('Offset          Length          Mapped to       File\n');
    expect(mapHumanLine({ ...e, start: 0 })).toBe('0               0x20000         0x60000         base.qcow2\n');
    expect(mapHumanLine({ ...e, zero: true })).toBe('');
    expect(() => mapHumanLine({ start: 0, length: 1, depth: 0, present: true, zero: false, data: true })).toThrow(
      'File contains external, encrypted or compressed clusters.',
    );
  });
});

describe('progress', () => {
  it('rounds like C printf from the float value', () => {
    expect(formatPercent(15.625)).toBe('15.62');
    expect(formatPercent(37.5)).toBe('37.50');
    expect(formatPercent(100)).toBe('100.00');
    expect(formatPercent(0)).toBe('0.00');
  });

  it('prints steps larger than the minimum, and 0 and 100', async () => {
    let text = '';
    const sink = new Writable({
      write(chunk, _enc, cb) {
        text += String(chunk);
        cb();
      },
    });
    const out = new Output(sink);
    const p = new ProgressPrinter(out, true, 1.0, 'absolute');
    p.report(0, 8);
    p.report(3, 8);
    p.report(4, 8);
    p.report(8, 8);
    p.report(8, 8);
    p.end();
    await out.flush();
    expect(text).toBe('    (0.00/100%)\r    (37.50/100%)\r    (50.00/100%)\r    (100.00/100%)\r    (100.00/100%)\r\n');
  });
});
