/**
 * Persistent dirty bitmaps: add, remove, clear, enable, disable, merge — and marking the enabled
 * bitmaps dirty when the guest writes through qcowkit, as QEMU does.
 *
 * Bitmap data is a flat little-endian bit array (bit = guest offset / granularity) stored in data
 * clusters listed by a one-level bitmap table (entry 0 = all zeros, entry 1 = all ones).
 * While qcowkit writes an image, its enabled bitmaps carry the in_use flag (set before the first
 * write, cleared when the bitmap data is saved at close), so a crash leaves them marked
 * inconsistent rather than silently wrong.
 */
import { QcowError } from '../../core/errors.js';
import * as C from './constants.js';
import { entryOffset } from './cluster-map.js';
import {
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  BME_MAX_NAME_SIZE,
  encodeBitmapDirectory,
  type BitmapDirectoryEntry,
} from './bitmap-directory.js';
import type { Qcow2Driver } from './driver.js';

const TABLE_ALL_ONES = 1;

export class Bitmaps {
  /** Loaded data clusters of bitmaps being changed: key `${index}:${cluster}`. */
  private dirty = new Map<string, Uint8Array>();
  private inUseSet = false;

  constructor(private drv: Qcow2Driver) {}

  private get cs(): number {
    return this.drv.g.clusterSize;
  }
  private get list(): BitmapDirectoryEntry[] {
    return this.drv.bitmaps;
  }

  private find(name: string): BitmapDirectoryEntry {
    const b = this.list.find((x) => x.name === name);
    if (!b) throw new QcowError('ENOENT', `Dirty bitmap '${name}' not found`);
    return b;
  }

  /** Number of data clusters (and table entries) a bitmap of this granularity needs. */
  private tableSize(granularityBits: number): number {
    const bits = Math.ceil(this.drv.size / 2 ** granularityBits);
    return Math.ceil(Math.ceil(bits / 8) / this.cs);
  }

  private async readTable(b: BitmapDirectoryEntry): Promise<number[]> {
    const raw = await this.drv.readMetadata(b.tableOffset, b.tableSize * 8, 'bitmap table');
    const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    const out: number[] = [];
    for (let i = 0; i < b.tableSize; i++) {
      const hi = dv.getUint32(i * 8);
      const lo = dv.getUint32(i * 8 + 4);
      const off = entryOffset(hi, lo);
      out.push(off ? off : lo & TABLE_ALL_ONES);
    }
    return out;
  }

  private encodeTable(entries: number[]): Uint8Array {
    const raw = new Uint8Array(Math.max(1, entries.length) * 8);
    const dv = new DataView(raw.buffer);
    entries.forEach((e, i) => dv.setBigUint64(i * 8, BigInt(e)));
    return raw.subarray(0, entries.length * 8);
  }

  /** Write a new directory (fresh clusters), switch the header's extension to it, free the old. */
  private async writeDirectory(list: BitmapDirectoryEntry[]): Promise<void> {
    const drv = this.drv;
    const w = drv.writer!;
    const h = drv.header;
    const old = h.bitmaps;
    let ext: typeof h.bitmaps;
    if (list.length) {
      const bytes = encodeBitmapDirectory(list);
      if (bytes.length > C.QCOW2_MAX_BITMAP_DIRECTORY_SIZE) throw new QcowError('EFBIG', 'Bitmap directory too large');
      const at = await w.refcounts.allocate(Math.ceil(bytes.length / this.cs));
      await w.refcounts.writeBlocks();
      await drv.rawWrite(bytes, at);
      await w.barrier();
      await w.refcounts.writeTableEntries();
      ext = { nbBitmaps: list.length, directorySize: bytes.length, directoryOffset: at };
    }
    const autoclear = list.length ? h.autoclearFeatures | C.AUTOCLEAR_BITMAPS : h.autoclearFeatures & ~C.AUTOCLEAR_BITMAPS;
    await drv.rewriteHeaderLocked({ ...h, bitmaps: ext, autoclearFeatures: autoclear });
    if (old) w.refcounts.free(old.directoryOffset / this.cs, Math.ceil(old.directorySize / this.cs));
    drv.bitmaps = list;
    await w.flushMetadata();
  }

