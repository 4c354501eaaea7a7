/**
 * Power-cut workloads for the toolbox operations — snapshot create (-c), delete (-d), apply (-a),
 * commit, rebase (safe mode, onto another backing file), amend (compat 1.1 → 0.10 and back,
 * lazy_refcounts on/off, refcount_bits) — and their runner.
 *
 * A fixture is built with qemu-img/qemu-io; the operation then runs through the library on
 * RecordingIOs (one per file it writes, interleaved in one global order). Afterwards the files are
 * rebuilt as a disk might hold them after a power cut at every flush-bounded point of that order
 * (the volatile writes of each file applied, dropped, reordered or one of them lost; identical
 * rebuilds checked once; sampled down to a budget, keeping every window's plain cut), and each:
 *  - opens read-write in QEMU (`qemu-io -c write`; QEMU repairs a dirty image on that open);
 *  - passes `qemu-img check` (leaks allowed; a dirty image is first repaired with `check -r all`);
 *  - shows the guest content the operation promises to keep: the active view (through the
 *    backing chain) unchanged, or for `snapshot -a` the old view or the snapshot's; every snapshot
 *    still listed holds its old content (a new one: the active content when it was taken); for
 *    commit every sector of the base holds its old content or the top's.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { openImage } from '../../src/block/open.js';
import { registerNodeCodecs } from '../../src/codecs/node.js';
import type { BlockDriver } from '../../src/core/block-driver.js';
import type { ByteIO, IOProvider } from '../../src/core/byte-io.js';
import { amendQcow2, type AmendOptions } from '../../src/formats/qcow2/amend.js';
import type { Qcow2Driver } from '../../src/formats/qcow2/driver.js';
import { SnapshotOps } from '../../src/formats/qcow2/snapshot.js';
import { MemoryIO, MemoryProvider } from '../../src/io/memory.js';
import { mulberry32, RecordingIO, type ReplayOptions } from '../../src/io/recording.js';
import { commit } from '../../src/ops/commit.js';
import { rebase } from '../../src/ops/rebase.js';
import { create, img, io } from '../helpers/build.js';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { describeResult, must, qemuImg, qemuIo, type RunResult } from '../helpers/proc.js';
import { describeIoOps, withoutRepairReport } from './harness.js';

const K = 1024;
const M = 1024 * K;
const VM = '/vm';
const JOBS = Math.max(1, Number(process.env.QCOWKIT_CRASH_JOBS ?? 2));
const FULL = process.env.QCOWKIT_CRASH_FULL === '1';

// ---------------------------------------------------------------------------------------------
// Workload description

export interface ToolboxWorkload {
  name: string;
  /** Build the fixture files in `dir` with qemu-img / qemu-io. */
  build(dir: string): Promise<void>;
  /** Files the operation writes (recorded); every other fixture file stays as built. */
  recorded: string[];
  /** The operation, through the library. */
  run(ctx: RunCtx): Promise<void>;
  /** Files whose guest view (through their backing chain) must never change. */
  unchanged?: string[];
  /** snapshot -a: the file's view is its old one or the (old) content of snapshot `id`. */
  becomes?: { file: string; snapshotId: string };
  /** Snapshot expectations: ids that must stay listed; `added`: a new snapshot may appear (holding the old active view). */
  snapshots?: { file: string; keep: string[]; mayDrop?: string[]; added?: boolean };
  /** commit: every 512-byte sector of `file`'s view is its old content or `from`'s old view. */
  mixOf?: { file: string; from: string };
  /** After the whole operation: `qemu-img info` format-specific fields (e.g. compat, refcount-bits). */
  finalInfo?: { file: string; data?: Record<string, unknown>; top?: Record<string, unknown> };
  /** Checked rebuilt images (default 30; every flush window's plain cut is kept regardless). */
  budget?: number;
  /** Facts about the recording (return a problem, or undefined). */
  after?(rec: Map<string, RecordingIO>): string | undefined;
}

