/**
 * `convert -O qcow2|qcow`: create the target (qemu-img's layout and -o options; -B makes it an
 * overlay), open it read-write and copy — sparse, compressed with -c in the worker pool, or, with
 * -B, only what differs from the new backing chain. A failed convert removes what it created.
 */
import * as fsCalls from '../io/fs-calls.js';
import type { BlockDriver } from '../core/block-driver.js';
import { ignoringFlushes } from '../core/byte-io.js';
import { bytesEqual } from '../core/util.js';
import { openImage } from '../block/open.js';
import { fileProvider, FileIO } from '../io/file.js';
import { CompressPool } from '../codecs/pool.js';
import { createImage } from '../ops/create.js';
import { ConvertFailure, convertImages, convertedSize, driverTarget, type ConvertTarget } from '../ops/convert.js';
import { convertCompressed } from '../ops/convert-compressed.js';
import { createQcow } from '../formats/qcow/create.js';
import { Qcow2Driver } from '../formats/qcow2/driver.js';
import { checkTargetBitmaps, copyBitmaps } from './convert-bitmaps.js';
import { CliError, messageOf } from './errors.js';
import type { Io } from './output.js';
import { ProgressPrinter } from './progress.js';

export interface ImageConvertArgs {
  outFormat: 'qcow2' | 'qcow';
  dstFile: string;
  dstArg: string;
  createOpts: string[];
  backing?: string;
  backingFormat?: string;
  compress: boolean;
  skipCreate: boolean;
  targetIsZero: boolean;
  minSparse: number;
  coroutines: number;
  progress: boolean;
  /** `-t`: cache mode of the target; with `unsafe` (the default for a new target) flushes are skipped. */
  cache?: string;
  /** Secrets (`--object secret,...`) for an encrypted target. */
  secrets?: Map<string, Uint8Array>;
  /** `encrypt.key-secret` of an existing target (`-n --target-image-opts`). */
  targetKeySecret?: string;
  /** `--bitmaps`: copy the source's persistent bitmaps (sources already checked). */
  bitmaps?: { skipBroken: boolean };
}

interface Compressible extends BlockDriver {
  writeCompressed(offset: number, data: Uint8Array): Promise<void>;
  header?: { compressionType: number };
  g?: { clusterSize: number };
}

/** Writes only what differs from the target's backing chain (convert -B). */
function diffTarget(drv: BlockDriver): ConvertTarget {
  const b = drv.backing!;
  const readBacking = async (offset: number, len: number) => {
    const buf = new Uint8Array(len);
    const n = Math.max(0, Math.min(len, b.size - offset));
    if (n) await b.readInto(buf.subarray(0, n), offset);
    return buf;
  };
  return {
    zeroInit: false,
    async write(offset, data) {
      const old = await readBacking(offset, data.length);
      for (let s = 0; s < data.length; ) {
        const e = Math.min(data.length, s + 65536);
        if (!bytesEqual(old.subarray(s, e), data.subarray(s, e))) await drv.write(offset + s, data.subarray(s, e));
        s = e;
      }
    },
    async writeZeroes(offset, length) {
      for (let s = 0; s < length; ) {
        const n = Math.min(length - s, 4 << 20);
        const old = await readBacking(offset + s, n);
        if (!old.every((x) => x === 0)) await drv.writeZeroes(offset + s, n);
        s += n;
      }
    },
    flush: () => drv.flush(),
  };
}

