/** The persistent dirty bitmap directory (bitmaps header extension): decoding with QEMU's limits. */
import { QcowError } from '../../core/errors.js';

export const BME_FLAG_IN_USE = 1 << 0;
export const BME_FLAG_AUTO = 1 << 1;
export const BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2;
export const BME_MIN_GRANULARITY_BITS = 9;
export const BME_MAX_GRANULARITY_BITS = 31;
export const BME_MAX_NAME_SIZE = 1023;

export interface BitmapDirectoryEntry {
  tableOffset: number;
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  name: string;
  extraData: Uint8Array;
}

const dec = new TextDecoder();

/** Size of a directory entry with a name of `nameSize` bytes and `extra` extra-data bytes. */
export function dirEntrySize(nameSize: number, extra: number): number {
  return (24 + nameSize + extra + 7) & ~7;
}

export function decodeBitmapDirectory(buf: Uint8Array, count: number, clusterSize: number): BitmapDirectoryEntry[] {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const out: BitmapDirectoryEntry[] = [];
  let pos = 0;
  for (let i = 0; i < count; i++) {
    if (pos + 24 > buf.length) throw new QcowError('ECORRUPT', 'Bitmap directory is truncated');
    const tableOffset = dv.getUint32(pos) * 0x100000000 + dv.getUint32(pos + 4);
    const tableSize = dv.getUint32(pos + 8);
    const flags = dv.getUint32(pos + 12);
    const type = buf[pos + 16]!;
    const granularityBits = buf[pos + 17]!;
    const nameSize = dv.getUint16(pos + 18);
    const extra = dv.getUint32(pos + 20);
    const size = dirEntrySize(nameSize, extra);
    if (pos + size > buf.length) throw new QcowError('ECORRUPT', 'Bitmap directory entry exceeds the directory size');
    if (tableOffset % clusterSize !== 0) throw new QcowError('ECORRUPT', 'Bitmap table offset is not cluster aligned');
    if (granularityBits < BME_MIN_GRANULARITY_BITS || granularityBits > BME_MAX_GRANULARITY_BITS) {
      throw new QcowError('ECORRUPT', `Bitmap granularity 2^${granularityBits} is out of range`);
    }
    if (nameSize === 0 || nameSize > BME_MAX_NAME_SIZE) throw new QcowError('ECORRUPT', 'Bitmap name size is invalid');
    out.push({
      tableOffset,
      tableSize,
      flags,
      type,
      granularityBits,
      extraData: buf.slice(pos + 24, pos + 24 + extra),
      name: dec.decode(buf.subarray(pos + 24 + extra, pos + 24 + extra + nameSize)),
    });
    pos += size;
  }
  return out;
}

/** Flags as qemu-img info names them. */
export function bitmapFlagNames(flags: number): string[] {
  const names: string[] = [];
  if (flags & BME_FLAG_IN_USE) names.push('in-use');
  if (flags & BME_FLAG_AUTO) names.push('auto');
  return names;
}

export function encodeBitmapDirectory(entries: BitmapDirectoryEntry[]): Uint8Array {
  const enc = new TextEncoder();
  const names = entries.map((e) => enc.encode(e.name));
  const total = entries.reduce((n, e, i) => n + dirEntrySize(names[i]!.length, e.extraData.length), 0);
  const out = new Uint8Array(total);
  const dv = new DataView(out.buffer);
  let pos = 0;
  entries.forEach((e, i) => {
    dv.setBigUint64(pos, BigInt(e.tableOffset));
    dv.setUint32(pos + 8, e.tableSize);
    dv.setUint32(pos + 12, e.flags);
    out[pos + 16] = e.type;
    out[pos + 17] = e.granularityBits;
    dv.setUint16(pos + 18, names[i]!.length);
    dv.setUint32(pos + 20, e.extraData.length);
    out.set(e.extraData, pos + 24);
    out.set(names[i]!, pos + 24 + e.extraData.length);
    pos += dirEntrySize(names[i]!.length, e.extraData.length);
  });
  return out;
}