export interface RunCtx {
  /**
   * Open `file` (library). `live` files are served from their recordings, every other one from a
   * read-only copy of the fixture (so a backing chain never sees the operation's writes).
   */
  open(file: string, opts?: { readOnly?: boolean; live?: string[]; noBacking?: boolean }): Promise<BlockDriver>;
}

// ---------------------------------------------------------------------------------------------
// One order over several recordings

interface GlobalEvent {
  file: string;
  /** Index in that file's recording. */
  op: number;
  kind: 'write' | 'flush' | 'truncate';
}

/** A ByteIO passing everything to a RecordingIO and noting each op in the global order. */
class Logged implements ByteIO {
  readonly readOnly = false;
  constructor(
    private readonly rec: RecordingIO,
    private readonly file: string,
    private readonly log: GlobalEvent[],
  ) {}
  get name(): string {
    return this.rec.name;
  }
  size(): Promise<number> {
    return this.rec.size();
  }
  read(buf: Uint8Array, offset: number): Promise<number> {
    return this.rec.read(buf, offset);
  }
  async write(buf: Uint8Array, offset: number): Promise<void> {
    await this.rec.write(buf, offset);
    this.log.push({ file: this.file, op: this.rec.mark() - 1, kind: 'write' });
  }
  async flush(): Promise<void> {
    await this.rec.flush();
    this.log.push({ file: this.file, op: this.rec.mark() - 1, kind: 'flush' });
  }
  async truncate(size: number): Promise<void> {
    await this.rec.truncate(size);
    this.log.push({ file: this.file, op: this.rec.mark() - 1, kind: 'truncate' });
  }
  async close(): Promise<void> {}
}

// ---------------------------------------------------------------------------------------------
// Runner

export interface ToolboxCrashResult {
  name: string;
  events: number;
  flushes: number;
  windows: number;
  checked: number;
  distinct: number;
  dirty: number;
  failures: string[];
  summary: string;
}

interface Expected {
  /** Guest view of each fixture file (raw, through its chain). */
  views: Map<string, Uint8Array>;
  /** file → snapshot id → content. */
  snaps: Map<string, Map<string, Uint8Array>>;
}

interface Plan {
  /** Global cut: events [0, g) were issued. */
  g: number;
  opts: ReplayOptions;
  label: string;
  /** Every flush window's plain cut is always checked. */
  must: boolean;
}

let codecsReady = false;

export async function runToolboxCrash(w: ToolboxWorkload): Promise<ToolboxCrashResult> {
  const t0 = performance.now();
  if (!codecsReady) {
    registerNodeCodecs();
    codecsReady = true;
  }
  const root = makeTmpDir(`qk-crash-tb-${w.name}-`);
  try {
    return await runIn(root, w, t0);
  } finally {
    removeTmpDir(root);
  }
}

async function rawView(dir: string, file: string, extra: string[] = []): Promise<Uint8Array> {
  const out = path.join(dir, `.view-${process.pid}-${Math.random().toString(36).slice(2)}.raw`);
  try {
    await must(qemuImg(['convert', '-U', ...extra, '-O', 'raw', file, out], { cwd: dir }));
    return new Uint8Array(fs.readFileSync(out));
  } finally {
    fs.rmSync(out, { force: true });
  }
}

async function snapshotIds(dir: string, file: string): Promise<string[]> {
  const r = await must(qemuImg(['info', '-U', '--output=json', file], { cwd: dir }));
  const j = JSON.parse(r.stdout) as { snapshots?: Array<{ id: string }> };
  return (j.snapshots ?? []).map((s) => s.id);
}

async function expectations(dir: string, w: ToolboxWorkload): Promise<Expected> {
  const views = new Map<string, Uint8Array>();
  const snaps = new Map<string, Map<string, Uint8Array>>();
  for (const f of fs.readdirSync(dir).filter((x) => x.endsWith('.qcow2'))) {
    views.set(f, await rawView(dir, f));
    if (w.snapshots?.file === f || w.becomes?.file === f) {
      const m = new Map<string, Uint8Array>();
      for (const id of await snapshotIds(dir, f)) m.set(id, await rawView(dir, f, ['-l', `snapshot.id=${id}`]));
      snaps.set(f, m);
    }
  }
  return { views, snaps };
}

