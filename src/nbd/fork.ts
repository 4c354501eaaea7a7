/**
 * `qemu-nbd --fork`: the parent starts a detached copy of itself and exits (0) once the copy
 * reports that it is listening, or (1) with the copy's error messages if it fails first. The
 * copy reports through file descriptor 3.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';

const ENV_FLAG = 'QCOWKIT_NBD_FORKED';

/** True in the detached copy. */
export function isForkedChild(): boolean {
  return process.env[ENV_FLAG] === '1';
}

/** Start the detached copy with the same arguments; resolves with the parent's exit code. */
export function forkAndWait(argv: string[]): Promise<number> {
  return new Promise((resolve) => {
    const script = process.argv[1]!;
    const child = spawn(process.execPath, [...process.execArgv, script, ...argv], {
      detached: true,
      stdio: ['ignore', 'ignore', 'pipe', 'pipe'],
      env: { ...process.env, [ENV_FLAG]: '1' },
    });
    let ready = false;
    let settled = false;
    const stderr = child.stdio[2]!;
    const status = child.stdio[3]!;
    const finish = (code: number) => {
      if (settled) return;
      settled = true;
      stderr.removeAllListeners('data');
      stderr.destroy();
      status.destroy();
      child.unref();
      resolve(code);
    };
    stderr.on('data', (d: Buffer) => {
      if (!ready) process.stderr.write(d);
    });
    status.on('data', (d: Buffer) => {
      if (d.toString().includes('ready')) {
        ready = true;
        finish(0);
      }
    });
    status.on('error', () => {});
    stderr.on('error', () => {});
    child.on('error', (e) => {
      process.stderr.write(`qcowkit: Failed to fork: ${e.message}\n`);
      finish(1);
    });
    child.on('exit', (code) => {
      // Let the last error lines through before reporting the failure.
      setImmediate(() => finish(ready ? 0 : code || 1));
    });
  });
}

/** In the copy: tell the parent we are listening, then stop writing to its stderr. */
export function signalReady(): void {
  try {
    fs.writeSync(3, 'ready\n');
    fs.closeSync(3);
  } catch {
    // parent gone
  }
  // The parent exits now; writes to the inherited stderr pipe would fail, so drop them.
  process.stderr.on('error', () => {});
  process.stderr.write = (() => true) as typeof process.stderr.write;
}