export async function convertToImage(a: ImageConvertArgs, sources: BlockDriver[], io: Io): Promise<number> {
  const total = convertedSize(sources);
  let created = false;
  let target: BlockDriver | undefined;
  let keySecret = a.targetKeySecret;
  try {
    if (!a.skipCreate) {
      if (a.outFormat === 'qcow2' || a.createOpts.length) {
        // qcow2, or qcow with -o (e.g. encrypt.format=aes): qemu-img's create, checks and messages.
        // qemu-img refuses -c with an encrypted target before creating it.
        if (a.compress && a.createOpts.some((t) => /(^|,)(encrypt\.format|encryption)=/.test(t))) {
          throw new CliError('Compression and encryption not supported at the same time');
        }
        const made = await createImage(
          {
            filename: a.dstFile,
            format: a.outFormat,
            size: BigInt(total),
            options: a.createOpts,
            ...(a.backing !== undefined ? { backingFile: a.backing } : {}),
            ...(a.backingFormat !== undefined ? { backingFormat: a.backingFormat } : {}),
            ...(a.secrets ? { secrets: a.secrets } : {}),
          },
          fileProvider,
        );
        if (made.keySecret !== undefined) keySecret = made.keySecret;
      } else {
        const file = await FileIO.create(a.dstFile);
        try {
          await createQcow(file, { size: total, ...(a.backing !== undefined ? { backingFile: a.backing } : {}) });
        } finally {
          await file.close();
        }
      }
      created = true;
    }
    // Like qemu-img: a target convert creates is written with cache=unsafe unless -t says otherwise
    // (it is of no use until convert completes); an existing one (-n) is flushed.
    const unsafe = a.cache === 'unsafe' || (a.cache === undefined && created);
    const provider = unsafe ? ignoringFlushes(fileProvider) : fileProvider;
    const openTarget = () =>
      openImage(a.dstFile, {
        io: provider,
        readOnly: false,
        format: a.outFormat,
        ...(a.secrets ? { secrets: a.secrets } : {}),
        ...(keySecret !== undefined ? { keySecret } : {}),
      });
    // An existing target (-n) that does not open is reported as qemu-img does.
    target = a.skipCreate
      ? await openTarget().catch((e: unknown) => {
          throw new CliError(`Could not open '${a.dstArg}': ${messageOf(e)}`);
        })
      : await openTarget();
    if (target.size < total) throw new CliError('output file is smaller than input file');
    if (a.bitmaps) checkTargetBitmaps(target);
    const bar = new ProgressPrinter(io.out, a.progress, 1.0, 'absolute');
    const drv = target as Compressible;
    if (a.compress) {
      if (typeof drv.writeCompressed !== 'function') throw new CliError('Compression not supported for this file format');
      if (target.info().encrypted) throw new CliError('Compression and encryption not supported at the same time');
      const zstd = drv.header?.compressionType === 1;
      const pool = new CompressPool(zstd ? 'zstd' : 'zlib');
      try {
        // the copy's reads overlap on the thread pool (metadata reads too: measured slower on this thread)
        fsCalls.setQuickCallsOnThisThread(false);
        await convertCompressed(
          sources,
          {
            clusterSize: target.info().clusterSize!,
            writeCompressed: (o, d) => drv.writeCompressed(o, d),
            write: (o, d) => drv.write(o, d),
            flush: () => drv.flush(),
          },
          (data, limit) => pool.compress(data, limit),
          { inFlight: pool.inFlightLimit, ...(a.progress ? { onProgress: bar.report } : {}) },
        );
        // qemu-img ends with an empty compressed write: qcow2 rounds its file up to whole sectors.
        if (target.format === 'qcow2') await drv.writeCompressed(0, new Uint8Array(0));
      } finally {
        await pool.close();
      }
    } else {
      const t = target.backing ? diffTarget(target) : driverTarget(target, (created && !target.backing) || a.targetIsZero);
      // the copy's reads overlap on the thread pool (metadata reads too: measured slower on this thread)
      fsCalls.setQuickCallsOnThisThread(false);
      await convertImages(sources, t, {
        minSparse: a.minSparse,
        concurrency: a.coroutines,
        ...(a.progress ? { onProgress: bar.report } : {}),
      });
    }
    if (a.bitmaps) await copyBitmaps(sources[0]!, target as Qcow2Driver, a.bitmaps.skipBroken, io);
    await target.close();
    target = undefined;
    bar.end();
    return 0;
  } catch (e) {
    if (target) await target.close().catch(() => {});
    if (created) await fsCalls.removeFile(a.dstFile).catch(() => {});
    if (e instanceof CliError) throw e;
    if (e instanceof ConvertFailure) throw new CliError(e.message);
    throw new CliError(`${a.dstArg}: error while converting ${a.outFormat}: ${messageOf(e)}`);
  }
}
