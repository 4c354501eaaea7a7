// Bench cases for the NBD server issue (qcowkit nbd vs qemu-nbd). Appended to CASES by cases.mjs.
//
// Both servers serve the same half-allocated qcow2 read-only over a Unix socket, started once per
// case with the same options (`-f qcow2 -r -t -k SOCK`; qemu-nbd's defaults: cache=writeback,
// aio=threads, one client at a time) and left running for the warm-up and every timed run; the
// timed command is the client. The run's wall time includes the client's start-up (the same for
// both servers); the random-read client also reports IOPS over its I/O phase, printed as a note.
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = dirname(fileURLToPath(import.meta.url));
const RANDREAD = join(HERE, 'lib', 'nbd-randread.mjs');
const RANDREAD_ARGS = ['--count', '40000', '--qd', '16', '--bs', '4096', '--seed', '1'];

/** Servers still running: killed if the bench exits early (SIGINT, a crash). */
const live = new Set();
process.on('exit', () => {
  for (const p of live) p.kill('SIGKILL');
});

/** Start one server; resolves once its pid file is written (it listens by then). */
async function startServer(argv, pidFile) {
  await rm(pidFile, { force: true });
  const proc = spawn(argv[0], [...argv.slice(1)], { stdio: ['ignore', 'ignore', 'pipe'] });
  live.add(proc);
  proc.on('exit', () => live.delete(proc));
  let err = '';
  proc.stderr.on('data', (d) => (err += d));
  let exited = false;
  const exit = new Promise((r) => proc.on('exit', () => { exited = true; r(); }));
  const deadline = Date.now() + 20000;
  while (!existsSync(pidFile) || readFileSync(pidFile, 'utf8').trim() === '') {
    if (exited || Date.now() > deadline) {
      proc.kill('SIGKILL');
      throw new Error(`${argv.join(' ')} did not start: ${err.trim()}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return { proc, exit, stderr: () => err };
}

/** utime+stime of a live process, in seconds (Linux /proc). */
function cpuSeconds(pid) {
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const rest = f.slice(f.lastIndexOf(')') + 2).split(' ');
    return (Number(rest[11]) + Number(rest[12])) / 100;
  } catch {
    return null;
  }
}

/** Both servers on the bench's qcow2, sockets in the work dir. */
async function serveBoth(ctx, id) {
  const src = await ctx.inputs.get('qcow2');
  const s = {};
  for (const tool of ['qemu', 'ours']) {
    const sock = join(ctx.dir, `${id}.${tool}.sock`);
    const pid = join(ctx.dir, `${id}.${tool}.pid`);
    const opts = ['-f', 'qcow2', '-r', '-t', '-k', sock, '--pid-file', pid, src.path];
    const argv = tool === 'qemu' ? ['qemu-nbd', ...opts] : [...ctx.tools.ours, 'nbd', ...opts];
    try {
      s[tool] = { sock, pidFile: pid, ...(await startServer(argv, pid)) };
    } catch (e) {
      for (const t of Object.values(s)) t.proc.kill('SIGKILL');
      throw e;
    }
  }
  return { src, servers: s, uri: (tool) => `nbd+unix:///?socket=${s[tool].sock}` };
}

async function stopBoth(p) {
  const cpu = {};
  for (const tool of ['qemu', 'ours']) {
    const srv = p.servers[tool];
    cpu[tool] = cpuSeconds(srv.proc.pid);
    srv.proc.kill('SIGTERM');
    const t = setTimeout(() => srv.proc.kill('SIGKILL'), 10000);
    await srv.exit;
    clearTimeout(t);
    await rm(srv.sock, { force: true });
    await rm(srv.pidFile, { force: true });
  }
  return cpu;
}

const label = { qemu: 'qemu-nbd', ours: 'qcowkit nbd' };

export const NBD_CASES = [
  {
    id: 'nbd-nbdcopy-null',
    name: 'nbd: nbdcopy export → null (sequential read)',
    required: true,
    setup: (ctx) => serveBoth(ctx, 'nbd-nbdcopy-null'),
    // Full argv (the client), for each server.
    command: (p, tool) => ['nbdcopy', p.uri(tool), 'null:'],
    verify: async (ctx, p, tool, r, state) => {
      // Once per server: the export's contents must be the image's (nbdcopy to a hash).
      if (state[tool]) return null;
      state[tool] = true;
      const sum = await new Promise((resolve, reject) => {
        const c = spawn('sh', ['-c', `nbdcopy '${p.uri(tool)}' - | sha256sum`], { stdio: ['ignore', 'pipe', 'inherit'] });
        let out = '';
        c.stdout.on('data', (d) => (out += d));
        c.on('error', reject);
        c.on('exit', (code) => (code === 0 ? resolve(out.split(' ')[0]) : reject(new Error(`nbdcopy | sha256sum: exit ${code}`))));
      });
      const ok = sum === p.src.sha256;
      return { ok, detail: ok ? 'export = image contents (sha256)' : `${label[tool]} export contents differ from the image` };
    },
    teardown: async (ctx, p, state) => {
      const cpu = await stopBoth(p);
      if (cpu.qemu != null && cpu.ours != null) {
        state.note = `nbd-nbdcopy-null: server CPU user+sys over all runs — qemu-nbd ${cpu.qemu.toFixed(2)} s, qcowkit nbd ${cpu.ours.toFixed(2)} s ` +
          '(nbd cases: times, CPU and RSS columns are the client\'s; the servers are long-running)';
      }
    },
    target: { ratio: 1.0 },
  },
  {
    id: 'nbd-randread',
    name: 'nbd: 4 KiB random reads, 16 in flight (IOPS)',
    required: true,
    setup: (ctx) => serveBoth(ctx, 'nbd-randread'),
    command: (p, tool) => [process.execPath, RANDREAD, '--socket', p.servers[tool].sock, ...RANDREAD_ARGS],
    // Same requests → same checksum of the data read from either server.
    verify: async (ctx, p, tool, r, state) => {
      const iops = Number(/iops=(\d+)/.exec(r.stderr)?.[1]);
      if (Number.isFinite(iops)) state[`${tool}Iops`] = Math.max(state[`${tool}Iops`] ?? 0, iops);
      if (tool === 'qemu') {
        state.want ??= r.stdout;
        return null;
      }
      if (state.want == null) return null;
      return r.stdout === state.want ? { ok: true, detail: 'same data as from qemu-nbd (checksum)' } : { ok: false, detail: `checksum differs: ${r.stdout.trim()} vs ${state.want.trim()}` };
    },
    teardown: async (ctx, p, state) => {
      const cpu = await stopBoth(p);
      const q = state.qemuIops;
      const o = state.oursIops;
      if (q && o) {
        state.note = `nbd-randread: best IOPS (client-measured, I/O phase) — qemu-nbd ${q}, qcowkit nbd ${o}: ours/qemu = ${(o / q).toFixed(2)}× (higher is better, target ≥ 1.00×)` +
          (cpu.qemu != null && cpu.ours != null ? `; server CPU user+sys over all runs ${cpu.qemu.toFixed(2)} s / ${cpu.ours.toFixed(2)} s` : '');
      }
    },
    target: { ratio: 1.0 },
  },
];
