/**
 * qcowkit's command line: qemu-img 7.2 syntax, output and exit codes.
 * `bin/qcowkit` calls `main(process.argv.slice(2))` and exits with the code it returns.
 */
import { setCodecs, type Codecs } from '../codecs/registry.js';
import { QcowError } from '../core/errors.js';
import { setQuickCallsOnThisThread } from '../io/fs-calls.js';
import { nativeZeroRuns } from '../io/sparse.js';
import { setZeroRunScan } from '../ops/bytes.js';
import { CliError, HelpRequested, UsageError, messageOf } from './errors.js';
import { getopt } from './getopt.js';
import { helpText, versionText } from './help.js';
import { processIo, type Io } from './output.js';

/** A command: `argv[0]` is the command name; returns the exit code; throws CliError/UsageError. */
export type Command = (argv: string[], io: Io) => Promise<number>;

/**
 * Implemented commands, loaded on first use: a run loads only its own command's code (faster
 * start), and a command module that fails to load cannot break the others.
 */
export const COMMANDS: Record<string, () => Promise<Command>> = {
  check: async () => (await import('./check-command.js')).runCheck,
  compare: async () => (await import('./compare.js')).cmdCompare,
  convert: async () => (await import('./convert.js')).cmdConvert,
  info: async () => (await import('./info.js')).cmdInfo,
  map: async () => (await import('./map.js')).cmdMap,
  nbd: async () => (await import('./nbd-command.js')).cmdNbd,
  amend: async () => (await import('./amend-command.js')).cmdAmend,
  bitmap: async () => (await import('./bitmap-command.js')).cmdBitmap,
  commit: async () => (await import('./commit-command.js')).cmdCommit,
  dd: async () => (await import('./dd-command.js')).cmdDd,
  measure: async () => (await import('./measure-command.js')).cmdMeasure,
  rebase: async () => (await import('./rebase-command.js')).cmdRebase,
  resize: async () => (await import('./resize-command.js')).cmdResize,
  snapshot: async () => (await import('./snapshot-command.js')).cmdSnapshot,
  create: async () => (await import('./create-command.js')).runCreate,
};

/** qemu-img commands qcowkit does not implement yet. */
const PLANNED = ['bench'];

const debug = () => process.env.QCOWKIT_DEBUG === '1';

async function run(argv: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(['qcowkit', ...argv], {
    short: '+:hVT:',
    long: { help: false, version: false, trace: true },
    stopAtOperand: true,
  });
  for (const o of options) {
    if (o.name === 'h' || o.name === 'help') throw new HelpRequested();
    if (o.name === 'V' || o.name === 'version') {
      io.out.write(versionText());
      return 0;
    }
    // -T/--trace: QEMU tracing has no counterpart here
  }
  if (operands.length === 0) throw new UsageError('Not enough arguments');
  const name = operands[0]!;
  const load = COMMANDS[name];
  if (!load) {
    if (PLANNED.includes(name)) throw new CliError(`Command '${name}' is not supported by qcowkit yet`);
    throw new UsageError(`Command not found: ${name}`);
  }
  // Quick file-system calls on this thread (see fs-calls.ts), except for the NBD server, which
  // must not hold its clients up behind one of them.
  setQuickCallsOnThisThread(name !== 'nbd');
  return (await load())(operands, io);
}

/**
 * The Node codecs (node:zlib, zstd-napi), loaded on first use: most runs never decompress, and
 * loading node:zlib is a noticeable part of a short command's start-up. Once loaded, the real
 * codecs replace these stand-ins in the registry.
 */
let nodeCodecs: Promise<Codecs> | undefined;
function loadCodecs(): Promise<Codecs> {
  nodeCodecs ??= import('../codecs/node.js').then((m) => {
    m.registerNodeCodecs();
    return m.nodeCodecs;
  });
  return nodeCodecs;
}
const lazyCodecs: Codecs = {
  inflateRaw: async (input, outLen, out) => (await loadCodecs()).inflateRaw(input, outLen, out),
  deflateRaw: async (input, limit) => (await loadCodecs()).deflateRaw!(input, limit),
  zstdDecompress: async (input, outLen) => (await loadCodecs()).zstdDecompress(input, outLen),
  zstdCompress: async (input, limit) => (await loadCodecs()).zstdCompress!(input, limit),
};

export async function main(argv: string[], io: Io = processIo()): Promise<number> {
  if (!nodeCodecs) setCodecs(lazyCodecs);
  setZeroRunScan(nativeZeroRuns);
  // The crypto primitives (node:crypto, also a few ms to load) serve encrypted images only, and
  // those are opened (or created) only with a key, which comes from an `--object secret,...`.
  if (argv.some((a) => a.includes('secret'))) (await import('../codecs/crypto-node.js')).registerNodeCrypto();
  let code: number;
  try {
    code = await run(argv, io);
  } catch (e) {
    code = report(e, io);
  }
  await io.out.flush();
  await io.err.flush();
  return code;
}

/** Print a failure the way qemu-img does and choose the exit code. */
function report(e: unknown, io: Io): number {
  if (e instanceof HelpRequested) {
    io.out.write(helpText());
    return 0;
  }
  if (e instanceof UsageError) {
    io.err.write(`qcowkit: ${e.message}\nTry 'qcowkit --help' for more information\n`);
    return 1;
  }
  if (debug() && e instanceof Error && e.stack) io.err.write(`${e.stack}\n`);
  if (e instanceof CliError) {
    if (e.message) io.err.write(`qcowkit: ${e.message}\n`);
    return e.exitCode;
  }
  if (e instanceof QcowError) {
    io.err.write(`qcowkit: ${e.message}\n`);
    return 1;
  }
  io.err.write(`qcowkit: ${messageOf(e)}\n`);
  return 1;
}
