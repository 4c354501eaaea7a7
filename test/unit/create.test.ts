/**
 * `create` without qemu-img: option syntax and typing, qemu-img's messages and their order, the
 * "Formatting" line, `-o help`, and the layouts qemu-img 7.2 produces (numbers recorded from
 * qemu-img runs, see /work/shared/qcow-notes.md §9), checked with our own reader and checker.
 */
import { describe, expect, it } from 'vitest';
import { Qcow2Checker } from '../../src/formats/qcow2/check.js';
import {
  CreateOptions,
  hasHelpOption,
  isValidOptionList,
  mergedOpts,
  optionsHelp,
  parseQemuSize,
  qcow2ParamsFromOptions,
  splitOptionList,
  type Qcow2CreateParams,
} from '../../src/formats/qcow2/create-options.js';
import {
  ClusterSet,
  computeQcow2Layout,
  createQcow2,
  encodeRefcountBlock,
  type Qcow2Layout,
} from '../../src/formats/qcow2/create.js';
import { Qcow2Driver } from '../../src/formats/qcow2/driver.js';
import { MemoryIO } from '../../src/io/memory.js';

function opts(list: string, size?: string, format: 'qcow2' | 'raw' = 'qcow2'): CreateOptions {
  const o = new CreateOptions(mergedOpts(format));
  if (list) o.parse(list);
  if (size !== undefined && !o.has('size')) o.set('size', size);
  return o;
}

function params(list: string, size: string): Qcow2CreateParams {
  return qcow2ParamsFromOptions(opts(list, size));
}

function layout(list: string, size: string): Qcow2Layout {
  return computeQcow2Layout(params(list, size));
}

function message(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    return (e as Error).message;
  }
  return '(no error)';
}

describe('sizes as qemu parses them', () => {
  it.each([
    ['1M', 1048576n],
    ['1.5M', 1572864n],
    ['1.K', 1024n],
    ['0.5K', 512n],
    [' 1M', 1048576n],
    ['+1M', 1048576n],
    ['1b', 1n],
    ['1B', 1n],
    ['1.0', 1n],
    ['0x100000', 1048576n],
    ['01000', 1000n],
    ['1g', 1073741824n],
    ['15.9E', 18331451923248866944n],
    ['18446744073709551615', 18446744073709551615n],
  ])('%s = %s', (text, want) => {
    expect(parseQemuSize(text)).toBe(want);
  });

  it.each(['abc', '1.5', '1.5B', '1kb', '1e3', '1M ', '', '.5K', '0x', '0x1.8', '1..5K', '1k5', '-1', '00x10'])(
    'rejects %j',
    (text) => {
      expect(() => parseQemuSize(text)).toThrow('invalid');
    },
  );

  it('out of range', () => {
    expect(() => parseQemuSize('16E')).toThrow('range');
    expect(() => parseQemuSize('18446744073709551616')).toThrow('range');
  });

  it('hex with a suffix warns', () => {
    const w: string[] = [];
    expect(parseQemuSize('0x1M', w)).toBe(1048576n);
    expect(w).toEqual(['Using a multiplier suffix on hex numbers is deprecated: 0x1M']);
  });
});

