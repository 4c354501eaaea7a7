/**
 * `info`: what qemu-img reports about an image, as QEMU's QAPI `ImageInfo` object (same key
 * names and types, keys listed in QAPI declaration order; printers reorder as QEMU does).
 */
import type { BlockDriver, SnapshotInfo } from '../core/block-driver.js';
import { QcowError } from '../core/errors.js';

/** QAPI SnapshotInfo. */
export interface SnapshotInfoJson {
  id: string;
  name: string;
  'vm-state-size': number;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number;
  'vm-clock-nsec': number;
  /** Absent when the snapshot was taken without icount. */
  icount?: number;
}

/** QAPI ImageInfo as qemu-img 7.2 fills it (no `children`: that came with QEMU 8.0). */
export interface ImageInfo {
  filename: string;
  format: string;
  'dirty-flag': boolean;
  'actual-size'?: number;
  'virtual-size': number;
  'cluster-size'?: number;
  encrypted?: boolean;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  snapshots?: SnapshotInfoJson[];
  'format-specific'?: { type: string; data: Record<string, unknown> };
}

/** QEMU's path_combine: a relative backing name is taken relative to the folder part of the image name. */
export function combinePath(baseFilename: string, name: string): string {
  if (name === '' || name.startsWith('/') || /^[a-zA-Z][a-zA-Z0-9+.-]*:/.test(name)) return name;
  const slash = baseFilename.lastIndexOf('/');
  return slash < 0 ? name : baseFilename.slice(0, slash + 1) + name;
}

export function snapshotToJson(s: SnapshotInfo): SnapshotInfoJson {
  const j: SnapshotInfoJson = {
    id: s.id,
    name: s.name,
    'vm-state-size': s.vmStateSize,
    'date-sec': s.dateSec,
    'date-nsec': s.dateNsec,
    'vm-clock-sec': Math.floor(s.vmClockNsec / 1e9),
    'vm-clock-nsec': s.vmClockNsec % 1e9,
  };
  if (s.icount !== undefined) j.icount = s.icount;
  return j;
}

/** Gather the ImageInfo of one opened image (its backing is not consulted). */
export async function collectImageInfo(drv: BlockDriver): Promise<ImageInfo> {
  const di = drv.info();
  const info: ImageInfo = {
    filename: drv.filename,
    format: drv.format,
    'dirty-flag': di.dirty,
    'virtual-size': drv.size,
  };
  const actual = await drv.actualSize();
  if (actual !== undefined) info['actual-size'] = actual;
  if (di.clusterSize !== undefined) info['cluster-size'] = di.clusterSize;
  if (di.encrypted) info.encrypted = true;
  if (di.backingFilename !== undefined) {
    info['backing-filename'] = di.backingFilename;
    info['full-backing-filename'] = di.fullBackingFilename ?? combinePath(drv.filename, di.backingFilename);
    if (di.backingFormat !== undefined) info['backing-filename-format'] = di.backingFormat;
  }
  if (di.snapshots && di.snapshots.length) info.snapshots = di.snapshots.map(snapshotToJson);
  if (di.formatSpecific) info['format-specific'] = di.formatSpecific;
  return info;
}

/** Opens one image of a chain without its backing (`format` undefined = probe). */
export type OpenForInfo = (filename: string, format: string | undefined) => Promise<BlockDriver>;

/**
 * `info --backing-chain`: the ImageInfo of every image from `filename` down to the base, each
 * opened on its own by `open`. A name seen twice is a loop (QEMU's wording).
 */
export async function collectBackingChainInfo(filename: string, format: string | undefined, open: OpenForInfo): Promise<ImageInfo[]> {
  const seen = new Set<string>();
  const out: ImageInfo[] = [];
  let name: string | undefined = filename;
  let fmt = format;
  while (name !== undefined) {
    if (seen.has(name)) throw new QcowError('EINVAL', `Backing file '${name}' creates an infinite loop.`);
    seen.add(name);
    const drv = await open(name, fmt);
    let info: ImageInfo;
    try {
      info = await collectImageInfo(drv);
    } finally {
      await drv.close();
    }
    out.push(info);
    name = info['full-backing-filename'];
    fmt = info['backing-filename-format'];
  }
  return out;
}