async function runIn(root: string, w: ToolboxWorkload, t0: number): Promise<ToolboxCrashResult> {
  const made = path.join(root, 'made');
  fs.mkdirSync(made);
  await w.build(made);
  const fixture = new Map<string, Uint8Array>();
  for (const f of fs.readdirSync(made)) fixture.set(f, new Uint8Array(fs.readFileSync(path.join(made, f))));
  const exp = await expectations(made, w);

  // The operation, recorded.
  const log: GlobalEvent[] = [];
  const recs = new Map<string, RecordingIO>();
  for (const f of w.recorded) recs.set(f, RecordingIO.fromBytes(`${VM}/${f}`, fixture.get(f)!));
  const ctx: RunCtx = {
    async open(file, opts = {}) {
      const readOnly = opts.readOnly ?? false;
      const live = new Set(opts.live ?? (readOnly ? [] : [file]));
      const mem = new MemoryProvider();
      for (const [f, bytes] of fixture) mem.files.set(`${VM}/${f}`, new MemoryIO(`${VM}/${f}`, bytes));
      const provider: IOProvider = {
        open: async (name, o): Promise<ByteIO> => {
          const f = path.basename(name);
          if (live.has(f) && recs.has(f)) return new Logged(recs.get(f)!, f, log);
          return mem.open(name, o);
        },
        resolve: (base, name) => mem.resolve(base, name),
      };
      return openImage(`${VM}/${file}`, { io: provider, readOnly, ...(opts.noBacking ? { noBacking: true } : {}) });
    },
  };
  await w.run(ctx);
  const setup: string[] = [];
  const extra = w.after?.(recs);
  if (extra) setup.push(extra);

  // Cut points: before every flush (each file's volatile writes then vary), and the end.
  const counts = (g: number) => {
    const c = new Map<string, number>();
    for (const f of w.recorded) c.set(f, 0);
    for (let i = 0; i < g; i++) {
      const e = log[i]!;
      c.set(e.file, e.op + 1);
    }
    return c;
  };
  const rng = mulberry32(0x70017 ^ w.name.length);
  const plans: Plan[] = [];
  const windows: number[] = [];
  for (let g = 0; g <= log.length; g++) {
    if (g < log.length && log[g]!.kind !== 'flush') continue;
    if (g > 0 && log[g - 1]!.kind === 'flush' && g < log.length) continue; // empty window
    windows.push(g);
    const c = counts(g);
    const nv = Math.max(0, ...w.recorded.map((f) => recs.get(f)!.volatileOps(c.get(f)!).length));
    plans.push({ g, opts: { strategy: 'all' }, label: 'all', must: true });
    if (!nv) continue;
    plans.push({ g, opts: { strategy: 'none' }, label: 'none', must: false });
    if (nv >= 2) {
      plans.push({ g, opts: { strategy: 'reverse' }, label: 'reverse', must: false });
      for (let s = 1; s <= 3; s++) plans.push({ g, opts: { strategy: 'random', seed: g * 7 + s }, label: 'random', must: false });
      const idx = nv <= 8 ? [...Array(nv).keys()] : [0, nv - 1, ...Array.from({ length: 4 }, () => Math.floor(rng() * nv))];
      for (const k of new Set(idx)) plans.push({ g, opts: { strategy: 'drop-one', index: k }, label: 'drop-one', must: false });
    }
  }

  // Rebuild every plan once to find the distinct images, then choose what to check.
  const replayers = new Map([...recs].map(([f, r]) => [f, r.replayer()] as const));
  const rebuild = (p: Plan): Map<string, Uint8Array> => {
    const c = counts(p.g);
    const out = new Map<string, Uint8Array>();
    for (const f of w.recorded) {
      const rec = recs.get(f)!;
      const cut = c.get(f)!;
      const nv = rec.volatileOps(cut).length;
      // drop-one past this file's volatile list: keep them all.
      const opts = p.opts.strategy === 'drop-one' && (p.opts.index ?? 0) >= nv ? { strategy: 'all' as const } : p.opts;
      out.set(f, replayers.get(f)!.at(cut, { ...opts, seed: (opts.seed ?? 1) + f.length }));
    }
    return out;
  };
  const hashOf = (m: Map<string, Uint8Array>) => {
    const h = createHash('sha1');
    for (const f of w.recorded) h.update(f).update(m.get(f)!);
    return h.digest('hex');
  };
  const byHash = new Map<string, Plan>();
  const mustHashes = new Set<string>();
  for (const p of [...plans].sort((a, b) => a.g - b.g)) {
    const hsh = hashOf(rebuild(p));
    // The final state is checked as such (it must show the operation done).
    if (!byHash.has(hsh) || (p.g === log.length && p.opts.strategy === 'all')) byHash.set(hsh, p);
    if (p.must) mustHashes.add(hsh);
  }
  const budget = FULL ? Infinity : w.budget ?? 30;
  const chosen = [...mustHashes].map((h) => byHash.get(h)!);
  const others = [...byHash].filter(([h]) => !mustHashes.has(h)).map(([, p]) => p);
  for (let i = others.length - 1; i > 0; i--) {
    const j = Math.floor(rng() * (i + 1));
    [others[i], others[j]] = [others[j]!, others[i]!];
  }
  chosen.push(...others.slice(0, Math.max(0, budget - chosen.length)));
  chosen.sort((a, b) => a.g - b.g);

  // Check them.
  const slots = Array.from({ length: JOBS }, (_, i) => {
    const d = path.join(root, `slot${i}`);
    fs.mkdirSync(d);
    return d;
  });
  const failures: string[] = [];
  let dirty = 0;
  let next = 0;
  await Promise.all(
    slots.map(async (slot) => {
      while (next < chosen.length) {
        const p = chosen[next++]!;
        const c = counts(p.g);
        const files = new Map<string, Uint8Array>();
        for (const f of w.recorded) {
          const rec = recs.get(f)!;
          const nv = rec.volatileOps(c.get(f)!).length;
          const opts = p.opts.strategy === 'drop-one' && (p.opts.index ?? 0) >= nv ? { strategy: 'all' as const } : p.opts;
          files.set(f, recs.get(f)!.replay(c.get(f)!, { ...opts, seed: (opts.seed ?? 1) + f.length }));
        }
        const v = await examineCut(slot, fixture, files, w, exp, p.g === log.length && p.opts.strategy === 'all');
        if (v.dirty) dirty++;
        if (v.problems.length) {
          const vol = w.recorded
            .map((f) => {
              const cut = c.get(f)!;
              const from = Math.max(0, recs.get(f)!.lastFlushBefore(cut));
              return `${f} (cut ${cut}/${recs.get(f)!.ops.length}):\n${describeIoOps(recs.get(f)!, from, cut, files.get(f)).slice(-24).join('\n')}`;
            })
            .join('\n');
          failures.push(`cut ${p.g}/${log.length} ${JSON.stringify(p.opts)}: ${v.problems.join('; ')}\n${vol}\n${v.output.slice(0, 3000)}`);
        }
      }
    }),
  );
  const all = [...setup, ...failures];
  const flushes = log.filter((e) => e.kind === 'flush').length;
  const summary =
    `[crash] ${w.name}: ${log.length} io ops (${flushes} flushes, ${windows.length} windows), ${byHash.size} distinct rebuilds, ` +
    `checked ${chosen.length} (${dirty} dirty, repaired by QEMU); failures ${all.length}; ${((performance.now() - t0) / 1000).toFixed(1)} s`;
  return { name: w.name, events: log.length, flushes, windows: windows.length, checked: chosen.length, distinct: byHash.size, dirty, failures: all, summary };
}