describe('-o lists', () => {
  it('splits like qemu: ",," escapes, bare keys, no-prefix', () => {
    expect(splitOptionList('a=1,b=x,,y,c,nod')).toEqual([
      { name: 'a', value: '1', flag: false },
      { name: 'b', value: 'x,y', flag: false },
      { name: 'c', value: 'on', flag: true },
      { name: 'd', value: 'off', flag: true },
    ]);
    expect(splitOptionList('data_file=a=b')).toEqual([{ name: 'data_file', value: 'a=b', flag: false }]);
  });

  it('validity of a -o argument', () => {
    for (const ok of ['a=1', 'lazy_refcounts=on,,', 'help']) expect(isValidOptionList(ok)).toBe(true);
    for (const bad of ['', ',a=1', 'a=1,', 'a=1,,,', ',,']) expect(isValidOptionList(bad)).toBe(false);
  });

  it('help detection', () => {
    expect(hasHelpOption('help')).toBe(true);
    expect(hasHelpOption('?')).toBe(true);
    expect(hasHelpOption('foo,help')).toBe(true);
    expect(hasHelpOption('cluster_size=4k,help,foo')).toBe(true);
    expect(hasHelpOption('compat=help')).toBe(false);
    expect(hasHelpOption('help=1')).toBe(false);
  });

  it('typed values and their messages', () => {
    expect(message(() => opts('foo=1,lazy_refcounts=maybe'))).toBe("Invalid parameter 'foo'");
    expect(message(() => opts('lazy_refcounts=maybe,foo=1'))).toBe("Parameter 'lazy_refcounts' expects 'on' or 'off'");
    expect(message(() => opts('lazy_refcounts=ON'))).toBe("Parameter 'lazy_refcounts' expects 'on' or 'off'");
    expect(message(() => opts('refcount_bits=8.0'))).toBe("Parameter 'refcount_bits' expects a number");
    expect(message(() => opts('refcount_bits=18446744073709551616'))).toBe(
      "Value '18446744073709551616' is too large for parameter 'refcount_bits'",
    );
    expect(message(() => opts('size=16E'))).toBe("Value '16E' is out of range for parameter 'size'");
    expect(message(() => opts('cluster_size=abc'))).toBe(
      "Parameter 'cluster_size' expects a non-negative number below 2^64 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, respectively.",
    );
    expect(message(() => opts('=on'))).toBe("Invalid parameter ''");
    expect(message(() => opts('nocow'))).toBe("Invalid parameter 'cow'");
    expect(message(() => opts('cluster_size=4k', undefined, 'raw'))).toBe("Invalid parameter 'cluster_size'");
  });
});

describe('the Formatting line', () => {
  const line = (list: string, size = '1M') => opts(list, size).formattingFields();
  it('defaults, then given options in qemu-img order', () => {
    expect(line('')).toBe('cluster_size=65536 extended_l2=off compression_type=zlib size=1048576 lazy_refcounts=off refcount_bits=16');
    expect(line('preallocation=metadata,compat=0.10')).toBe(
      'cluster_size=65536 extended_l2=off preallocation=metadata compression_type=zlib size=1048576 compat=0.10 lazy_refcounts=off refcount_bits=16',
    );
    expect(line('data_file=d,,d,data_file_raw=on,lazy_refcounts=yes,refcount_bits=0x10,cluster_size=4k,nocow=on,extent_size_hint=1M')).toBe(
      'cluster_size=4096 extended_l2=off compression_type=zlib size=1048576 data_file=d,,d data_file_raw=on lazy_refcounts=yes refcount_bits=16 nocow=on extent_size_hint=1048576',
    );
    expect(line('refcount_bits=-1')).toContain('refcount_bits=-1');
    expect(line('size=8E', undefined)).toContain('size=-9223372036854775808');
    expect(line('encryption=off,encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10')).toBe(
      'encryption=off encrypt.format=luks encrypt.key-secret=s encrypt.iter-time=10 cluster_size=65536 extended_l2=off compression_type=zlib size=1048576 lazy_refcounts=off refcount_bits=16',
    );
    expect(opts('preallocation=full', '1M', 'raw').formattingFields()).toBe('size=1048576 preallocation=full');
  });
});

