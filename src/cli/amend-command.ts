/**
 * `qcowkit amend [--object OBJ] [--image-opts] [-p] [-q] [-f FMT] [-t CACHE] [--force] -o OPTIONS FILE`
 * and `amend -o help`: qemu-img 7.2's amend for qcow2 — compat (0.10 <-> 1.1), lazy_refcounts,
 * data_file, data_file_raw, size, with qemu-img's option parsing, messages and exit codes.
 *
 * Differences from qemu-img, all on the safe side: every check is made before anything changes
 * (qemu-img may resize before refusing a downgrade); a downgrade of an image with persistent
 * bitmaps removes them cleanly (qemu-img leaves them behind, leaked and inconsistent).
 * LUKS key slots (`encrypt.state`, `encrypt.keyslot`, `encrypt.new-secret`, `encrypt.old-secret`,
 * `encrypt.iter-time`): src/formats/crypto/luks-amend.ts, prepared (PBKDF2 included) with the other
 * checks and written right after a compat upgrade, as qemu-img orders it.
 * refcount_bits: new refcount structures written beside the old ones, switched in by one header
 * write (src/formats/qcow2/amend-refcount.ts).
 */
import { QcowError } from '../core/errors.js';
import { amendQcow2 } from '../formats/qcow2/amend.js';
import { entryOffset } from '../formats/qcow2/cluster-map.js';
import * as C from '../formats/qcow2/constants.js';
import { CreateOptions, QCOW2_CREATE_OPTS, hasHelpOption, isValidOptionList, type OptDesc } from '../formats/qcow2/create-options.js';
import { Qcow2Driver } from '../formats/qcow2/driver.js';
import { checkCacheMode } from './common.js';
import { CliError, HelpRequested, UsageError, messageOf } from './errors.js';
import { getopt } from './getopt.js';
import { closeAll } from './open.js';
import type { Io } from './output.js';
import { ProgressPrinter } from './progress.js';
import { resizeDriver } from './resize-command.js';
import { openWritable } from './toolbox-common.js';
import { QEMU_FORMATS } from './rebase-command.js';
import { checkLuksAmendOptions, prepareQcow2LuksAmend, type LuksAmendOptions } from '../formats/crypto/luks-amend.js';
import { resolveImageArg, secretsFromObjects } from './open.js';

/** qcow2's amend options (help text as qemu-img 7.2 prints it). */
export const QCOW2_AMEND_OPTS: readonly OptDesc[] = [
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  { name: 'compat', type: 'string', help: 'Compatibility level (v2 [0.10] or v3 [1.1])' },
  { name: 'backing_file', type: 'string', help: 'File name of a base image' },
  { name: 'backing_fmt', type: 'string', help: 'Image format of the base image' },
  { name: 'data_file', type: 'string', help: 'File name of an external data file' },
  { name: 'data_file_raw', type: 'bool', help: 'The external data file must stay valid as a raw image' },
  { name: 'lazy_refcounts', type: 'bool', help: 'Postpone refcount updates' },
  { name: 'refcount_bits', type: 'number', help: 'Width of a reference count entry in bits' },
  { name: 'encrypt.new-secret', type: 'string', help: 'New secret to set in the matching keyslots. Empty string to erase' },
  { name: 'encrypt.state', type: 'string', help: 'Select new state of affected keyslots (active/inactive)' },
  { name: 'encrypt.old-secret', type: 'string', help: 'Select all keyslots that match this password' },
  { name: 'encrypt.keyslot', type: 'number', help: 'Select a single keyslot to modify explicitly' },
  { name: 'encrypt.iter-time', type: 'number', help: 'Time to spend in PBKDF in milliseconds' },
];

const TYPE_LABEL: Record<OptDesc['type'], string> = {
  string: '<str>',
  size: '<size>',
  number: '<num>',
  bool: '<bool (on/off)>',
};

export function amendHelpText(): string {
  const list = [...QCOW2_AMEND_OPTS].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return (
    "Amend options for 'qcow2':\n" +
    list.map((d) => `  ${`${d.name}=${TYPE_LABEL[d.type]}`.padEnd(22)} - ${d.help}\n`).join('')
  );
}

const SIZE_HINT_ONE_LINE =
  ' Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, respectively.';
const SIZE_HINT = '\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.';

