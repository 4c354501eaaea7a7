/**
 * Running qemu-img, qemu-io and our CLI with execFile (argument arrays, no shell).
 * Every call resolves (never rejects) with exit code, signal, output and elapsed time.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CLI = path.join(REPO_ROOT, 'bin', 'qcowkit');
export const DIST = path.join(REPO_ROOT, 'dist');

export interface RunResult {
  /** Exit code; null when killed by a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** Wall-clock milliseconds. */
  ms: number;
  /** Killed because it ran longer than the timeout. */
  timedOut: boolean;
  /** The command line, for messages. */
  cmdline: string;
}

export interface RunOptions {
  cwd?: string;
  /** Kill after this many ms (default 120 s). */
  timeout?: number;
  env?: NodeJS.ProcessEnv;
}

/** Same locale for every tool so messages and number formats are comparable. */
const BASE_ENV: NodeJS.ProcessEnv = { ...process.env, LC_ALL: 'C', LANG: 'C' };

export function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const timeout = opts.timeout ?? 120_000;
  const start = performance.now();
  const cmdline = [cmd, ...args].map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : JSON.stringify(a))).join(' ');
  return new Promise((resolve) => {
    const child = execFile(
      cmd,
      args,
      {
        cwd: opts.cwd,
        env: opts.env ?? BASE_ENV,
        encoding: 'utf8',
        maxBuffer: 256 * 1024 * 1024,
        timeout,
        killSignal: 'SIGKILL',
      },
      (err, stdout, stderr) => {
        const ms = performance.now() - start;
        let code: number | null = 0;
        let signal: NodeJS.Signals | null = null;
        if (err) {
          const e = err as NodeJS.ErrnoException & { code?: unknown; signal?: NodeJS.Signals | null; killed?: boolean };
          code = typeof e.code === 'number' ? e.code : null;
          signal = e.signal ?? null;
          if (code === null && signal === null) {
            // spawn failure (ENOENT etc.)
            stderr = `${stderr}${e.message}\n`;
            code = 127;
          }
        }
        const timedOut = signal === 'SIGKILL' && ms >= timeout - 50;
        resolve({ code, signal, stdout, stderr, ms, timedOut, cmdline });
      },
    );
    // Nothing reads stdin interactively (qemu-io without -c would wait for commands).
    child.stdin?.end();
  });
}

export function qemuImg(args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return run('qemu-img', args, opts);
}

export function qemuIo(args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return run('qemu-io', args, opts);
}

/** Our CLI, `bin/qcowkit`, executed as a user runs it (its shell lines start `node` from PATH). */
export function qk(args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return run(CLI, args, opts);
}

const CPU_REPORT = path.join(path.dirname(fileURLToPath(import.meta.url)), 'cpu-report.cjs');
let cpuSeq = 0;

/** Our CLI, also measuring the CPU time (user + system, ms) it used; undefined if it was killed. */
export async function qkCpu(args: string[], opts: RunOptions = {}): Promise<RunResult & { cpuMs?: number }> {
  const report = path.join(os.tmpdir(), `qk-cpu-${process.pid}-${cpuSeq++}.txt`);
  const env = { ...(opts.env ?? BASE_ENV), QK_CPU_REPORT: report };
  const r = await run(process.execPath, ['--require', CPU_REPORT, CLI, ...args], { ...opts, env });
  let cpuMs: number | undefined;
  try {
    cpuMs = Number(fs.readFileSync(report, 'utf8'));
    fs.rmSync(report, { force: true });
  } catch {
    cpuMs = undefined;
  }
  return { ...r, cpuMs, cmdline: `${process.execPath} ${CLI} ${args.join(' ')}` };
}

export function describeResult(r: RunResult & { cpuMs?: number }): string {
  const cpu = r.cpuMs !== undefined ? ` cpu_ms=${Math.round(r.cpuMs)}` : '';
  return `$ ${r.cmdline}\n  exit=${r.code} signal=${r.signal} ms=${Math.round(r.ms)}${cpu}\n  stdout: ${clip(r.stdout)}\n  stderr: ${clip(r.stderr)}`;
}

function clip(s: string, n = 2000): string {
  return s.length > n ? `${s.slice(0, n)}... (${s.length} chars)` : s;
}

/** Run and throw (with full output) unless the command exits 0. Used to build fixtures. */
export async function must(p: Promise<RunResult>): Promise<RunResult> {
  const r = await p;
  if (r.code !== 0) throw new Error(`fixture command failed:\n${describeResult(r)}`);
  return r;
}

/** qemu-io exits 0 even after some failed commands in older versions; treat "failed" lines as errors too. */
export async function mustIo(args: string[], opts: RunOptions = {}): Promise<RunResult | undefined> {
  if (!args.includes('-c')) return undefined; // no commands: nothing to do (and don't go interactive)
  const r = await qemuIo(args, opts);
  if (r.code !== 0 || /failed|error/i.test(r.stdout) || /\S/.test(r.stderr)) {
    throw new Error(`qemu-io failed:\n${describeResult(r)}`);
  }
  return r;
}

/** Run several thunks with at most `limit` in flight. */
export async function pool<T>(limit: number, thunks: Array<() => Promise<T>>): Promise<T[]> {
  const out: T[] = new Array(thunks.length);
  let next = 0;
  async function worker(): Promise<void> {
    while (next < thunks.length) {
      const i = next++;
      out[i] = await thunks[i]!();
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, thunks.length) }, worker));
  return out;
}
