/**
 * The snapshot-table part of the qcow2 check: reading the table leniently (repairing oversized
 * extra data and overlong tables under `-r all`), flagging incomplete v3 entries, and rewriting
 * the table when it needed repairs. Reproduces qemu-img 7.2's messages and counting.
 */
import { writeReftablePointer } from './header.js';
import * as C from './constants.js';
import { Refcounts } from './refcount.js';
import { CheckFailure, FIX_ERRORS, strerror, type CheckResult, type Errno } from './check-base.js';
import { type CheckImage, type CheckSnapshot } from './check-state.js';

const INT64_MAX = (1n << 63n) - 1n;
const INT_MAX = 0x7fffffff;
const ENTRY_HEADER = 40;
const KNOWN_EXTRA = 24;
const dec = new TextDecoder();

/** QEMU's qcow2_validate_table, returning the error (message, errno) or undefined. */
function validateTable(
  offset: bigint,
  entries: number,
  entryLen: number,
  maxBytes: number,
  cs: number,
  name: string,
): { msg: string; errno: Errno } | undefined {
  if (entries > Math.floor(maxBytes / entryLen)) return { msg: `${name} too large`, errno: 'EFBIG' };
  if (INT64_MAX - BigInt(entries) * BigInt(entryLen) < offset || offset % BigInt(cs) !== 0n) {
    return { msg: `${name} offset invalid`, errno: 'EINVAL' };
  }
  return undefined;
}

/** Sequential reads through a window, so a table of many small entries costs few file reads. */
class TableReader {
  private win: Uint8Array = new Uint8Array(0);
  private winStart = 0;
  constructor(private img: CheckImage) {}
  async read(offset: number, length: number): Promise<Uint8Array> {
    if (offset >= this.winStart && offset + length <= this.winStart + this.win.length) {
      return this.win.slice(offset - this.winStart, offset - this.winStart + length);
    }
    if (length > 1 << 20) return this.img.readPadded(offset, length);
    this.winStart = offset;
    this.win = await this.img.readPadded(offset, 1 << 20);
    return this.win.slice(0, length);
  }
}

function cstr(b: Uint8Array): string {
  const nul = b.indexOf(0);
  return dec.decode(nul < 0 ? b : b.subarray(0, nul));
}

/**
 * qcow2_check_read_snapshot_table: read the table the header points to into `img.snapshots`.
 * Throws CheckFailure when the table cannot be read at all.
 */
