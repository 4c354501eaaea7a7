/**
 * `qemu-nbd -s`: a temporary copy-on-write layer over an image opened read-only. Written data
 * lives in an unlinked sparse temporary file, 64 KiB chunks at a time (QEMU's temporary qcow2
 * overlay has 64 KiB clusters, so block status and allocation depth look the same); the image
 * itself is never modified and the layer vanishes when the server exits.
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { BlockDriver, DriverInfo, Extent } from '../core/block-driver.js';
import { QcowError } from '../core/errors.js';

const CHUNK = 64 * 1024;

type ChunkState = 'data' | 'zero';

export class CowOverlay implements BlockDriver {
  readonly format = 'qcow2';
  readonly readOnly = false;
  readonly size: number;
  private chunks = new Map<number, ChunkState>();
  private closed = false;

  private constructor(
    readonly backing: BlockDriver,
    private readonly fh: fsp.FileHandle,
    readonly filename: string,
  ) {
    this.size = backing.size;
  }

  /** Create the overlay in TMPDIR (the file is unlinked at once; only the descriptor remains). */
  static async create(base: BlockDriver): Promise<CowOverlay> {
    const dir = await fsp.mkdtemp(path.join(process.env.TMPDIR || os.tmpdir(), 'qcowkit-nbd-'));
    const name = path.join(dir, 'overlay');
    const fh = await fsp.open(name, 'w+', 0o600);
    await fsp.rm(dir, { recursive: true, force: true });
    return new CowOverlay(base, fh, name);
  }

  private check(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new QcowError('EINVAL', `Request [${offset}, +${length}) is past the end of the image (${this.size} bytes)`);
    }
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const buf = new Uint8Array(length);
    await this.readInto(buf, offset);
    return buf;
  }

  async readInto(buf: Uint8Array, offset: number): Promise<void> {
    this.check(offset, buf.length);
    let pos = offset;
    const end = offset + buf.length;
    while (pos < end) {
      const idx = Math.floor(pos / CHUNK);
      const state = this.chunks.get(idx);
      // Extend the run over following chunks in the same state.
      let runEnd = Math.min((idx + 1) * CHUNK, end);
      while (runEnd < end && this.chunks.get(Math.floor(runEnd / CHUNK)) === state) runEnd = Math.min(runEnd + CHUNK, end);
      const dst = buf.subarray(pos - offset, runEnd - offset);
      if (state === 'data') await this.readFile(dst, pos);
      else if (state === 'zero') dst.fill(0);
      else await this.backing.readInto(dst, pos);
      pos = runEnd;
    }
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.check(offset, data.length);
    let pos = offset;
    const end = offset + data.length;
    while (pos < end) {
      const idx = Math.floor(pos / CHUNK);
      const cStart = idx * CHUNK;
      const cEnd = Math.min(cStart + CHUNK, this.size);
      const wEnd = Math.min(cEnd, end);
      if (pos === cStart && wEnd === cEnd) {
        await this.writeFile(data.subarray(pos - offset, wEnd - offset), pos);
      } else {
        // Partial chunk: copy the old content first (copy-on-write).
        const whole = new Uint8Array(cEnd - cStart);
        await this.readInto(whole, cStart);
        whole.set(data.subarray(pos - offset, wEnd - offset), pos - cStart);
        await this.writeFile(whole, cStart);
      }
      this.chunks.set(idx, 'data');
      pos = wEnd;
    }
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.check(offset, length);
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const idx = Math.floor(pos / CHUNK);
      const cStart = idx * CHUNK;
      const cEnd = Math.min(cStart + CHUNK, this.size);
      const wEnd = Math.min(cEnd, end);
      if (pos === cStart && wEnd === cEnd) this.chunks.set(idx, 'zero');
      else if (this.chunks.get(idx) !== 'zero') await this.write(pos, new Uint8Array(wEnd - pos));
      pos = wEnd;
    }
  }

  /** Discarded whole chunks read as zeros afterwards (as in a qcow2 overlay with a backing file). */
  async discard(offset: number, length: number): Promise<void> {
    this.check(offset, length);
    const end = offset + length;
    for (let idx = Math.floor(offset / CHUNK); idx * CHUNK < end; idx++) {
      const cStart = idx * CHUNK;
      const cEnd = Math.min(cStart + CHUNK, this.size);
      if (offset <= cStart && end >= cEnd) this.chunks.set(idx, 'zero');
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.check(offset, length);
    const out: Extent[] = [];
    let pos = offset;
    const end = offset + length;
    while (pos < end && out.length < 4096) {
      const idx = Math.floor(pos / CHUNK);
      const state = this.chunks.get(idx);
      let runEnd = Math.min((idx + 1) * CHUNK, end);
      while (runEnd < end && this.chunks.get(Math.floor(runEnd / CHUNK)) === state) runEnd = Math.min(runEnd + CHUNK, end);
      if (state) {
        out.push({ offset: pos, length: runEnd - pos, kind: state, depth: 0 });
      } else {
        let p = pos;
        while (p < runEnd) {
          const ext = await this.backing.blockStatus(p, runEnd - p);
          for (const e of ext) out.push({ offset: e.offset, length: e.length, kind: e.kind, depth: e.depth + 1, zeroData: e.zeroData });
          const last = ext[ext.length - 1]!;
          p = last.offset + last.length;
        }
      }
      pos = runEnd;
    }
    return out;
  }

  async flush(): Promise<void> {
    // Nothing here has to survive the process.
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.fh.close().catch(() => {});
    await this.backing.close();
  }

  info(): DriverInfo {
    return { dirty: false, clusterSize: CHUNK };
  }

  async actualSize(): Promise<number | undefined> {
    return (await this.fh.stat()).blocks * 512;
  }

  private async readFile(dst: Uint8Array, pos: number): Promise<void> {
    let done = 0;
    while (done < dst.length) {
      const { bytesRead } = await this.fh.read(dst, done, dst.length - done, pos + done);
      if (bytesRead <= 0) {
        dst.fill(0, done);
        return;
      }
      done += bytesRead;
    }
  }

  private async writeFile(src: Uint8Array, pos: number): Promise<void> {
    let done = 0;
    while (done < src.length) {
      const { bytesWritten } = await this.fh.write(src, done, src.length - done, pos + done);
      done += bytesWritten;
    }
  }
}
