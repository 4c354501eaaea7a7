/**
 * Persistent dirty bitmaps as the qcow2 check sees them: the directory (QEMU's bitmap_list_load
 * rules and messages) and each bitmap table (bitmap_table_load: every entry must be valid).
 */
import { masked } from './check-base.js';
import { type CheckImage } from './check-state.js';

export interface DirBitmap {
  name: string;
  tableOffset: number;
  tableSize: number;
  flags: number;
}

const BME_FLAG_IN_USE = 1;
const dec = new TextDecoder();

/** The bitmap directory, or QEMU's error message for it. */
export async function loadBitmapList(img: CheckImage): Promise<{ bitmaps: DirBitmap[] } | { error: string }> {
  const bm = img.bitmaps!;
  const size = bm.directorySize;
  if (size === 0) return { error: 'Requested bitmap directory size is zero' };
  if (size > 1024 * 65535) return { error: 'Requested bitmap directory size is too big' };
  const dir = await img.readPadded(bm.directoryOffset, size);
  const dv = new DataView(dir.buffer);
  const out: DirBitmap[] = [];
  const broken = { error: 'Broken bitmap directory' };
  let e = 0;
  while (e < size) {
    if (e + 24 > size) return broken;
    if (out.length + 1 > bm.nbBitmaps) return { error: 'More bitmaps found than specified in header extension' };
    const tableOffset = dv.getUint32(e) * 0x100000000 + dv.getUint32(e + 4);
    const tableSize = dv.getUint32(e + 8);
    const flags = dv.getUint32(e + 12);
    const type = dir[e + 16]!;
    const gran = dir[e + 17]!;
    const nameSize = dv.getUint16(e + 18);
    const extra = dv.getUint32(e + 20);
    const next = e + Math.ceil((24 + extra + nameSize) / 8) * 8;
    if (next > size) return broken;
    if (extra !== 0) return { error: 'Bitmap extra data is not supported' };
    const name = dec.decode(dir.subarray(e + 24, e + 24 + nameSize));
    const physBytes = tableSize * img.cs;
    if (
      tableSize === 0 ||
      tableOffset === 0 ||
      tableOffset % img.cs !== 0 ||
      type !== 1 ||
      nameSize > 1023 ||
      gran > 31 ||
      gran < 9 ||
      flags & ~3 ||
      nameSize === 0 ||
      physBytes > 0x20000000 ||
      (!(flags & BME_FLAG_IN_USE) && img.header.size > physBytes * 8 * 2 ** gran)
    ) {
      return { error: `Bitmap '${name}' doesn't satisfy the constraints` };
    }
    out.push({ name, tableOffset, tableSize, flags });
    e = next;
  }
  if (out.length !== bm.nbBitmaps) return { error: 'Less bitmaps found than specified in header extension' };
  if (e !== size) return broken;
  return { bitmaps: out };
}

/** Data cluster offsets of a bitmap table (0 = none), undefined when an entry is invalid. */
export async function loadBitmapTable(img: CheckImage, bm: DirBitmap): Promise<Array<number | bigint> | undefined> {
  const table = await img.readPadded(bm.tableOffset, bm.tableSize * 8);
  const dv = new DataView(table.buffer);
  const out: Array<number | bigint> = [];
  for (let i = 0; i < bm.tableSize; i++) {
    const hi = dv.getUint32(i * 8);
    const lo = dv.getUint32(i * 8 + 4);
    const off = masked(hi, lo, 0x00ffffff, 0xfffffe00);
    const unaligned = typeof off === 'bigint' ? off % BigInt(img.cs) !== 0n : off % img.cs !== 0;
    if (hi & 0xff000000 || lo & 0x1fe || (off !== 0 && (lo & 1 || unaligned))) return undefined;
    out.push(off);
  }
  return out;
}

/**
 * What QEMU's open does with consistent bitmaps (qcow2_load_dirty_bitmaps): the directory must
 * load and every bitmap not in use must have a valid table. Returns the open error, if any.
 */
export async function bitmapsOpenError(img: CheckImage): Promise<string | undefined> {
  const list = await loadBitmapList(img);
  if ('error' in list) return list.error;
  for (const bm of list.bitmaps) {
    if (bm.flags & BME_FLAG_IN_USE) continue;
    if (!(await loadBitmapTable(img, bm))) {
      return `Could not read bitmap_table table from image for bitmap '${bm.name}': Invalid argument`;
    }
  }
  return undefined;
}

