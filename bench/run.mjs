#!/usr/bin/env node
// qcowkit benchmark harness: runs qemu-img and qcowkit on the same inputs in
// the same run and prints wall times, ratios and peak RSS. See bench/README.md.
//
//   node bench/run.mjs [--size 1G] [--runs 3] [--only SUBSTR[,SUBSTR]] [--keep]
//                      [--workdir DIR] [--json] [--rss time|poll] [--no-warmup]
//                      [--timeout SEC] [--rss-target MB] [--list]
//
// Env: QEMU_IMG (default: qemu-img), QCOWKIT_BIN (default: bin/qcowkit;
// point it at qemu-img to test the harness itself).
import { execFile, execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { cpus, tmpdir, hostname, loadavg } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { CASES } from './cases.mjs';
import { Inputs, abortInputs } from './lib/inputs.mjs';
import { defaultRssMethod, killActive, measure } from './lib/measure.mjs';
import { fmtBytes, fmtMB, fmtSec, hashFile, maxOf, median, minOf, parseSize } from './lib/util.mjs';

const execFileP = promisify(execFile);
const HERE = dirname(fileURLToPath(import.meta.url));
const REPO = resolve(HERE, '..');

// ---------------------------------------------------------------- options --
function usage(code) {
  const msg = `usage: node bench/run.mjs [options]
  --size SIZE        virtual size of the half-allocated image (default 1G; e.g. 128M)
  --runs N           timed runs per tool and case, best is reported (default 3)
  --only S[,S...]    only cases whose id or name contains one of the substrings
  --keep             keep the temporary work dir (path is printed)
  --workdir DIR      use DIR for inputs/outputs (created if needed, kept, inputs reused)
  --json             print machine-readable results on stdout (table goes to stderr)
  --rss time|poll    peak-RSS method (default: time if GNU /usr/bin/time exists)
  --rss-target MB    peak-RSS target for qcowkit (default 200)
  --no-warmup        skip the untimed warm-up run of each tool
  --no-sync          don't run sync(1) (untimed) before each command
  --timeout SEC      kill a command after SEC seconds (default 600)
  --list             list the cases and exit
env: QEMU_IMG=path (default qemu-img), QCOWKIT_BIN=path (default: bin/qcowkit)`;
  (code ? process.stderr : process.stdout).write(msg + '\n');
  process.exit(code);
}

function parseArgs(argv) {
  const o = {
    size: parseSize('1G'), runs: 3, only: null, keep: false, workdir: null, json: false,
    rss: null, rssTargetMB: 200, warmup: true, timeoutS: 600, list: false, sync: true,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const eq = a.indexOf('=');
    const [k, inline] = a.startsWith('--') && eq > 0 ? [a.slice(0, eq), a.slice(eq + 1)] : [a, undefined];
    const val = () => {
      if (inline !== undefined) return inline;
      if (i + 1 >= argv.length) { process.stderr.write(`missing value for ${k}\n`); usage(2); }
      return argv[++i];
    };
    switch (k) {
      case '--size': o.size = parseSize(val()); break;
      case '--runs': o.runs = Number(val()); break;
      case '--only': o.only = val().split(',').map((s) => s.trim().toLowerCase()).filter(Boolean); break;
      case '--keep': o.keep = true; break;
      case '--workdir': o.workdir = resolve(val()); break;
      case '--json': o.json = true; break;
      case '--rss': o.rss = val(); break;
      case '--rss-target': o.rssTargetMB = Number(val()); break;
      case '--no-warmup': o.warmup = false; break;
      case '--no-sync': o.sync = false; break;
      case '--timeout': o.timeoutS = Number(val()); break;
      case '--list': o.list = true; break;
      case '-h': case '--help': usage(0); break;
      default: process.stderr.write(`unknown option: ${a}\n`); usage(2);
    }
  }
  if (!Number.isInteger(o.runs) || o.runs < 1) { process.stderr.write('--runs must be >= 1\n'); usage(2); }
  if (o.size % (64 * 1024)) { process.stderr.write('--size must be a multiple of 64K\n'); usage(2); }
  if (o.rss && !['time', 'poll'].includes(o.rss)) { process.stderr.write('--rss is time or poll\n'); usage(2); }
  if (!(o.timeoutS > 0)) { process.stderr.write('--timeout must be > 0\n'); usage(2); }
  return o;
}

// ------------------------------------------------------------------ tools --
function tools() {
  const qemu = process.env.QEMU_IMG || 'qemu-img';
  let ours;
  let oursLabel = 'qcowkit';
  if (process.env.QCOWKIT_BIN) {
    const b = process.env.QCOWKIT_BIN;
    // A JS entry point runs under this node; anything else (bin/qcowkit too) is executed directly.
    ours = /\.(m?js|cjs)$/.test(b) ? [process.execPath, b] : [b];
    if (!b.endsWith('qcowkit')) oursLabel = `qcowkit[=${basename(b)}]`;
  } else {
    // As a user runs it: the launcher's shell lines keep NODE_EXTRA_CA_CERTS out of Node's start.
    ours = [join(REPO, 'bin', 'qcowkit')];
  }
  return { qemu: [qemu], ours, oursLabel };
}

function log(msg) { process.stderr.write(msg + '\n'); }

function describeFailure(r) {
  const why = r.timedOut ? 'timed out' : r.signal ? `killed by ${r.signal}` : `exit ${r.code}`;
  const err = r.stderr.trim().split('\n').slice(-8).join('\n    ');
  return `${why}: ${r.argv.join(' ')}${err ? `\n    ${err}` : ''}`;
}

// ------------------------------------------------------------ verification --
async function verifyRun(kind, ctx, p, state, tool, r) {
  // Returns {ok, detail} for this single run, or null if nothing to check.
  if (!kind) return null;
  if (typeof kind === 'function') return kind(ctx, p, tool, r, state);
  if (kind === 'raw-output') {
    const h = await hashFile(r.outPath);
    r.outAllocated = h.allocated;
    const expect = p.src?.sha256;
    if (tool === 'qemu') {
      state.qemuHash ??= h;
      if (expect && h.sha256 !== expect) return { ok: false, detail: 'qemu-img output ≠ source contents (bench input bug?)' };
      return null;
    }
    if (h.size !== (state.qemuHash?.size ?? p.src?.size)) {
      return { ok: false, detail: `output size ${h.size} ≠ ${state.qemuHash?.size ?? p.src?.size}` };
    }
    if (state.qemuHash && h.sha256 !== state.qemuHash.sha256) return { ok: false, detail: 'output differs from qemu-img output' };
    if (expect && h.sha256 !== expect) return { ok: false, detail: 'output differs from source contents' };
    return { ok: true, detail: 'identical' };
  }
  if (kind === 'image-compare') {
    // For outputs that are images (e.g. raw → qcow2): same guest-visible contents as the source.
    if (tool === 'qemu') return null;
    try {
      await execFileP(ctx.tools.qemu[0], ['compare', '-q', p.src.path, r.outPath]);
      return { ok: true, detail: 'qemu-img compare: identical' };
    } catch (e) {
      return { ok: false, detail: `qemu-img compare: ${e.code === 1 ? 'contents differ' : (e.stderr || e.message).trim()}` };
    }
  }
  if (kind === 'stdout') {
    if (tool === 'qemu') { state.qemuStdout ??= r.stdout; return null; }
    const want = state.qemuStdout ?? state.lastQemu?.stdout;
    if (want == null) return null;
    if (r.stdout === want) return { ok: true, detail: 'stdout identical' };
    const a = want.split('\n');
    const b = r.stdout.split('\n');
    let i = 0;
    while (i < a.length && a[i] === b[i]) i++;
    return {
      ok: false,
      detail: `stdout differs at line ${i + 1}: qemu-img ${JSON.stringify(a[i] ?? '<eof>')} vs ours ${JSON.stringify(b[i] ?? '<eof>')}`,
    };
  }
  throw new Error(`unknown verify kind ${kind}`);
}

// ------------------------------------------------------------------ cases --
async function runCase(c, ctx) {
  const { opts, tools: T, dir } = ctx;
  const res = {
    id: c.id, name: c.name, required: !!c.required, target: c.target ?? null,
    qemu: { argv: null, wallNs: [], rssKiB: [], cpuS: [], outAllocated: null },
    ours: { argv: null, wallNs: [], rssKiB: [], cpuS: [], outAllocated: null },
    verify: null, error: null,
  };
  log(`\n[${c.id}] ${c.name}`);
  let p;
  try {
    p = { ...(await c.setup(ctx)) };
  } catch (e) {
    res.error = `setup failed: ${e.message}`;
    log(`  ✗ ${res.error}`);
    return res;
  }
  const argvFor = (tool) => {
    const q = { ...p, out: c.output ? join(dir, `${c.id}.${tool}.${c.output}`) : undefined };
    // A case may give the whole argv per tool (`command(p, tool)`, e.g. a client of a server it
    // started in setup and stops in `teardown(ctx, p, state)`; state.note is printed).
    if (c.command) return { argv: c.command(q, tool), out: q.out };
    const args = tool === 'qemu' ? c.qemu(q) : (c.ours ?? c.qemu)(q);
    return { argv: [...T[tool], ...args], out: q.out };
  };
  res.qemu.argv = argvFor('qemu').argv;
  res.ours.argv = argvFor('ours').argv;

  const state = {};
  const verdicts = [];
  const one = async (tool, timed) => {
    const { argv, out } = argvFor(tool);
    if (out) await rm(out, { force: true });
    // Flush dirty pages (earlier outputs, input generation) so write-back
    // from a previous run doesn't land in this one's timing.
    if (opts.sync) await execFileP('sync', []);
    const r = await measure(argv, { rssMethod: ctx.rssMethod, tmpDir: dir, timeoutMs: opts.timeoutS * 1000 });
    if (r.code !== 0 || r.signal || r.timedOut) {
      if (out) await rm(out, { force: true });
      throw new Error(`${tool === 'qemu' ? 'qemu-img' : T.oursLabel} failed (${describeFailure(r)})`);
    }
    r.outPath = out;
    const v = await verifyRun(c.verify, ctx, p, state, tool, r);
    if (tool === 'qemu') state.lastQemu = r;
    if (v) {
      verdicts.push(v);
      if (!v.ok) log(`  ✗ ${tool === 'qemu' ? 'qemu-img' : T.oursLabel}: ${v.detail}`);
    }
    if (out) await rm(out, { force: true });
    const slot = res[tool];
    if (r.outAllocated != null) slot.outAllocated = r.outAllocated;
    if (timed) {
      slot.wallNs.push(r.wallNs);
      slot.rssKiB.push(r.rssKiB);
      slot.cpuS.push(r.userS == null ? null : Math.round((r.userS + r.sysS) * 100) / 100);
    } else {
      slot.warmupRssKiB = r.rssKiB;
    }
    const w = Math.max(8, T.oursLabel.length);
    log(`  ${timed ? 'run   ' : 'warmup'} ${(tool === 'qemu' ? 'qemu-img' : T.oursLabel).padEnd(w)} ` +
      `${fmtSec(r.wallNs).padStart(8)} s  rss ${fmtMB(r.rssKiB)}`);
  };

  try {
    if (opts.warmup) {
      await one('qemu', false);
      await one('ours', false);
    }
    for (let i = 0; i < opts.runs; i++) {
      // Alternate which tool goes first so neither always inherits the other's cache state.
      const order = i % 2 === 0 ? ['qemu', 'ours'] : ['ours', 'qemu'];
      for (const t of order) await one(t, true);
    }
  } catch (e) {
    res.error = e.message;
    log(`  ✗ ${e.message}`);
  } finally {
    if (c.teardown) {
      try {
        await c.teardown(ctx, p, state);
      } catch (e) {
        res.error ??= `teardown failed: ${e.message}`;
      }
    }
    if (state.note) res.note = state.note;
  }
  if (verdicts.length) {
    const bad = verdicts.find((v) => !v.ok);
    res.verify = bad ?? verdicts[verdicts.length - 1];
  }
  return res;
}

// --------------------------------------------------------------- summary --
function summarize(res, opts) {
  const q = res.qemu;
  const o = res.ours;
  const s = {
    qemuBestS: q.wallNs.length ? Number(minOf(q.wallNs)) / 1e9 : null,
    oursBestS: o.wallNs.length ? Number(minOf(o.wallNs)) / 1e9 : null,
    qemuMedianS: q.wallNs.length ? Number(median(q.wallNs)) / 1e9 : null,
    oursMedianS: o.wallNs.length ? Number(median(o.wallNs)) / 1e9 : null,
    qemuPeakRssKiB: maxOf([...q.rssKiB, q.warmupRssKiB]),
    oursPeakRssKiB: maxOf([...o.rssKiB, o.warmupRssKiB]),
    qemuCpuS: minOf(q.cpuS.filter((x) => x != null)),
    oursCpuS: minOf(o.cpuS.filter((x) => x != null)),
  };
  // Spread of each tool's timed runs (slowest / fastest): the noise floor of this run.
  s.qemuSpread = q.wallNs.length > 1 ? Number(maxOf(q.wallNs)) / Number(minOf(q.wallNs)) : null;
  s.oursSpread = o.wallNs.length > 1 ? Number(maxOf(o.wallNs)) / Number(minOf(o.wallNs)) : null;
  s.ratio = s.qemuBestS && s.oursBestS != null ? s.oursBestS / s.qemuBestS : null;
  const t = res.target;
  s.timeTargetMet = null;
  if (t && s.oursBestS != null && !res.error) {
    if (t.ratio != null) s.timeTargetMet = s.ratio <= t.ratio;
    else if (t.seconds != null) s.timeTargetMet = s.oursBestS < t.seconds;
  }
  s.rssTargetMet = s.oursPeakRssKiB != null && !res.error ? (s.oursPeakRssKiB * 1024) / 1e6 <= opts.rssTargetMB : null;
  return s;
}

const mark = (b) => (b == null ? ' ' : b ? '✓' : '✗');

function table(results, ctx) {
  const { opts, tools: T } = ctx;
  const head = ['case', 'qemu-img s', `${T.oursLabel} s`, 'ratio', 'target', '', 'qemu-img RSS',
    `${T.oursLabel} RSS`, `≤${opts.rssTargetMB} MB`, 'output'];
  const rows = [];
  for (const r of results) {
    const s = r.summary;
    const tgt = !r.target ? '—' : r.target.ratio != null ? `≤${r.target.ratio.toFixed(2)}×` : `<${r.target.seconds} s`;
    rows.push([
      (r.required ? '' : '(extra) ') + r.name,
      s.qemuBestS == null ? '—' : fmtSec(BigInt(Math.round(s.qemuBestS * 1e9))),
      s.oursBestS == null ? '—' : fmtSec(BigInt(Math.round(s.oursBestS * 1e9))),
      s.ratio == null ? '—' : `${s.ratio.toFixed(2)}×`,
      tgt,
      r.error ? '✗' : mark(s.timeTargetMet),
      fmtMB(s.qemuPeakRssKiB),
      fmtMB(s.oursPeakRssKiB),
      r.error ? '✗' : mark(s.rssTargetMet),
      r.error ? `✗ FAILED` : !r.verify ? '—' : r.verify.ok ? `✓ ${r.verify.detail}` : `✗ ${r.verify.detail}`,
    ]);
  }
  const width = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const right = new Set([1, 2, 3, 6, 7]);
  const fmtRow = (row) => row.map((c, i) => (i === row.length - 1 ? c : right.has(i) ? c.padStart(width[i]) : c.padEnd(width[i]))).join(' │ ');
  const lines = [fmtRow(head), width.map((w, i) => '─'.repeat(i === width.length - 1 ? Math.max(w, 6) : w)).join('─┼─'), ...rows.map(fmtRow)];
  return lines.join('\n');
}

// ------------------------------------------------------------------- main --
async function envInfo(ctx) {
  const { tools: T, opts } = ctx;
  let qemuVersion = null;
  try {
    qemuVersion = (await execFileP(T.qemu[0], ['--version'])).stdout.split('\n')[0];
  } catch { /* reported by the runs */ }
  let fsType = null;
  try {
    fsType = execFileSync('stat', ['-f', '-c', '%T', ctx.dir], { encoding: 'utf8' }).trim();
  } catch { /* optional */ }
  return {
    date: new Date().toISOString(),
    host: hostname(),
    cpu: cpus()[0]?.model ?? null,
    cpus: cpus().length,
    node: process.version,
    qemuImg: qemuVersion,
    qemuCmd: T.qemu,
    oursCmd: T.ours,
    size: opts.size,
    runs: opts.runs,
    warmup: opts.warmup,
    sync: opts.sync,
    rssMethod: ctx.rssMethod,
    loadavgStart: loadavg(),
    workdir: ctx.dir,
    fsType,
  };
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  let cases = CASES;
  if (opts.only) {
    cases = CASES.filter((c) => opts.only.some((s) => c.id.toLowerCase().includes(s) || c.name.toLowerCase().includes(s)));
  }
  if (opts.list) {
    for (const c of CASES) process.stdout.write(`${c.id.padEnd(26)} ${c.required ? '' : '(extra) '}${c.name}\n`);
    return 0;
  }
  if (!cases.length) { log(`no case matches --only ${opts.only.join(',')} (see --list)`); return 2; }

  const T = tools();
  if (!process.env.QCOWKIT_BIN && !existsSync(join(REPO, 'dist', 'cli', 'main.js'))) {
    log('dist/cli/main.js is missing: run `npm run build` (or use `npm run bench`)');
    return 1;
  }

  let dir;
  let removeDir = false;
  if (opts.workdir) {
    dir = opts.workdir;
    await mkdir(dir, { recursive: true });
  } else {
    dir = await mkdtemp(join(tmpdir(), 'qcowkit-bench-'));
    removeDir = !opts.keep;
  }
  const rssMethod = opts.rss ?? defaultRssMethod();
  const ctx = { opts, tools: T, dir, rssMethod, inputs: new Inputs({ dir, size: opts.size, qemu: T.qemu[0], log }) };

  const cleanup = async () => {
    if (removeDir) await rm(dir, { recursive: true, force: true });
    else log(`\nwork dir kept: ${dir}`);
  };
  let interrupted = false;
  const onSignal = (sig) => {
    if (interrupted) return;
    interrupted = true;
    log(`\n${sig}: cleaning up`);
    killActive();
    abortInputs();
    cleanup().finally(() => process.exit(130));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  let results = [];
  let meta;
  try {
    meta = await envInfo(ctx);
    log(`qcowkit bench — ${meta.qemuImg ?? 'qemu-img ?'}, node ${meta.node}, ${meta.cpus}× ${meta.cpu}`);
    log(`size ${fmtBytes(opts.size)}, ${opts.runs} run(s)${opts.warmup ? ' + warm-up' : ''}, best of runs, ` +
      `RSS via ${rssMethod === 'time' ? 'GNU time (ru_maxrss)' : '/proc VmHWM polling (lower bound)'}, work dir ${dir} (${meta.fsType ?? '?'})`);
    log(`qemu-img: ${T.qemu.join(' ')}\n${T.oursLabel}: ${T.ours.join(' ')}`);
    for (const c of cases) {
      if (interrupted) break;
      const r = await runCase(c, ctx);
      r.summary = summarize(r, opts);
      results.push(r);
    }
  } finally {
    if (!interrupted) await cleanup();
  }

  if (interrupted) return new Promise(() => {}); // onSignal exits once cleanup is done
  meta.loadavgEnd = loadavg();

  const out = table(results, ctx);
  const notes = [
    `size ${fmtBytes(opts.size)} (half allocated: ¼ random, ¼ log text, ½ holes); 64 TiB image empty.`,
    `times: best wall-clock seconds of ${opts.runs} run(s); ratio = ${T.oursLabel} / qemu-img (lower is better); ` +
      `RSS: peak over all runs, MB = 10^6 bytes${rssMethod === 'poll' ? ' (polled: lower bound)' : ''}.`,
  ];
  const alloc = results.filter((r) => r.qemu.outAllocated != null && r.ours.outAllocated != null);
  for (const r of alloc) {
    notes.push(`${r.id}: output allocated on disk — qemu-img ${fmtBytes(r.qemu.outAllocated)}, ${T.oursLabel} ${fmtBytes(r.ours.outAllocated)}`);
  }
  const cpu = results.filter((r) => r.summary.qemuCpuS != null && r.summary.oursCpuS != null);
  if (cpu.length) {
    notes.push(`CPU user+sys s, best run (qemu-img / ${T.oursLabel}) — less load-sensitive than wall time: ` +
      cpu.map((r) => `${r.id} ${r.summary.qemuCpuS.toFixed(2)} / ${r.summary.oursCpuS.toFixed(2)}`).join(', '));
  }
  const noisy = results.filter((r) => r.summary.qemuSpread > 1.1 && r.summary.qemuBestS > 0.05);
  const busy = Math.max(meta.loadavgStart[0], meta.loadavgEnd[0]) > meta.cpus * 0.5;
  if (noisy.length || busy) {
    notes.push(`⚠ noisy machine: load average ${meta.loadavgStart[0].toFixed(1)} → ${meta.loadavgEnd[0].toFixed(1)} on ${meta.cpus} CPUs` +
      (noisy.length ? `; qemu-img's own runs varied ${noisy.map((r) => `${((r.summary.qemuSpread - 1) * 100).toFixed(0)}% (${r.id})`).join(', ')}` : '') +
      (noisy.length ? ' — ratios within that margin are not significant' : ' — timings are unreliable') +
      '; rerun on an idle machine / with more --runs.');
  }
  for (const r of results) if (r.note) notes.push(r.note);
  for (const r of results) if (r.error) notes.push(`✗ ${r.id}: ${r.error.replace(/\n/g, '\n    ')}`);
  const human = `\n${out}\n\n${notes.map((n) => `  ${n}`).join('\n')}\n`;

  const failed = results.some((r) => r.error);
  const mismatch = results.some((r) => r.verify && !r.verify.ok);
  if (opts.json) {
    process.stderr.write(human);
    const json = {
      meta,
      rssTargetMB: opts.rssTargetMB,
      cases: results.map((r) => ({
        id: r.id,
        name: r.name,
        required: r.required,
        target: r.target,
        error: r.error,
        verify: r.verify,
        note: r.note ?? null,
        qemu: { argv: r.qemu.argv, wallS: r.qemu.wallNs.map((n) => Number(n) / 1e9), rssKiB: r.qemu.rssKiB, cpuS: r.qemu.cpuS, outAllocated: r.qemu.outAllocated },
        ours: { argv: r.ours.argv, wallS: r.ours.wallNs.map((n) => Number(n) / 1e9), rssKiB: r.ours.rssKiB, cpuS: r.ours.cpuS, outAllocated: r.ours.outAllocated },
        ...r.summary,
      })),
      failed,
      mismatch,
    };
    process.stdout.write(JSON.stringify(json, null, 2) + '\n');
  } else {
    process.stdout.write(human);
  }
  if (failed) return 1;
  if (mismatch) return 3;
  return 0;
}

main().then(
  (code) => { process.exitCode = code; },
  (e) => { log(`bench: ${e.stack || e.message}`); process.exitCode = 1; },
);
