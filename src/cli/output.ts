/**
 * Buffered writing to stdout/stderr. Long outputs (map of a huge image) are written in blocks and
 * wait for the pipe to drain, so memory stays bounded and nothing is lost when the process ends.
 */
import type { Writable } from 'node:stream';

const FLUSH_AT = 64 * 1024;

export class Output {
  private buf: string[] = [];
  private pending = 0;
  constructor(private readonly stream: Writable) {}

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
    if (!this.stream.write(text)) {
      await new Promise<void>((resolve) => {
        const done = () => {
          this.stream.off('drain', done);
          this.stream.off('error', done);
          this.stream.off('close', done);
          resolve();
        };
        this.stream.once('drain', done);
        this.stream.once('error', done);
        this.stream.once('close', done);
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

export function processIo(): Io {
  if (!pipeGuard) {
    pipeGuard = true;
    // A reader that went away (`qcowkit map img | head`): stop quietly, like a process killed by SIGPIPE.
    process.stdout.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'EPIPE') process.exit(128 + 13);
      throw e;
    });
  }
  return {
    out: new Output(process.stdout),
    err: new Output(process.stderr),
    isTTY: Boolean(process.stdout.isTTY),
  };
}