/** Parse the `-o` text against the amend options; create-only options get qemu-img's hint. */
export function parseAmendOptions(text: string): CreateOptions {
  const opts = new CreateOptions(QCOW2_AMEND_OPTS);
  try {
    opts.parse(text);
    return opts;
  } catch (e) {
    let msg = messageOf(e).replace(SIZE_HINT_ONE_LINE, SIZE_HINT);
    const all = [...QCOW2_AMEND_OPTS, ...QCOW2_CREATE_OPTS.filter((d) => !QCOW2_AMEND_OPTS.some((a) => a.name === d.name))];
    try {
      new CreateOptions(all).parse(text);
      msg += '\nThis option is only supported for image creation';
    } catch {
      // not a create option either
    }
    throw new CliError(msg);
  }
}

interface AmendPlan {
  upgrade: boolean;
  downgrade: boolean;
  lazy?: boolean;
  dataFile?: string;
  dataFileRawOff: boolean;
  size?: number;
  refcountBits?: number;
  /** LUKS key-slot change, checked and ready to write. */
  luks?: () => Promise<void>;
}

/** How the image was opened: what the LUKS key-slot operations need. */
interface AmendContext {
  secrets?: Map<string, Uint8Array>;
  keySecret?: string;
  force: boolean;
}

/** The `encrypt.*` amend options given. */
function luksAmendOptions(o: CreateOptions): LuksAmendOptions {
  const out: LuksAmendOptions = {};
  const state = o.str('encrypt.state');
  if (state !== undefined) out.state = state;
  const ns = o.str('encrypt.new-secret');
  if (ns !== undefined) out.newSecret = ns;
  const os = o.str('encrypt.old-secret');
  if (os !== undefined) out.oldSecret = os;
  const ks = o.big('encrypt.keyslot');
  if (ks !== undefined) out.keyslot = ks;
  const it = o.big('encrypt.iter-time');
  if (it !== undefined) out.iterTime = Number(BigInt.asIntN(64, it));
  return out;
}

