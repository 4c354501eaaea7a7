import type { ByteIO, IOProvider } from '../core/byte-io.js';
import { QcowError } from '../core/errors.js';
import { dirname, joinPath } from '../core/util.js';

/** Growable in-memory storage (tests, browsers, scratch overlays). */
export class MemoryIO implements ByteIO {
  readonly name: string;
  readonly readOnly: boolean;
  private buf: Uint8Array;
  private len: number;

  constructor(name = 'memory', initial?: Uint8Array, readOnly = false) {
    this.name = name;
    this.readOnly = readOnly;
    this.buf = initial ? initial.slice() : new Uint8Array(0);
    this.len = this.buf.length;
  }

  /** The current content (a copy). */
  bytes(): Uint8Array {
    return this.buf.slice(0, this.len);
  }

  async size(): Promise<number> {
    return this.len;
  }

  async read(buf: Uint8Array, offset: number): Promise<number> {
    if (offset >= this.len) return 0;
    const n = Math.min(buf.length, this.len - offset);
    buf.set(this.buf.subarray(offset, offset + n));
    return n;
  }

  private ensure(cap: number) {
    if (cap <= this.buf.length) return;
    const next = new Uint8Array(Math.max(cap, this.buf.length * 2, 4096));
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
  }

  async write(data: Uint8Array, offset: number): Promise<void> {
    if (this.readOnly) throw new QcowError('EPERM', `Cannot write to read-only '${this.name}'`);
    const end = offset + data.length;
    this.ensure(end);
    if (offset > this.len) this.buf.fill(0, this.len, offset);
    this.buf.set(data, offset);
    if (end > this.len) this.len = end;
  }

  async flush(): Promise<void> {}

  async truncate(size: number): Promise<void> {
    if (size > this.len) {
      this.ensure(size);
      this.buf.fill(0, this.len, size);
    }
    this.len = size;
  }

  async close(): Promise<void> {}
}

/** A name → MemoryIO map usable as an IOProvider (backing files in memory). */
export class MemoryProvider implements IOProvider {
  readonly files = new Map<string, MemoryIO>();
  async open(name: string, opts: { readOnly: boolean }): Promise<ByteIO> {
    const f = this.files.get(name);
    if (!f) throw new QcowError('ENOENT', `Could not open '${name}': No such file or directory`);
    return opts.readOnly ? new ReadOnlyView(f) : f;
  }
  async create(name: string): Promise<ByteIO> {
    const f = new MemoryIO(name);
    this.files.set(name, f);
    return f;
  }
  resolve(base: string, name: string): string {
    return joinPath(dirname(base), name);
  }
  async remove(name: string): Promise<void> {
    this.files.delete(name);
  }
  async exists(name: string): Promise<boolean> {
    return this.files.has(name);
  }
}

class ReadOnlyView implements ByteIO {
  readonly readOnly = true;
  constructor(private inner: MemoryIO) {}
  get name() {
    return this.inner.name;
  }
  size() {
    return this.inner.size();
  }
  read(buf: Uint8Array, offset: number) {
    return this.inner.read(buf, offset);
  }
  async write(): Promise<void> {
    throw new QcowError('EPERM', `Cannot write to read-only '${this.name}'`);
  }
  async flush() {}
  async truncate(): Promise<void> {
    throw new QcowError('EPERM', `Cannot write to read-only '${this.name}'`);
  }
  async close() {}
}
