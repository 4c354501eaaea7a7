// Run one command and measure wall time + peak RSS of the child.
//
// Wall time: process.hrtime.bigint() around spawn() → 'exit' (no shell).
// Peak RSS, two methods:
//   'time' — wrap the command in GNU `/usr/bin/time -f '%M %U %S' -o FILE`;
//            exact ru_maxrss from wait4(), plus user/sys CPU. Adds ~1 ms of
//            exec overhead, identical for both tools.
//   'poll' — spawn the command directly and read VmHWM from
//            /proc/<pid>/status every ~20 ms; VmHWM is monotonic, so the last
//            value read is a lower bound of the peak (exact for anything that
//            lives longer than a couple of polls). No CPU times.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';

export const GNU_TIME = '/usr/bin/time';

let seq = 0;
const active = new Set();

/** Kill (by process group) the commands currently being measured — for SIGINT cleanup. */
export function killActive() {
  for (const pid of active) {
    try { process.kill(-pid, 'SIGKILL'); } catch { /* gone */ }
  }
}

export function defaultRssMethod() {
  if (!existsSync(GNU_TIME)) return 'poll';
  // Make sure it is GNU time (supports -f/-o and reports %M), not another one.
  const r = spawnSync(GNU_TIME, ['-f', '%M', '--', 'true'], { encoding: 'utf8' });
  if (r.status === 0 && /^\d+\s*$/m.test(r.stderr ?? '')) return 'time';
  return 'poll';
}

function readHwmKiB(pid) {
  try {
    const s = readFileSync(`/proc/${pid}/status`, 'utf8');
    const m = /^VmHWM:\s+(\d+)\s+kB/m.exec(s);
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

const MAX_CAPTURE = 32 << 20;

/**
 * @param {string[]} cmd   argv; cmd[0] is the executable
 * @param {{rssMethod:'time'|'poll', tmpDir:string, timeoutMs?:number, env?:object, cwd?:string}} opts
 * @returns {Promise<{argv:string[], code:number|null, signal:string|null, timedOut:boolean,
 *   wallNs:bigint, rssKiB:number|null, userS:number|null, sysS:number|null,
 *   stdout:string, stderr:string, stdoutTruncated:boolean}>}
 */
export async function measure(cmd, opts) {
  const { rssMethod, tmpDir, timeoutMs = 0, env, cwd } = opts;
  let file = cmd[0];
  let args = cmd.slice(1);
  let timeFile = null;
  if (rssMethod === 'time') {
    timeFile = join(tmpDir, `.time-${process.pid}-${seq++}`);
    args = ['-f', '%M %U %S', '-o', timeFile, '--', file, ...args];
    file = GNU_TIME;
  }

  const out = [];
  const err = [];
  let outLen = 0;
  let errLen = 0;
  let truncated = false;
  let hwm = null;
  let timedOut = false;

  const t0 = process.hrtime.bigint();
  const child = spawn(file, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: env ?? process.env,
    cwd,
    detached: true, // own process group, so a timeout kills the whole tree
  });
  if (child.pid) active.add(child.pid);
  let t1 = null;
  let poller = null;
  if (rssMethod === 'poll' && child.pid) {
    const poll = () => {
      const v = readHwmKiB(child.pid);
      if (v != null) hwm = v;
    };
    poll();
    poller = setInterval(poll, 20);
  }
  child.stdout.on('data', (c) => {
    if (outLen < MAX_CAPTURE) { out.push(c); outLen += c.length; } else truncated = true;
  });
  child.stderr.on('data', (c) => {
    if (errLen < MAX_CAPTURE) { err.push(c); errLen += c.length; }
  });
  let killer = null;
  if (timeoutMs > 0) {
    killer = setTimeout(() => {
      timedOut = true;
      try { process.kill(-child.pid, 'SIGKILL'); } catch { /* already gone */ }
    }, timeoutMs);
  }

  const { code, signal } = await new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('exit', () => {
      t1 = process.hrtime.bigint();
      if (poller) {
        clearInterval(poller);
        poller = null;
      }
    });
    // 'close' comes after 'exit' once stdio is drained too.
    child.on('close', (c, s) => resolve({ code: c, signal: s }));
  }).finally(() => {
    active.delete(child.pid);
    if (poller) clearInterval(poller);
    if (killer) clearTimeout(killer);
  });
  if (t1 == null) t1 = process.hrtime.bigint();

  let rssKiB = hwm;
  let userS = null;
  let sysS = null;
  let exitCode = code;
  if (timeFile) {
    try {
      const txt = await readFile(timeFile, 'utf8');
      // GNU time may prepend "Command exited with non-zero status N" /
      // "Command terminated by signal N"; the format line is last.
      const lines = txt.trim().split('\n');
      const m = /^(\d+) ([\d.]+) ([\d.]+)$/.exec(lines[lines.length - 1].trim());
      if (m) {
        rssKiB = Number(m[1]);
        userS = Number(m[2]);
        sysS = Number(m[3]);
      }
    } catch { /* time did not write it (e.g. exec failure) */ }
    await rm(timeFile, { force: true });
    // GNU time exits 127/126 if it could not run the command.
  }

  return {
    argv: cmd,
    code: exitCode,
    signal,
    timedOut,
    wallNs: t1 - t0,
    rssKiB,
    userS,
    sysS,
    stdout: Buffer.concat(out).toString('utf8'),
    stderr: Buffer.concat(err).toString('utf8'),
    stdoutTruncated: truncated,
  };
}
