/**
 * Creating qcow (version 1) images exactly like `qemu-img create -f qcow` 7.2 (byte for byte):
 * 48-byte header, the backing file name right after it, the L1 table at round_up(48 + name, 8)
 * written as whole zeroed 512-byte sectors. 4 KiB clusters and 512-entry L2 tables without a
 * backing file; 512-byte clusters and 4096-entry L2 tables with one. The virtual size is rounded
 * up to whole sectors. There is no backing format field: `backingFormat` is accepted (qemu-img uses
 * it only to open the backing file) and not stored.
 */
import type { ByteIO } from '../../core/byte-io.js';
import { QcowError } from '../../core/errors.js';
import { qcowCreateLayout, type QcowCreateLayout } from './header.js';

export interface QcowCreateParams {
  /** Virtual size in bytes (rounded up to a multiple of 512). */
  size: number;
  backingFile?: string;
  /** Not stored (qcow v1 has no backing format); kept for symmetry with qcow2. */
  backingFormat?: string;
  /** Legacy AES encryption (crypt_method 1; the key is the password, nothing else is stored). */
  encrypt?: boolean;
}

const ZERO_CHUNK = 1 << 20;

/** Write a new empty qcow image to `io` (which should be empty). Returns the layout written. */
export async function createQcow(io: ByteIO, params: QcowCreateParams): Promise<QcowCreateLayout> {
  const layout = qcowCreateLayout({ size: params.size, backingFile: params.backingFile });
  if (params.encrypt) new DataView(layout.headerBytes.buffer, layout.headerBytes.byteOffset, layout.headerBytes.byteLength).setUint32(36, 1);
  await io.truncate(0);
  await io.write(layout.headerBytes, 0);
  // Padding between the name and the L1 table, then the L1 table itself: all zeros, written (not
  // just truncated) so the file's allocation matches qemu-img's.
  const start = layout.headerBytes.length;
  const zeros = new Uint8Array(Math.min(ZERO_CHUNK, layout.fileSize - start));
  for (let off = start; off < layout.fileSize; ) {
    const n = Math.min(zeros.length, layout.fileSize - off);
    await io.write(n === zeros.length ? zeros : zeros.subarray(0, n), off);
    off += n;
  }
  await io.flush();
  return layout;
}

/**
 * qcow's create options (format options in the order qemu-img prints them in its "Formatting ..."
 * line, then the file protocol's), same shape as the qcow2 option tables.
 */
export const QCOW_CREATE_OPTS: ReadonlyArray<{ name: string; type: 'string' | 'size' | 'number' | 'bool'; help: string }> = [
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  { name: 'backing_file', type: 'string', help: 'File name of a base image' },
  { name: 'backing_fmt', type: 'string', help: 'Format of the backing image' },
  { name: 'encryption', type: 'bool', help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)" },
  { name: 'encrypt.format', type: 'string', help: "Encrypt the image, format choices: 'aes'" },
  { name: 'encrypt.key-secret', type: 'string', help: 'ID of the secret that provides the AES encryption key' },
  { name: 'nocow', type: 'bool', help: 'Turn off copy-on-write (valid only on btrfs)' },
  { name: 'preallocation', type: 'string', help: 'Preallocation mode (allowed values: off, falloc, full)' },
  { name: 'extent_size_hint', type: 'size', help: 'Extent size hint for the image file, 0 to disable' },
];

/** Output of `qemu-img create -f qcow -o help x` (7.2), including the final newline. */
export const QCOW_CREATE_HELP =
  'Supported options:\n' +
  '  backing_file=<str>     - File name of a base image\n' +
  '  backing_fmt=<str>      - Format of the backing image\n' +
  "  encrypt.format=<str>   - Encrypt the image, format choices: 'aes'\n" +
  '  encrypt.key-secret=<str> - ID of the secret that provides the AES encryption key\n' +
  "  encryption=<bool (on/off)> - Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)\n" +
  '  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable\n' +
  '  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)\n' +
  '  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)\n' +
  '  size=<size>            - Virtual disk size\n';
