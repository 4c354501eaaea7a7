/**
 * `check`: qemu-img's consistency check driver around a format's check (qcow2 only; other formats
 * "do not support checks"): run with the requested repairs, and when something was repaired,
 * double-check the image; report as QEMU's QAPI `ImageCheck` object (human text or JSON).
 */
import type { ByteIO } from '../core/byte-io.js';
import { CheckFailure, Qcow2Checker, fixMode, type CheckLog, type CheckResult, type RepairMode } from '../formats/qcow2/check.js';

export { CheckFailure, repairDirty } from '../formats/qcow2/check.js';
export type { CheckLog, CheckResult, RepairMode };

/** QAPI ImageCheck; optional members are omitted when zero, like qemu-img's collect_image_check. */
export interface ImageCheck {
  filename: string;
  format: string;
  'check-errors': number;
  'image-end-offset'?: number;
  corruptions?: number;
  leaks?: number;
  'corruptions-fixed'?: number;
  'leaks-fixed'?: number;
  'total-clusters'?: number;
  'allocated-clusters'?: number;
  'fragmented-clusters'?: number;
  'compressed-clusters'?: number;
}

const nz = (v: number): number | undefined => (v !== 0 ? v : undefined);

/** collect_image_check (keys in QAPI declaration order; qjson reorders them like QEMU). */
export function toImageCheck(filename: string, format: string, r: CheckResult): ImageCheck {
  const c: ImageCheck = { filename, format, 'check-errors': r.checkErrors };
  const opt: Array<[keyof ImageCheck, number]> = [
    ['image-end-offset', r.imageEndOffset],
    ['corruptions', r.corruptions],
    ['leaks', r.leaks],
    ['corruptions-fixed', r.corruptionsFixed],
    ['leaks-fixed', r.leaksFixed],
    ['total-clusters', r.totalClusters],
    ['allocated-clusters', r.allocatedClusters],
    ['fragmented-clusters', r.fragmentedClusters],
    ['compressed-clusters', r.compressedClusters],
  ];
  for (const [k, v] of opt) if (nz(v) !== undefined) (c as unknown as Record<string, number>)[k] = v;
  return c;
}

/** C's "%0.2f" (glibc: exact value, ties to even). */
export function percent2(v: number): string {
  const exact = v.toFixed(60); // exact decimal expansion of the double
  const dot = exact.indexOf('.');
  let intPart = BigInt(exact.slice(0, dot));
  let frac2 = Number(exact.slice(dot + 1, dot + 3));
  const rest = exact.slice(dot + 3);
  const tail = rest.replace(/0+$/, '');
  let up: boolean;
  if (tail === '' || rest[0]! < '5') up = false;
  else if (rest[0]! > '5' || tail.length > 1) up = true;
  else up = frac2 % 2 === 1; // exactly half: to even
  if (up) {
    frac2++;
    if (frac2 === 100) {
      frac2 = 0;
      intPart++;
    }
  }
  return `${intPart}.${String(frac2).padStart(2, '0')}`;
}

/** dump_human_image_check. */
export function humanImageCheck(c: ImageCheck): string {
  let out = '';
  const corruptions = c.corruptions ?? 0;
  const leaks = c.leaks ?? 0;
  if (!(corruptions || leaks || c['check-errors'])) {
    out += 'No errors were found on the image.\n';
  } else {
    if (corruptions) {
      out += `\n${corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    }
    if (leaks) out += `\n${leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    if (c['check-errors']) out += `\n${c['check-errors']} internal errors have occurred during the check.\n`;
  }
  const total = c['total-clusters'] ?? 0;
  const alloc = c['allocated-clusters'] ?? 0;
  if (total !== 0 && alloc !== 0) {
    const frag = c['fragmented-clusters'] ?? 0;
    const comp = c['compressed-clusters'] ?? 0;
    out +=
      `${alloc}/${total} = ${percent2((alloc * 100) / total)}% allocated, ` +
      `${percent2((frag * 100) / alloc)}% fragmented, ${percent2((comp * 100) / alloc)}% compressed clusters\n`;
  }
  if (c['image-end-offset']) out += `Image end offset: ${c['image-end-offset']}\n`;
  return out;
}

/** The "repaired" banner qemu-img prints before double-checking. */
export function repairedBanner(first: CheckResult): string {
  return (
    'The following inconsistencies were found and repaired:\n\n' +
    `    ${first.leaksFixed} leaked clusters\n` +
    `    ${first.corruptionsFixed} corruptions\n\n` +
    'Double checking the fixed image now...\n'
  );
}

export interface CheckRun {
  /** The (repairing) pass. */
  first: CheckResult;
  /** The double check, run when the first pass repaired anything. */
  second?: CheckResult;
  /** The double check could not complete. */
  secondFailure?: CheckFailure;
  /** What to report: the double check's result with the first pass's fixed counts, or the first pass. */
  final?: CheckResult;
}

/**
 * Check a qcow2 image like qemu-img: one pass with the requested repairs; if it repaired
 * anything, a second read-only pass. Throws CheckFailure when the first pass cannot complete and
 * QcowError when the image cannot be opened for checking. `onRepaired` runs between the passes.
 */
export async function checkQcow2Image(
  io: ByteIO,
  opts: { repair?: RepairMode; log?: CheckLog; onRepaired?: (first: CheckResult) => void | Promise<void> },
): Promise<CheckRun> {
  const fix = fixMode(opts.repair);
  const checker = await Qcow2Checker.open(io, { writable: fix !== 0, log: opts.log });
  return runChecks(checker, fix, opts.onRepaired);
}

/** The two-pass logic on an already opened checker. */
export async function runChecks(
  checker: Qcow2Checker,
  fix: number,
  onRepaired?: (first: CheckResult) => void | Promise<void>,
): Promise<CheckRun> {
  const first = await checker.check(fix);
  if (!first.corruptionsFixed && !first.leaksFixed) return { first, final: first };
  await onRepaired?.(first);
  try {
    const second = await checker.check(0);
    return { first, second, final: { ...second, leaksFixed: first.leaksFixed, corruptionsFixed: first.corruptionsFixed } };
  } catch (e) {
    if (e instanceof CheckFailure) return { first, secondFailure: e };
    throw e;
  }
}

/** qemu-img's exit code for a completed check: 2 corruptions, 3 leaks only, 0 clean (1 for internal errors). */
export function checkExitCode(r: CheckResult): number {
  if (r.checkErrors) return 1;
  if (r.corruptions) return 2;
  if (r.leaks) return 3;
  return 0;
}
