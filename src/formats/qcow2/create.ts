/**
 * Creating a fresh qcow2 image laid out exactly as qemu-img 7.2 lays it out.
 *
 * qemu-img builds a new image in steps — header, a one-cluster refcount table and one refcount
 * block, then it grows the L1 table to the virtual size and preallocates — and every cluster it
 * needs comes from its first-fit allocator. Where the structures land (refcount blocks that
 * describe themselves, the refcount table moving to the end of the file when it grows, the hole
 * the old table leaves behind, L2 tables interleaved with data clusters) follows from that
 * allocator. `computeQcow2Layout` replays the same allocation decisions on an in-memory model
 * (intervals of allocated clusters; nothing is proportional to the virtual size except the
 * structures themselves), and `createQcow2` writes the result with a few large writes, leaving
 * everything else a hole. The allocation behaviour was worked out by creating images with
 * qemu-img and reading them back (see /work/shared/qcow-notes.md §1, §2, §9).
 */
import { firstNonZero, lastNonZero } from '../../core/byte-scan.js';
import { writeZeroRange, type ByteIO } from '../../core/byte-io.js';
import { QcowError } from '../../core/errors.js';
import * as C from './constants.js';
import { encodeHeader, type Qcow2Header } from './header.js';
import { planRefcountArea } from './refcount-area.js';
import type { Qcow2CreateParams } from './create-options.js';

export type { Qcow2CreateParams } from './create-options.js';

/** Sorted, disjoint, non-adjacent half-open intervals of cluster indexes. */
export class ClusterSet {
  private s: number[] = [];
  private e: number[] = [];

  /** Index of the first interval whose end is > c. */
  private firstEndingAfter(c: number): number {
    let lo = 0;
    let hi = this.e.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.e[mid]! > c) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  }

  has(c: number): boolean {
    const i = this.firstEndingAfter(c);
    return i < this.s.length && this.s[i]! <= c;
  }

  /** First member in [a, b), or -1; `runEnd` receives the end of its interval. */
  firstIn(a: number, b: number): { at: number; runEnd: number } | undefined {
    const i = this.firstEndingAfter(a);
    if (i >= this.s.length) return undefined;
    const at = Math.max(a, this.s[i]!);
    return at < b ? { at, runEnd: this.e[i]! } : undefined;
  }

  /** Last member < n, or -1. */
  lastBelow(n: number): number {
    const i = this.firstEndingAfter(n - 1);
    if (i < this.s.length && this.s[i]! < n) return Math.min(n, this.e[i]!) - 1;
    return i > 0 ? this.e[i - 1]! - 1 : -1;
  }

  add(a: number, b: number): void {
    if (b <= a) return;
    const i = this.firstEndingAfter(a - 1); // first interval ending at or after a (adjacent merges)
    let j = i;
    let ns = a;
    let ne = b;
    while (j < this.s.length && this.s[j]! <= b) {
      ns = Math.min(ns, this.s[j]!);
      ne = Math.max(ne, this.e[j]!);
      j++;
    }
    this.s.splice(i, j - i, ns);
    this.e.splice(i, j - i, ne);
  }

  remove(a: number, b: number): void {
    if (b <= a) return;
    const i = this.firstEndingAfter(a);
    let j = i;
    const ns: number[] = [];
    const ne: number[] = [];
    while (j < this.s.length && this.s[j]! < b) {
      if (this.s[j]! < a) {
        ns.push(this.s[j]!);
        ne.push(a);
      }
      if (this.e[j]! > b) {
        ns.push(b);
        ne.push(this.e[j]!);
      }
      j++;
    }
    this.s.splice(i, j - i, ...ns);
    this.e.splice(i, j - i, ...ne);
  }

  /** Intervals intersecting [a, b), clipped. */
  *runs(a: number, b: number): Generator<[number, number]> {
    for (let i = this.firstEndingAfter(a); i < this.s.length && this.s[i]! < b; i++) {
      yield [Math.max(a, this.s[i]!), Math.min(b, this.e[i]!)];
    }
  }

  get intervalCount(): number {
    return this.s.length;
  }
}

/** A guest cluster range mapped to consecutive host clusters (all within one L2 table). */
export interface DataRun {
  guest: number;
  host: number;
  count: number;
}

