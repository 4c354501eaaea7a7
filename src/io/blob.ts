/**
 * Read-only byte I/O over a `Blob` (a browser `File` is one): each read is
 * `blob.slice(a, b).arrayBuffer()`. `BlobProvider` serves a set of named Blobs, so an image and
 * its backing files picked by a user (two `File` objects) open as a chain.
 */
import type { ByteIO, IOProvider } from '../core/byte-io.js';
import { QcowError } from '../core/errors.js';
import { dirname, joinPath } from '../core/util.js';

function readOnlyError(name: string): QcowError {
  return new QcowError('EPERM', `Cannot write to '${name}': Read-only file system (Blobs are read-only)`);
}

export class BlobIO implements ByteIO {
  readonly readOnly = true;
  private closed = false;

  constructor(
    private readonly blob: Blob,
    readonly name: string = (blob as { name?: unknown }).name === undefined ? 'blob' : String((blob as { name?: unknown }).name),
  ) {}

  async size(): Promise<number> {
    return this.blob.size;
  }

  async read(buf: Uint8Array, offset: number): Promise<number> {
    if (this.closed) throw new QcowError('EIO', `Cannot read '${this.name}': closed`);
    if (offset >= this.blob.size || buf.length === 0) return 0;
    const end = Math.min(offset + buf.length, this.blob.size);
    let data: ArrayBuffer;
    try {
      data = await this.blob.slice(offset, end).arrayBuffer();
    } catch (e) {
      throw new QcowError('EIO', `Could not read '${this.name}' at ${offset}: ${e instanceof Error ? e.message : String(e)}`);
    }
    buf.set(new Uint8Array(data));
    return data.byteLength;
  }

  async write(): Promise<void> {
    throw readOnlyError(this.name);
  }

  async truncate(): Promise<void> {
    throw readOnlyError(this.name);
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    this.closed = true;
  }
}

function basename(name: string): string {
  return name.slice(name.lastIndexOf('/') + 1);
}

/**
 * Named Blobs as an IOProvider (read-only). Backing names resolve like file names (relative to
 * the image's folder); a name that matches no Blob exactly falls back to a Blob of the same base
 * name, since a browser's File objects carry no folder (a backing file recorded as
 * `/var/lib/images/base.qcow2` opens from a File named `base.qcow2`).
 */
export class BlobProvider implements IOProvider {
  readonly blobs = new Map<string, Blob>();

  /** A `File` is named by its own `name`; other Blobs by the name given (a map's key). */
  constructor(blobs: Iterable<File> | Iterable<[string, Blob]> | Record<string, Blob> = []) {
    if (Symbol.iterator in Object(blobs)) {
      for (const item of blobs as Iterable<File | [string, Blob]>) {
        if (Array.isArray(item)) this.add(item[0], item[1]);
        else this.add(item.name, item);
      }
    } else {
      for (const [name, blob] of Object.entries(blobs as Record<string, Blob>)) this.add(name, blob);
    }
  }

  add(name: string, blob: Blob): this {
    this.blobs.set(name, blob);
    return this;
  }

  private find(name: string): Blob | undefined {
    const exact = this.blobs.get(name);
    if (exact) return exact;
    const base = basename(name);
    for (const [n, b] of this.blobs) if (basename(n) === base) return b;
    return undefined;
  }

  async open(name: string, opts: { readOnly: boolean }): Promise<ByteIO> {
    const blob = this.find(name);
    if (!blob) throw new QcowError('ENOENT', `Could not open '${name}': No such file or directory`);
    if (!opts.readOnly) throw readOnlyError(name);
    return new BlobIO(blob, name);
  }

  resolve(base: string, name: string): string {
    return joinPath(dirname(base), name);
  }

  async create(name: string): Promise<ByteIO> {
    throw readOnlyError(name);
  }

  async exists(name: string): Promise<boolean> {
    return this.find(name) !== undefined;
  }
}