  async add(name: string, opts: { granularity?: number; disabled?: boolean } = {}): Promise<void> {
    const drv = this.drv;
    if (drv.header.version < 3) throw new QcowError('ENOTSUP', 'Cannot store persistent bitmaps in qcow2 v2 images');
    const nameBytes = new TextEncoder().encode(name).length;
    if (!nameBytes || nameBytes > BME_MAX_NAME_SIZE) throw new QcowError('EINVAL', 'Bitmap name is too long');
    if (this.list.some((b) => b.name === name)) throw new QcowError('EEXIST', `Bitmap already exists: ${name}`);
    if (this.list.length >= C.QCOW2_MAX_BITMAPS) throw new QcowError('EFBIG', 'Too many bitmaps');
    const gran = opts.granularity ?? Math.max(65536, drv.g.clusterSize);
    const gb = Math.log2(gran);
    if (!Number.isInteger(gb) || gb < 9 || gb > 31) throw new QcowError('EINVAL', 'Granularity must be power of 2 between 512 and 2147483648');
    await drv.writer!.exclusive(async () => {
      const w = drv.writer!;
      await w.start();
      const size = this.tableSize(gb);
      const at = await w.refcounts.allocate(Math.max(1, Math.ceil((size * 8) / this.cs)));
      await w.refcounts.writeBlocks();
      await drv.rawWrite(new Uint8Array(Math.max(1, Math.ceil((size * 8) / this.cs)) * this.cs), at);
      await w.barrier();
      await w.refcounts.writeTableEntries();
      const entry: BitmapDirectoryEntry = {
        tableOffset: at,
        tableSize: size,
        flags: opts.disabled ? 0 : BME_FLAG_AUTO,
        type: 1,
        granularityBits: gb,
        name,
        extraData: new Uint8Array(0),
      };
      await this.writeDirectory([...this.list, entry]);
    });
  }

  /** Release a bitmap's data clusters (table entries become "all zeros"). */
  private async releaseData(b: BitmapDirectoryEntry): Promise<void> {
    const w = this.drv.writer!;
    for (const e of await this.readTable(b)) if (e > 1) w.refcounts.free(e / this.cs);
  }

  async remove(name: string): Promise<void> {
    const b = this.find(name);
    const drv = this.drv;
    await drv.writer!.exclusive(async () => {
      await drv.writer!.start();
      await this.writeDirectory(this.list.filter((x) => x !== b));
      await this.releaseData(b);
      drv.writer!.refcounts.free(b.tableOffset / this.cs, Math.max(1, Math.ceil((b.tableSize * 8) / this.cs)));
      await drv.writer!.flushMetadata();
    });
  }

  async clear(name: string): Promise<void> {
    const b = this.find(name);
    const drv = this.drv;
    await drv.writer!.exclusive(async () => {
      await drv.writer!.start();
      const old = await this.readTable(b);
      await drv.rawWrite(this.encodeTable(old.map(() => 0)), b.tableOffset);
      await drv.writer!.barrier();
      for (const e of old) if (e > 1) drv.writer!.refcounts.free(e / this.cs);
      await drv.writer!.flushMetadata();
    });
  }

  async setEnabled(name: string, enabled: boolean): Promise<void> {
    const b = this.find(name);
    await this.drv.writer!.exclusive(async () => {
      await this.drv.writer!.start();
      const list = this.list.map((x) => (x === b ? { ...x, flags: enabled ? x.flags | BME_FLAG_AUTO : x.flags & ~BME_FLAG_AUTO } : x));
      await this.writeDirectory(list);
    });
  }

  /** The bitmap's bits as a flat array (sized for the image). */
  async readBits(name: string): Promise<{ bits: Uint8Array; granularity: number }> {
    const b = this.find(name);
    const table = await this.readTable(b);
    const bytes = Math.ceil(Math.ceil(this.drv.size / 2 ** b.granularityBits) / 8);
    const bits = new Uint8Array(bytes);
    for (let i = 0; i < table.length; i++) {
      const from = i * this.cs;
      const to = Math.min(bytes, from + this.cs);
      if (table[i] === 1) bits.fill(0xff, from, to);
      else if (table[i]! > 1) bits.set((await this.drv.readMetadata(table[i]!, this.cs, 'bitmap data')).subarray(0, to - from), from);
    }
    return { bits, granularity: 2 ** b.granularityBits };
  }

