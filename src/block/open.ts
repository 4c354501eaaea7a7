/**
 * Open an image by name: probe its format, open the driver, resolve and open its backing chain
 * (relative names against the image's folder, backing_fmt honoured, loops and over-deep chains refused).
 */
import type { BlockDriver, OpenOptions } from '../core/block-driver.js';
import type { ByteIO, IOProvider } from '../core/byte-io.js';
import { QcowError } from '../core/errors.js';
import { MAX_BACKING_CHAIN_DEPTH } from '../formats/qcow2/constants.js';
import { RawDriver } from '../formats/raw/driver.js';
import { Qcow2Driver } from '../formats/qcow2/driver.js';
import { QcowDriver } from '../formats/qcow/driver.js';

export interface OpenImageOptions extends OpenOptions {
  io: IOProvider;
}

/** Context passed down the chain so loops and depth can be detected. */
interface ChainState {
  seen: Set<string>;
  depth: number;
}

export const FORMATS = ['qcow2', 'qcow', 'raw'] as const;

export async function probeFormat(io: ByteIO): Promise<string> {
  const head = new Uint8Array(8);
  const n = await io.read(head, 0);
  if (n >= 8) {
    const dv = new DataView(head.buffer);
    if (dv.getUint32(0) === 0x514649fb) {
      const v = dv.getUint32(4);
      // As QEMU probes: version 1 is qcow, anything newer is qcow2 (which then names the version).
      if (v === 1) return 'qcow';
      if (v >= 2) return 'qcow2';
    }
  }
  return 'raw';
}

/** Collapse `.` and `dir/..` segments so one file reached by different names is seen once. */
function normalizePath(p: string): string {
  const abs = p.startsWith('/');
  const out: string[] = [];
  for (const part of p.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..' && out.length && out[out.length - 1] !== '..') out.pop();
    else if (part !== '..' || !abs) out.push(part);
  }
  return (abs ? '/' : '') + out.join('/');
}

export async function openImage(filename: string, opts: OpenImageOptions): Promise<BlockDriver> {
  return openInChain(filename, opts, { seen: new Set(), depth: 0 });
}

async function openInChain(filename: string, opts: OpenImageOptions, chain: ChainState): Promise<BlockDriver> {
  if (chain.depth > MAX_BACKING_CHAIN_DEPTH) {
    throw new QcowError('EINVAL', `Backing chain of '${filename}' is deeper than ${MAX_BACKING_CHAIN_DEPTH} images`);
  }
  const key = normalizePath(filename);
  if (chain.seen.has(key)) {
    throw new QcowError('EINVAL', `Backing file '${filename}' creates an infinite loop`);
  }
  chain.seen.add(key);
  const readOnly = opts.readOnly ?? true;
  const io = await opts.io.open(filename, { readOnly });
  try {
    const format = opts.format ?? (await probeFormat(io));
    switch (format) {
      case 'raw':
        return await RawDriver.open(io, { readOnly });
      case 'qcow2':
        return await Qcow2Driver.open(io, {
          ...opts,
          readOnly,
          provider: opts.io,
          openBacking: (name, fmt) =>
            openInChain(
              name,
              // encryption: backing images see the secrets, not this image's key-secret (QEMU: backing.encrypt.key-secret)
              { io: opts.io, format: fmt, readOnly: true, ...(opts.secrets ? { secrets: opts.secrets } : {}) },
              { seen: chain.seen, depth: chain.depth + 1 },
            ),
        });
      case 'qcow':
        // qcow v1 stores no backing format: the backing file is probed.
        return await QcowDriver.open(io, {
          ...opts,
          readOnly,
          provider: opts.io,
          openBacking: (name, fmt) =>
            openInChain(
              name,
              { io: opts.io, format: fmt, readOnly: true, ...(opts.secrets ? { secrets: opts.secrets } : {}) },
              { seen: chain.seen, depth: chain.depth + 1 },
            ),
        });
      default:
        throw new QcowError('EINVAL', `Unknown driver '${format}'`);
    }
  } catch (e) {
    await io.close().catch(() => {});
    throw e;
  }
}
