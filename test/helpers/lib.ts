/** Loading our library from dist/ (built by `npm test` before vitest runs). */
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { DIST } from './proc.js';

export interface LibExtent {
  offset: number;
  length: number;
  kind: 'data' | 'zero' | 'unallocated';
  depth: number;
  hostOffset?: number;
}

export interface LibDriver {
  readonly size: number;
  read(offset: number, length: number): Promise<Uint8Array>;
  blockStatus(offset: number, length: number): Promise<LibExtent[]>;
  close(): Promise<void>;
}

export interface Lib {
  open(filename: string, opts?: { format?: string; snapshot?: { id?: string; name?: string } }): Promise<LibDriver>;
}

let cached: Promise<Lib> | undefined;

export function loadLib(): Promise<Lib> {
  cached ??= (async () => {
    const imp = (p: string) => import(pathToFileURL(path.join(DIST, p)).href);
    const [openMod, fileMod, codecMod] = await Promise.all([imp('block/open.js'), imp('io/file.js'), imp('codecs/node.js')]);
    codecMod.registerNodeCodecs();
    return {
      open: (filename, opts = {}) =>
        openMod.openImage(filename, { io: fileMod.fileProvider, readOnly: true, ...opts }) as Promise<LibDriver>,
    };
  })();
  return cached;
}

/** Extents of the whole image (looping: blockStatus may return fewer bytes than asked). */
export async function allExtents(d: LibDriver): Promise<LibExtent[]> {
  const out: LibExtent[] = [];
  let pos = 0;
  while (pos < d.size) {
    const ext = await d.blockStatus(pos, d.size - pos);
    if (!Array.isArray(ext) || ext.length === 0) throw new Error(`blockStatus(${pos}, ${d.size - pos}) returned no extents`);
    for (const e of ext) {
      if (e.offset !== pos) throw new Error(`blockStatus: extent at ${e.offset}, expected ${pos}`);
      if (!(e.length > 0)) throw new Error(`blockStatus: empty extent at ${e.offset}`);
      out.push(e);
      pos += e.length;
    }
  }
  if (pos !== d.size) throw new Error(`blockStatus covered ${pos} bytes, image has ${d.size}`);
  return out;
}
