/** The internal snapshot table: decoding and encoding of entries (no I/O beyond the reader passed in). */
import { QcowError } from '../../core/errors.js';
import * as C from './constants.js';

export interface SnapshotEntry {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  /** Virtual disk size at snapshot time (undefined when the entry has no such extra data). */
  diskSize?: number;
  /** -1 when icount was disabled (or not recorded). */
  icount: number;
  /** Extra data bytes beyond the fields we know, preserved. */
  unknownExtra: Uint8Array;
  extraDataSize: number;
}

const dec = new TextDecoder();
const enc = new TextEncoder();

function u64(dv: DataView, off: number): number {
  return dv.getUint32(off) * 0x100000000 + dv.getUint32(off + 4);
}

/** Reads the table's bytes on demand so nothing is allocated beyond what the table really holds. */
export type TableReader = (offset: number, length: number) => Promise<Uint8Array>;

export async function readSnapshotTable(
  read: TableReader,
  offset: number,
  count: number,
  opts: { version: number; fileSize: number },
): Promise<SnapshotEntry[]> {
  const out: SnapshotEntry[] = [];
  let pos = offset;
  for (let i = 0; i < count; i++) {
    if (pos - offset + 40 > C.QCOW_MAX_SNAPSHOTS_SIZE) throw new QcowError('ECORRUPT', 'Snapshot table too large');
    if (pos + 40 > opts.fileSize) throw new QcowError('ECORRUPT', `Snapshot table entry ${i} is past the end of the file`);
    const head = await read(pos, 40);
    const dv = new DataView(head.buffer, head.byteOffset, 40);
    const idSize = dv.getUint16(12);
    const nameSize = dv.getUint16(14);
    const extraSize = dv.getUint32(36);
    if (extraSize > C.QCOW_MAX_SNAPSHOT_EXTRA_DATA) {
      throw new QcowError('ECORRUPT', `Too much extra metadata in snapshot table entry ${i}`);
    }
    const restLen = extraSize + idSize + nameSize;
    const entryLen = (40 + restLen + 7) & ~7;
    if (pos - offset + entryLen > C.QCOW_MAX_SNAPSHOTS_SIZE) throw new QcowError('ECORRUPT', 'Snapshot table too large');
    if (pos + 40 + restLen > opts.fileSize) throw new QcowError('ECORRUPT', `Snapshot table entry ${i} is past the end of the file`);
    const rest = restLen ? await read(pos + 40, restLen) : new Uint8Array(0);
    const edv = new DataView(rest.buffer, rest.byteOffset, rest.byteLength);
    let vmStateSize = dv.getUint32(32);
    let diskSize: number | undefined;
    let icount = -1;
    if (extraSize >= 8) vmStateSize = u64(edv, 0);
    if (extraSize >= 16) diskSize = u64(edv, 8);
    if (extraSize >= 24) {
      const ic = edv.getBigUint64(16);
      icount = ic === 0xffffffffffffffffn ? -1 : Number(ic);
    }
    out.push({
      l1TableOffset: u64(dv, 0),
      l1Size: dv.getUint32(8),
      dateSec: dv.getUint32(16),
      dateNsec: dv.getUint32(20),
      vmClockNsec: u64(dv, 24),
      vmStateSize,
      diskSize,
      icount,
      extraDataSize: extraSize,
      unknownExtra: extraSize > 24 ? rest.slice(24, extraSize) : new Uint8Array(0),
      id: dec.decode(rest.subarray(extraSize, extraSize + idSize)),
      name: dec.decode(rest.subarray(extraSize + idSize, restLen)),
    });
    pos += entryLen;
  }
  return out;
}

/**
 * Encode entries into one table (each entry starts at a multiple of 8 bytes; as in QEMU the table
 * ends where the last entry does); extra data is written as 24 bytes + unknown tail.
 */
export function encodeSnapshotTable(entries: SnapshotEntry[]): Uint8Array {
  const parts: Uint8Array[] = [];
  let total = 0;
  let lastPad = 0;
  for (const e of entries) {
    const id = enc.encode(e.id);
    const name = enc.encode(e.name);
    const extraSize = 24 + e.unknownExtra.length;
    const len = (40 + extraSize + id.length + name.length + 7) & ~7;
    lastPad = len - (40 + extraSize + id.length + name.length);
    const b = new Uint8Array(len);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, BigInt(e.l1TableOffset));
    dv.setUint32(8, e.l1Size);
    dv.setUint16(12, id.length);
    dv.setUint16(14, name.length);
    dv.setUint32(16, e.dateSec);
    dv.setUint32(20, e.dateNsec);
    dv.setBigUint64(24, BigInt(e.vmClockNsec));
    dv.setUint32(32, e.vmStateSize > 0xffffffff ? 0 : e.vmStateSize);
    dv.setUint32(36, extraSize);
    dv.setBigUint64(40, BigInt(e.vmStateSize));
    dv.setBigUint64(48, BigInt(e.diskSize ?? 0));
    dv.setBigUint64(56, e.icount < 0 ? 0xffffffffffffffffn : BigInt(e.icount));
    b.set(e.unknownExtra, 64);
    b.set(id, 40 + extraSize);
    b.set(name, 40 + extraSize + id.length);
    parts.push(b);
    total += len;
  }
  const out = new Uint8Array(total);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out.subarray(0, total - lastPad);
}
