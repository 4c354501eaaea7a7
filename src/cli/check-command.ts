/**
 * `qcowkit check [-f FMT] [--output=human|json] [-r leaks|all] [-T CACHE] [-U] [-q]
 * [--object OBJ] [--image-opts] IMG`: qemu-img check's output, streams and exit codes
 * (0 clean or repaired, 1 check failed, 2 corruptions, 3 leaks only, 63 format without checks).
 */
import { readSync } from 'node:fs';
import { openImage, probeFormat } from '../block/open.js';
import { readFully } from '../core/byte-io.js';
import type { ByteIO } from '../core/byte-io.js';
import { qjson } from '../core/qjson.js';
import { Qcow2Checker, fixMode, type RepairMode } from '../formats/qcow2/check.js';
import { INCOMPAT_DATA_FILE } from '../formats/qcow2/constants.js';
import {
  CheckFailure,
  checkExitCode,
  humanImageCheck,
  repairedBanner,
  runChecks,
  toImageCheck,
} from '../ops/check.js';
import { checkCacheMode, parseOutputFormat, qprint } from './common.js';
import { CliError, HelpRequested, UsageError, messageOf } from './errors.js';
import { getopt } from './getopt.js';
import { cliProvider, resolveImageArg, secretsFromObjects } from './open.js';
import { openDataCipher } from '../formats/crypto/qcow2.js';
import type { Qcow2Header } from '../formats/qcow2/header.js';
import { processIo, type Io } from './output.js';

/** Formats qcowkit can open for `check` without a check of their own. */
const NO_CHECK_FORMATS = new Set(['raw', 'qcow']);

/**
 * Run `check`. `argv[0]` is the command name (as the dispatcher passes it). Usage and open
 * errors are thrown (CliError/UsageError) for the dispatcher to print; check results and
 * "Check failed" are printed here.
 */
