/**
 * `qcowkit nbd [OPTIONS] FILE`: serve an image over NBD, with qemu-nbd 7.2's options and
 * behaviour (exit after the last client unless -t, one client at a time unless -e, SIGTERM/SIGINT
 * shut down cleanly, --fork detaches once listening).
 */
import * as fs from 'node:fs';
import type { BlockDriver } from '../core/block-driver.js';
import { QcowError } from '../core/errors.js';
import { CowOverlay } from '../nbd/cow-overlay.js';
import { loadExportBitmap, type DirtyBitmapView } from '../nbd/dirty-bitmap.js';
import { nbdFileProvider } from '../nbd/file-io.js';
import { NbdExport, type DetectZeroesMode, type DiscardMode } from '../nbd/export.js';
import { forkAndWait, isForkedChild, signalReady } from '../nbd/fork.js';
import { parseObjects, splitQemuOpts, type TlsX509Object } from '../nbd/objects.js';
import { OffsetWindow } from '../nbd/offset-window.js';
import { NbdServer, type ListenTarget } from '../nbd/server.js';
import { loadX509Server, type TlsConfig } from '../nbd/tls.js';
import { CliError, HelpRequested, UsageError, messageOf } from './errors.js';
import { getopt } from './getopt.js';
import { resolveImageArg } from './open.js';
import { openChainForCli } from './toolbox-common.js';
import type { Io } from './output.js';

export const NBD_USAGE = `Usage: qcowkit nbd [OPTIONS] FILE
Serve FILE over the Network Block Device protocol (qemu-nbd compatible).

  -p, --port=PORT           port to listen on (default '10809')
  -b, --bind=IFACE          interface to bind to (default '0.0.0.0')
  -k, --socket=PATH         path to the unix socket
  -e, --shared=NUM          device can be shared by NUM clients (default '1', 0 = no limit)
  -t, --persistent          don't exit on the last connection
  -v, --verbose             display extra debugging information
  -x, --export-name=NAME    expose export by name (default is empty string)
  -D, --description=TEXT    export a human-readable description
  -o, --offset=OFFSET       offset into the image
  -A, --allocation-depth    expose the allocation depth
  -B, --bitmap=NAME         expose a persistent dirty bitmap
  --object type,id=ID,...   define an object (secret, tls-creds-x509)
  --tls-creds=ID            use id of an earlier --object to provide TLS
  --fork                    fork off the server process and exit the parent once it is running
  --pid-file=PATH           store the server's process ID in the given file
  -f, --format=FORMAT       set image format (raw, qcow2)
  -r, --read-only           export read-only
  -s, --snapshot            redirect writes to a temporary overlay
  -l, --load-snapshot=SNAPSHOT_PARAM
                            export an internal snapshot read-only: 'snapshot.id=[ID],snapshot.name=[NAME]'
                            or '[ID_OR_NAME]'
  -n, --nocache, --cache=MODE, --aio=MODE   accepted (one I/O path)
      --discard=MODE        set discard mode (ignore, unmap)
      --detect-zeroes=MODE  set detect-zeroes mode (off, on, unmap)
      --image-opts          treat FILE as a full set of image options
`;

interface NbdArgs {
  port: number;
  bind: string;
  socket?: string;
  shared: number;
  persistent: boolean;
  verbose: boolean;
  exportName: string;
  description?: string;
  offset: number;
  allocationDepth: boolean;
  /** -B/--bitmap names, in command-line order. */
  bitmaps: string[];
  objects: string[];
  tlsCreds?: string;
  fork: boolean;
  pidFile?: string;
  format?: string;
  readOnly: boolean;
  snapshot: boolean;
  loadSnapshot?: { id?: string; name?: string };
  discard: DiscardMode;
  detectZeroes: DetectZeroesMode;
  imageOpts: boolean;
  file: string;
}

function parseIntArg(what: string, v: string, max: number): number {
  if (!/^(0x[0-9a-fA-F]+|[0-9]+)$/.test(v)) throw new CliError(`Invalid ${what} '${v}'`);
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n > max) throw new CliError(`Invalid ${what} '${v}'`);
  return n;
}

