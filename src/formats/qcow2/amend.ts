/**
 * `amend` for qcow2: compat 0.10 ↔ 1.1, lazy_refcounts, refcount_bits (new refcount structures
 * switched in by one header write: amend-refcount.ts), backing_file / backing_fmt, data_file /
 * data_file_raw, size.
 */
import { QcowError } from '../../core/errors.js';
import * as C from './constants.js';
import { amendRefcountBits } from './amend-refcount.js';
import { entryOffset } from './cluster-map.js';
import type { Qcow2Driver } from './driver.js';
import type { Qcow2Header } from './header.js';

export interface AmendOptions {
  compat?: '0.10' | '1.1';
  lazyRefcounts?: boolean;
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  dataFileRaw?: boolean;
  size?: number;
  /** New refcount width (v3 images; a power of two up to 64). */
  refcountBits?: number;
}

const COPIED_HI = 0x80000000;
const COMPRESSED_HI = 0x40000000;

/** Validate a set of amend options against the image before changing anything. */
function validate(drv: Qcow2Driver, o: AmendOptions): void {
  const h = drv.header;
  const targetV3 = o.compat ? o.compat === '1.1' : h.version === 3;
  const lazy = o.lazyRefcounts ?? (h.compatibleFeatures & C.COMPAT_LAZY_REFCOUNTS) !== 0n;
  if (!targetV3 && o.lazyRefcounts) {
    throw new QcowError('EINVAL', 'Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
  }
  void lazy;
  if (o.compat === '0.10' && h.version === 3) {
    const incompat = h.incompatibleFeatures & ~(C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT);
    if (incompat) throw new QcowError('ENOTSUP', `Cannot downgrade an image with incompatible features 0x${incompat.toString(16)} set`);
    if ((o.refcountBits ?? 2 ** h.refcountOrder) !== 16) throw new QcowError('ENOTSUP', 'compat=0.10 requires refcount_bits=16');
    if (drv.bitmaps.length) throw new QcowError('ENOTSUP', 'Cannot downgrade an image with persistent bitmaps');
  }
  if ((o.dataFile !== undefined || o.dataFileRaw !== undefined) && !(h.incompatibleFeatures & C.INCOMPAT_DATA_FILE)) {
    throw new QcowError('EINVAL', 'data-file can only be set for images that use an external data file');
  }
  if (o.dataFileRaw && h.backingFile !== undefined) {
    throw new QcowError('EINVAL', 'data-file-raw cannot be set on existing images with backing files');
  }
}

export async function amendQcow2(drv: Qcow2Driver, o: AmendOptions): Promise<void> {
  validate(drv, o);
  if (o.refcountBits !== undefined && o.refcountBits !== 2 ** drv.header.refcountOrder) {
    const { refcountBits, ...rest } = o;
    if (rest.compat === '1.1' && drv.header.version === 2) {
      // A new width needs v3: upgrade (and the rest) first.
      await amendQcow2(drv, rest);
      await amendRefcountBits(drv, refcountBits);
      return;
    }
    // A downgrade needs 16 bits: change the width first.
    await amendRefcountBits(drv, refcountBits);
    o = rest;
  }
  const h = drv.header;
  if (o.size !== undefined && o.size !== drv.size) {
    if (o.size < drv.size) throw new QcowError('EINVAL', 'qcow2 amend cannot shrink images; use resize --shrink');
    await drv.resize(o.size);
  }
  const next: Qcow2Header = { ...h };
  if (o.backingFile !== undefined) {
    next.backingFile = o.backingFile || undefined;
    next.backingFormat = o.backingFile ? o.backingFormat ?? h.backingFormat : undefined;
  } else if (o.backingFormat !== undefined) {
    if (h.backingFile === undefined) throw new QcowError('EINVAL', 'Cannot amend the backing format of an image without a backing file');
    next.backingFormat = o.backingFormat;
  }
  if (o.dataFile !== undefined) next.dataFile = o.dataFile;
  if (o.dataFileRaw !== undefined) {
    next.autoclearFeatures = o.dataFileRaw ? h.autoclearFeatures | C.AUTOCLEAR_DATA_FILE_RAW : h.autoclearFeatures & ~C.AUTOCLEAR_DATA_FILE_RAW;
  }
  if (o.lazyRefcounts !== undefined) {
    next.compatibleFeatures = o.lazyRefcounts
      ? next.compatibleFeatures | C.COMPAT_LAZY_REFCOUNTS
      : next.compatibleFeatures & ~C.COMPAT_LAZY_REFCOUNTS;
  }
  if (o.compat === '1.1' && h.version === 2) {
    next.version = 3;
    next.headerLength = C.V3_HEADER_LENGTH_WITH_COMPRESSION;
    next.refcountOrder = 4;
    next.compressionType = 0;
    next.featureNames = C.QEMU_FEATURE_NAMES.map((f) => ({ ...f }));
  } else if (o.compat === '0.10' && h.version === 3) {
    await expandZeroClusters(drv);
    next.version = 2;
    next.headerLength = C.V2_HEADER_LENGTH;
    next.incompatibleFeatures = 0n;
    next.compatibleFeatures = 0n;
    next.autoclearFeatures = 0n;
    next.featureNames = [];
    next.unknownHeaderFields = new Uint8Array(0);
  }
  await drv.rewriteHeader(next);
}

/**
 * v2 images have no zero flag: zero clusters become real zeros (allocated where a backing file
 * could otherwise show through, unallocated where nothing would), in every L1 table.
 *
 * A preallocated zero cluster is zeroed in place only when nothing but this L2 table references
 * it. QEMU 7.2 zeroes it in place even when a snapshot still reads its data through another
 * table (`write -z` after a snapshot keeps the shared cluster), corrupting that snapshot; here it
 * is handled like an unpreallocated zero cluster and the reference to the shared one dropped.
 */
async function expandZeroClusters(drv: Qcow2Driver): Promise<void> {
  const w = drv.writer!;
  const { g } = drv;
  const cs = g.clusterSize;
  const hasBacking = drv.header.backingFile !== undefined;
  const tables: Uint8Array[] = [drv.activeL1];
  for (const sn of drv.snapshots) tables.push(await drv.readMetadata(sn.l1TableOffset, sn.l1Size * 8, 'snapshot L1 table'));
  const seen = new Set<number>();
  const zeros = new Uint8Array(cs);
  for (const l1 of tables) {
    const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    for (let i = 0; i < l1.length / 8; i++) {
      const l2 = entryOffset(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4));
      if (!l2 || seen.has(l2)) continue;
      seen.add(l2);
      const l2Refs = await w.refcounts.get(l2 / cs);
      for (let k = 0; k < g.l2Entries; k++) {
        const e = await w.tables.getEntry(l2, k);
        if (e.hi & COMPRESSED_HI || !(e.lo & 1)) continue;
        const host = entryOffset(e.hi, e.lo);
        if (host && (await w.refcounts.get(host / cs)) === l2Refs) {
          await drv.rawWrite(zeros, host);
          await w.tables.setEntry(l2, k, { ...e, lo: (e.lo & ~1) >>> 0 });
          continue;
        }
        if (!hasBacking) {
          await w.tables.setEntry(l2, k, { hi: 0, lo: 0, bhi: 0, blo: 0 });
        } else {
          const at = await w.refcounts.allocate(1);
          for (let r = 1; r < l2Refs; r++) await w.refcounts.update(at / cs, 1);
          await drv.rawWrite(zeros, at);
          const hi = Math.floor(at / 0x100000000) | (l2Refs === 1 ? COPIED_HI : 0);
          await w.tables.setEntry(l2, k, { hi: hi >>> 0, lo: at >>> 0, bhi: 0, blo: 0 });
        }
        // The shared cluster loses the references this table held (once it no longer points there).
        if (host) freeTimes(w, host / cs, l2Refs);
      }
    }
  }
  await w.flush();
}

function freeTimes(w: NonNullable<Qcow2Driver['writer']>, cluster: number, times: number): void {
  for (let r = 0; r < times; r++) w.refcounts.free(cluster);
}