export async function checkReadSnapshotTable(img: CheckImage, res: CheckResult, fix: number): Promise<void> {
  const ptr = await img.readPadded(60, 12);
  const pdv = new DataView(ptr.buffer);
  let nb = pdv.getUint32(0);
  const offsetBig = pdv.getBigUint64(4);
  const repair = (fix & FIX_ERRORS) !== 0;
  let nbReduced = 0;
  img.snapshots = [];
  img.snapshotsSize = 0;
  img.nbSnapshots = nb;
  img.snapshotsOffset = offsetBig <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(offsetBig) : offsetBig;

  if (nb > C.QCOW_MAX_SNAPSHOTS && repair) {
    img.log(`Discarding ${nb - C.QCOW_MAX_SNAPSHOTS} overhanging snapshots`);
    nbReduced += nb - C.QCOW_MAX_SNAPSHOTS;
    nb = C.QCOW_MAX_SNAPSHOTS;
    img.nbSnapshots = nb;
  }
  const bad = validateTable(offsetBig, nb, ENTRY_HEADER, ENTRY_HEADER * C.QCOW_MAX_SNAPSHOTS, img.cs, 'snapshot table');
  if (bad) {
    res.checkErrors++;
    img.log(`ERROR ${bad.msg}`, 'report');
    if (nb > C.QCOW_MAX_SNAPSHOTS) {
      img.log(`You can force-remove all ${nb - C.QCOW_MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all`);
    }
    throw new CheckFailure(bad.errno);
  }

  let extraDropped = 0;
  if (nb > 0) {
    const so = Number(offsetBig);
    const reader = new TableReader(img);
    let offset = so;
    const fail = (msg: string, hint: string, errno: Errno): never => {
      res.checkErrors++;
      img.log(`ERROR failed to read the snapshot table: ${msg}`, 'report');
      img.log(hint);
      throw new CheckFailure(errno);
    };
    for (let i = 0; i < nb; i++) {
      const preSnOffset = offset;
      let tableLength = Math.ceil((offset - so) / 8) * 8;
      offset = Math.ceil(offset / 8) * 8;
      const h = await reader.read(offset, ENTRY_HEADER);
      offset += ENTRY_HEADER;
      const dv = new DataView(h.buffer, h.byteOffset, ENTRY_HEADER);
      const l1Big = dv.getBigUint64(0);
      const idSize = dv.getUint16(12);
      const nameSize = dv.getUint16(14);
      let extraSize = dv.getUint32(36);
      let truncate = false;
      if (extraSize > C.QCOW_MAX_SNAPSHOT_EXTRA_DATA) {
        if (!repair) {
          fail(
            `Too much extra metadata in snapshot table entry ${i}`,
            'You can force-remove this extra metadata with qemu-img check -r all',
            'EFBIG',
          );
        }
        img.log(`Discarding too much extra metadata in snapshot table entry ${i} (${extraSize} > ${C.QCOW_MAX_SNAPSHOT_EXTRA_DATA})`);
        extraDropped++;
        truncate = true;
      }
      const known = Math.min(KNOWN_EXTRA, extraSize);
      const extra = new Uint8Array(KNOWN_EXTRA);
      extra.set(await reader.read(offset, known));
      offset += known;
      const edv = new DataView(extra.buffer);
      const sn: CheckSnapshot = {
        l1TableOffset: l1Big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(l1Big) : l1Big,
        l1Size: dv.getUint32(8),
        idStr: '',
        name: '',
        dateSec: dv.getUint32(16),
        dateNsec: dv.getUint32(20),
        vmClockNsec: dv.getBigUint64(24),
        vmStateSize: BigInt(dv.getUint32(32)),
        extraDataSize: extraSize,
        diskSize: BigInt(img.totalBytes),
        icount: 0xffffffffffffffffn,
        unknownExtra: new Uint8Array(0),
      };
      if (extraSize >= 8) sn.vmStateSize = edv.getBigUint64(0);
      if (extraSize >= 16) sn.diskSize = edv.getBigUint64(8);
      if (extraSize >= 24) sn.icount = edv.getBigUint64(16);
      if (extraSize > KNOWN_EXTRA) {
        const extraEnd = offset + extraSize - KNOWN_EXTRA;
        if (truncate) extraSize = C.QCOW_MAX_SNAPSHOT_EXTRA_DATA;
        sn.extraDataSize = extraSize;
        sn.unknownExtra = await reader.read(offset, extraSize - KNOWN_EXTRA);
        offset = extraEnd;
      }
      sn.idStr = cstr(await reader.read(offset, idSize));
      offset += idSize;
      sn.name = cstr(await reader.read(offset, nameSize));
      offset += nameSize;
      tableLength += ENTRY_HEADER + extraSize + idSize + nameSize;
      if (tableLength > C.QCOW_MAX_SNAPSHOTS_SIZE || offset - so > INT_MAX) {
        if (!repair) {
          fail('Snapshot table is too big', `You can force-remove all ${nb - i} overhanging snapshots with qemu-img check -r all`, 'EFBIG');
        }
        img.log(`Discarding ${nb - i} overhanging snapshots (snapshot table is too big)`);
        nbReduced += nb - i;
        nb = i;
        offset = preSnOffset;
        break;
      }
      img.snapshots.push(sn);
    }
    img.nbSnapshots = nb;
    img.snapshotsSize = offset - so;
  }

  res.corruptions += nbReduced + extraDropped;
  if (nbReduced) {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, img.nbSnapshots);
    try {
      await img.write(b, 60);
      await img.io.flush();
    } catch (e) {
      res.checkErrors++;
      img.log(`ERROR failed to update the snapshot count in the image header: ${strerror('EIO')}`);
      throw new CheckFailure('EIO');
    }
    res.corruptionsFixed += nbReduced;
    res.corruptions -= nbReduced;
  }

  if (img.version >= 3) {
    img.snapshots.forEach((sn, i) => {
      if (sn.extraDataSize < 16) {
        res.corruptions++;
        img.log(`${repair ? 'Repairing' : 'ERROR'} snapshot table entry ${i} is incomplete`);
      }
    });
  }
}