function parseLoadSnapshot(v: string): { id?: string; name?: string } {
  if (!v.startsWith('snapshot.')) return { name: v };
  const out: { id?: string; name?: string } = {};
  for (const [k, val] of splitQemuOpts(v)) {
    if (k === 'snapshot.id') out.id = val;
    else if (k === 'snapshot.name') out.name = val;
    else throw new CliError(`Failed in parsing snapshot param '${v}'`);
  }
  if (out.id === undefined && out.name === undefined) throw new CliError(`Failed in parsing snapshot param '${v}'`);
  return out;
}

export function parseNbdArgs(argv: string[]): NbdArgs {
  const { options, operands } = getopt(argv, {
    short: 'hVp:b:k:x:D:o:AB:f:rsl:nte:vLc:dT:',
    long: {
      help: false, version: false, port: true, bind: true, socket: true, 'export-name': true, description: true,
      offset: true, 'allocation-depth': false, bitmap: true, format: true, 'read-only': false, snapshot: false,
      'load-snapshot': true, nocache: false, cache: true, aio: true, discard: true, 'detect-zeroes': true,
      'image-opts': false, object: true, 'tls-creds': true, 'tls-authz': true, 'tls-hostname': true, trace: true,
      fork: false, 'pid-file': true, 'selinux-label': true, persistent: false, shared: true, verbose: false,
      list: false, connect: true, disconnect: false,
    },
  });
  const a: Omit<NbdArgs, 'file'> & { file?: string } = {
    port: 10809, bind: '0.0.0.0', shared: 1, persistent: false, verbose: false, exportName: '', offset: 0,
    allocationDepth: false, bitmaps: [], objects: [], fork: false, readOnly: false, snapshot: false, discard: 'ignore',
    detectZeroes: 'off', imageOpts: false,
  };
  for (const o of options) {
    const v = o.value ?? '';
    switch (o.name) {
      case 'h': case 'help': throw new HelpRequested();
      case 'V': case 'version': throw new VersionRequested();
      case 'p': case 'port': a.port = parseIntArg('port', v, 65535); break;
      case 'b': case 'bind': a.bind = v; break;
      case 'k': case 'socket': a.socket = v; break;
      case 'x': case 'export-name':
        if (Buffer.byteLength(v) > 4096) throw new CliError('export name too long to send to clients');
        a.exportName = v;
        break;
      case 'D': case 'description':
        if (Buffer.byteLength(v) > 4096) throw new CliError('description too long to send to clients');
        a.description = v;
        break;
      case 'o': case 'offset': a.offset = parseIntArg('offset', v, Number.MAX_SAFE_INTEGER); break;
      case 'A': case 'allocation-depth': a.allocationDepth = true; break;
      case 'B': case 'bitmap': a.bitmaps.push(v); break;
      case 'f': case 'format': a.format = v; break;
      case 'r': case 'read-only': a.readOnly = true; break;
      case 's': case 'snapshot': a.snapshot = true; break;
      case 'l': case 'load-snapshot': a.loadSnapshot = parseLoadSnapshot(v); a.readOnly = true; break;
      case 'n': case 'nocache': case 'aio': case 'T': case 'trace': break;
      case 'cache':
        if (!['none', 'writeback', 'writethrough', 'directsync', 'unsafe'].includes(v)) throw new CliError(`Invalid cache mode '${v}'`);
        break;
      case 'discard':
        if (v === 'ignore' || v === 'off') a.discard = 'ignore';
        else if (v === 'unmap' || v === 'on') a.discard = 'unmap';
        else throw new CliError(`Invalid discard mode \`${v}'`);
        break;
      case 'detect-zeroes':
        if (v !== 'off' && v !== 'on' && v !== 'unmap') throw new CliError(`Invalid detect-zeroes mode '${v}'`);
        a.detectZeroes = v;
        break;
      case 'image-opts': a.imageOpts = true; break;
      case 'object': a.objects.push(v); break;
      case 'tls-creds': a.tlsCreds = v; break;
      case 'tls-authz': throw new CliError('--tls-authz is not supported by qcowkit');
      case 'tls-hostname': throw new CliError('--tls-hostname is only valid with --list');
      case 'selinux-label': throw new CliError('SELinux support not enabled in this binary');
      case 'fork': a.fork = true; break;
      case 'pid-file': a.pidFile = v; break;
      case 't': case 'persistent': a.persistent = true; break;
      case 'e': case 'shared': a.shared = parseIntArg('shared device number', v, 0x7fffffff); break;
      case 'v': case 'verbose': a.verbose = true; break;
      case 'L': case 'list': throw new CliError('--list (NBD client mode) is not supported by qcowkit');
      case 'c': case 'connect': case 'd': case 'disconnect':
        throw new CliError('Kernel NBD devices (--connect/--disconnect) are not supported by qcowkit');
    }
  }
  if (operands.length !== 1) throw new UsageError('Invalid number of arguments');
  if (a.detectZeroes === 'unmap' && a.discard !== 'unmap') {
    throw new CliError('setting detect-zeroes to unmap is not allowed without setting discard operation to unmap');
  }
  if (a.tlsCreds !== undefined && a.socket !== undefined) throw new CliError('TLS is only supported with IPv4/IPv6');
  return { ...a, file: operands[0]! };
}

