/** Errors the CLI turns into a message and an exit code. */

/** Bad command line: printed with a "Try 'qcowkit --help'" hint, exit 1 (qemu-img's error_exit). */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

/**
 * A failure already worded for the user: printed as one `qcowkit: message` line (or silently when
 * `message` is empty), then exit with `exitCode`.
 */
export class CliError extends Error {
  readonly exitCode: number;
  constructor(message: string, exitCode = 1) {
    super(message);
    this.name = 'CliError';
    this.exitCode = exitCode;
  }
}

/** The message of any thrown value, without a stack. */
export function messageOf(e: unknown): string {
  if (e instanceof Error) return e.message;
  return String(e);
}

/** `-h` / `--help` given to a command: main prints the help text and exits 0. */
export class HelpRequested extends Error {
  constructor() {
    super('help');
    this.name = 'HelpRequested';
  }
}