// ---------------------------------------------------------------------------------------------
// Examining one rebuilt set of files

interface CheckJson {
  corruptions?: number;
  leaks?: number;
  'check-errors'?: number;
}

function checkProblem(r: RunResult): string | undefined {
  let j: CheckJson;
  try {
    j = JSON.parse(r.stdout) as CheckJson;
  } catch {
    return `qemu-img check gave no result: ${oneLine(r)}`;
  }
  if ((j.corruptions ?? 0) !== 0 || (j['check-errors'] ?? 0) !== 0 || (r.code !== 0 && r.code !== 3)) {
    return `qemu-img check: exit ${r.code}, corruptions ${j.corruptions ?? 0}, check-errors ${j['check-errors'] ?? 0}, leaks ${j.leaks ?? 0}`;
  }
  return undefined;
}

function oneLine(r: RunResult): string {
  return `exit ${r.code}: ${(r.stderr.trim() || r.stdout.trim()).split('\n').slice(0, 4).join(' | ')}`;
}

function isDirty(b: Uint8Array): boolean {
  const dv = new DataView(b.buffer, b.byteOffset, b.length);
  return b.length >= 80 && dv.getUint32(4) >= 3 && (dv.getBigUint64(72) & 1n) === 1n;
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length));
}

function firstDiff(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

async function examineCut(
  slot: string,
  fixture: Map<string, Uint8Array>,
  files: Map<string, Uint8Array>,
  w: ToolboxWorkload,
  exp: Expected,
  /** The state after the whole operation: it must have done what it is for. */
  final: boolean,
): Promise<{ problems: string[]; dirty: boolean; output: string }> {
  for (const f of fs.readdirSync(slot)) fs.rmSync(path.join(slot, f), { force: true });
  for (const [f, b] of fixture) fs.writeFileSync(path.join(slot, f), files.get(f) ?? b);
  const problems: string[] = [];
  const out: string[] = [];
  let anyDirty = false;
  for (const f of w.recorded) {
    if (!f.endsWith('.qcow2')) continue;
    const bytes = files.get(f)!;
    const dirty = isDirty(bytes);
    anyDirty ||= dirty;
    // QEMU opens it read-write (repairing a dirty image) and writes, on a copy next to it.
    const rw = `rw-${f}`;
    fs.writeFileSync(path.join(slot, rw), bytes);
    const r0 = await qemuIo(['-f', 'qcow2', '-t', 'unsafe', '-c', 'write -P 0x55 0 512', rw], { cwd: slot });
    fs.rmSync(path.join(slot, rw), { force: true });
    out.push(describeResult(r0));
    const stderr = dirty ? withoutRepairReport(r0.stderr) : r0.stderr;
    if (r0.code !== 0 || !/wrote 512\/512/.test(r0.stdout) || /\S/.test(stderr)) problems.push(`${f}: QEMU cannot open it read-write and write: ${oneLine(r0)}`);
    const r1 = await qemuImg(['check', '-T', 'unsafe', '--output=json', '-f', 'qcow2', f], { cwd: slot });
    out.push(describeResult(r1));
    if (!dirty) {
      const bad = checkProblem(r1);
      if (bad) problems.push(`${f}: ${bad}`);
    } else {
      const r2 = await qemuImg(['check', '-T', 'unsafe', '-r', 'all', '-f', 'qcow2', f], { cwd: slot });
      out.push(describeResult(r2));
      const r3 = await qemuImg(['check', '-T', 'unsafe', '--output=json', '-f', 'qcow2', f], { cwd: slot });
      out.push(describeResult(r3));
      const bad = checkProblem(r3);
      if (bad) problems.push(`${f}: after 'check -r all' of the dirty image: ${bad}`);
    }
  }
  if (problems.length) return { problems, dirty: anyDirty, output: out.join('\n') };

  const view = async (f: string, extra: string[] = []) => {
    try {
      return await rawView(slot, f, extra);
    } catch (e) {
      problems.push(`${f}: cannot read ${extra.join(' ') || 'the active view'}: ${(e as Error).message.split('\n').slice(0, 4).join(' | ')}`);
      return undefined;
    }
  };
  for (const f of w.unchanged ?? []) {
    const v = await view(f);
    if (v && !equal(v, exp.views.get(f)!)) problems.push(`${f}: guest view changed (first difference at byte ${firstDiff(v, exp.views.get(f)!)})`);
  }
  if (w.becomes) {
    const f = w.becomes.file;
    const v = await view(f);
    const target = exp.snaps.get(f)!.get(w.becomes.snapshotId)!;
    if (v && final && !equal(v, target)) problems.push(`${f}: after the operation the guest view is not snapshot ${w.becomes.snapshotId}'s`);
    else if (v && !equal(v, exp.views.get(f)!) && !equal(v, target)) {
      problems.push(`${f}: guest view is neither the old one nor snapshot ${w.becomes.snapshotId}'s (differs from them at ${firstDiff(v, exp.views.get(f)!)} / ${firstDiff(v, target)}; size ${v.length})`);
    }
  }
  if (w.mixOf) {
    const v = await view(w.mixOf.file);
    const a = exp.views.get(w.mixOf.file)!;
    const b = exp.views.get(w.mixOf.from)!;
    if (v && final && !equal(v, b)) problems.push(`${w.mixOf.file}: after the operation it does not hold ${w.mixOf.from}'s content`);
    else if (v) {
      if (v.length !== a.length && v.length !== b.length) problems.push(`${w.mixOf.file}: size ${v.length}, expected ${a.length} or ${b.length}`);
      else {
        for (let s = 0; s < v.length; s += 512) {
          const sec = v.subarray(s, s + 512);
          const pad = (x: Uint8Array) => {
            const o = new Uint8Array(sec.length);
            o.set(x.subarray(s, Math.min(x.length, s + sec.length)));
            return o;
          };
          if (!equal(sec, pad(a)) && !equal(sec, pad(b))) {
            problems.push(`${w.mixOf.file}: sector at ${s} is neither its old content nor ${w.mixOf.from}'s`);
            break;
          }
        }
      }
    }
  }
  if (w.snapshots) {
    const { file, keep, mayDrop = [], added } = w.snapshots;
    const old = exp.snaps.get(file)!;
    let ids: string[] = [];
    try {
      ids = await snapshotIds(slot, file);
    } catch (e) {
      problems.push(`${file}: cannot list snapshots: ${(e as Error).message.split('\n')[0]}`);
    }
    for (const id of keep) if (!ids.includes(id)) problems.push(`${file}: snapshot ${id} is gone`);
    if (final) {
      for (const id of mayDrop) if (ids.includes(id)) problems.push(`${file}: after the operation snapshot ${id} is still there`);
      if (added && ids.filter((x) => !old.has(x)).length !== 1) problems.push(`${file}: after the operation there is no new snapshot`);
    }
    for (const id of ids) {
      if (!old.has(id) && !added) {
        problems.push(`${file}: unexpected snapshot ${id}`);
        continue;
      }
      if (!old.has(id) && !keep.includes(id) && !mayDrop.includes(id) && ids.filter((x) => !old.has(x)).length > 1) {
        problems.push(`${file}: more than one new snapshot`);
      }
      const v = await view(file, ['-l', `snapshot.id=${id}`]);
      const want = old.get(id) ?? exp.views.get(file)!;
      if (v && !equal(v, want)) problems.push(`${file}: snapshot ${id} content differs (at byte ${firstDiff(v, want)})`);
    }
  }
  if (final && w.finalInfo) {
    const r = await qemuImg(['info', '-U', '--output=json', w.finalInfo.file], { cwd: slot });
    const info = JSON.parse(r.stdout) as Record<string, unknown> & { 'format-specific': { data: Record<string, unknown> } };
    const wants: Array<[Record<string, unknown>, Record<string, unknown> | undefined]> = [
      [info['format-specific'].data, w.finalInfo.data],
      [info, w.finalInfo.top],
    ];
    for (const [have, want] of wants) {
      for (const [key, v] of Object.entries(want ?? {})) {
        if (have[key] !== v) problems.push(`${w.finalInfo.file}: after the operation ${key} is ${JSON.stringify(have[key])}, expected ${JSON.stringify(v)}`);
      }
    }
  }
  return { problems, dirty: anyDirty, output: out.join('\n') };
}

// ---------------------------------------------------------------------------------------------
// Fixtures

/** 4 MiB image: data, zero clusters, a compressed cluster, snapshots s1 and s2 between writes. */
async function withSnapshots(dir: string, opts: Record<string, string | number | boolean>, file = 'img.qcow2'): Promise<void> {
  const v3 = opts.compat !== '0.10';
  await create(dir, file, 4 * M, opts);
  await io(dir, file, ['write -q -P 0x11 0 1M', 'write -q -c -P 0x12 1M 64k', ...(v3 ? ['write -q -z 1536k 128k'] : []), 'write -q -P 0x13 3M 100k']);
  await img(dir, ['snapshot', '-c', 's1', file]);
  await io(dir, file, ['write -q -P 0x21 512k 256k', 'write -q -P 0x22 2M 64k', ...(v3 ? ['write -q -z 0 64k'] : [])]);
  await img(dir, ['snapshot', '-c', 's2', file]);
  await io(dir, file, ['write -q -P 0x31 64k 64k', 'write -q -P 0x32 2560k 320k', 'write -q -P 0x33 100k 3k']);
}

/** base.qcow2 full of data, top.qcow2 over it with data and zero clusters. */
async function chain(dir: string): Promise<void> {
  await create(dir, 'base.qcow2', 4 * M);
  await io(dir, 'base.qcow2', ['write -q -P 0x41 0 4M', 'write -q -z 3M 256k']);
  await create(dir, 'top.qcow2', undefined, {}, { backing: 'base.qcow2' });
  await io(dir, 'top.qcow2', ['write -q -P 0x51 100k 300k', 'write -q -z 1M 128k', 'write -q -P 0x52 2M 1M', 'write -q -P 0x53 3900k 4k']);
}

const snap = async (ctx: RunCtx, fn: (ops: SnapshotOps) => Promise<unknown>) => {
  const drv = (await ctx.open('img.qcow2')) as Qcow2Driver;
  await fn(new SnapshotOps(drv, drv.writer!));
  await drv.close();
};

function snapshotCreate(compat: '1.1' | '0.10'): ToolboxWorkload {
  return {
    name: `snapshot-create-${compat}`,
    build: (d) => withSnapshots(d, { compat }),
    recorded: ['img.qcow2'],
    run: (ctx) => snap(ctx, (o) => o.create({ name: 'new' })),
    unchanged: ['img.qcow2'],
    snapshots: { file: 'img.qcow2', keep: ['1', '2'], added: true },
  };
}

function snapshotDelete(compat: '1.1' | '0.10'): ToolboxWorkload {
  return {
    name: `snapshot-delete-${compat}`,
    build: (d) => withSnapshots(d, { compat }),
    recorded: ['img.qcow2'],
    run: (ctx) => snap(ctx, (o) => o.delete('2')),
    unchanged: ['img.qcow2'],
    snapshots: { file: 'img.qcow2', keep: ['1'], mayDrop: ['2'] },
  };
}

function snapshotApply(compat: '1.1' | '0.10'): ToolboxWorkload {
  return {
    name: `snapshot-apply-${compat}`,
    build: (d) => withSnapshots(d, { compat }),
    recorded: ['img.qcow2'],
    run: (ctx) => snap(ctx, (o) => o.apply('1')),
    becomes: { file: 'img.qcow2', snapshotId: '1' },
    snapshots: { file: 'img.qcow2', keep: ['1', '2'] },
  };
}

const commitWorkload: ToolboxWorkload = {
  name: 'commit',
  build: chain,
  recorded: ['top.qcow2', 'base.qcow2'],
  async run(ctx) {
    // As the CLI: the top with its chain (the backing file read-only, never read for committed
    // ranges), the base opened read-write on its own.
    const top = await ctx.open('top.qcow2', { live: ['top.qcow2'] });
    const base = await ctx.open('base.qcow2', { live: ['base.qcow2'] });
    await commit(top, base, { baseDepth: 1 });
    await base.close();
    await top.close();
  },
  unchanged: ['top.qcow2'],
  mixOf: { file: 'base.qcow2', from: 'top.qcow2' },
};

const rebaseWorkload: ToolboxWorkload = {
  name: 'rebase-safe',
  async build(d) {
    await chain(d);
    await create(d, 'new.qcow2', 4 * M);
    await io(d, 'new.qcow2', ['write -q -P 0x41 0 1M', 'write -q -P 0x61 1M 1M', 'write -q -P 0x41 3M 512k']);
  },
  recorded: ['top.qcow2'],
  async run(ctx) {
    const top = await ctx.open('top.qcow2');
    const nb = await ctx.open('new.qcow2', { readOnly: true });
    await rebase(top, { backingName: 'new.qcow2', backingFormat: 'qcow2', newBacking: nb });
    await nb.close();
    await top.close();
  },
  unchanged: ['top.qcow2'],
  finalInfo: { file: 'top.qcow2', top: { 'backing-filename': 'new.qcow2' } },
};

function amendWorkload(name: string, build: (d: string) => Promise<void>, o: AmendOptions, finalData: Record<string, unknown>, snapshots = true): ToolboxWorkload {
  return {
    finalInfo: { file: 'img.qcow2', data: finalData },
    name,
    build,
    recorded: ['img.qcow2'],
    async run(ctx) {
      const drv = (await ctx.open('img.qcow2')) as Qcow2Driver;
      await amendQcow2(drv, o);
      await drv.close();
    },
    unchanged: ['img.qcow2'],
    ...(snapshots ? { snapshots: { file: 'img.qcow2', keep: ['1', '2'] } } : {}),
  };
}

/** v3 overlay with zero clusters over data, plus snapshots: the downgrade must allocate zeros. */
async function overlayWithSnapshots(d: string): Promise<void> {
  await create(d, 'base.qcow2', 4 * M);
  await io(d, 'base.qcow2', ['write -q -P 0x41 0 4M']);
  await create(d, 'img.qcow2', undefined, {}, { backing: 'base.qcow2' });
  await io(d, 'img.qcow2', ['write -q -z 0 128k', 'write -q -P 0x51 1M 64k', 'write -q -z 2M 64k']);
  await img(d, ['snapshot', '-c', 's1', 'img.qcow2']);
  await io(d, 'img.qcow2', ['write -q -z 1M 64k', 'write -q -P 0x52 3M 64k']);
  await img(d, ['snapshot', '-c', 's2', 'img.qcow2']);
  await io(d, 'img.qcow2', ['write -q -z 3M 64k', 'write -q -P 0x53 2M 4k']);
}

export const TOOLBOX: ToolboxWorkload[] = [
  snapshotCreate('1.1'),
  snapshotCreate('0.10'),
  snapshotDelete('1.1'),
  snapshotDelete('0.10'),
  snapshotApply('1.1'),
  snapshotApply('0.10'),
  commitWorkload,
  rebaseWorkload,
  amendWorkload('amend-downgrade', (d) => withSnapshots(d, {}), { compat: '0.10' }, { compat: '0.10' }),
  amendWorkload('amend-downgrade-overlay', overlayWithSnapshots, { compat: '0.10' }, { compat: '0.10' }),
  amendWorkload('amend-upgrade', (d) => withSnapshots(d, { compat: '0.10' }), { compat: '1.1' }, { compat: '1.1' }),
  amendWorkload('amend-lazy-on', (d) => withSnapshots(d, {}), { lazyRefcounts: true }, { 'lazy-refcounts': true }),
  amendWorkload('amend-lazy-off', (d) => withSnapshots(d, { lazy_refcounts: true }), { lazyRefcounts: false }, { 'lazy-refcounts': false }),
  amendWorkload('amend-refcount-bits-8', (d) => withSnapshots(d, { cluster_size: 4096 }), { refcountBits: 8 }, { 'refcount-bits': 8 }),
  amendWorkload('amend-refcount-bits-64', (d) => withSnapshots(d, { refcount_bits: 8, lazy_refcounts: true }), { refcountBits: 64 }, { 'refcount-bits': 64 }),
];
