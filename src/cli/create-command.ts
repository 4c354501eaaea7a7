/**
 * `qcowkit create [--object OBJ] [-q] [-f FMT] [-b BACKING [-F BACKING_FMT]] [-u] [-o OPTIONS] IMG [SIZE]`:
 * qemu-img 7.2's create — option syntax, `-o help`, the "Formatting ..." line, messages and exit
 * codes (0 created or help shown, 1 any failure).
 */
import { QcowError } from '../core/errors.js';
import {
  hasHelpOption,
  isValidOptionList,
  optionsHelp,
  parseQemuSize,
  SizeParseError,
  type CreateFormat,
} from '../formats/qcow2/create-options.js';
import { fileProvider } from '../io/file.js';
import { isHttpUrl, urlProtocol } from '../io/http.js';
import { createImage } from '../ops/create.js';
import { QCOW_CREATE_HELP } from '../formats/qcow/create.js';
import { CliError, HelpRequested, UsageError } from './errors.js';
import { getopt } from './getopt.js';
import { processIo, type Io } from './output.js';
import { secretsFromObjects } from './open.js';

const INT64_MAX = (1n << 63n) - 1n;

/** `create -f qcow -o help` without a file name: the format's own options only. */
function qcowFormatHelp(): string {
  const own = new Set(['backing_file', 'backing_fmt', 'encrypt.format', 'encrypt.key-secret', 'encryption', 'size']);
  const lines = QCOW_CREATE_HELP.split('\n').filter((l) => own.has(l.trim().split('=')[0]!));
  return `Supported qcow options:\n${lines.join('\n')}\n\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n`;
}

/**
 * `-o help` of create (and of convert, which prints the same): the format's options, and with a
 * file name given, those of the protocol (file) level too.
 */
export function writeCreateOptionsHelp(io: Io, format: string, withFile: boolean): void {
  if (format === 'qcow') {
    io.out.write(withFile ? QCOW_CREATE_HELP : qcowFormatHelp());
    return;
  }
  if (format !== 'qcow2' && format !== 'raw') throw new CliError(`Unknown file format '${format}'`);
  io.out.write(optionsHelp(format as CreateFormat, withFile));
}

/** The SIZE argument as qemu-img's img_create reads it. */
export function parseSizeArgument(text: string, warn?: (m: string) => void): bigint {
  const warnings: string[] = [];
  let v: bigint;
  try {
    v = parseQemuSize(text, warnings);
  } catch (e) {
    if (e instanceof SizeParseError && e.kind === 'range') {
      throw new CliError(`Invalid image size specified. Must be between 0 and ${INT64_MAX}.`);
    }
    throw new CliError(
      'Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    );
  } finally {
    for (const w of warnings) warn?.(w);
  }
  if (v > INT64_MAX) throw new CliError(`Invalid image size specified. Must be between 0 and ${INT64_MAX}.`);
  return v;
}

/** Run `create`; `argv[0]` is the command name (as the dispatcher passes it). */
export async function runCreate(argv: string[], io: Io = processIo()): Promise<number> {
  const { options, operands } = getopt(argv, {
    short: ':F:b:f:ho:qu',
    long: { help: false, object: true },
  });
  let format = 'raw';
  let backingFile: string | undefined;
  let backingFormat: string | undefined;
  let noBackingOpen = false;
  let quiet = false;
  const optionLists: string[] = [];
  const objects: string[] = [];
  for (const o of options) {
    switch (o.name) {
      case 'h':
      case 'help':
        throw new HelpRequested();
      case 'f':
        format = o.value!;
        break;
      case 'b':
        backingFile = o.value!;
        break;
      case 'F':
        backingFormat = o.value!;
        break;
      case 'u':
        noBackingOpen = true;
        break;
      case 'q':
        quiet = true;
        break;
      case 'o':
        if (!isValidOptionList(o.value!)) throw new CliError(`Invalid option list: ${o.value}`);
        optionLists.push(o.value!);
        break;
      case 'object':
        objects.push(o.value!);
        break;
      default:
        break;
    }
  }
  const warn = (m: string) => io.err.write(`qcowkit: warning: ${m}\n`);
  // Secrets (and their errors) come first, as qemu-img creates its objects before anything else.
  const secrets = secretsFromObjects(objects);

  if (optionLists.some(hasHelpOption)) {
    writeCreateOptionsHelp(io, format, operands.length > 0);
    return 0;
  }
  if (operands.length < 1) throw new UsageError('Expecting image file name');
  const filename = operands[0]!;
  if (isHttpUrl(filename)) throw new CliError(`${filename}: Protocol driver '${urlProtocol(filename)}' does not support image creation`);
  let size: bigint | undefined;
  if (operands.length >= 2) size = parseSizeArgument(operands[1]!, warn);
  if (operands.length > 2) throw new UsageError(`Unexpected argument: ${operands[2]}`);

  try {
    await createImage(
      {
        filename,
        format,
        size,
        options: optionLists,
        backingFile,
        backingFormat,
        noBackingOpen,
        onFormatting: (line) => {
          if (!quiet) io.out.write(`${line}\n`);
        },
        onWarning: warn,
        ...(secrets ? { secrets } : {}),
      },
      fileProvider,
    );
  } catch (e) {
    if (e instanceof QcowError) throw new CliError(e.message.replace(/\n/g, ' '));
    throw e;
  }
  return 0;
}
