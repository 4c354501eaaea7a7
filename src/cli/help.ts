/** `--help` and `--version` texts (qcowkit's own words; the command syntax is qemu-img's). */
import { createRequire } from 'node:module';

export function packageVersion(): string {
  try {
    const require = createRequire(import.meta.url);
    const pkg = require('../../package.json') as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

export function versionText(): string {
  return `qcowkit version ${packageVersion()}\nCommand-line compatible with qemu-img 7.2 (qcowkit is not QEMU).\n`;
}

/** Synopsis of each command qcowkit implements. */
export const SYNOPSES: Record<string, string> = {
  check: 'check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename',
  compare: 'compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2',
  convert:
    'convert [--object objectdef] [--image-opts] [--target-is-zero] [-U] [-C] [-p] [-q] [-n] [-f fmt] [-t cache] ' +
    '[-T src_cache] [-O output_fmt] [-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] ' +
    '[-m num_coroutines] [-W] filename [filename2 [...]] output_filename',
  info: 'info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename',
  map: 'map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename',
};

export function helpText(): string {
  const cmds = Object.keys(SYNOPSES)
    .sort()
    .map((c) => `  ${SYNOPSES[c]}`)
    .join('\n');
  return `qcowkit version ${packageVersion()} - qcow2 disk images, compatible with qemu-img 7.2
usage: qcowkit [-h] [-V] [-T trace] command [command options]

General options:
  -h, --help        show this help and exit (also: qcowkit COMMAND --help)
  -V, --version     show the version and exit
  -T, --trace ARG   accepted for compatibility; ignored

Commands:
${cmds}

Arguments:
  filename          an image file; with --image-opts an option string such as
                    driver=qcow2,file.filename=disk.qcow2
  fmt               image format (qcow2, raw); detected from the file when omitted
  output_fmt        format of the new image for convert (raw)
  cache, src_cache  none, writeback, writethrough, directsync or unsafe (checked, not used)
  ofmt              human (default) or json
  sizes and offsets accept the suffixes k, M, G, T, P, E (powers of 1024); b means bytes

Command options:
  -f fmt            format of the (first) image; -F fmt: format of the second image (compare)
  -U, --force-share open images read-only without locking (qcowkit never locks)
  -q                quiet: print nothing but errors
  -p                show progress
  -s                compare: strict mode, allocation must match too
  -n                convert: write into an existing target instead of creating it
  -S size           convert: zero runs at least this long become holes (default 4k; 0 writes everything)
  -l snapshot_param convert: read an internal snapshot: snapshot.id=ID,snapshot.name=NAME or ID_OR_NAME
  -m n              convert: requests in flight (1-16, default 8)
  --backing-chain   info: show every image of the backing chain
  --start-offset, --max-length   map: the range to map

Exit codes follow qemu-img (compare: 0 identical, 1 different, 2 open error,
3 allocation query error, 4 read error).
`;
}