export interface Qcow2Layout {
  clusterSize: number;
  clusterBits: number;
  refcountBits: number;
  /** Entries per L2 table. */
  l2Entries: number;
  extendedL2: boolean;
  /** Header fields (offsets in bytes), ready for encodeHeader. */
  header: Qcow2Header;
  /** Virtual size (may exceed 2^53). */
  size: bigint;
  l1: { cluster: number; entries: number; l2: Map<number, number> };
  refcountTable: { cluster: number; clusters: number; blocks: number[] };
  /** Every allocated (refcount 1) host cluster. */
  allocated: ClusterSet;
  dataRuns: DataRun[];
  /** Bytes QEMU leaves behind in freed clusters (old refcount tables). */
  stale: Array<{ offset: number; data: Uint8Array }>;
  /** Length of the image file. */
  fileLength: number;
  /** preallocation=full: zeros written to this byte range of the image file. */
  zeroFill?: { offset: number; length: number };
  /** preallocation=falloc: this byte range is fallocate()d (left sparse where the platform cannot). */
  fallocRange?: { offset: number; length: number };
  /**
   * With an external data file and preallocation: the length the data file is extended to (the end
   * of the last data cluster), using the preallocation mode (metadata: sparse).
   */
  dataFileLength?: number;
  /** LUKS: the clusters holding the LUKS header (`length` bytes of it, the rest of the clusters zero). */
  crypto?: { cluster: number; clusters: number; length: number };
}

const INV = -1;

function encodeTable(blocks: number[], clusters: number, clusterSize: number): Uint8Array {
  const buf = new Uint8Array(clusters * clusterSize);
  const dv = new DataView(buf.buffer);
  blocks.forEach((b, i) => {
    if (b) {
      const off = b * clusterSize;
      dv.setUint32(i * 8, Math.floor(off / 2 ** 32));
      dv.setUint32(i * 8 + 4, off >>> 0);
    }
  });
  return buf;
}

/** Replays qemu-img's allocator while it creates an image. */
class AllocModel {
  readonly cs: number;
  /** Refcount entries per refcount block. */
  readonly perBlock: number;
  readonly used = new ClusterSet();
  rt: number[];
  rtCluster = 1;
  rtClusters = 1;
  freeIndex = 0;
  fileEnd = 0;
  stale: Array<{ offset: number; data: Uint8Array }> = [];
  l1 = new Map<number, number>();
  dataRuns: DataRun[] = [];

  constructor(clusterBits: number, refcountOrder: number) {
    this.cs = 2 ** clusterBits;
    this.perBlock = 2 ** (clusterBits + 3 - refcountOrder);
    this.rt = new Array<number>(this.cs / 8).fill(0);
    this.rt[0] = 2;
  }

  touch(offset: number, length: number): void {
    if (offset + length > this.fileEnd) this.fileEnd = offset + length;
  }

  /** First-fit search for n free clusters from the free-cluster hint (no refcount update). */
  allocNoref(n: number): number {
    let start = this.freeIndex;
    for (;;) {
      const hit = this.used.firstIn(start, start + n);
      if (!hit) break;
      start = hit.runEnd;
    }
    this.freeIndex = start + n;
    return start;
  }

  /** +1 on [start, start+n); false = "try again" (a refcount block was just created). */
  updateRefcount(start: number, n: number): boolean {
    const end = start + n;
    let c = start;
    while (c < end) {
      if (!this.ensureBlock(c)) {
        // Undo what was counted so far; the caller searches again, from these clusters on.
        this.used.remove(start, c);
        this.freeIndex = Math.min(this.freeIndex, start);
        return false;
      }
      const idx = Math.floor(c / this.perBlock);
      const segEnd = Math.min(end, (idx + 1) * this.perBlock);
      this.used.add(c, segEnd);
      c = segEnd;
    }
    return true;
  }

  /** Make sure the refcount block covering cluster c exists; false when one had to be created. */
  ensureBlock(c: number): boolean {
    const idx = Math.floor(c / this.perBlock);
    if (idx < this.rt.length && this.rt[idx]) return true;
    const nb = this.allocNoref(1);
    if (Math.floor(nb / this.perBlock) === idx) {
      this.used.add(nb, nb + 1); // describes itself
    } else if (!this.updateRefcount(nb, 1)) {
      return false;
    }
    this.touch(nb * this.cs, this.cs);
    if (idx < this.rt.length) {
      this.rt[idx] = nb;
      return false;
    }
    const blocksUsed = Math.ceil(Math.max(c + 1, nb + 1) / this.perBlock);
    this.refcountArea(blocksUsed * this.perBlock, 0, false, idx, nb);
    return false;
  }

