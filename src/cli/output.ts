/**
 * Buffered writing to stdout/stderr. Long outputs (map of a huge image) are written in blocks and
 * wait for the pipe to drain, so memory stays bounded and nothing is lost when the process ends.
 */
import type { Writable } from 'node:stream';

const FLUSH_AT = 64 * 1024;

export class Output {
  private buf: string[] = [];
  private pending = 0;
  private made?: Writable;
  /** `stream` may be a function making it at the first flush with text (see processIo). */
  constructor(private readonly stream: Writable | (() => Writable)) {}

  /** Queue text; call `flush()` (or `write` again) to push it out. */
  write(text: string): void {
    this.buf.push(text);
    this.pending += text.length;
  }

  /** Queue text and flush when enough is buffered. */
  async writeSoon(text: string): Promise<void> {
    this.write(text);
    if (this.pending >= FLUSH_AT) await this.flush();
  }

  async flush(): Promise<void> {
    if (this.buf.length === 0) return;
    const text = this.buf.join('');
    this.buf = [];
    this.pending = 0;
    const stream = (this.made ??= typeof this.stream === 'function' ? this.stream() : this.stream);
    if (!stream.write(text)) {
      await new Promise<void>((resolve) => {
        const done = () => {
          stream.off('drain', done);
          stream.off('error', done);
          stream.off('close', done);
          resolve();
        };
        stream.once('drain', done);
        stream.once('error', done);
        stream.once('close', done);
      });
    }
  }
}

/** The standard streams of one CLI run (tests may substitute their own). */
export interface Io {
  out: Output;
  err: Output;
  /** Whether stdout is a terminal (unused by qemu-img's formats, kept for progress decisions). */
  isTTY: boolean;
}

let pipeGuard = false;

function stdout(): NodeJS.WriteStream {
  if (!pipeGuard) {
    pipeGuard = true;
    // A reader that went away (`qcowkit map img | head`): stop quietly, like a process killed by SIGPIPE.
    process.stdout.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'EPIPE') process.exit(128 + 13);
      throw e;
    });
  }
  return process.stdout;
}

/**
 * The process's streams, made only when first written to: Node builds process.stdout and
 * process.stderr (and loads the stream modules they need) on first use, ~5 ms of start-up that a
 * command printing nothing (convert, resize, commit) need not pay.
 */
export function processIo(): Io {
  return {
    out: new Output(stdout),
    err: new Output(() => process.stderr),
    get isTTY() {
      return Boolean(stdout().isTTY);
    },
  };
}