/** Encode the snapshot table like QEMU's qcow2_write_snapshots (extra data at least 24 bytes). */
export function encodeCheckSnapshots(snapshots: CheckSnapshot[]): { bytes: Uint8Array; size: number } {
  const enc = new TextEncoder();
  const parts: Array<{ at: number; data: Uint8Array }> = [];
  let offset = 0;
  for (const sn of snapshots) {
    offset = Math.ceil(offset / 8) * 8;
    const id = enc.encode(sn.idStr);
    const name = enc.encode(sn.name);
    const extraSize = Math.max(KNOWN_EXTRA, sn.extraDataSize);
    const e = new Uint8Array(ENTRY_HEADER + extraSize + id.length + name.length);
    const dv = new DataView(e.buffer);
    dv.setBigUint64(0, BigInt(sn.l1TableOffset));
    dv.setUint32(8, sn.l1Size);
    dv.setUint16(12, id.length);
    dv.setUint16(14, name.length);
    dv.setUint32(16, sn.dateSec);
    dv.setUint32(20, sn.dateNsec);
    dv.setBigUint64(24, sn.vmClockNsec);
    dv.setUint32(32, Number(sn.vmStateSize & 0xffffffffn));
    dv.setUint32(36, extraSize);
    dv.setBigUint64(40, sn.vmStateSize);
    dv.setBigUint64(48, sn.diskSize);
    dv.setBigUint64(56, sn.icount);
    if (sn.extraDataSize > KNOWN_EXTRA) e.set(sn.unknownExtra.subarray(0, sn.extraDataSize - KNOWN_EXTRA), ENTRY_HEADER + KNOWN_EXTRA);
    e.set(id, ENTRY_HEADER + extraSize);
    e.set(name, ENTRY_HEADER + extraSize + id.length);
    parts.push({ at: offset, data: e });
    offset += e.length;
  }
  const bytes = new Uint8Array(offset);
  for (const p of parts) bytes.set(p.data, p.at);
  return { bytes, size: offset };
}

/** Write the repaired snapshot table to new clusters, switch the header to it, free the old one. */
async function writeSnapshots(img: CheckImage): Promise<void> {
  const { bytes, size } = encodeCheckSnapshots(img.snapshots);
  if (size > C.QCOW_MAX_SNAPSHOTS_SIZE) throw new CheckFailure('EFBIG');
  const cs = img.cs;
  const hdr = await img.readPadded(48, 12);
  const hdv = new DataView(hdr.buffer);
  const host = {
    io: img.io,
    clusterBits: img.clusterBits,
    refcountOrder: img.refcountOrder,
    reftableOffset: Number(hdv.getBigUint64(0)),
    reftableClusters: hdv.getUint32(8),
    onReftableMoved: (offset: number, clusters: number) => writeReftablePointer(img, offset, clusters),
  };
  await img.flushRefcounts();
  img.dropRefcountCache();
  const rc = await Refcounts.load(host);
  let newOffset = 0;
  if (size > 0) {
    newOffset = await rc.allocate(Math.ceil(size / cs));
    await rc.writeBlocks();
    await img.io.flush();
    await rc.writeTableEntries();
    await img.write(bytes, newOffset);
  }
  await img.io.flush();
  const ptr = new Uint8Array(12);
  const pdv = new DataView(ptr.buffer);
  pdv.setUint32(0, img.snapshots.length);
  pdv.setBigUint64(4, BigInt(newOffset));
  await img.write(ptr, 60);
  await img.io.flush();
  // Free the old table like QEMU's qcow2_free_clusters: the whole range or nothing (a failure puts
  // back what was freed, and QEMU ignores it: the clusters just leak). Stopping at the first
  // failure also keeps a hostile table size from making this loop run for minutes.
  const old = img.snapshotsOffset;
  if (img.snapshotsSize > 0 && typeof old === 'number') {
    const first = Math.floor(old / cs);
    const last = Math.floor((old + img.snapshotsSize - 1) / cs);
    const freed: number[] = [];
    try {
      for (let c = first; c <= last; c++) {
        rc.free(c);
        await rc.applyFrees();
        freed.push(c);
      }
    } catch {
      for (const c of freed) {
        try {
          await rc.update(c, 1);
        } catch {
          /* leaked */
        }
      }
    }
    await rc.writeBlocks();
    await rc.writeTableEntries();
    await img.io.flush();
  }
  img.snapshotsOffset = newOffset;
  img.snapshotsSize = size;
  img.nbSnapshots = img.snapshots.length;
  // The allocator may have moved the reftable and written blocks: reload what the check caches.
  const after = await img.readPadded(48, 12);
  const adv = new DataView(after.buffer);
  const rtOff = Number(adv.getBigUint64(0));
  img.setReftable(rtOff, await img.readPadded(rtOff, adv.getUint32(8) * cs));
}

/** qcow2_check_fix_snapshot_table: rewrite the table when its entries needed repairs. */
export async function checkFixSnapshotTable(img: CheckImage, res: CheckResult, fix: number): Promise<void> {
  if (res.corruptions && fix & FIX_ERRORS) {
    try {
      await writeSnapshots(img);
    } catch (e) {
      res.checkErrors++;
      const errno: Errno = e instanceof CheckFailure ? e.errno : 'EIO';
      img.log(`ERROR failed to update the snapshot table: ${strerror(errno)}`);
      throw new CheckFailure(errno);
    }
    res.corruptionsFixed += res.corruptions;
    res.corruptions = 0;
  }
}