  /**
   * New refcount structures at `startC` covering everything up to there plus `additional`
   * clusters: new blocks first, then a new (bigger) table; the old table is freed. Returns the
   * first cluster after them.
   */
  refcountArea(startC: number, additional: number, exact: boolean, newIdx: number, newBlock: number): number {
    const area = planRefcountArea(this.rt, this.perBlock, this.cs / 8, startC, additional, exact, newIdx, newBlock);
    const nt = area.table;
    const tableC = area.tableCluster;
    const tableClusters = area.tableClusters;
    const endC = area.endCluster;
    for (const [, c] of area.created) this.touch(c * this.cs, this.cs);
    for (let i = area.areaIndex; i < area.total; i++) {
      const first = i * this.perBlock;
      if (first < endC) {
        this.used.add(Math.max(first, startC), Math.min(endC, first + this.perBlock));
        this.touch(nt[i]! * this.cs, this.cs);
      }
    }
    this.touch(tableC * this.cs, tableClusters * this.cs);
    this.stale.push({ offset: this.rtCluster * this.cs, data: encodeTable(this.rt, this.rtClusters, this.cs) });
    const oldC = this.rtCluster;
    const oldN = this.rtClusters;
    this.rt = nt;
    this.rtCluster = tableC;
    this.rtClusters = tableClusters;
    this.used.remove(oldC, oldC + oldN);
    this.freeIndex = Math.min(this.freeIndex, oldC);
    return endC;
  }

  allocClusters(n: number): number {
    for (;;) {
      const off = this.allocNoref(n);
      if (this.updateRefcount(off, n)) return off;
    }
  }

  /** Allocate up to n clusters exactly at c (stops at the first used one); returns how many. */
  allocClustersAt(c: number, n: number): number {
    for (;;) {
      const hit = this.used.firstIn(c, c + n);
      const i = hit ? hit.at - c : n;
      if (i === 0) return 0;
      if (this.updateRefcount(c, i)) return i;
    }
  }
}

/**
 * The header qemu-img writes for a new image (offsets are filled in from the layout). qemu-img
 * leaves the feature name table out of images with clusters smaller than 8 KiB.
 */
export function qcow2CreateHeader(p: Qcow2CreateParams): Qcow2Header {
  const cs = 2 ** p.clusterBits;
  let incompat = 0n;
  if (p.dataFile !== undefined) incompat |= C.INCOMPAT_DATA_FILE;
  if (p.compressionType !== 0) incompat |= C.INCOMPAT_COMPRESSION;
  if (p.extendedL2) incompat |= C.INCOMPAT_EXTL2;
  return {
    version: p.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: p.clusterBits,
    size: Number(p.size),
    cryptMethod: 0,
    l1Size: 0,
    l1TableOffset: 0,
    refcountTableOffset: cs,
    refcountTableClusters: 1,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: p.version === 3 ? incompat : 0n,
    compatibleFeatures: p.version === 3 && p.lazyRefcounts ? C.COMPAT_LAZY_REFCOUNTS : 0n,
    autoclearFeatures: p.version === 3 && p.dataFileRaw ? C.AUTOCLEAR_DATA_FILE_RAW : 0n,
    refcountOrder: p.version === 3 ? p.refcountOrder : 4,
    headerLength: p.version === 3 ? C.V3_HEADER_LENGTH_WITH_COMPRESSION : C.V2_HEADER_LENGTH,
    compressionType: p.compressionType,
    unknownHeaderFields: new Uint8Array(0),
    backingFormat: p.backingFile !== undefined ? p.backingFormat : undefined,
    featureNames: p.version === 3 && cs > 4096 ? C.QEMU_FEATURE_NAMES.map((f) => ({ ...f })) : [],
    unknownExtensions: [],
    dataFile: p.dataFile,
    backingFile: p.backingFile,
  };
}

