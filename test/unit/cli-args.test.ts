/** Command-line parsing of the CLI layer: getopt semantics, sizes, --image-opts, -l. */
import { describe, expect, it } from 'vitest';
import { getopt } from '../../src/cli/getopt.js';
import { UsageError, CliError } from '../../src/cli/errors.js';
import { parseQemuSize, parseSizeArg, parseOutputFormat, checkCacheMode } from '../../src/cli/common.js';
import { imageSpecFromOpts, parseQemuOpts } from '../../src/cli/image-opts.js';
import { parseSnapshotParam } from '../../src/cli/convert.js';

const spec = { short: ':f:hqU', long: { help: false, format: true, output: true, 'backing-chain': false, 'image-opts': false } };

describe('getopt', () => {
  it('mixes options and operands, clusters short options, takes attached and separate arguments', () => {
    const r = getopt(['info', 'a.img', '-qU', '-fqcow2', '--output', 'json', 'b'], spec);
    expect(r.operands).toEqual(['a.img', 'b']);
    expect(r.options).toEqual([{ name: 'q' }, { name: 'U' }, { name: 'f', value: 'qcow2' }, { name: 'output', value: 'json' }]);
  });

  it('accepts --name=value and unambiguous abbreviations', () => {
    const r = getopt(['info', '--out=json', '--back', 'x'], spec);
    expect(r.options).toEqual([{ name: 'output', value: 'json' }, { name: 'backing-chain' }]);
  });

  it('stops at --', () => {
    expect(getopt(['info', '--', '-f', 'x'], spec).operands).toEqual(['-f', 'x']);
  });

  it('words errors like qemu-img', () => {
    const err = (argv: string[]) => {
      try {
        getopt(argv, spec);
      } catch (e) {
        expect(e).toBeInstanceOf(UsageError);
        return (e as Error).message;
      }
      return 'no error';
    };
    expect(err(['info', '-z', 'x'])).toBe("unrecognized option '-z'");
    expect(err(['info', '-Uz', 'x'])).toBe("unrecognized option '-Uz'");
    expect(err(['info', '-zU', 'x'])).toBe("unrecognized option 'info'");
    expect(err(['info', '--bogus'])).toBe("unrecognized option '--bogus'");
    expect(err(['info', '--backing-chain=1'])).toBe("unrecognized option '--backing-chain=1'");
    expect(err(['info', '-f'])).toBe("missing argument for option '-f'");
    expect(err(['info', '--output'])).toBe("missing argument for option '--output'");
  });

  it('can stop at the first operand (global options)', () => {
    const r = getopt(['qcowkit', '-T', 'x', 'info', '-f', 'raw'], { short: '+:hVT:', stopAtOperand: true });
    expect(r.options).toEqual([{ name: 'T', value: 'x' }]);
    expect(r.operands).toEqual(['info', '-f', 'raw']);
  });
});

describe('sizes (qemu_strtosz)', () => {
  it('parses suffixes, fractions with a unit, and hex', () => {
    expect(parseQemuSize('512')).toBe(512n);
    expect(parseQemuSize('1.5k')).toBe(1536n);
    expect(parseQemuSize('10b')).toBe(10n);
    expect(parseQemuSize('4M')).toBe(4n << 20n);
    expect(parseQemuSize('0x10')).toBe(16n);
    expect(parseQemuSize('1.k')).toBe(1024n);
    expect(parseQemuSize('1E')).toBe(1n << 60n);
  });
  it('rejects what qemu rejects', () => {
    for (const bad of ['1.5', '-1', '1e3', '1kb', '.5k', '10 ', '1 k', 'abc', '']) expect(parseQemuSize(bad)).toBeUndefined();
  });
  it('gives qemu-img messages', () => {
    expect(() => parseSizeArg('start offset', 'x')).toThrow(/^Invalid start offset specified. You may use k, M, G/);
    expect(() => parseSizeArg('start offset', '8E')).toThrow('Invalid start offset specified. Must be between 0 and 9223372036854775807.');
    expect(parseSizeArg('start offset', '5E')).toBe(5 * 2 ** 60);
  });
});

describe('small option checks', () => {
  it('output format and cache modes', () => {
    expect(parseOutputFormat('json')).toBe('json');
    expect(() => parseOutputFormat('xml')).toThrow('--output must be used with human or json as argument.');
    expect(() => checkCacheMode('bogus', true)).toThrow('Invalid source cache option: bogus');
    expect(() => checkCacheMode('unsafe', false)).not.toThrow();
  });
});

describe('--image-opts', () => {
  it('splits QemuOpts with ,, escapes and an implied first key', () => {
    expect(parseQemuOpts('driver=qcow2,file.filename=a,,b.img')).toEqual([
      ['driver', 'qcow2'],
      ['file.filename', 'a,b.img'],
    ]);
    expect(parseQemuOpts('x.img,foo', 'file')).toEqual([
      ['file', 'x.img'],
      ['foo', 'on'],
    ]);
  });
  it('maps driver and file.filename', () => {
    expect(imageSpecFromOpts('driver=qcow2,file.filename=d.qcow2')).toEqual({ filename: 'd.qcow2', format: 'qcow2', unknown: [] });
    expect(imageSpecFromOpts('file.filename=d.qcow2,foo=1')).toEqual({ filename: 'd.qcow2', unknown: ['foo'] });
  });
  it('errors like qemu-img', () => {
    expect(() => imageSpecFromOpts('d.qcow2')).toThrow("Could not open 'd.qcow2': Cannot find device='d.qcow2' nor node-name='d.qcow2'");
    expect(() => imageSpecFromOpts('filename=x')).toThrow("Could not open 'filename=x': Must specify either driver or file");
    expect(() => imageSpecFromOpts('driver=qcow2')).toThrow('A block device must be specified for "file"');
    expect(() => imageSpecFromOpts('file.filename=x,file.foo=1')).toThrow("Block protocol 'file' doesn't support the option 'foo'");
  });
});

describe('convert -l', () => {
  it('takes ID_OR_NAME or snapshot.id/snapshot.name', () => {
    expect(parseSnapshotParam('snap1')).toEqual({ name: 'snap1' });
    expect(parseSnapshotParam('snapshot.id=2,snapshot.name=s')).toEqual({ id: '2', name: 's' });
    expect(() => parseSnapshotParam('snapshot.foo=1')).toThrow(CliError);
  });
});