  /** OR another bitmap (same image or another, any granularity) into `name`. */
  async merge(name: string, src: { bits: Uint8Array; granularity: number }): Promise<void> {
    const b = this.find(name);
    const g = 2 ** b.granularityBits;
    const mark: Array<[number, number]> = [];
    for (let bit = 0; bit < src.bits.length * 8; bit++) {
      if (src.bits[bit >> 3]! & (1 << (bit & 7))) mark.push([bit * src.granularity, src.granularity]);
    }
    await this.drv.writer!.exclusive(async () => {
      await this.drv.writer!.start();
      for (const [off, len] of mark) await this.setBits(b, off, Math.min(len, this.drv.size - off), g);
      await this.saveDirty();
    });
  }

  // ---- tracking guest writes ------------------------------------------------------------

  /** Mark [offset, offset+length) dirty in every enabled bitmap. Caller holds the writer lock. */
  async markDirty(offset: number, length: number): Promise<void> {
    const enabled = this.list.filter((b) => b.flags & BME_FLAG_AUTO);
    if (!enabled.length || length <= 0) return;
    if (!this.inUseSet) {
      this.inUseSet = true;
      await this.writeDirectory(this.list.map((b) => (b.flags & BME_FLAG_AUTO ? { ...b, flags: b.flags | BME_FLAG_IN_USE } : b)));
    }
    for (const b of this.list) if (b.flags & BME_FLAG_AUTO) await this.setBits(b, offset, length, 2 ** b.granularityBits);
  }

  private async setBits(b: BitmapDirectoryEntry, offset: number, length: number, g: number): Promise<void> {
    const idx = this.list.indexOf(b);
    const first = Math.floor(offset / g);
    const last = Math.floor((offset + length - 1) / g);
    let table: number[] | undefined;
    for (let bit = first; bit <= last; bit++) {
      const byte = bit >> 3;
      const cluster = Math.floor(byte / this.cs);
      const key = `${idx}:${cluster}`;
      let data = this.dirty.get(key);
      if (!data) {
        table ??= await this.readTable(b);
        const e = table[cluster] ?? 0;
        data = e === 1 ? new Uint8Array(this.cs).fill(0xff) : e > 1 ? (await this.drv.readMetadata(e, this.cs, 'bitmap data')).slice() : new Uint8Array(this.cs);
        this.dirty.set(key, data);
      }
      data[byte % this.cs]! |= 1 << (bit & 7);
    }
  }

  /** Write changed bitmap data (new clusters), point the tables at them, clear in_use. */
  async saveDirty(): Promise<void> {
    const drv = this.drv;
    const w = drv.writer!;
    if (!this.dirty.size && !this.inUseSet) return;
    const byBitmap = new Map<number, Array<[number, Uint8Array]>>();
    for (const [key, data] of this.dirty) {
      const [i, c] = key.split(':').map(Number) as [number, number];
      if (!byBitmap.has(i)) byBitmap.set(i, []);
      byBitmap.get(i)!.push([c, data]);
    }
    for (const [i, clusters] of byBitmap) {
      const b = this.list[i]!;
      const table = await this.readTable(b);
      const old: number[] = [];
      for (const [c, data] of clusters) {
        const at = await w.refcounts.allocate(1);
        await drv.rawWrite(data, at);
        if (table[c]! > 1) old.push(table[c]!);
        table[c] = at;
      }
      await w.refcounts.writeBlocks();
      await w.barrier();
      await w.refcounts.writeTableEntries();
      await drv.rawWrite(this.encodeTable(table), b.tableOffset);
      await w.barrier();
      for (const o of old) w.refcounts.free(o / this.cs);
    }
    this.dirty.clear();
    if (this.inUseSet) {
      this.inUseSet = false;
      await this.writeDirectory(this.list.map((b) => ({ ...b, flags: b.flags & ~BME_FLAG_IN_USE })));
    }
    await w.flushMetadata();
  }
}