/** Encode the header cluster like encodeHeader, with the full 64-bit size and qemu-img's messages on overflow. */
export function encodeCreateHeader(h: Qcow2Header, size: bigint): Uint8Array {
  const enc = new TextEncoder();
  if (h.backingFile !== undefined) {
    const nameLen = enc.encode(h.backingFile).length;
    const why = nameLen > C.MAX_BACKING_FILE_NAME ? 'Invalid argument' : undefined;
    const fits = (() => {
      try {
        encodeHeader({ ...h });
        return true;
      } catch {
        return false;
      }
    })();
    if (why || !fits) {
      throw new QcowError(
        'EINVAL',
        `Could not assign backing file '${h.backingFile}' with format '${h.backingFormat ?? ''}': ${why ?? 'No space left on device'}`,
      );
    }
  }
  const buf = encodeHeader(h);
  new DataView(buf.buffer, buf.byteOffset, buf.byteLength).setBigUint64(24, size);
  return buf;
}

/** The layout qemu-img 7.2 gives a new image with these parameters. Pure. */
export function computeQcow2Layout(p: Qcow2CreateParams): Qcow2Layout {
  const cs = 2 ** p.clusterBits;
  const l2Entries = cs / (p.extendedL2 ? 16 : 8);
  const m = new AllocModel(p.clusterBits, p.refcountOrder);
  const hasDataFile = p.dataFile !== undefined;

  // Header cluster, then the refcount table (cluster 1) and its first block (cluster 2).
  m.touch(0, cs);
  m.touch(cs, 2 * cs);
  m.allocClusters(3);

  // Grow the L1 table to the virtual size.
  const perL1 = BigInt(l2Entries) * BigInt(cs);
  const l1Entries = Number((p.size + perL1 - 1n) / perL1);
  let l1Cluster = 0;
  if (l1Entries > 0) {
    l1Cluster = m.allocClusters(Math.ceil((l1Entries * 8) / cs));
    m.touch(l1Cluster * cs, l1Entries * 8);
  }

  const getL2 = (l1Index: number): number => {
    let c = m.l1.get(l1Index);
    if (c === undefined) {
      c = m.allocClusters(1);
      m.l1.set(l1Index, c);
      m.touch(c * cs, cs);
    }
    return c;
  };

  let zeroFill: Qcow2Layout['zeroFill'];
  let dataFileLength: number | undefined;
  let fallocRange: Qcow2Layout['fallocRange'];
  const prealloc = p.preallocation;
  if (prealloc !== 'off') {
    if (p.size > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new QcowError('EFBIG', 'Preallocation of images this large is not supported');
    }
    const size = Number(p.size);
    if (prealloc === 'metadata' || hasDataFile) {
      // Walk the guest range in chunks of at most INT_MAX bytes; each chunk allocates an L2 table
      // where needed, then the data clusters of that table (host-contiguous where possible).
      const chunkMax = Math.floor(0x7fffffff / cs) * cs;
      let offset = 0;
      let bytes = size;
      let lastHost = 0;
      let lastCur = 0;
      while (bytes > 0) {
        let start = offset;
        let remaining = Math.min(bytes, chunkMax);
        const want = remaining;
        let clusterHost = INV;
        let host = INV;
        let cur = 0;
        for (;;) {
          if (host === INV && clusterHost !== INV) host = clusterHost;
          start += cur;
          remaining -= cur;
          if (clusterHost !== INV) clusterHost += cur;
          if (remaining === 0) break;
          cur = remaining;
          const gc = Math.floor(start / cs);
          const inCluster = start % cs;
          getL2(Math.floor(gc / l2Entries));
          let nb = Math.min(Math.ceil((inCluster + cur) / cs), l2Entries - (gc % l2Entries));
          let hc: number;
          if (hasDataFile) hc = gc;
          else if (clusterHost === INV) hc = m.allocClusters(nb);
          else {
            hc = Math.floor(clusterHost / cs);
            nb = m.allocClustersAt(hc, nb);
            if (nb === 0) {
              cur = 0;
              break;
            }
          }
          m.dataRuns.push({ guest: gc, host: hc, count: nb });
          if (clusterHost === INV) clusterHost = hc * cs + inCluster;
          cur = Math.min(cur, nb * cs - inCluster);
        }
        const done = want - remaining;
        offset += done;
        bytes -= done;
        lastHost = host;
        lastCur = done;
      }
      // The file holding the data is extended to the end of the last data (sub)cluster (sparse for
      // metadata; the data file is extended with the preallocation mode).
      const sub = p.extendedL2 ? cs / 32 : cs;
      const dataEnd = Math.ceil((lastHost + lastCur) / sub) * sub;
      if (hasDataFile) dataFileLength = dataEnd;
      else if (dataEnd > m.fileEnd) m.fileEnd = dataEnd;
    } else {
      // falloc/full: refcount structures for everything first, then all data clusters in one
      // contiguous area at the end, then the L2 tables wherever the allocator puts them.
      const oldFileC = m.used.lastBelow(Math.ceil(m.fileEnd / cs)) + 1;
      const nbData = Math.ceil(size / cs);
      const nbL2 = Math.ceil(nbData / l2Entries) + 1;
      const allocStart = m.refcountArea(oldFileC, nbData + nbL2, true, 0, 0);
      const got = m.allocClustersAt(allocStart, nbData);
      if (got !== nbData) throw new QcowError('EIO', 'qcow2 create: data area allocation failed');
      const newEnd = (allocStart + nbData) * cs;
      if (newEnd > m.fileEnd) {
        const range = { offset: m.fileEnd, length: newEnd - m.fileEnd };
        if (prealloc === 'full') zeroFill = range;
        else fallocRange = range;
        m.fileEnd = newEnd;
      }
      let g = 0;
      let h = allocStart;
      let left = nbData;
      while (left > 0) {
        const nb = Math.min(left, l2Entries - (g % l2Entries));
        getL2(Math.floor(g / l2Entries));
        m.dataRuns.push({ guest: g, host: h, count: nb });
        g += nb;
        h += nb;
        left -= nb;
      }
    }
  }

  // Encryption: QEMU sets it up last, the LUKS header in the first free clusters (zero-filled).
  let crypto: Qcow2Layout['crypto'];
  if (p.encryption?.format === 'luks') {
    const length = p.encryption.luksHeaderLength ?? 0;
    if (!(length > 0)) throw new QcowError('EINVAL', 'qcow2 create: LUKS header length missing');
    const clusters = Math.ceil(length / cs);
    const cluster = m.allocClusters(clusters);
    m.touch(cluster * cs, clusters * cs);
    crypto = { cluster, clusters, length };
  }

  const header = qcow2CreateHeader(p);
  if (p.encryption) header.cryptMethod = p.encryption.format === 'luks' ? C.CRYPT_LUKS : C.CRYPT_AES;
  if (crypto) header.cryptoHeader = { offset: crypto.cluster * cs, length: crypto.length };
  header.l1Size = l1Entries;
  header.l1TableOffset = l1Cluster * cs;
  header.refcountTableOffset = m.rtCluster * cs;
  header.refcountTableClusters = m.rtClusters;
  return {
    clusterSize: cs,
    clusterBits: p.clusterBits,
    refcountBits: 2 ** p.refcountOrder,
    l2Entries,
    extendedL2: p.extendedL2,
    header,
    size: p.size,
    l1: { cluster: l1Cluster, entries: l1Entries, l2: m.l1 },
    refcountTable: { cluster: m.rtCluster, clusters: m.rtClusters, blocks: m.rt },
    allocated: m.used,
    dataRuns: m.dataRuns,
    stale: m.stale,
    fileLength: m.fileEnd,
    zeroFill,
    fallocRange,
    dataFileLength,
    ...(crypto ? { crypto } : {}),
  };
}