describe('-o help', () => {
  it('qcow2 without a filename', () => {
    expect(optionsHelp('qcow2', false)).toBe(`Supported qcow2 options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  compression_type=<str> - Compression method used for image cluster compression
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.cipher-alg=<str> - Name of encryption cipher algorithm
  encrypt.cipher-mode=<str> - Name of encryption cipher mode
  encrypt.format=<str>   - Encrypt the image, format choices: 'aes', 'luks'
  encrypt.hash-alg=<str> - Name of encryption hash algorithm
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.ivgen-alg=<str> - Name of IV generator algorithm
  encrypt.ivgen-hash-alg=<str> - Name of IV generator hash algorithm
  encrypt.key-secret=<str> - ID of secret providing qcow AES key or LUKS passphrase
  encryption=<bool (on/off)> - Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)
  extended_l2=<bool (on/off)> - Extended L2 tables
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size

The protocol level may support further options.
Specify the target filename to include those options.
`);
  });
  it('raw with a filename', () => {
    expect(optionsHelp('raw', true)).toBe(`Supported options:
  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable
  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)
  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)
  size=<size>            - Virtual disk size
`);
  });
});

describe('qcow2 option checks in qemu-img order', () => {
  const v3 = 'compatibility level 1.1 and above (use version=v3 or greater)';
  it.each([
    ['compat=1.0,preallocation=bogus', "Parameter 'version' does not accept value '1.0'"],
    ['preallocation=bogus,compression_type=lz4', "Parameter 'preallocation' does not accept value 'bogus'"],
    ['compression_type=lz4,cluster_size=3000', "Parameter 'compression-type' does not accept value 'lz4'"],
    ['cluster_size=3000,compat=0.10,extended_l2=on', `Extended L2 entries are only supported with ${v3}`],
    ['cluster_size=3000,refcount_bits=3', 'Cluster size must be a power of two between 512 and 2048k'],
    ['extended_l2=on,cluster_size=8k,refcount_bits=3', 'Extended L2 entries are only supported with cluster sizes of at least 16384 bytes'],
    [
      'backing_file=b,backing_fmt=qcow2,preallocation=metadata,refcount_bits=3',
      'Backing file and preallocation can only be used at the same time if extended_l2 is on',
    ],
    ['backing_fmt=qcow2,compat=0.10,lazy_refcounts=on', 'Backing format cannot be used without backing file'],
    ['compat=0.10,lazy_refcounts=on,refcount_bits=8', `Lazy refcounts only supported with ${v3}`],
    ['refcount_bits=3,compat=0.10', 'Refcount width must be a power of two and may not exceed 64 bits'],
    [
      'compat=0.10,refcount_bits=8,compression_type=zstd',
      'Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)',
    ],
    ['data_file=d,data_file_raw=on,backing_file=b,backing_fmt=qcow2', 'Backing file and data-file-raw cannot be used at the same time'],
    ['compat=0.10,data_file=d,compression_type=zstd', `External data files are only supported with ${v3}`],
    ['data_file_raw=on,compat=0.10,compression_type=zstd', 'data-file-raw requires data-file'],
    ['compat=0.10,compression_type=zstd', `Non-zlib compression type is only supported with ${v3}`],
    ['refcount_bits=18446744073709551615', "Parameter 'refcount-bits' expects integer"],
    ['encrypt.cipher-alg=aes', "Parameter 'encrypt.format' is missing"],
    ['encrypt.format=bogus', "Parameter 'format' does not accept value 'bogus'"],
    ['encrypt.format=luks,encrypt.cipher-alg=aes-512', "Parameter 'cipher-alg' does not accept value 'aes-512'"],
    ['encrypt.format=aes,encrypt.iter-time=10', "Parameter 'encrypt.iter-time' is unexpected"],
  ])('%s', (list, want) => {
    expect(message(() => params(list, '1M'))).toBe(want);
  });

  it('size limits', () => {
    expect(message(() => params('', '7E'))).toBe("The image size is too large for file format 'qcow2' (try using a larger cluster size)");
    expect(message(() => params('cluster_size=512', '137438953473'))).toContain('too large');
    expect(params('cluster_size=512', '128G').size).toBe(128n << 30n);
    expect(params('cluster_size=2M', '2E').size).toBe(2n << 60n);
    expect(message(() => params('', '9223372036854775807'))).toBe('Could not resize image: Image size cannot be negative');
    expect(message(() => params('', '9223372036854775296'))).toBe(
      'Could not resize image: offset(9223372036854775296) exceeds maximum(9223372035781033984)',
    );
    expect(params('', '1000').size).toBe(1024n);
  });

  it('data_file_raw implies metadata preallocation', () => {
    expect(params('data_file=d,data_file_raw=on', '1M').preallocation).toBe('metadata');
  });
});

