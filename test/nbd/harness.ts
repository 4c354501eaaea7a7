/**
 * Running NBD servers from tests: our `bin/qcowkit nbd` or `qemu-nbd`, as child processes on a
 * free TCP port or a Unix socket, ready once the pid file appears (so no probe connection is made),
 * stopped with a signal and their exit status reported.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { CLI, run, type RunResult } from '../helpers/proc.js';

export interface Served {
  proc: ChildProcess;
  /** TCP port (when not on a Unix socket). */
  port?: number;
  /** Unix socket path. */
  socket?: string;
  /** stderr so far. */
  stderr(): string;
  /** `nbd://127.0.0.1:PORT/NAME` or `nbd+unix:///NAME?socket=PATH`. */
  uri(name?: string): string;
  /** Resolves with the exit status (does not send anything). */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Send a signal (default SIGTERM) and wait for the exit. */
  stop(signal?: NodeJS.Signals): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

let counter = 0;
/** Servers still running, so a failed test cannot leave one behind (see stopAll). */
const running = new Set<ChildProcess>();

/** Kill every server this test file started and has not stopped (call from afterAll). */
export async function stopAll(): Promise<void> {
  await Promise.all(
    [...running].map(
      (p) =>
        new Promise<void>((resolve) => {
          if (p.exitCode !== null || p.signalCode !== null) return resolve();
          p.once('exit', () => resolve());
          p.kill('SIGKILL');
        }),
    ),
  );
  running.clear();
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

export interface StartOptions {
  dir: string;
  /** Listen on a Unix socket in `dir` instead of TCP. */
  unix?: boolean;
  /** Run qemu-nbd instead of qcowkit (the oracle). */
  qemu?: boolean;
  /** Extra environment. */
  env?: NodeJS.ProcessEnv;
}

/** Start a server with `args` (image last); resolves once it listens. */
export async function startServer(args: string[], o: StartOptions): Promise<Served> {
  const id = `${process.pid}-${++counter}`;
  const pidFile = path.join(o.dir, `nbd-${id}.pid`);
  const listen: string[] = [];
  let port: number | undefined;
  let socket: string | undefined;
  if (o.unix) {
    socket = path.join(o.dir, `nbd-${id}.sock`);
    listen.push('-k', socket);
  } else {
    port = await freePort();
    listen.push('-b', '127.0.0.1', '-p', String(port));
  }
  const all = [...listen, '--pid-file', pidFile, ...args];
  const proc = o.qemu
    ? spawn('qemu-nbd', all, { cwd: o.dir, stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...o.env } })
    : spawn(process.execPath, [CLI, 'nbd', ...all], { cwd: o.dir, stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...o.env } });
  running.add(proc);
  proc.on('exit', () => running.delete(proc));
  let err = '';
  proc.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    proc.on('exit', (code, signal) => resolve({ code, signal })),
  );
  let dead = false;
  void exited.then(() => (dead = true));
  const deadline = Date.now() + 15_000;
  while (!fs.existsSync(pidFile) || fs.readFileSync(pidFile, 'utf8').trim() === '') {
    if (dead) throw new Error(`server exited before listening: ${(await exited).code}\n${err}`);
    if (Date.now() > deadline) {
      proc.kill('SIGKILL');
      throw new Error(`server did not start listening within 15 s\n${err}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    proc,
    port,
    socket,
    stderr: () => err,
    uri: (name = '') => (socket ? `nbd+unix:///${name}?socket=${socket}` : `nbd://127.0.0.1:${port}/${name}`),
    exited,
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (!dead) proc.kill(signal);
      const timer = setTimeout(() => proc.kill('SIGKILL'), 15_000);
      const r = await exited;
      clearTimeout(timer);
      return r;
    },
  };
}

export function nbdinfo(args: string[], opts: { timeout?: number } = {}): Promise<RunResult> {
  return run('nbdinfo', args, { timeout: opts.timeout ?? 30_000 });
}

export function nbdcopy(args: string[]): Promise<RunResult> {
  return run('nbdcopy', args, { timeout: 60_000 });
}

/** Make output from two servers comparable: their URIs/ports differ. */
export function normalize(text: string, served: Served): string {
  let t = text;
  if (served.port !== undefined) t = t.split(String(served.port)).join('PORT');
  if (served.socket !== undefined) t = t.split(served.socket).join('SOCKET');
  return t;
}