// ------------------------------------------------------------------------------------------------
// Encoding the structures

function setU64(dv: DataView, off: number, hi: number, value: number): void {
  dv.setUint32(off, (hi | Math.floor(value / 2 ** 32)) >>> 0);
  dv.setUint32(off + 4, value >>> 0);
}

/** Refcount block `index` of the layout (every allocated cluster has refcount 1). */
export function encodeRefcountBlock(layout: Qcow2Layout, index: number): Uint8Array {
  const cs = layout.clusterSize;
  const bits = layout.refcountBits;
  const per = (cs * 8) / bits;
  const buf = new Uint8Array(cs);
  const base = index * per;
  for (const [a, b] of layout.allocated.runs(base, base + per)) {
    let j = a - base;
    const end = b - base;
    if (bits >= 8) {
      const w = bits / 8;
      for (; j < end; j++) buf[j * w + w - 1] = 1;
    } else {
      const perByte = 8 / bits;
      const pattern = bits === 1 ? 0xff : bits === 2 ? 0x55 : 0x11;
      for (; j < end && j % perByte !== 0; j++) buf[(j * bits) >> 3]! |= 1 << ((j * bits) & 7);
      const fullEnd = end - (end % perByte);
      if (j < fullEnd) {
        buf.fill(pattern, (j * bits) >> 3, (fullEnd * bits) >> 3);
        j = fullEnd;
      }
      for (; j < end; j++) buf[(j * bits) >> 3]! |= 1 << ((j * bits) & 7);
    }
  }
  return buf;
}

