// Bench cases for the encryption issue (LUKS qcow2, aes-256-xts-plain64). Appended to CASES by
// cases.mjs. Both tools get the same secret object and a 10 ms iter-time (PBKDF2 calibration and
// key derivation are then a small, equal part of each run).
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { LUKS_CREATE_OPTS, LUKS_OBJECT, luksImageOpts, luksQcow2Input } from './lib/inputs-luks.mjs';

const execFileP = promisify(execFile);

/** `qemu-img compare` of the LUKS output against the raw source (guest contents). */
async function compareLuksOutput(ctx, p, tool, r) {
  try {
    await execFileP(ctx.tools.qemu[0], ['compare', '-q', ...LUKS_OBJECT, '--image-opts',
      `driver=raw,file.filename=${p.src.path.replaceAll(',', ',,')}`, luksImageOpts(r.outPath)]);
  } catch (e) {
    return { ok: false, detail: `qemu-img compare (${tool}): ${e.code === 1 ? 'contents differ' : (e.stderr || e.message).trim()}` };
  }
  if (tool === 'qemu') return null;
  try {
    await execFileP(ctx.tools.qemu[0], ['check', '-q', ...LUKS_OBJECT, '--image-opts', luksImageOpts(r.outPath)]);
  } catch (e) {
    return { ok: false, detail: `qemu-img check: ${(e.stderr || e.stdout || e.message).trim().split('\n')[0]}` };
  }
  return { ok: true, detail: 'qemu-img compare: identical, check clean' };
}

/** Runs "$@", again (up to 5 times) while it fails only because of the calibration. */
const RETRY_CALIBRATION =
  'i=0; while :; do err=$("$@" 2>&1) && exit 0; i=$((i+1)); ' +
  'case "$err" in *"Unable to get accurate CPU usage"*) [ $i -lt 5 ] && continue;; esac; ' +
  'printf "%s\\n" "$err" >&2; exit 1; done';

export const LUKS_CASES = [
  {
    id: 'convert-luks-raw',
    name: 'LUKS qcow2 → raw',
    required: true,
    setup: async (ctx) => ({ src: await luksQcow2Input(ctx.inputs) }),
    output: 'raw',
    qemu: (p) => ['convert', ...LUKS_OBJECT, '--image-opts', luksImageOpts(p.src.path), '-O', 'raw', p.out],
    verify: 'raw-output',
    target: { ratio: 1.2 },
  },
  {
    id: 'convert-raw-luks',
    name: 'raw → LUKS qcow2',
    required: true,
    setup: async (ctx) => ({ src: await ctx.inputs.get('raw'), tools: ctx.tools }),
    output: 'qcow2',
    // qemu-img's PBKDF2 calibration gives up now and then on a busy machine ("Unable to get
    // accurate CPU usage", after a few ms): its runs go through a small retry loop (sh -c).
    command: (p, tool) => {
      const args = ['convert', ...LUKS_OBJECT, '-f', 'raw', '-O', 'qcow2', '-o', LUKS_CREATE_OPTS, p.src.path, p.out];
      return tool === 'qemu' ? ['sh', '-c', RETRY_CALIBRATION, 'sh', ...p.tools.qemu, ...args] : [...p.tools.ours, ...args];
    },
    verify: compareLuksOutput,
    target: { ratio: 1.2 },
  },
];