export async function runCheck(argv: string[], io: Io = processIo()): Promise<number> {
  const { options, operands } = getopt(argv, {
    short: ':hf:r:T:qU',
    long: {
      help: false,
      format: true,
      repair: true,
      output: true,
      object: true,
      'image-opts': false,
      'force-share': false,
    },
  });
  let format: string | undefined;
  let outputArg: string | undefined;
  let repair: RepairMode | undefined;
  let cache: string | undefined;
  let quiet = false;
  let imageOpts = false;
  const objects: string[] = [];
  for (const o of options) {
    switch (o.name) {
      case 'h':
      case 'help':
        throw new HelpRequested();
      case 'f':
      case 'format':
        format = o.value!;
        break;
      case 'r':
      case 'repair':
        if (o.value === 'leaks' || o.value === 'all') repair = o.value;
        else throw new UsageError(`Unknown option value for -r (expecting 'leaks' or 'all'): ${o.value}`);
        break;
      case 'output':
        outputArg = o.value!;
        break;
      case 'T':
        cache = o.value!;
        break;
      case 'q':
        quiet = true;
        break;
      case 'image-opts':
        imageOpts = true;
        break;
      case 'object':
        objects.push(o.value!);
        break;
      default:
        break; // -U/--force-share: no locking here
    }
  }
  if (operands.length !== 1) throw new UsageError('Expecting one image file name');
  const output = outputArg === undefined ? 'human' : parseOutputFormat(outputArg);
  if (cache !== undefined) checkCacheMode(cache, true);
  if (imageOpts && format !== undefined) throw new CliError('--image-opts and --format are mutually exclusive');
  const secrets = secretsFromObjects(objects);
  const arg = operands[0]!;
  const spec = resolveImageArg(arg, { format, imageOpts });
  const fix = fixMode(repair);

  let file: ByteIO;
  try {
    file = withSyncReads(await cliProvider.open(spec.filename, { readOnly: fix === 0 }));
  } catch (e) {
    throw new CliError(`Could not open '${arg}': ${messageOf(e)}`);
  }
  try {
    const fmt = spec.format ?? (await probeFormat(file));
    if (fmt !== 'qcow2' && !NO_CHECK_FORMATS.has(fmt)) throw new CliError(`Could not open '${arg}': Unknown driver '${fmt}'`);
    if (spec.unknown.length) throw new CliError(`Could not open '${arg}': Block format '${fmt}' does not support the option '${spec.unknown[0]}'`);
    if (fmt === 'qcow') await validateQcowV1(file, arg);
    if (fmt !== 'qcow2') throw new CliError('This image format does not support checks', 63);

    const log = (line: string, kind?: 'report' | 'partial') => {
      void io.err.writeSoon(kind === 'report' ? `qcowkit: ${line}\n` : kind === 'partial' ? line : `${line}\n`);
    };
    let checker: Qcow2Checker;
    try {
      checker = await Qcow2Checker.open(file, { writable: fix !== 0, log });
    } catch (e) {
      throw new CliError(`Could not open '${arg}': ${messageOf(e)}`);
    }
    const header = checker.img.header;
    if (header.cryptMethod !== 0) {
      // Like qemu-img, an encrypted image opens only with its key named (the check itself needs no key).
      if (spec.keySecret === undefined) throw new CliError(`Could not open '${arg}': Parameter 'encrypt.key-secret' is required for cipher`);
      if (!secrets?.has(spec.keySecret)) throw new CliError(`Could not open '${arg}': No secret with id '${spec.keySecret}'`);
      // ...and the key must unlock it (a wrong password fails the open, as in qemu-img).
      try {
        (await import('../codecs/crypto-node.js')).registerNodeCrypto();
        await openDataCipher(header, file, { readOnly: true, secrets, keySecret: spec.keySecret });
      } catch (e) {
        throw new CliError(`Could not open '${arg}': ${messageOf(e)}`);
      }
    }
    if (header.incompatibleFeatures & INCOMPAT_DATA_FILE) {
      // qemu-img opens the external data file too (its clusters are not refcounted, but it must
      // exist). QEMU 7.2 takes a relative name from the header relative to its working directory.
      const name = spec.dataFile ?? header.dataFile;
      if (name !== undefined) {
        try {
          await (await cliProvider.open(name, { readOnly: true })).close();
        } catch (e) {
          throw new CliError(`Could not open '${arg}': ${messageOf(e)}`);
        }
      }
    }
    if (header.backingFile !== undefined) {
      // qemu-img opens the backing chain too: a missing backing file fails the check.
      try {
        const name = cliProvider.resolve(spec.filename, header.backingFile);
        const b = await openImage(name, { io: cliProvider, readOnly: true, ...(header.backingFormat ? { format: header.backingFormat } : {}) });
        await b.close();
      } catch (e) {
        throw new CliError(`Could not open '${arg}': Could not open backing file: ${messageOf(e)}`);
      }
    }

    let run;
    try {
      run = await runChecks(checker, fix, async (first) => {
        if (output !== 'human') return;
        await io.err.flush();
        qprint(io, quiet, repairedBanner(first));
        await io.out.flush();
      });
      // On a terminal, the per-cluster lines come before the summary, as with qemu-img.
      await io.err.flush();
    } catch (e) {
      if (e instanceof CheckFailure) throw new CliError(`Check failed: ${e.message}`);
      throw e;
    }
    if (run.secondFailure) throw new CliError(`Check failed: ${run.secondFailure.message}`);
    const result = run.final!;
    const report = toImageCheck(arg, 'qcow2', result);
    qprint(io, quiet, output === 'json' ? `${qjson(report)}\n` : humanImageCheck(report));
    if (result.checkErrors) throw new CliError('Check failed');
    return checkExitCode(result);
  } finally {
    await file.close().catch(() => {});
  }
}

/** What QEMU's qcow (v1) driver checks before it can say it has no check. */
async function validateQcowV1(file: ByteIO, arg: string): Promise<void> {
  const head = await readFully(file, 0, 8);
  const dv = new DataView(head.buffer);
  if (dv.getUint32(0) !== 0x514649fb) throw new CliError(`Could not open '${arg}': Image not in qcow format`);
  const version = dv.getUint32(4);
  if (version !== 1) {
    throw new CliError(`Could not open '${arg}': qcow (v1) does not support qcow version ${version}\nTry the 'qcow2' driver instead.`);
  }
}

/**
 * The check reads thousands of small tables one after the other and does nothing else meanwhile:
 * blocking positional reads (pread) cost a few microseconds each where fs.promises reads cost tens
 * (a thread-pool round trip and a promise each). Everything but `read` goes to the file itself.
 */
function withSyncReads(file: ByteIO): ByteIO {
  const fd = (file as { fd?: unknown }).fd;
  if (typeof fd !== 'number') return file;
  const io: ByteIO = {
    name: file.name,
    readOnly: file.readOnly,
    size: () => file.size(),
    read(buf: Uint8Array, offset: number): Promise<number> {
      try {
        return Promise.resolve(readSync(fd, buf, 0, buf.length, offset));
      } catch (e) {
        return Promise.reject(e);
      }
    },
    write: (buf, offset) => file.write(buf, offset),
    flush: () => file.flush(),
    truncate: (size) => file.truncate(size),
    close: () => file.close(),
  };
  if (file.dataRuns) io.dataRuns = (offset, length) => file.dataRuns!(offset, length);
  if (file.allocatedSize) io.allocatedSize = () => file.allocatedSize!();
  if (file.punchHole) io.punchHole = (offset, length) => file.punchHole!(offset, length);
  return io;
}