class VersionRequested extends Error {}

/** Options of `--image-opts` that name secrets: checked against --object, then left to the image layer. */
function checkImageOptSecrets(text: string, objects: Map<string, unknown>): string {
  const kept: string[] = [];
  for (const [k, v] of splitQemuOpts(text)) {
    if (k === 'key-secret' || k === 'password-secret') {
      if (!objects.has(v)) throw new CliError(`No secret with id '${v}'`);
      continue; // options of drivers qcowkit does not have (luks, ssh...): opening reports that
    }
    // qcow2's encrypt.key-secret (and backing.…encrypt.key-secret) go to the image layer, which
    // looks the secret up when it unlocks the image.
    kept.push(k === 'qom-type' ? v.replace(/,/g, ',,') : `${k}=${v.replace(/,/g, ',,')}`);
  }
  return kept.join(',');
}

/** The driver to export, and whether its format is raw by probing (QEMU then guards block 0). */
async function openDriver(a: NbdArgs, objects: ReturnType<typeof parseObjects>): Promise<{ drv: BlockDriver; probedRaw: boolean }> {
  const file = a.imageOpts ? checkImageOptSecrets(a.file, objects) : a.file;
  const formatGiven = resolveImageArg(file, { ...(a.format !== undefined ? { format: a.format } : {}), imageOpts: a.imageOpts }).format !== undefined;
  const writable = !a.readOnly && !a.snapshot && !a.loadSnapshot;
  const secrets = new Map<string, Uint8Array>();
  for (const [id, o] of objects) if (o.type === 'secret') secrets.set(id, new Uint8Array(o.value));
  let drv: BlockDriver;
  try {
    drv = await openChainForCli(file, {
      ...(a.format !== undefined ? { format: a.format } : {}),
      imageOpts: a.imageOpts,
      writable,
      needKey: true,
      ...(secrets.size ? { secrets } : {}),
      provider: nbdFileProvider,
      ...(a.loadSnapshot ? { snapshot: a.loadSnapshot } : {}),
    });
  } catch (e) {
    // qemu-nbd words it "Failed to blk_new_open 'FILE': <reason>".
    const prefix = `Could not open '${file}': `;
    if (e instanceof CliError && e.message.startsWith(prefix)) {
      throw new CliError(`Failed to blk_new_open '${a.file}': ${e.message.slice(prefix.length)}`);
    }
    throw e;
  }
  const probed = !formatGiven && drv.format === 'raw';
  if (probed && writable) {
    process.stderr.write(
      `WARNING: Image format was not specified for '${a.file}' and probing guessed raw.\n` +
        '         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n' +
        "         Specify the 'raw' format explicitly to remove the restrictions.\n",
    );
  }
  // --discard=unmap opens the image with unmap: like QEMU, what discards free is discarded in the file.
  const writer = (drv as { writer?: { passDiscard: boolean } }).writer;
  if (a.discard === 'unmap' && writer) writer.passDiscard = true;
  try {
    if (a.snapshot && !a.readOnly) drv = await CowOverlay.create(drv);
    if (a.offset) drv = new OffsetWindow(drv, a.offset);
  } catch (e) {
    await drv.close().catch(() => {});
    if (e instanceof QcowError) throw new CliError(e.message);
    throw e;
  }
  return { drv, probedRaw: probed && !a.offset && !(a.snapshot && !a.readOnly) };
}

