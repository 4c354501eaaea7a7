/**
 * Power-cut harness. A workload runs through our library on an image (made by qemu-img) whose file
 * is a RecordingIO; afterwards the file is rebuilt as a disk might hold it after a power cut at many
 * points of the recording (volatile writes applied, dropped, reordered, optionally torn), and each
 * rebuilt image must:
 *  - open read-write in QEMU (`qemu-io -c 'write ...'`; QEMU repairs a dirty image on that open);
 *  - pass `qemu-img check` (leaks allowed; a dirty image is first repaired with `check -r all`);
 *  - read back (`qemu-img convert -O raw`) the guest data that was flushed before the cut: every
 *    512-byte sector not written since the last completed guest flush equals the model at that
 *    flush, and every sector written since holds one of the values it had since that flush.
 *
 * Env: QCOWKIT_CRASH_FULL=1 (every cut, more strategies), QCOWKIT_CRASH_TORN=1 (add torn writes,
 * reported separately), QCOWKIT_CRASH_JOBS (parallel checks, default 3), QCOWKIT_CRASH_KEEP=dir (save
 * failing images there; default <tmp>/qcowkit-crash-failures).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { openImage } from '../../src/block/open.js';
import { registerNodeCodecs } from '../../src/codecs/node.js';
import type { ByteIO, IOProvider } from '../../src/core/byte-io.js';
import type { Qcow2Driver } from '../../src/formats/qcow2/driver.js';
import { MemoryIO, MemoryProvider } from '../../src/io/memory.js';
import { mulberry32, RecordingIO, type RecordedOp, type ReplayOptions } from '../../src/io/recording.js';
import { describeResult, must, qemuImg, qemuIo, type RunResult } from '../helpers/proc.js';

export const FULL = process.env.QCOWKIT_CRASH_FULL === '1';
export const TORN = FULL || process.env.QCOWKIT_CRASH_TORN === '1';
const JOBS = Math.max(1, Number(process.env.QCOWKIT_CRASH_JOBS ?? 3));
/** In full mode, at most this many cut points per workload (evenly spread, plus every header window). */
const FULL_MAX_CUTS = Number(process.env.QCOWKIT_CRASH_MAX_CUTS ?? 1500);
const SECTOR = 512;
const VM = '/vm';
const IMG = 'img.qcow2';

// ---------------------------------------------------------------------------------------------
// Workload description

export interface BackingSpec {
  fmt: 'qcow2' | 'raw';
  size: number;
  /** Content seed: random data with a few zero holes. */
  seed: number;
  /** qemu-img -o for a qcow2 backing file. */
  options?: string;
}

export interface ImageSpec {
  size: number;
  /** qemu-img create -o */
  options: string;
  backing?: BackingSpec;
}

export interface Workload {
  name: string;
  image: ImageSpec;
  seed: number;
  /** Fast mode: about this many rebuilt images are checked (default 40). */
  budget?: number;
  run(g: Guest): Promise<void>;
  /** Extra facts about the recording to assert (return a problem string, or undefined). */
  after?(rec: RecordingIO, g: Guest): string | undefined;
}

export type GuestOp =
  | {
      kind: 'write' | 'zero' | 'discard';
      offset: number;
      length: number;
      /** Bytes of the range after the op; null = zeros. */
      value: Uint8Array | null;
      startOp: number;
      endOp: number;
      note?: string;
    }
  | { kind: 'resize'; size: number; startOp: number; endOp: number }
  | { kind: 'flush'; startOp: number; endOp: number; note?: string };

/** What the workload drives: the library's writer, with a model of the guest content. */
export class Guest {
  readonly ops: GuestOp[] = [];
  readonly rng: () => number;
  size: number;
  closed = false;

  constructor(
    readonly drv: Qcow2Driver,
    readonly rec: RecordingIO,
    /** Guest content of the image as created (backing data or zeros). */
    readonly initial: Uint8Array,
    seed: number,
  ) {
    this.rng = mulberry32(seed);
    this.size = drv.size;
  }

  get version(): number {
    return this.drv.header.version;
  }
  get clusterSize(): number {
    return this.drv.g.clusterSize;
  }
  /** Zero-flag unit: the subcluster with extended L2, else the cluster. */
  get unit(): number {
    return this.drv.g.subclusterSize;
  }

  int(lo: number, hi: number): number {
    return lo + Math.floor(this.rng() * (hi - lo + 1));
  }
  pick<T>(a: readonly T[]): T {
    return a[Math.floor(this.rng() * a.length)]!;
  }
  /** A sector-aligned offset for a `len`-byte request inside the disk. */
  sectorOffset(len: number, from = 0, to = this.size): number {
    return this.int(Math.ceil(from / SECTOR), Math.floor((to - len) / SECTOR)) * SECTOR;
  }
  bytes(len: number): Uint8Array {
    const b = new Uint8Array(len);
    for (let i = 0; i < len; i += 4) {
      const v = (this.rng() * 0x100000000) >>> 0;
      b[i] = v;
      b[i + 1] = v >>> 8;
      b[i + 2] = v >>> 16;
      b[i + 3] = v >>> 24;
    }
    return b;
  }

  private aligned(offset: number, length: number): void {
    if (offset % SECTOR || length % SECTOR || offset < 0 || offset + length > this.size || length <= 0) {
      throw new Error(`workload request [${offset}, +${length}) must be sector aligned and inside the disk (${this.size})`);
    }
  }