export function encodeRefcountTable(layout: Qcow2Layout): Uint8Array {
  return encodeTable(layout.refcountTable.blocks, layout.refcountTable.clusters, layout.clusterSize);
}

/** The active L1 table (l1Size * 8 bytes). */
export function encodeL1(layout: Qcow2Layout): Uint8Array {
  const buf = new Uint8Array(layout.l1.entries * 8);
  const dv = new DataView(buf.buffer);
  for (const [i, c] of layout.l1.l2) setU64(dv, i * 8, 0x80000000, c * layout.clusterSize);
  return buf;
}

/** Data runs grouped by the L1 index of the L2 table that maps them. */
export function runsByTable(layout: Qcow2Layout): Map<number, DataRun[]> {
  const byTable = new Map<number, DataRun[]>();
  for (const r of layout.dataRuns) {
    const t = Math.floor(r.guest / layout.l2Entries);
    let list = byTable.get(t);
    if (!list) byTable.set(t, (list = []));
    list.push(r);
  }
  return byTable;
}

/** One L2 table: its data clusters with COPIED set (extended L2: empty subcluster bitmaps). */
export function encodeL2Table(layout: Qcow2Layout, l1Index: number, runs: readonly DataRun[]): Uint8Array {
  const cs = layout.clusterSize;
  const entrySize = layout.extendedL2 ? 16 : 8;
  const buf = new Uint8Array(cs);
  const dv = new DataView(buf.buffer);
  for (const r of runs) {
    const first = r.guest - l1Index * layout.l2Entries;
    for (let k = 0; k < r.count; k++) setU64(dv, (first + k) * entrySize, 0x80000000, (r.host + k) * cs);
  }
  return buf;
}

// ------------------------------------------------------------------------------------------------
// Writing

interface Segment {
  offset: number;
  data: Uint8Array;
}

function trimZeros(seg: Segment): Segment | undefined {
  const d = seg.data;
  const a = firstNonZero(d);
  if (a < 0) return undefined;
  const b = lastNonZero(d) + 1;
  return { offset: seg.offset + a, data: d.subarray(a, b) };
}

/** Joins writes separated by small gaps (filled with zeros) into large ones. */
class BatchWriter {
  private parts: Segment[] = [];
  private start = 0;
  private end = 0;
  constructor(
    private readonly io: ByteIO,
    private readonly maxGap = 4096,
    private readonly maxWrite = 8 * 1024 * 1024,
  ) {}

  async add(seg: Segment): Promise<void> {
    const segEnd = seg.offset + seg.data.length;
    if (this.parts.length && (seg.offset < this.end || seg.offset - this.end > this.maxGap || segEnd - this.start > this.maxWrite)) {
      await this.flush();
    }
    if (!this.parts.length) this.start = seg.offset;
    this.parts.push(seg);
    this.end = segEnd;
  }

  async flush(): Promise<void> {
    if (!this.parts.length) return;
    if (this.parts.length === 1) await this.io.write(this.parts[0]!.data, this.start);
    else {
      const buf = new Uint8Array(this.end - this.start);
      for (const p of this.parts) buf.set(p.data, p.offset - this.start);
      await this.io.write(buf, this.start);
    }
    this.parts = [];
  }
}


/**
 * Write a fresh qcow2 image into `io` (which must be empty: a newly created or truncated file).
 * The data of an external data file is not touched here.
 */
export async function createQcow2(io: ByteIO, params: Qcow2CreateParams, extra: WriteLayoutExtra = {}): Promise<Qcow2Layout> {
  const layout = computeQcow2Layout(params);
  await writeQcow2Layout(io, layout, extra);
  return layout;
}

export interface WriteLayoutExtra {
  /** LUKS: the header blob (from buildQcow2LuksHeader) for `layout.crypto`'s clusters. */
  cryptoBlob?: Uint8Array;
}

/** Granularity at which the LUKS blob's all-zero parts are left as holes. */
const BLOB_CHUNK = 4096;

