/** Worker thread body: compresses clusters for the pool in `pool.ts`. */
import { parentPort } from 'node:worker_threads';
import * as zlib from 'node:zlib';
import { zstdCompressSync } from './node.js';

interface Job {
  id: number;
  type: 'zlib' | 'zstd';
  data: Uint8Array;
  limit: number;
}

parentPort!.on('message', (job: Job) => {
  try {
    let out: Uint8Array | undefined;
    if (job.type === 'zstd') out = zstdCompressSync(job.data, job.limit);
    else {
      const c = zlib.deflateRawSync(job.data, { windowBits: 12, memLevel: 9, level: 6 });
      out = c.length < job.limit ? c : undefined;
    }
    if (out) {
      const copy = new Uint8Array(out.length);
      copy.set(out);
      parentPort!.postMessage({ id: job.id, data: copy }, [copy.buffer]);
    } else parentPort!.postMessage({ id: job.id });
  } catch (e) {
    parentPort!.postMessage({ id: job.id, error: e instanceof Error ? e.message : String(e) });
  }
});
