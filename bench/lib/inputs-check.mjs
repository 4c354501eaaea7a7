// Bench inputs for the check cases (cases-check.mjs), made with qemu-img at setup time and
// memoised per work dir like the shared inputs (Inputs.produce: temporary name, then rename).
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

async function qemuImg(qemu, args) {
  try {
    await execFileP(qemu, args, { maxBuffer: 64 << 20 });
  } catch (e) {
    throw new Error(`input generation failed: ${qemu} ${args.join(' ')}\n${e.stderr || e.message}`);
  }
}

/**
 * qcow2 with 4 KiB clusters, 4 GiB virtual, every cluster allocated: 1,048,576 allocated clusters,
 * 2048 L2 tables (one every 2 MiB of data, interleaved with it, as a fully written image has
 * them), 514 refcount blocks. Made with `preallocation=metadata`: the L1/L2 tables and refcounts
 * are exactly those of a fully written image, but the data clusters are never written, so the file
 * takes ~10 MB of disk and a few seconds to make instead of 4 GiB. `check` reads only metadata, so
 * it does the same work on it as on a written image.
 */
export async function million4k(inputs) {
  const path = await inputs.produce('check-1m-4k.qcow2', (p) =>
    qemuImg(inputs.qemu, ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,preallocation=metadata', p, '4G']));
  return { path };
}