describe('ClusterSet', () => {
  it('adds, merges, removes, searches', () => {
    const s = new ClusterSet();
    s.add(0, 3);
    s.add(5, 6);
    s.add(3, 5); // bridges into one interval
    expect([...s.runs(0, 100)]).toEqual([[0, 6]]);
    s.remove(2, 4);
    expect([...s.runs(0, 100)]).toEqual([
      [0, 2],
      [4, 6],
    ]);
    expect(s.has(1)).toBe(true);
    expect(s.has(2)).toBe(false);
    expect(s.firstIn(2, 10)).toEqual({ at: 4, runEnd: 6 });
    expect(s.firstIn(2, 4)).toBeUndefined();
    expect(s.lastBelow(5)).toBe(4);
    expect(s.lastBelow(4)).toBe(1);
    expect(s.lastBelow(100)).toBe(5);
    expect(s.lastBelow(0)).toBe(-1);
  });
});

describe('layouts qemu-img 7.2 produces', () => {
  it('64M, 64 KiB clusters: header, refcount table, refcount block, 8-byte L1', () => {
    const l = layout('', '64M');
    expect(l.header.l1TableOffset).toBe(0x30000);
    expect(l.header.l1Size).toBe(1);
    expect(l.refcountTable).toMatchObject({ cluster: 1, clusters: 1 });
    expect(l.fileLength).toBe(196616);
  });

  it('size 0: no L1 at all', () => {
    const l = layout('', '0');
    expect(l.header.l1TableOffset).toBe(0);
    expect(l.fileLength).toBe(196608);
  });

  it('128G with 512-byte clusters: the L1 spans 65536 clusters, the refcount table moves', () => {
    const l = layout('cluster_size=512', '128G');
    expect(l.header.l1Size).toBe(4194304);
    expect(l.l1.cluster).toBe(3);
    expect(l.refcountTable.cluster).toBe(65794);
    expect(l.refcountTable.clusters).toBe(7);
    const rt = l.refcountTable.blocks;
    expect([rt[0], rt[1], rt[2], rt[252], rt[253], rt[255], rt[256], rt[257], rt[258]]).toEqual([
      2, 65539, 65541, 65791, 65801, 65803, 65540, 65792, 65793,
    ]);
    expect(l.allocated.has(1)).toBe(false); // the old table, freed (its bytes stay)
    expect(l.stale).toHaveLength(1);
    expect(l.stale[0]!.offset).toBe(512);
    expect(l.fileLength).toBe(33691648);
  });

  it.each([
    ['cluster_size=512,refcount_bits=1', '128G', 33564160],
    ['cluster_size=512,refcount_bits=64', '128G', 34101760],
    ['cluster_size=4k', '8T', 33583104],
    ['cluster_size=2M', '2E', 39845888],
    ['', '2P', 33751040],
    ['extended_l2=on', '1P', 33751040],
    ['cluster_size=512,preallocation=metadata', '8M', 8587264],
    ['cluster_size=512,preallocation=falloc', '8M', 8557056],
    ['preallocation=metadata', '3G', 3221946368],
    ['preallocation=metadata', '1000', 393216],
    ['preallocation=metadata,extended_l2=on', '1000', 329728],
    ['cluster_size=4k,preallocation=full', '100000', 122880],
    ['data_file=d', '1G', 196624],
    ['data_file=d,preallocation=metadata', '1G', 393216],
  ])('-o %s %s: file length %i', (list, size, len) => {
    expect(layout(list, size).fileLength).toBe(len);
  });

  it('8M metadata with 512-byte clusters: table growth in the middle of the data', () => {
    const l = layout('cluster_size=512,preallocation=metadata', '8M');
    expect(l.refcountTable).toMatchObject({ cluster: 16641, clusters: 2 });
    expect(l.refcountTable.blocks[64]).toBe(16385);
    expect(l.refcountTable.blocks[65]).toBe(16640);
    expect(l.l1.l2.get(0)).toBe(7);
    expect(l.l1.l2.get(255)).toBe(16707);
    expect(l.allocated.has(16600)).toBe(false); // the gap the growth left
  });

  it('falloc: new refcount table after the metadata, first L2 table in the freed cluster 1', () => {
    const l = layout('preallocation=falloc', '64M');
    expect(l.refcountTable).toMatchObject({ cluster: 4, clusters: 1 });
    expect(l.l1.l2.get(0)).toBe(1);
    expect(l.dataRuns).toEqual([{ guest: 0, host: 5, count: 1024 }]);
    expect(l.fallocRange).toEqual({ offset: 5 * 65536, length: 1024 * 65536 });
  });

  it('data file: data clusters at their guest offsets, the data file extended to the last cluster', () => {
    const l = layout('data_file=d,preallocation=metadata,extended_l2=on', '1000');
    expect(l.dataRuns).toEqual([{ guest: 0, host: 0, count: 1 }]);
    expect(l.dataFileLength).toBe(2048);
  });
});