  async write(offset: number, data: Uint8Array, note?: string): Promise<void> {
    this.aligned(offset, data.length);
    const startOp = this.rec.mark();
    await this.drv.write(offset, data);
    this.ops.push({ kind: 'write', offset, length: data.length, value: data.slice(), startOp, endOp: this.rec.mark(), note });
  }

  async writeZeroes(offset: number, length: number, mayUnmap: boolean): Promise<void> {
    this.aligned(offset, length);
    const startOp = this.rec.mark();
    await this.drv.writeZeroes(offset, length, { mayUnmap });
    this.ops.push({ kind: 'zero', offset, length, value: null, startOp, endOp: this.rec.mark(), note: mayUnmap ? 'unmap' : undefined });
  }

  /**
   * Discard: whole clusters only (partial clusters are left alone, as by QEMU, also with
   * subclusters; a last partial cluster ending the image counts as whole). Afterwards the range
   * reads as zeros on v3 images (zero flag), and as the backing data on v2 (unallocated).
   */
  async discard(offset: number, length: number): Promise<void> {
    this.aligned(offset, length);
    const startOp = this.rec.mark();
    await this.drv.discard(offset, length);
    const endOp = this.rec.mark();
    const cs = this.clusterSize;
    const end = offset + length;
    const a = Math.ceil(offset / cs) * cs;
    const b = end === this.size ? end : Math.min(this.size, Math.floor(end / cs) * cs);
    if (a >= b) {
      this.ops.push({ kind: 'discard', offset, length: 0, value: null, startOp, endOp, note: 'partial cluster: no-op' });
      return;
    }
    const value = this.version >= 3 ? null : sliceZeroPadded(this.initial, a, b - a);
    this.ops.push({ kind: 'discard', offset: a, length: b - a, value, startOp, endOp });
  }

  async flush(note?: string): Promise<void> {
    const startOp = this.rec.mark();
    await this.drv.flush();
    this.ops.push({ kind: 'flush', startOp, endOp: this.rec.mark(), note });
  }

  async resize(size: number): Promise<void> {
    const startOp = this.rec.mark();
    await this.drv.resize(size);
    this.size = size;
    this.ops.push({ kind: 'resize', size, startOp, endOp: this.rec.mark() });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const startOp = this.rec.mark();
    await this.drv.close();
    this.ops.push({ kind: 'flush', startOp, endOp: this.rec.mark(), note: 'close' });
  }
}

