// LUKS bench inputs (encryption issue): the bench's half-allocated raw image converted by qemu-img
// into a LUKS qcow2 (aes-256-xts-plain64, QEMU's default cipher) with a short PBKDF2 time, so that
// the key derivation does not dominate the timings. Generated once per work dir, like the others.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

/** The secret every LUKS case uses (bench data only). */
export const LUKS_SECRET_ID = 'sec0';
export const LUKS_PASSWORD = 'qcowkit-bench-password';
export const LUKS_OBJECT = ['--object', `secret,id=${LUKS_SECRET_ID},data=${LUKS_PASSWORD}`];
/** Creation options: QEMU's default cipher, 10 ms of PBKDF2. */
export const LUKS_CREATE_OPTS = `encrypt.format=luks,encrypt.key-secret=${LUKS_SECRET_ID},encrypt.cipher-alg=aes-256,encrypt.cipher-mode=xts,encrypt.iter-time=10`;

/** `--image-opts` text opening a LUKS qcow2 with the bench secret. */
export function luksImageOpts(path) {
  return `driver=qcow2,file.filename=${path.replaceAll(',', ',,')},encrypt.key-secret=${LUKS_SECRET_ID}`;
}

const memo = new WeakMap();

/** {path, sha256, size} of the LUKS qcow2 holding the bench's raw input (sha256 = the raw's). */
export function luksQcow2Input(inputs) {
  if (!memo.has(inputs)) {
    memo.set(inputs, (async () => {
      const raw = await inputs.get('raw');
      const path = await inputs.produce(`half-${inputs.tag}.luks.qcow2`, async (p) => {
        for (let attempt = 1; ; attempt++) {
          try {
            await execFileP(inputs.qemu, ['convert', ...LUKS_OBJECT, '-f', 'raw', '-O', 'qcow2', '-o', LUKS_CREATE_OPTS, raw.path, p],
              { maxBuffer: 64 << 20 });
            return;
          } catch (e) {
            // qemu-img's PBKDF2 calibration sometimes gives up on a busy machine: try again.
            if (attempt < 5 && /Unable to get accurate CPU usage/.test(e.stderr ?? '')) continue;
            throw new Error(`input generation failed: qemu-img convert → LUKS qcow2\n${e.stderr || e.message}`);
          }
        }
      });
      return { path, sha256: raw.sha256, size: raw.size };
    })());
  }
  return memo.get(inputs);
}