describe('refcount block encoding', () => {
  it.each([1, 2, 4, 8, 16, 32, 64])('%i-bit entries', (bits) => {
    const order = Math.log2(bits);
    const l = layout(`cluster_size=512,refcount_bits=${bits}`, '1M');
    const block = encodeRefcountBlock(l, 0);
    const per = (512 * 8) / bits;
    for (let i = 0; i < Math.min(per, 16); i++) {
      const v =
        bits >= 8
          ? block[i * (bits / 8) + bits / 8 - 1]!
          : (block[(i * bits) >> 3]! >> ((i * bits) & 7)) & ((1 << bits) - 1);
      expect(v, `entry ${i}`).toBe(l.allocated.has(i) ? 1 : 0);
    }
    expect(order).toBe(l.header.refcountOrder);
  });
});

describe('created images read back and check clean', () => {
  const cases: Array<[string, string]> = [
    ['', '64M'],
    ['compat=0.10', '10M'],
    ['cluster_size=512,refcount_bits=1', '3G'],
    ['cluster_size=512,refcount_bits=64,preallocation=metadata', '300k'],
    ['preallocation=metadata,extended_l2=on,lazy_refcounts=on', '5M'],
    ['preallocation=falloc,cluster_size=4k,refcount_bits=4', '3M'],
    ['preallocation=full,compression_type=zstd', '1M'],
    ['backing_file=b.qcow2,backing_fmt=qcow2', '1M'],
  ];
  it.each(cases)('-o %s %s', async (list, size) => {
    const mem = new MemoryIO('x.qcow2');
    const p = params(list, size);
    await createQcow2(mem, p);
    const checker = await Qcow2Checker.open(new MemoryIO('x.qcow2', mem.bytes()), { writable: false });
    const r = await checker.check(0);
    expect([r.corruptions, r.leaks, r.checkErrors]).toEqual([0, 0, 0]);
    const drv = await Qcow2Driver.open(mem, {
      readOnly: true,
      noBacking: true,
      provider: { open: () => Promise.reject(new Error('no')), resolve: (_b, n) => n },
      openBacking: () => Promise.reject(new Error('no backing expected')),
    });
    expect(drv.size).toBe(Number(p.size));
    expect(await drv.read(0, 4096)).toEqual(new Uint8Array(4096));
    const ext = await drv.blockStatus(0, drv.size);
    const kinds = new Set(ext.map((e) => e.kind));
    // Preallocated clusters show as data, except with extended L2 (no subcluster is allocated yet).
    if (p.preallocation !== 'off' && !p.extendedL2) expect(kinds.has('data') || kinds.has('zero')).toBe(true);
    else expect([...kinds]).toEqual(['unallocated']);
    await drv.close();
  });
});
