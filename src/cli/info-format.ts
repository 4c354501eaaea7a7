/** Human-readable `info` output, line for line as qemu-img 7.2 prints it. */
import { qdictOrder } from '../core/qjson.js';
import { sizeToStr } from '../core/util.js';
import type { ImageInfo, SnapshotInfoJson } from '../ops/info.js';

const pad = (n: number) => '    '.repeat(n);

function padEnd(s: string, n: number): string {
  return s.length >= n ? s : s + ' '.repeat(n - s.length);
}
function padStart(s: string, n: number): string {
  return s.length >= n ? s : ' '.repeat(n - s.length) + s;
}
const two = (n: number) => String(n).padStart(2, '0');

/** Header of the snapshot table. */
export function snapshotHeader(): string {
  return `${padEnd('ID', 10)}${padEnd('TAG', 17)}${padStart('VM SIZE', 8)}${padStart('DATE', 20)}${padStart('VM CLOCK', 13)}${padStart('ICOUNT', 11)}\n`;
}

/** Local time as `YYYY-MM-DD HH:MM:SS`. */
function localDate(sec: number): string {
  const d = new Date(sec * 1000);
  return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
}

export function snapshotLine(s: SnapshotInfoJson): string {
  const secs = s['vm-clock-sec'];
  const clock = `${two(Math.floor(secs / 3600))}:${two(Math.floor(secs / 60) % 60)}:${two(secs % 60)}.${String(
    Math.floor(s['vm-clock-nsec'] / 1e6),
  ).padStart(3, '0')}`;
  const icount = s.icount === undefined ? '' : String(s.icount);
  return (
    `${padEnd(s.id, 9)} ${padEnd(s.name, 16)} ${padStart(sizeToStr(s['vm-state-size']), 8)}` +
    `${padStart(localDate(s['date-sec']), 20)}${padStart(clock, 13)}${padStart(icount, 11)}\n`
  );
}

function scalar(v: unknown): string {
  if (typeof v === 'boolean') return v ? 'true' : 'false';
  if (v === null) return 'null';
  return String(v);
}

function isComposite(v: unknown): v is object {
  return typeof v === 'object' && v !== null;
}

/** QEMU's dump of a QObject tree: dict keys in QDict order with '-' shown as ' ', lists as [i]. */
export function dumpObject(v: unknown, level: number): string {
  let out = '';
  if (Array.isArray(v)) {
    v.forEach((item, i) => {
      if (isComposite(item)) out += `${pad(level)}[${i}]:\n${dumpObject(item, level + 1)}`;
      else out += `${pad(level)}[${i}]: ${scalar(item)}\n`;
    });
    return out;
  }
  const obj = v as Record<string, unknown>;
  for (const key of qdictOrder(Object.keys(obj).filter((k) => obj[k] !== undefined))) {
    const val = obj[key];
    const name = key.replace(/-/g, ' ');
    if (isComposite(val)) out += `${pad(level)}${name}:\n${dumpObject(val, level + 1)}`;
    else out += `${pad(level)}${name}: ${scalar(val)}\n`;
  }
  return out;
}

export function humanImageInfo(info: ImageInfo): string {
  const size = info['virtual-size'];
  let out = `image: ${info.filename}\nfile format: ${info.format}\n`;
  out += `virtual size: ${sizeToStr(size)} (${size} bytes)\n`;
  const actual = info['actual-size'];
  out += `disk size: ${actual === undefined ? 'unavailable' : sizeToStr(actual)}\n`;
  if (info.encrypted) out += 'encrypted: yes\n';
  if (info['cluster-size'] !== undefined) out += `cluster_size: ${info['cluster-size']}\n`;
  if (info['dirty-flag']) out += 'cleanly shut down: no\n';
  const backing = info['backing-filename'];
  if (backing !== undefined) {
    const full = info['full-backing-filename'];
    out += `backing file: ${backing}${full !== undefined && full !== backing ? ` (actual path: ${full})` : ''}\n`;
    if (info['backing-filename-format'] !== undefined) out += `backing file format: ${info['backing-filename-format']}\n`;
  }
  if (info.snapshots && info.snapshots.length) {
    out += 'Snapshot list:\n' + snapshotHeader();
    for (const s of info.snapshots) out += snapshotLine(s);
  }
  const fs = info['format-specific'];
  if (fs) out += 'Format specific information:\n' + dumpObject(fs.data, 1);
  return out;
}