function sliceZeroPadded(src: Uint8Array, offset: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  if (offset < src.length) out.set(src.subarray(offset, Math.min(src.length, offset + length)));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Model of guest content over the recording

/** Guest content after guest ops `[0, upTo)`, advanced incrementally. */
class ModelCursor {
  content: Uint8Array;
  upTo = 0;
  constructor(
    private readonly initial: Uint8Array,
    private readonly ops: GuestOp[],
  ) {
    this.content = initial.slice();
  }
  advance(to: number): Uint8Array {
    if (to < this.upTo) {
      this.content = this.initial.slice();
      this.upTo = 0;
    }
    for (; this.upTo < to; this.upTo++) this.content = applyGuestOp(this.content, this.ops[this.upTo]!);
    return this.content;
  }
}

function applyGuestOp(m: Uint8Array, op: GuestOp): Uint8Array {
  switch (op.kind) {
    case 'flush':
      return m;
    case 'resize': {
      if (op.size === m.length) return m;
      const n = new Uint8Array(op.size);
      n.set(m.subarray(0, Math.min(m.length, op.size)));
      return n;
    }
    default:
      if (!op.length) return m;
      if (op.value) m.set(op.value, op.offset);
      else m.fill(0, op.offset, op.offset + op.length);
      return m;
  }
}

/** What the disk must show at a cut: the state at the last completed guest flush plus what may have changed. */
interface Expectation {
  /** Index (in guest ops) of the governing flush, -1 = image as created. */
  flushIndex: number;
  /** Guest ops started after that flush and before the cut (their ranges may hold any of their values). */
  dirty: GuestOp[];
  /** Virtual sizes the image may report. */
  sizes: number[];
}

function expectationAt(ops: GuestOp[], cut: number, initialSize: number): Expectation {
  let flushIndex = -1;
  let size = initialSize;
  let sizeAtFlush = initialSize;
  for (let i = 0; i < ops.length; i++) {
    const op = ops[i]!;
    if (op.startOp >= cut) break;
    if (op.kind === 'flush' && op.endOp <= cut) {
      flushIndex = i;
      sizeAtFlush = size;
    }
    if (op.kind === 'resize') size = op.size;
  }
  const dirty: GuestOp[] = [];
  const sizes = [sizeAtFlush];
  for (let i = flushIndex + 1; i < ops.length; i++) {
    const op = ops[i]!;
    if (op.startOp >= cut) break;
    if (op.kind === 'flush') continue;
    dirty.push(op);
    if (op.kind === 'resize' && !sizes.includes(op.size)) sizes.push(op.size);
  }
  return { flushIndex, dirty, sizes };
}

/** Compare QEMU's raw view with the expectation; returns a problem or undefined. */
export function verifyData(raw: Uint8Array, base: Uint8Array, exp: Expectation, allOps: GuestOp[]): string | undefined {
  if (!exp.sizes.includes(raw.length)) return `virtual size is ${raw.length}, expected ${exp.sizes.join(' or ')}`;
  // Candidate values of every sector written since the flush.
  const cands = new Map<number, Uint8Array[]>();
  for (const op of exp.dirty) {
    if (op.kind === 'resize' || op.kind === 'flush' || !op.length) continue;
    const first = Math.floor(op.offset / SECTOR);
    const last = Math.ceil((op.offset + op.length) / SECTOR);
    for (let s = first; s < last; s++) {
      let list = cands.get(s);
      if (!list) {
        list = [sliceZeroPadded(base, s * SECTOR, SECTOR)];
        cands.set(s, list);
      }
      const next = list[list.length - 1]!.slice();
      const a = Math.max(op.offset, s * SECTOR);
      const b = Math.min(op.offset + op.length, (s + 1) * SECTOR);
      if (op.value) next.set(op.value.subarray(a - op.offset, b - op.offset), a - s * SECTOR);
      else next.fill(0, a - s * SECTOR, b - s * SECTOR);
      list.push(next);
    }
  }
  const dirtySectors = [...cands.keys()].sort((x, y) => x - y);
  const nSectors = Math.ceil(raw.length / SECTOR);
  let pos = 0; // sector
  const cleanMismatch = (fromS: number, toS: number): number => {
    const a = fromS * SECTOR;
    const b = Math.min(raw.length, toS * SECTOR);
    if (a >= b) return -1;
    const inBase = Math.min(b, base.length);
    if (a < inBase && !Buffer.from(raw.buffer, raw.byteOffset + a, inBase - a).equals(Buffer.from(base.buffer, base.byteOffset + a, inBase - a))) {
      for (let i = a; i < inBase; i++) if (raw[i] !== base[i]) return i;
    }
    for (let i = Math.max(a, inBase); i < b; i++) if (raw[i] !== 0) return i;
    return -1;
  };
  const describe = (at: number, what: string): string => {
    const last = [...allOps].reverse().find((o) => o.kind !== 'flush' && o.kind !== 'resize' && o.offset <= at && at < o.offset + o.length);
    const lastIdx = last ? allOps.indexOf(last) : -1;
    const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
    return (
      `guest data at 0x${at.toString(16)} (${what}): QEMU reads ${hex(raw.subarray(at, at + 8))}, ` +
      `expected ${hex(sliceZeroPadded(base, at, 8))} (state at the last flush` +
      (exp.flushIndex >= 0 ? `, guest op #${exp.flushIndex}` : ', image as created') +
      `); last guest op touching it: ${lastIdx >= 0 ? `#${lastIdx} ${fmtGuestOp(last!)}` : 'none'}`
    );
  };
  for (const s of dirtySectors) {
    if (s >= nSectors) break;
    const bad = cleanMismatch(pos, s);
    if (bad >= 0) return describe(bad, 'not written since the last flush');
    const sec = raw.subarray(s * SECTOR, Math.min(raw.length, (s + 1) * SECTOR));
    const list = cands.get(s)!;
    if (!list.some((c) => Buffer.from(c.buffer, c.byteOffset, sec.length).equals(sec))) {
      return describe(s * SECTOR, `written since the last flush; matches none of its ${list.length} possible values`);
    }
    pos = s + 1;
  }
  const bad = cleanMismatch(pos, nSectors);
  if (bad >= 0) return describe(bad, 'not written since the last flush');
  return undefined;
}

export function fmtGuestOp(op: GuestOp): string {
  const r = (o: number, l: number) => `[0x${o.toString(16)}, +0x${l.toString(16)})`;
  switch (op.kind) {
    case 'flush':
      return op.note === 'close' ? 'close' : 'flush';
    case 'resize':
      return `resize ${op.size}`;
    case 'write':
      return `write ${r(op.offset, op.length)}`;
    case 'zero':
      return `write_zeroes ${r(op.offset, op.length)}${op.note ? ' mayUnmap' : ''}`;
    case 'discard':
      return `discard ${r(op.offset, op.length)}${op.note ? ` (${op.note})` : ''}`;
  }
}

// ---------------------------------------------------------------------------------------------
// qcow2 layout peeking (for readable failure reports and workload assertions)

export interface Layout {
  clusterSize: number;
  version: number;
  size: number;
  l1Offset: number;
  l1Size: number;
  reftableOffset: number;
  reftableClusters: number;
  incompat: bigint;
  refblocks: Set<number>;
  l2tables: Set<number>;
}

export function parseLayout(bytes: Uint8Array): Layout {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const u64 = (o: number) => (o + 8 <= bytes.length ? Number(dv.getBigUint64(o)) : 0);
  const u32 = (o: number) => (o + 4 <= bytes.length ? dv.getUint32(o) : 0);
  const clusterSize = 2 ** u32(20);
  const version = u32(4);
  const l = {
    clusterSize,
    version,
    size: u64(24),
    l1Offset: u64(40),
    l1Size: u32(36),
    reftableOffset: u64(48),
    reftableClusters: u32(56),
    incompat: version >= 3 && bytes.length >= 80 ? dv.getBigUint64(72) : 0n,
    refblocks: new Set<number>(),
    l2tables: new Set<number>(),
  };
  const mask = 0x00fffffffffffe00n;
  for (let i = 0; i < (l.reftableClusters * clusterSize) / 8; i++) {
    const o = l.reftableOffset + i * 8;
    if (o + 8 > bytes.length) break;
    const e = Number(dv.getBigUint64(o) & mask);
    if (e) l.refblocks.add(e);
  }
  for (let i = 0; i < l.l1Size; i++) {
    const o = l.l1Offset + i * 8;
    if (o + 8 > bytes.length) break;
    const e = Number(dv.getBigUint64(o) & mask);
    if (e) l.l2tables.add(e);
  }
  return l;
}

function classify(off: number, len: number, l: Layout, fin: Layout): string {
  const cs = l.clusterSize;
  const c = Math.floor(off / cs) * cs;
  if (off < cs) {
    const fields: string[] = [];
    const f = (a: number, b: number, n: string) => off < b && off + len > a && fields.push(n);
    f(24, 32, 'size');
    f(36, 48, 'l1');
    f(48, 60, 'reftable');
    f(72, 96, 'features');
    return `header(${fields.join(',') || 'other'})`;
  }
  const inRange = (a: number, n: number) => off >= a && off < a + n;
  if (inRange(l.reftableOffset, l.reftableClusters * cs)) return 'reftable';
  if (inRange(l.l1Offset, l.l1Size * 8 || 1)) return 'L1';
  if (l.refblocks.has(c)) return 'refblock';
  if (l.l2tables.has(c)) return 'L2';
  if (inRange(fin.reftableOffset, fin.reftableClusters * cs)) return 'reftable(final location)';
  if (inRange(fin.l1Offset, fin.l1Size * 8 || 1)) return 'L1(final location)';
  if (fin.refblocks.has(c)) return 'refblock(linked later)';
  if (fin.l2tables.has(c)) return 'L2(linked later)';
  return 'data';
}

/** Whether a write's bytes are in `image`: all / none / some sectors of it. */
function landed(op: { offset: number; data: Uint8Array }, image: Uint8Array): 'on disk' | 'NOT on disk' | 'partly on disk' {
  let yes = 0;
  let no = 0;
  for (let a = op.offset; a < op.offset + op.data.length; ) {
    const b = Math.min(op.offset + op.data.length, (Math.floor(a / SECTOR) + 1) * SECTOR);
    const got = image.subarray(a, b);
    const want = op.data.subarray(a - op.offset, b - op.offset);
    if (got.length === want.length && Buffer.from(got).equals(Buffer.from(want))) yes++;
    else no++;
    a = b;
  }
  return no === 0 ? 'on disk' : yes === 0 ? 'NOT on disk' : 'partly on disk';
}

/** One line per io op in `[from, to)`, with what each write hit (and, given the image, whether it landed). */
export function describeIoOps(rec: RecordingIO, from: number, to: number, image?: Uint8Array): string[] {
  const rep = rec.replayer();
  const fin = parseLayout(rec.replay(rec.ops.length));
  const out: string[] = [];
  const f = to > 0 ? rec.lastFlushBefore(to) : -1;
  for (let i = Math.max(0, from); i < to; i++) {
    const op = rec.ops[i]!;
    if (op.kind === 'flush') out.push(`  io#${i} flush`);
    else if (op.kind === 'truncate') out.push(`  io#${i} truncate ${op.size}`);
    else {
      const l = parseLayout(rep.at(i + 1));
      const tag = image && i > f ? ` <- ${landed(op, image)}` : '';
      out.push(`  io#${i} write [0x${op.offset.toString(16)}, +0x${op.data.length.toString(16)}) ${classify(op.offset, op.data.length, l, fin)}${tag}`);
    }
  }
  return out;
}

/** The volatile writes at a cut as `kind:landed` words (one-line failure summaries). */
function volatileSummary(rec: RecordingIO, cut: number, image: Uint8Array): string {
  const f = rec.lastFlushBefore(cut);
  return describeIoOps(rec, f + 1, cut, image)
    .map((l) => l.replace(/^\s*io#(\d+) write \[[^)]*\) /, '#$1 ').replace(' <- on disk', '+').replace(' <- NOT on disk', '-').replace(' <- partly on disk', '~'))
    .join(' ');
}

// ---------------------------------------------------------------------------------------------
// Running a workload

export interface CrashResult {
  name: string;
  ioOps: number;
  flushes: number;
  cuts: number;
  checks: number;
  distinctImages: number;
  dirtyImages: number;
  /** Dirty images whose plain (pre-repair) check reported corruptions (stale refcounts by design). */
  dirtyWithCorruptions: number;
  byStrategy: Record<string, number>;
  failures: Failure[];
  tornChecks: number;
  tornFailures: Failure[];
  ms: number;
  summary: string;
  report: string;
}

export interface Failure {
  cut: number;
  strategy: string;
  problems: string[];
  /** One line: the first problem and the volatile writes (+ landed, - lost, ~ torn). */
  brief?: string;
  saved?: string;
  repro: string;
}

interface Plan {
  cut: number;
  opts: ReplayOptions;
  label: string;
  torn: boolean;
}

export interface Verdict {
  problems: string[];
  dirty: boolean;
  preRepairCorruptions: number;
  raw?: string;
  checkOutput: string;
}

let codecsReady = false;

export async function runCrashTest(w: Workload): Promise<CrashResult> {
  const t0 = performance.now();
  if (!codecsReady) {
    registerNodeCodecs();
    codecsReady = true;
  }
  const root = fs.mkdtempSync(path.join(scratchDir(), `qk-crash-${w.name}-`));
  try {
    return await runIn(root, w, t0);
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
}

async function runIn(root: string, w: Workload, t0: number): Promise<CrashResult> {
  // 1. Images made by qemu-img.
  const made = path.join(root, 'made');
  fs.mkdirSync(made);
  const backingName = w.image.backing ? `base.${w.image.backing.fmt}` : undefined;
  if (w.image.backing) await makeBacking(made, w.image.backing);
  const createArgs = ['create', '-q', '-f', 'qcow2'];
  if (w.image.options) createArgs.push('-o', w.image.options);
  if (backingName) createArgs.push('-b', backingName, '-F', w.image.backing!.fmt);
  createArgs.push(IMG, String(w.image.size));
  await must(qemuImg(createArgs, { cwd: made }));
  const imgBytes = new Uint8Array(fs.readFileSync(path.join(made, IMG)));
  await must(qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', IMG, 'initial.raw'], { cwd: made }));
  const initial = new Uint8Array(fs.readFileSync(path.join(made, 'initial.raw')));
  fs.rmSync(path.join(made, 'initial.raw'));

  // 2. The workload through our library, recorded.
  const rec = RecordingIO.fromBytes(`${VM}/${IMG}`, imgBytes);
  const mem = new MemoryProvider();
  if (backingName) mem.files.set(`${VM}/${backingName}`, new MemoryIO(`${VM}/${backingName}`, fs.readFileSync(path.join(made, backingName))));
  const provider: IOProvider = {
    open: async (name, opts): Promise<ByteIO> => (name === rec.name ? rec : mem.open(name, opts)),
    resolve: (base, name) => mem.resolve(base, name),
  };
  const drv = (await openImage(rec.name, { io: provider, readOnly: false })) as Qcow2Driver;
  const guest = new Guest(drv, rec, initial, w.seed);
  await w.run(guest);
  await guest.close();
  const N = rec.ops.length;
  const flushes = rec.ops.filter((o) => o.kind === 'flush').length;
  const setupProblems: string[] = [];
  const extra = w.after?.(rec, guest);
  if (extra) setupProblems.push(extra);

  // 3. Slots: one folder per parallel check, each with the backing file next to the image.
  const slots: string[] = [];
  for (let i = 0; i < JOBS; i++) {
    const d = path.join(root, `slot${i}`);
    fs.mkdirSync(d);
    if (backingName) fs.copyFileSync(path.join(made, backingName), path.join(d, backingName));
    slots.push(d);
  }
  const keepRoot = process.env.QCOWKIT_CRASH_KEEP ?? path.join(os.tmpdir(), 'qcowkit-crash-failures');

  // 4. Plan.
  const tWorkload = performance.now() - t0;
  const plans = planCuts(rec, w, N);
  const cutsChecked = new Set(plans.map((p) => p.cut)).size;

  // 5. Execute, grouped by the governing guest flush so one model copy serves a group.
  const model = new ModelCursor(initial, guest.ops);
  const rep = rec.replayer();
  const failures: Failure[] = [];
  const tornFailures: Failure[] = [];
  const byStrategy: Record<string, number> = {};
  let checks = 0;
  let tornChecks = 0;
  let dirtyImages = 0;
  let dirtyWithCorruptions = 0;
  const seenHashes = new Set<string>();
  let groupCache = new Map<string, Promise<Verdict>>();
  let groupFlush = Number.NaN;
  let rawCounter = 0;

  const sorted = [...plans].sort((a, b) => a.cut - b.cut);
  let i = 0;
  while (i < sorted.length) {
    const exp0 = expectationAt(guest.ops, sorted[i]!.cut, initial.length);
    let j = i;
    while (j < sorted.length && expectationAt(guest.ops, sorted[j]!.cut, initial.length).flushIndex === exp0.flushIndex) j++;
    const group = sorted.slice(i, j);
    i = j;
    if (groupFlush !== exp0.flushIndex) {
      for (const v of groupCache.values()) {
        const r = (await v).raw;
        if (r) fs.rmSync(r, { force: true });
      }
      groupCache = new Map();
      groupFlush = exp0.flushIndex;
    }
    const base = model.advance(exp0.flushIndex + 1).slice();
    await runPool(group, async (p, slot) => {
      const bytes = rep.at(p.cut, p.opts);
      const hash = createHash('sha1').update(bytes).digest('hex');
      let vp = groupCache.get(hash);
      const fresh = !vp;
      if (!vp) {
        const rawPath = path.join(root, `raw-${rawCounter++}.bin`);
        vp = examine(bytes, slots[slot]!, rawPath);
        groupCache.set(hash, vp);
      }
      const v = await vp;
      const problems = [...v.problems];
      if (v.raw) {
        const raw = new Uint8Array(fs.readFileSync(v.raw));
        const exp = expectationAt(guest.ops, p.cut, initial.length);
        const bad = verifyData(raw, base, exp, guest.ops);
        if (bad) problems.push(bad);
      }
      if (p.torn) tornChecks++;
      else {
        checks++;
        byStrategy[p.label] = (byStrategy[p.label] ?? 0) + 1;
      }
      if (fresh && !seenHashes.has(hash)) {
        seenHashes.add(hash);
        if (v.dirty) dirtyImages++;
        if (v.preRepairCorruptions) dirtyWithCorruptions++;
      }
      if (problems.length) {
        const f: Failure = { cut: p.cut, strategy: p.label, problems, repro: '' };
        const list = p.torn ? tornFailures : failures;
        if (list.length < 40) f.brief = `cut ${p.cut} ${JSON.stringify(p.opts)}: ${problems[0]!.slice(0, 160)} | volatile: ${volatileSummary(rec, p.cut, bytes).slice(0, 400)}`;
        if (list.length < 5) {
          f.repro = reproText(w, rec, guest, p, bytes, v);
          f.saved = saveFailure(keepRoot, w.name, p, bytes, slots[slot]!, backingName, f);
        }
        list.push(f);
      }
    });
  }
  for (const v of groupCache.values()) {
    const r = (await v).raw;
    if (r) fs.rmSync(r, { force: true });
  }

  // The final image (after close) must be exact and clean.
  const finalExp = expectationAt(guest.ops, N, initial.length);
  if (finalExp.dirty.length) setupProblems.push(`internal: final cut has ${finalExp.dirty.length} unflushed guest ops`);

  const ms = performance.now() - t0;
  const strat = Object.entries(byStrategy)
    .map(([k, v]) => `${k} ${v}`)
    .join(', ');
  const summary =
    `[crash] ${w.name}: ${guest.ops.length} guest ops, ${N} io ops (${flushes} flushes); ` +
    `checked ${checks} rebuilt images at ${cutsChecked} cut points (${strat}); ${seenHashes.size} distinct, ` +
    `${dirtyImages} dirty (repaired by QEMU; ${dirtyWithCorruptions} showed corruptions before repair); failures ${failures.length}` +
    (TORN ? `; torn: ${tornChecks} checks, ${tornFailures.length} failures` : '') +
    `; ${(ms / 1000).toFixed(1)} s (workload ${(tWorkload / 1000).toFixed(1)} s)`;
  const allFailures = [...setupProblems.map((p) => ({ cut: N, strategy: '-', problems: [p], repro: '' })), ...failures];
  const report = [
    summary,
    ...allFailures.slice(0, 3).map((f) => `--- cut ${f.cut} (${f.strategy}): ${f.problems.join('; ')}\n${f.repro}${f.saved ? `\nsaved: ${f.saved}` : ''}`),
    allFailures.length > 3 ? `... and ${allFailures.length - 3} more failures:` : '',
    ...allFailures.slice(3).flatMap((f) => (f.brief ? [`  ${f.brief}`] : [])),
  ].join('\n');
  return {
    name: w.name,
    ioOps: N,
    flushes,
    cuts: cutsChecked,
    checks,
    distinctImages: seenHashes.size,
    dirtyImages,
    dirtyWithCorruptions,
    byStrategy,
    failures: allFailures,
    tornChecks,
    tornFailures,
    ms,
    summary,
    report,
  };
}

/** Scratch space: RAM-backed when available (QEMU's flushes on repair are then cheap). */
function scratchDir(): string {
  const env = process.env.QCOWKIT_CRASH_TMP;
  if (env) return env;
  try {
    fs.accessSync('/dev/shm', fs.constants.W_OK);
    if (fs.statSync('/dev/shm').isDirectory()) return '/dev/shm';
  } catch {
    // no /dev/shm
  }
  return os.tmpdir();
}

async function makeBacking(dir: string, b: BackingSpec): Promise<void> {
  const rng = mulberry32(b.seed);
  const data = new Uint8Array(b.size);
  for (let i = 0; i < data.length; i += 4) {
    const v = (rng() * 0x100000000) >>> 0;
    data[i] = v;
    data[i + 1] = v >>> 8;
    data[i + 2] = v >>> 16;
    data[i + 3] = v >>> 24;
  }
  // A few zero holes (unallocated in a qcow2 backing file).
  for (let k = 0; k < 4; k++) {
    const len = (1 + Math.floor(rng() * 8)) * 65536;
    const off = Math.floor((rng() * (b.size - len)) / 65536) * 65536;
    data.fill(0, off, off + len);
  }
  if (b.fmt === 'raw') {
    fs.writeFileSync(path.join(dir, 'base.raw'), data);
    return;
  }
  fs.writeFileSync(path.join(dir, 'base.tmp'), data);
  const args = ['convert', '-q', '-f', 'raw', '-O', 'qcow2'];
  if (b.options) args.push('-o', b.options);
  await must(qemuImg([...args, 'base.tmp', 'base.qcow2'], { cwd: dir }));
  fs.rmSync(path.join(dir, 'base.tmp'));
}

/**
 * QEMU's stderr without the report of what it repaired while opening a dirty image read-write:
 * refcount and OFLAG_COPIED repairs, and the rebuild of refcount structures that are broken
 * (as an image left dirty while being emptied may be).
 */
export function withoutRepairReport(stderr: string): string {
  return stderr.replace(/^(Leaked cluster|ERROR cluster|Repairing cluster|ERROR OFLAG_COPIED|Repairing OFLAG_COPIED|Rebuilding refcount structure)[^\n]*\n?/gm, '');
}

/** Rebuilt image → QEMU's verdict (RW open, check, repair if dirty) and its raw content. */
export async function examine(bytes: Uint8Array, slot: string, rawPath: string): Promise<Verdict> {
  const img = path.join(slot, IMG);
  const problems: string[] = [];
  const out: string[] = [];
  const l = parseLayout(bytes);
  const dirty = l.version >= 3 && (l.incompat & 1n) === 1n;
  let preRepairCorruptions = 0;

  // QEMU opens it read-write (repairing a dirty image on the way) and writes.
  const rw = path.join(slot, 'rw.qcow2');
  fs.writeFileSync(rw, bytes);
  const r0 = await qemuIo(['-f', 'qcow2', '-t', 'unsafe', '-c', 'write -P 0x55 0 512', rw], { cwd: slot });
  const stderr = dirty ? withoutRepairReport(r0.stderr) : r0.stderr;
  if (r0.code !== 0 || !/wrote 512\/512/.test(r0.stdout) || /\S/.test(stderr)) {
    problems.push(`QEMU cannot open it read-write and write: ${oneLine(r0)}`);
  }
  out.push(describeResult(r0));
  if (FULL && !problems.length) {
    const rr = await qemuImg(['check', '-T', 'unsafe', '--output=json', '-f', 'qcow2', rw], { cwd: slot });
    const bad = checkProblem(rr);
    if (bad) problems.push(`after QEMU wrote to it: ${bad}`);
  }

  fs.writeFileSync(img, bytes);
  const r1 = await qemuImg(['check', '-T', 'unsafe', '--output=json', '-f', 'qcow2', img], { cwd: slot });
  out.push(describeResult(r1));
  if (!dirty) {
    const bad = checkProblem(r1);
    if (bad) problems.push(bad);
  } else {
    preRepairCorruptions = parseCheck(r1)?.corruptions ?? 0;
    const r2 = await qemuImg(['check', '-T', 'unsafe', '-r', 'all', '-f', 'qcow2', img], { cwd: slot });
    out.push(describeResult(r2));
    const r3 = await qemuImg(['check', '-T', 'unsafe', '--output=json', '-f', 'qcow2', img], { cwd: slot });
    out.push(describeResult(r3));
    const bad = checkProblem(r3);
    if (bad) problems.push(`after 'check -r all' of the dirty image: ${bad}`);
  }
  const rc = await qemuImg(['convert', '-T', 'unsafe', '-t', 'unsafe', '-f', 'qcow2', '-O', 'raw', img, rawPath], { cwd: slot });
  if (rc.code !== 0) {
    problems.push(`qemu-img convert failed: ${oneLine(rc)}`);
    return { problems, dirty, preRepairCorruptions, checkOutput: out.join('\n') };
  }
  return { problems, dirty, preRepairCorruptions, raw: rawPath, checkOutput: out.join('\n') };
}

interface CheckJson {
  corruptions?: number;
  leaks?: number;
  'check-errors'?: number;
}

function parseCheck(r: RunResult): CheckJson | undefined {
  try {
    return JSON.parse(r.stdout) as CheckJson;
  } catch {
    return undefined;
  }
}

function checkProblem(r: RunResult): string | undefined {
  const j = parseCheck(r);
  if (!j) return `qemu-img check gave no result: ${oneLine(r)}`;
  if ((j.corruptions ?? 0) !== 0 || (j['check-errors'] ?? 0) !== 0 || (r.code !== 0 && r.code !== 3)) {
    return `qemu-img check: exit ${r.code}, corruptions ${j.corruptions ?? 0}, check-errors ${j['check-errors'] ?? 0}, leaks ${j.leaks ?? 0}`;
  }
  return undefined;
}

function oneLine(r: RunResult): string {
  return `exit ${r.code}: ${(r.stderr.trim() || r.stdout.trim()).split('\n').slice(0, 4).join(' | ')}`;
}

/** Run `fn` over `items` with JOBS in flight; each call gets a slot index of its own. */
async function runPool<T>(items: T[], fn: (item: T, slot: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(JOBS, items.length) }, async (_, slot) => {
      while (next < items.length) {
        const it = items[next++]!;
        await fn(it, slot);
      }
    }),
  );
}

// ---------------------------------------------------------------------------------------------
// Choosing cut points

function planCuts(rec: RecordingIO, w: Workload, N: number): Plan[] {
  const rng = mulberry32(w.seed ^ 0x5eed);
  const ops = rec.ops;
  // Windows between flushes; a cut inside one has its writes volatile.
  const volatileCuts: number[] = [];
  // Cuts in a flush window that writes the header (or truncates): the rare, risky windows.
  const headerCuts = new Set<number>();
  let windowHasHeader = false;
  for (let c = 1; c <= N; c++) {
    const op = ops[c - 1]!;
    if (op.kind === 'flush') {
      windowHasHeader = false;
      continue;
    }
    volatileCuts.push(c);
    if (op.kind === 'truncate' || (op.kind === 'write' && op.offset < 512)) windowHasHeader = true;
    if (windowHasHeader) headerCuts.add(c);
  }
  // Windows that write a pointer (header, refcount table, L1 table) together with other writes:
  // losing the pointer while the rest lands (or the reverse) is where ordering bugs show. The cut
  // just before the window's closing flush, with the pointer write dropped.
  const first = parseLayout(rec.initial);
  const last = parseLayout(rec.replay(N));
  const pointerRegions = [first, last].flatMap((l) => [
    [0, 512],
    [l.reftableOffset, l.reftableOffset + l.reftableClusters * l.clusterSize],
    [l.l1Offset, l.l1Offset + l.l1Size * 8],
  ]);
  const isPointer = (op: RecordedOp) => op.kind === 'write' && pointerRegions.some(([a, b]) => op.offset < b! && op.offset + op.data.length > a!);
  const pointerWindows: Array<{ cut: number; drop: number }> = [];
  for (let c = 1; c <= N; c++) {
    if (ops[c - 1]!.kind !== 'flush') continue;
    const vol = rec.volatileOps(c - 1);
    const k = vol.findIndex((i) => isPointer(ops[i]!));
    if (vol.length >= 2 && k >= 0) pointerWindows.push({ cut: c - 1, drop: k });
  }
  const plans: Plan[] = [];
  const add = (cut: number, opts: ReplayOptions, label: string, torn = false) => plans.push({ cut, opts, label, torn });
  const strategiesFor = (cut: number, full: boolean) => {
    const nv = rec.volatileOps(cut).length;
    add(cut, { strategy: 'all' }, 'all');
    if (nv === 0) return;
    if (full) {
      add(cut, { strategy: 'none' }, 'none');
      if (nv >= 2) {
        add(cut, { strategy: 'reverse' }, 'reverse');
        for (let s = 1; s <= 3; s++) add(cut, { strategy: 'random', seed: cut * 7 + s }, 'random');
        const idx = nv <= 6 ? [...Array(nv).keys()] : [0, nv - 1, Math.floor(rng() * nv), Math.floor(rng() * nv)];
        for (const k of idx) add(cut, { strategy: 'drop-one', index: k }, 'drop-one');
      }
    } else {
      if (nv >= 2) {
        add(cut, { strategy: 'random', seed: cut }, 'random');
        const r = rng();
        if (r < 0.4) add(cut, { strategy: 'drop-one', index: Math.floor(rng() * nv) }, 'drop-one');
        else if (r < 0.7) add(cut, { strategy: 'reverse' }, 'reverse');
        else add(cut, { strategy: 'none' }, 'none');
      } else add(cut, { strategy: 'none' }, 'none');
    }
    if (TORN) for (let s = 1; s <= (full ? 3 : 1); s++) add(cut, { strategy: 'torn', seed: cut * 13 + s }, 'torn', true);
  };
  const spread = (list: number[], n: number): number[] => {
    if (list.length <= n) return list;
    const out: number[] = [];
    for (let k = 0; k < n; k++) out.push(list[Math.floor(((k + rng()) * list.length) / n)]!);
    return [...new Set(out)];
  };
  let cuts: number[];
  if (FULL) {
    const hc = [...headerCuts];
    cuts = [...new Set([0, ...hc.slice(0, FULL_MAX_CUTS / 3), ...spread(volatileCuts, FULL_MAX_CUTS - Math.min(hc.length, FULL_MAX_CUTS / 3)), N])];
  } else {
    const budget = w.budget ?? 40;
    const perCut = 2.6 + (TORN ? 1 : 0);
    const n = Math.max(4, Math.round(budget / perCut));
    const hc = spread([...headerCuts], Math.ceil(n / 4));
    const pw = spread(
      pointerWindows.map((p) => p.cut),
      Math.ceil(n / 4),
    );
    cuts = [...new Set([...hc, ...pw, ...spread(volatileCuts, n - hc.length - pw.length), N])];
  }
  for (const c of cuts.sort((a, b) => a - b)) strategiesFor(c, FULL);
  // Every sampled pointer window (all of them in full mode) also loses just its pointer write.
  const sampled = new Set(cuts);
  for (const p of pointerWindows) {
    if (FULL || sampled.has(p.cut)) add(p.cut, { strategy: 'drop-one', index: p.drop }, 'drop-pointer');
  }
  return plans;
}

// ---------------------------------------------------------------------------------------------
// Failure reports

function reproText(w: Workload, rec: RecordingIO, g: Guest, p: Plan, bytes: Uint8Array, v: Verdict): string {
  const vol = rec.volatileOps(p.cut);
  const f = rec.lastFlushBefore(p.cut);
  const guestLines = g.ops
    .map((o, k) => ({ o, k }))
    .filter(({ o }) => o.startOp < p.cut)
    .map(({ o, k }) => `  #${k} ${fmtGuestOp(o)}  (io ${o.startOp}..${o.endOp})`);
  const guestShown = guestLines.length > 40 ? [`  ... ${guestLines.length - 40} earlier guest ops`, ...guestLines.slice(-40)] : guestLines;
  return [
    `workload ${w.name}: qemu-img create -f qcow2 -o ${w.image.options || '(defaults)'}${w.image.backing ? ` -b base.${w.image.backing.fmt}` : ''} ${w.image.size}`,
    `power cut after io op ${p.cut} of ${rec.ops.length}; last flush io#${f}; strategy ${JSON.stringify(p.opts)} over ${vol.length} volatile ops:`,
    ...abridge(describeIoOps(rec, Math.max(0, f), p.cut, bytes)),
    `guest ops started before the cut:`,
    ...guestShown,
    `QEMU output:`,
    compactQemuOutput(v.checkOutput),
  ].join('\n');
}

/** Long io-op listings: the first and last few, plus every lost/torn write and pointer write. */
function abridge(lines: string[]): string[] {
  if (lines.length <= 30) return lines;
  const out: string[] = [];
  let skipped = 0;
  lines.forEach((l, k) => {
    if (k < 5 || k >= lines.length - 8 || /NOT on disk|partly|header|reftable|L1/.test(l)) {
      if (skipped) out.push(`  ... ${skipped} more`);
      skipped = 0;
      out.push(l);
    } else skipped++;
  });
  return out;
}

/** QEMU output with runs of per-cluster leak/repair lines folded into a count. */
function compactQemuOutput(text: string): string {
  const out: string[] = [];
  let folded = 0;
  let errors = 0;
  for (const line of text.split('\n')) {
    if (/^\s*(Leaked cluster|Repairing cluster) \d+/.test(line)) {
      folded++;
      continue;
    }
    if (/^\s*ERROR/.test(line) && ++errors > 12) {
      folded++;
      continue;
    }
    if (folded) out.push(`  (${folded} more leak/repair/error lines)`);
    folded = 0;
    out.push(`  ${line}`);
  }
  if (folded) out.push(`  (${folded} more leak/repair/error lines)`);
  return out.join('\n').slice(0, 8000);
}

function saveFailure(keepRoot: string, name: string, p: Plan, bytes: Uint8Array, slot: string, backingName: string | undefined, f: Failure): string | undefined {
  try {
    const dir = path.join(keepRoot, name, `cut${p.cut}-${p.label}${p.opts.seed !== undefined ? `-s${p.opts.seed}` : ''}${p.opts.index !== undefined ? `-i${p.opts.index}` : ''}`);
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, IMG), bytes);
    if (backingName) fs.copyFileSync(path.join(slot, backingName), path.join(dir, backingName));
    fs.writeFileSync(path.join(dir, 'repro.txt'), `${f.problems.join('\n')}\n\n${f.repro}\n`);
    return dir;
  } catch {
    return undefined;
  }
}