function isAllZero(b: Uint8Array): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/**
 * Write a computed layout: in file order, each structure encoded only when it is written (memory
 * stays bounded by the write batch), only its non-zero bytes unless it covers bytes QEMU left
 * behind in a freed cluster, neighbours joined into large writes; everything else stays a hole.
 */
export async function writeQcow2Layout(io: ByteIO, layout: Qcow2Layout, extra: WriteLayoutExtra = {}): Promise<void> {
  const cs = layout.clusterSize;
  interface Item {
    offset: number;
    length: number;
    encode: () => Uint8Array;
    /** Write even when all zero (it covers stale bytes). */
    keepZero?: boolean;
  }
  const items: Item[] = [];
  if (layout.crypto) {
    const blob = extra.cryptoBlob;
    const span = layout.crypto.clusters * cs;
    if (!blob || blob.length < layout.crypto.length || blob.length > span) {
      throw new QcowError('EINVAL', 'qcow2 create: the LUKS header does not fit the clusters reserved for it');
    }
    const base = layout.crypto.cluster * cs;
    for (let o = 0; o < span; o += BLOB_CHUNK) {
      const n = Math.min(BLOB_CHUNK, span - o);
      const piece = o < blob.length ? blob.subarray(o, Math.min(blob.length, o + n)) : new Uint8Array(0);
      const data = piece.length === n ? piece : (() => {
        const b = new Uint8Array(n);
        b.set(piece);
        return b;
      })();
      items.push({ offset: base + o, length: n, encode: () => data, keepZero: true });
    }
  }
  const headerBytes = encodeCreateHeader(layout.header, layout.size);
  items.push({ offset: 0, length: cs, encode: () => headerBytes });
  items.push({
    offset: layout.refcountTable.cluster * cs,
    length: layout.refcountTable.clusters * cs,
    encode: () => encodeRefcountTable(layout),
  });
  layout.refcountTable.blocks.forEach((b, i) => {
    if (b) items.push({ offset: b * cs, length: cs, encode: () => encodeRefcountBlock(layout, i) });
  });
  if (layout.l1.entries) items.push({ offset: layout.l1.cluster * cs, length: layout.l1.entries * 8, encode: () => encodeL1(layout) });
  const byTable = runsByTable(layout);
  for (const [l1Index, cluster] of layout.l1.l2) {
    items.push({ offset: cluster * cs, length: cs, encode: () => encodeL2Table(layout, l1Index, byTable.get(l1Index) ?? []) });
  }

  // Bytes QEMU leaves in freed clusters (old refcount tables), minus what structures overwrite.
  const overlaps = (a: { offset: number; length: number }, b: { offset: number; length: number }) =>
    a.offset < b.offset + b.length && b.offset < a.offset + a.length;
  const staleSpans = layout.stale.map((s) => ({ offset: s.offset, length: s.data.length }));
  for (const s of layout.stale) {
    let pieces: Segment[] = [s];
    for (const it of items) {
      if (!overlaps(it, { offset: s.offset, length: s.data.length })) continue;
      const next: Segment[] = [];
      for (const p of pieces) {
        const pEnd = p.offset + p.data.length;
        const itEnd = it.offset + it.length;
        if (!overlaps(it, { offset: p.offset, length: p.data.length })) next.push(p);
        else {
          if (p.offset < it.offset) next.push({ offset: p.offset, data: p.data.subarray(0, it.offset - p.offset) });
          if (itEnd < pEnd) next.push({ offset: itEnd, data: p.data.subarray(itEnd - p.offset) });
        }
      }
      pieces = next;
    }
    for (const p of pieces) items.push({ offset: p.offset, length: p.data.length, encode: () => p.data });
  }
  items.sort((x, y) => x.offset - y.offset);

  if (layout.zeroFill) await writeZeroRange(io, layout.zeroFill.offset, layout.zeroFill.length);
  const w = new BatchWriter(io);
  for (const it of items) {
    const data = it.encode();
    if (it.keepZero && !staleSpans.some((s) => overlaps(s, it)) && isAllZero(data)) continue;
    if (staleSpans.some((s) => overlaps(s, it))) await w.add({ offset: it.offset, data });
    else {
      const t = trimZeros({ offset: it.offset, data });
      if (t) await w.add(t);
    }
  }
  await w.flush();
  if ((await io.size()) !== layout.fileLength) await io.truncate(layout.fileLength);
  if (layout.fallocRange) await io.allocate?.(layout.fallocRange.offset, layout.fallocRange.length);
}