export async function cmdNbd(argv: string[], io: Io): Promise<number> {
  let a: NbdArgs;
  try {
    a = parseNbdArgs(argv);
  } catch (e) {
    if (e instanceof HelpRequested) {
      io.out.write(NBD_USAGE);
      return 0;
    }
    if (e instanceof VersionRequested) {
      io.out.write('qcowkit nbd (qemu-nbd 7.2 compatible)\n');
      return 0;
    }
    throw e;
  }
  if (a.fork && !isForkedChild()) {
    await io.err.flush();
    return forkAndWait(argv);
  }

  let objects;
  let tls: TlsConfig | undefined;
  try {
    objects = parseObjects(a.objects);
    if (a.tlsCreds !== undefined) {
      const o = objects.get(a.tlsCreds);
      if (!o) throw new CliError(`Failed to get TLS creds: No TLS credentials with id '${a.tlsCreds}'`);
      if (o.type !== 'tls-creds-x509') throw new CliError(`Object with id '${a.tlsCreds}' is not TLS credentials`);
      tls = loadX509Server(o as TlsX509Object);
    }
  } catch (e) {
    if (e instanceof QcowError) throw new CliError(e.message);
    throw e;
  }

  const { drv, probedRaw } = await openDriver(a, objects);
  const readOnly = a.readOnly || !!a.loadSnapshot;
  const bitmaps: DirtyBitmapView[] = [];
  try {
    // qemu-nbd builds its bitmap list last -B first, and checks (and lists) them in that order.
    for (const name of [...a.bitmaps].reverse()) {
      bitmaps.push(await loadExportBitmap(drv, name, { writable: !readOnly, behindOffset: a.offset !== 0 }));
    }
  } catch (e) {
    await drv.close().catch(() => {});
    if (e instanceof QcowError) throw new CliError(e.message);
    throw e;
  }
  const exp = new NbdExport(drv, {
    name: a.exportName,
    ...(a.description !== undefined ? { description: a.description } : {}),
    readOnly,
    discard: a.discard,
    detectZeroes: a.detectZeroes,
    allocationDepth: a.allocationDepth,
    multiConn: readOnly && a.shared !== 1,
    probedRaw,
    ...(bitmaps.length ? { bitmaps } : {}),
  });
  const log = (m: string) => {
    if (a.verbose) process.stderr.write(`qcowkit: ${m}\n`);
  };
  // Clients must finish the handshake within 10 s (QCOWKIT_NBD_HANDSHAKE_TIMEOUT_MS overrides, for tests).
  const hs = Number(process.env.QCOWKIT_NBD_HANDSHAKE_TIMEOUT_MS);
  const server = new NbdServer({
    exports: [exp],
    shared: a.shared,
    persistent: a.persistent,
    ...(tls ? { tls } : {}),
    ...(Number.isFinite(hs) && hs > 0 ? { handshakeTimeoutMs: hs } : {}),
    log,
  });
  const target: ListenTarget = a.socket !== undefined ? { path: a.socket } : { host: a.bind, port: a.port };
  try {
    await server.listen(target);
  } catch (e) {
    await exp.close().catch(() => {});
    const where = a.socket !== undefined ? `unix socket '${a.socket}'` : `${a.bind}:${a.port}`;
    throw new CliError(`Failed to listen on ${where}: ${messageOf(e)}`);
  }
  if (a.pidFile !== undefined) {
    try {
      fs.writeFileSync(a.pidFile, `${process.pid}\n`);
    } catch (e) {
      await server.shutdown().catch(() => {});
      throw new CliError(`Failed to write pid file '${a.pidFile}': ${messageOf(e)}`);
    }
  }
  if (isForkedChild()) signalReady();

  const code = await new Promise<number>((resolve) => {
    let stopping = false;
    const stop = () => {
      if (stopping) return;
      stopping = true;
      for (const s of SIGNALS) process.off(s, stop);
      server.shutdown().then(
        () => resolve(0),
        (e: unknown) => {
          process.stderr.write(`qcowkit: ${messageOf(e)}\n`);
          resolve(1);
        },
      );
    };
    for (const s of SIGNALS) process.on(s, stop);
    server.on('last-client', stop);
  });
  if (a.pidFile !== undefined) fs.rmSync(a.pidFile, { force: true });
  // Nothing should be left, but never linger after a clean shutdown.
  setTimeout(() => process.exit(code), 2000).unref();
  return code;
}

const SIGNALS: NodeJS.Signals[] = ['SIGTERM', 'SIGINT', 'SIGHUP'];