/** All of qemu's checks (qcow2_amend_options and what it calls), before anything is changed. */
async function plan(drv: Qcow2Driver, o: CreateOptions, ctx: AmendContext): Promise<AmendPlan> {
  const h = drv.header;
  const fail = (m: string) => new CliError(m);
  const oldVersion = h.version;
  let newVersion = oldVersion;
  // The options in qemu's order (size, compat, backing_file, backing_fmt, data_file, data_file_raw,
  // lazy_refcounts, refcount_bits, encrypt.*): the checks made while reading them.
  const compat = o.str('compat');
  if (compat !== undefined) {
    if (compat === '0.10' || compat === 'v2') newVersion = 2;
    else if (compat === '1.1' || compat === 'v3') newVersion = 3;
    else throw fail(`Unknown compatibility level ${compat}`);
  }
  const hasDataFile = (h.incompatibleFeatures & C.INCOMPAT_DATA_FILE) !== 0n;
  const isRaw = (h.autoclearFeatures & C.AUTOCLEAR_DATA_FILE_RAW) !== 0n;
  const dataFile = o.str('data_file');
  if (dataFile !== undefined && !hasDataFile) throw fail('data-file can only be set for images that use an external data file');
  const dataFileRaw = o.has('data_file_raw') ? o.bool('data_file_raw') : isRaw;
  if (dataFileRaw && !isRaw) throw fail('data-file-raw cannot be set on existing images');
  const curBits = 2 ** h.refcountOrder;
  let refcountBits = curBits;
  if (o.has('refcount_bits')) {
    const v = BigInt.asIntN(64, o.big('refcount_bits')!);
    if (v <= 0n || v > 64n || (v & (v - 1n)) !== 0n) throw fail('Refcount width must be a power of two and may not exceed 64 bits');
    refcountBits = Number(v);
  }
  if (QCOW2_AMEND_OPTS.some((d) => d.name.startsWith('encrypt.') && o.has(d.name))) {
    if (h.cryptMethod === C.CRYPT_NONE) throw fail("Can't amend encryption options - encryption not present");
    if (h.cryptMethod !== C.CRYPT_LUKS) throw fail('Only LUKS encryption options can be amended');
  }
  const luksOpts = QCOW2_AMEND_OPTS.some((d) => d.name.startsWith('encrypt.') && o.has(d.name)) ? luksAmendOptions(o) : undefined;
  // After the upgrade: backing file, lazy refcounts, refcount width.
  const backingFile = o.str('backing_file');
  const backingFmt = o.str('backing_fmt');
  if (backingFile !== undefined || backingFmt !== undefined) {
    if (backingFile !== h.backingFile || backingFmt !== h.backingFormat) {
      throw fail("Cannot amend the backing file\nYou can use 'qcowkit rebase' instead.");
    }
  }
  const curLazy = (h.compatibleFeatures & C.COMPAT_LAZY_REFCOUNTS) !== 0n;
  const lazy = o.has('lazy_refcounts') ? o.bool('lazy_refcounts') : curLazy;
  if (lazy !== curLazy && lazy && newVersion < 3) {
    throw fail('Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
  }
  if (refcountBits !== curBits) {
    if (newVersion < 3 && refcountBits !== 16) {
      throw fail('Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
    }
  }
  // size= (0 means "not given", as in qemu)
  let size: number | undefined;
  const sz = o.big('size');
  if (sz !== undefined && sz !== 0n) {
    const v = BigInt.asIntN(64, sz);
    if (v < 0n || v > BigInt(Number.MAX_SAFE_INTEGER)) throw fail('File too large');
    size = Number(v);
    if (size % 512) throw fail('The new size must be a multiple of 512');
    if (size !== drv.size) {
      if (drv.snapshots.length && Math.max(oldVersion, newVersion) < 3) throw fail("Can't resize a v2 image which has snapshots");
      if (size > drv.size && Math.ceil(size / drv.g.l1Coverage) > C.QCOW_MAX_L1_SIZE / 8) {
        throw fail('Failed to grow the L1 table: File too large');
      }
    } else size = undefined;
  }
  // Downgrade (done last).
  const downgrade = newVersion < oldVersion;
  if (downgrade) {
    if (refcountBits !== 16) throw fail('compat=0.10 requires refcount_bits=16');
    if (hasDataFile) throw fail('Cannot downgrade an image with a data file');
    const incompat = h.incompatibleFeatures & ~(C.INCOMPAT_COMPRESSION | C.INCOMPAT_DIRTY);
    if (incompat) throw fail(`Cannot downgrade an image with incompatible features 0x${incompat.toString(16)} set`);
    if (h.compressionType !== C.COMPRESSION_ZLIB && (await hasCompressedClusters(drv))) {
      throw fail('Cannot downgrade an image with zstd compression type and existing compressed clusters');
    }
  }
  // LUKS key slots last: the checks that need the key (PBKDF2) once everything else passed.
  let luks: AmendPlan['luks'];
  if (luksOpts) {
    checkLuksAmendOptions(luksOpts);
    if (ctx.keySecret === undefined) throw fail("Parameter 'encrypt.key-secret' is required for cipher");
    luks = await prepareQcow2LuksAmend(drv, luksOpts, {
      keySecret: ctx.keySecret,
      force: ctx.force,
      ...(ctx.secrets ? { secrets: ctx.secrets } : {}),
    });
  }
  return {
    ...(luks ? { luks } : {}),
    upgrade: newVersion > oldVersion,
    downgrade,
    ...(lazy !== curLazy ? { lazy } : {}),
    ...(dataFile !== undefined ? { dataFile } : {}),
    dataFileRawOff: isRaw && !dataFileRaw,
    ...(size !== undefined ? { size } : {}),
    ...(refcountBits !== curBits ? { refcountBits } : {}),
  };
}

/** Whether any L2 table reachable from the active or a snapshot L1 table holds a compressed cluster. */
async function hasCompressedClusters(drv: Qcow2Driver): Promise<boolean> {
  const w = drv.writer!;
  const tables: Uint8Array[] = [drv.activeL1];
  for (const sn of drv.snapshots) tables.push(await drv.readMetadata(sn.l1TableOffset, sn.l1Size * 8, 'snapshot L1 table'));
  const seen = new Set<number>();
  for (const l1 of tables) {
    const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    for (let i = 0; i < l1.length / 8; i++) {
      const l2 = entryOffset(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4));
      if (!l2 || seen.has(l2)) continue;
      seen.add(l2);
      for (let k = 0; k < drv.g.l2Entries; k++) {
        if ((await w.tables.getEntry(l2, k)).hi & 0x40000000) return true;
      }
    }
  }
  return false;
}

async function apply(drv: Qcow2Driver, p: AmendPlan): Promise<void> {
  if (p.upgrade) await amendQcow2(drv, { compat: '1.1' });
  if (p.luks) await p.luks();
  if (p.lazy !== undefined || p.dataFileRawOff || (p.dataFile !== undefined && p.dataFile !== '')) {
    await amendQcow2(drv, {
      ...(p.lazy !== undefined ? { lazyRefcounts: p.lazy } : {}),
      ...(p.dataFileRawOff ? { dataFileRaw: false } : {}),
      ...(p.dataFile ? { dataFile: p.dataFile } : {}),
    });
  }
  if (p.refcountBits !== undefined) {
    try {
      await amendQcow2(drv, { refcountBits: p.refcountBits });
    } catch (e) {
      if (e instanceof QcowError && /^Cannot decrease/.test(e.message)) throw new CliError(e.message);
      throw e;
    }
  }
  if (p.dataFile === '' && drv.header.dataFile !== undefined) {
    await drv.rewriteHeader({ ...drv.header, dataFile: undefined });
  }
  if (p.size !== undefined) await resizeDriver(drv, p.size);
  if (p.downgrade) {
    // v2 images cannot hold persistent bitmaps or a compression type: drop them first.
    for (const b of [...drv.bitmaps]) await drv.bitmapOps().remove(b.name);
    const h = drv.header;
    if (h.compressionType !== C.COMPRESSION_ZLIB || h.incompatibleFeatures & C.INCOMPAT_COMPRESSION) {
      await drv.rewriteHeader({ ...h, compressionType: C.COMPRESSION_ZLIB, incompatibleFeatures: h.incompatibleFeatures & ~C.INCOMPAT_COMPRESSION });
    }
    await amendQcow2(drv, { compat: '0.10' });
  }
  await drv.flush();
}

export async function cmdAmend(argv: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(argv, {
    short: ':ho:f:t:pq',
    long: { help: false, object: true, 'image-opts': false, force: false },
  });
  let format: string | undefined;
  let cache: string | undefined;
  let progress = false;
  let quiet = false;
  let imageOpts = false;
  let force = false;
  const objects: string[] = [];
  const lists: string[] = [];
  for (const o of options) {
    switch (o.name) {
      case 'h':
      case 'help':
        throw new HelpRequested();
      case 'o':
        if (!isValidOptionList(o.value!)) throw new CliError(`Invalid option list: ${o.value}`);
        lists.push(o.value!);
        break;
      case 'f':
        format = o.value!;
        break;
      case 't':
        cache = o.value!;
        break;
      case 'p':
        progress = true;
        break;
      case 'q':
        quiet = true;
        break;
      case 'image-opts':
        imageOpts = true;
        break;
      case 'object':
        objects.push(o.value!);
        break;
      case 'force':
        force = true;
        break;
      default:
        break;
    }
  }
  if (!lists.length) throw new UsageError('Must specify options (-o)');
  const text = lists.join(',');
  if (quiet) progress = false;
  const help = hasHelpOption(text);
  const printHelp = (fmt: string): number => {
    if (fmt !== 'qcow2') {
      if (!QEMU_FORMATS.has(fmt)) throw new CliError(`Unknown file format '${fmt}'`);
      throw new CliError(`Format driver '${fmt}' does not support option amendment`);
    }
    io.out.write(amendHelpText());
    return 0;
  };
  if (format !== undefined && help) return printHelp(format);
  if (operands.length !== 1) throw new CliError('Expecting one image file name');
  if (cache !== undefined) checkCacheMode(cache, false);
  if (imageOpts && format !== undefined) throw new CliError('--image-opts and --format are mutually exclusive');
  const file = operands[0]!;

  const secrets = secretsFromObjects(objects);
  const keySecret = resolveImageArg(file, { imageOpts }).keySecret;
  const drv = await openWritable(file, { imageOpts, ...(format !== undefined ? { format } : {}), ...(secrets ? { secrets } : {}) }, io);
  try {
    if (help) {
      printHelp(drv.format);
    } else {
      if (!(drv instanceof Qcow2Driver)) throw new CliError(`Format driver '${drv.format}' does not support option amendment`);
      const opts = parseAmendOptions(text);
      const p = await plan(drv, opts, { force, ...(secrets ? { secrets } : {}), ...(keySecret !== undefined ? { keySecret } : {}) });
      const bar = new ProgressPrinter(io.out, progress, 1.0, 'absolute');
      bar.report(0, 100);
      try {
        await apply(drv, p);
      } catch (e) {
        throw e instanceof CliError ? e : new CliError(messageOf(e));
      } finally {
        bar.report(100, 100);
        bar.end();
      }
    }
    await drv.close();
  } catch (e) {
    await closeAll([drv]);
    if (e instanceof QcowError) throw new CliError(e.message);
    throw e;
  }
  return 0;
}
