/**
 * Command-line parsing with GNU getopt_long semantics, as qemu-img uses it: options and operands
 * may be mixed (operands are collected in order), `--` ends the options, short options cluster
 * (`-qU`) and take their argument attached or as the next word (`-fqcow2`, `-f qcow2`), long
 * options take `--name=value` or `--name value` and may be abbreviated to any unambiguous prefix.
 */
import { UsageError } from './errors.js';

export interface OptionSpec {
  /** Short letters: a letter followed by ':' takes an argument (getopt syntax, e.g. "f:hqU"). */
  short: string;
  /** Long names; the value is true when the option takes an argument. */
  long?: Record<string, boolean>;
  /**
   * Stop at the first operand (getopt's leading '+'), as qemu-img's global options do. Everything
   * from the first operand on is returned untouched in `operands`.
   */
  stopAtOperand?: boolean;
}

export interface ParsedOption {
  /** The short letter, or the full long name. */
  name: string;
  /** The argument, for options that take one. */
  value?: string;
}

export interface ParsedArgs {
  options: ParsedOption[];
  operands: string[];
}

function shortTable(spec: string): Map<string, boolean> {
  const table = new Map<string, boolean>();
  for (let i = 0; i < spec.length; i++) {
    const c = spec[i]!;
    if (c === ':' || c === '+') continue;
    table.set(c, spec[i + 1] === ':');
  }
  return table;
}

/** Resolve a (possibly abbreviated) long option name; undefined when unknown or ambiguous. */
function matchLong(long: Record<string, boolean>, name: string): string | undefined {
  if (Object.prototype.hasOwnProperty.call(long, name)) return name;
  const candidates = Object.keys(long).filter((k) => k.startsWith(name));
  return candidates.length === 1 ? candidates[0] : undefined;
}

/** Parse `argv`; like C's argv, `argv[0]` is the command name and is not parsed. */
export function getopt(argv: readonly string[], spec: OptionSpec): ParsedArgs {
  const shorts = shortTable(spec.short);
  const long = spec.long ?? {};
  const options: ParsedOption[] = [];
  const operands: string[] = [];
  let i = 1;
  while (i < argv.length) {
    const arg = argv[i]!;
    i++;
    if (arg === '--') {
      operands.push(...argv.slice(i));
      break;
    }
    if (arg.startsWith('--')) {
      const eq = arg.indexOf('=');
      const given = eq < 0 ? arg.slice(2) : arg.slice(2, eq);
      const name = matchLong(long, given);
      if (name === undefined) throw new UsageError(`unrecognized option '${arg}'`);
      const takesArg = long[name]!;
      if (takesArg) {
        if (eq >= 0) options.push({ name, value: arg.slice(eq + 1) });
        else if (i < argv.length) options.push({ name, value: argv[i++]! });
        else throw new UsageError(`missing argument for option '${arg}'`);
      } else {
        if (eq >= 0) throw new UsageError(`unrecognized option '${arg}'`);
        options.push({ name });
      }
      continue;
    }
    if (arg.startsWith('-') && arg.length > 1) {
      for (let j = 1; j < arg.length; j++) {
        const c = arg[j]!;
        const takesArg = shorts.get(c);
        if (takesArg === undefined) {
          // getopt names the word it has finished with: the cluster itself when the unknown letter
          // ends it, else the word before (a quirk qemu-img's messages inherit).
          throw new UsageError(`unrecognized option '${j === arg.length - 1 ? arg : argv[i - 2]}'`);
        }
        if (!takesArg) {
          options.push({ name: c });
          continue;
        }
        if (j + 1 < arg.length) options.push({ name: c, value: arg.slice(j + 1) });
        else if (i < argv.length) options.push({ name: c, value: argv[i++]! });
        else throw new UsageError(`missing argument for option '-${c}'`);
        break;
      }
      continue;
    }
    if (spec.stopAtOperand) {
      operands.push(...argv.slice(i - 1));
      break;
    }
    operands.push(arg);
  }
  return { options, operands };
}
