/**
 * LUKS key-slot management (`qemu-img amend -o encrypt.*` on a LUKS qcow2 image), following
 * QEMU 7.2's qcrypto_block_luks_amend_options with its checks, their order and its messages:
 *
 * - `encrypt.state=active,encrypt.new-secret=ID[,encrypt.keyslot=N][,encrypt.iter-time=MS]`: the
 *   master key is recovered with the image's own password (`encrypt.key-secret` of the open) and
 *   stored in slot N (or the first free one) under the new password.
 * - `encrypt.state=inactive,(encrypt.keyslot=N|encrypt.old-secret=ID)`: erase slot N, or every
 *   slot the old password opens; erasing the last active slot(s) needs `--force`.
 *
 * `prepareLuksAmend` makes every check (PBKDF2 included) before anything is written and returns
 * the writes to make. Crash consistency as QEMU: a new slot's key material is written (and
 * flushed) before the header that marks the slot active; an erased slot is marked inactive in the
 * header (flushed) before its key material is overwritten with random bytes.
 */
import { QcowError } from '../../core/errors.js';
import { cryptoBackend, type CryptoBackend } from '../../codecs/crypto-registry.js';
import type { Qcow2Header } from '../qcow2/header.js';
import { wipe } from './bytes.js';
import { decodeLuksHeader, encodeLuksHeader, LUKS_HEADER_SIZE, LUKS_NUM_SLOTS, LUKS_SLOT_DISABLED, LUKS_SLOT_ENABLED, LUKS_SALT_LEN, luksParams, validateLuksHeader, type LuksHeader, type LuksParams } from './luks-header.js';
import { fillKeySlot, loadKeySlot, LUKS_DEFAULTS, pbkdf2Rate, slotIterations, unlockLuks } from './luks.js';
import { secretPassword } from './options.js';
import { SECTOR_SIZE } from './sector-cipher.js';

/** The `encrypt.*` amend options as given (`keyslot` as the number option's u64 value). */
export interface LuksAmendOptions {
  state?: string;
  newSecret?: string;
  oldSecret?: string;
  keyslot?: bigint;
  iterTime?: number;
}

/** Byte access to the LUKS header area (offsets from its start). */
export interface LuksArea {
  read(offset: number, length: number): Promise<Uint8Array>;
  write(data: Uint8Array, offset: number): Promise<void>;
  flush(): Promise<void>;
}

export interface LuksAmendContext {
  /** The password the image was opened with (QEMU's `luks->secret`). */
  password: Uint8Array;
  secrets?: ReadonlyMap<string, Uint8Array>;
  force: boolean;
  /** Calibration time of the PBKDF2 benchmark (ms, default 100). */
  calibrationMs?: number;
}

/** QEMU overwrites an erased slot's key material this many times. */
const ERASE_ITERATIONS = 40;

const fail = (msg: string) => new QcowError('EINVAL', msg);

/** The checks QEMU makes while parsing the options (before any key is looked at). */
export function checkLuksAmendOptions(o: LuksAmendOptions): 'active' | 'inactive' {
  if (o.state === undefined) throw fail("Parameter 'state' is missing");
  if (o.state !== 'active' && o.state !== 'inactive') throw fail(`Parameter 'state' does not accept value '${o.state}'`);
  return o.state;
}

/** QEMU keeps the key slot in a C int. */
function slotNumber(v: bigint): number {
  return Number(BigInt.asIntN(32, v));
}

function countActive(h: LuksHeader): number {
  return h.slots.filter((s) => s.active === LUKS_SLOT_ENABLED).length;
}

/**
 * Check an amend request against the header and work out the change; returns the function that
 * writes it (nothing is written before).
 */
export async function prepareLuksAmend(area: LuksArea, o: LuksAmendOptions, ctx: LuksAmendContext, be: CryptoBackend = cryptoBackend()): Promise<() => Promise<void>> {
  const state = checkLuksAmendOptions(o);
  const h = decodeLuksHeader(await area.read(0, LUKS_HEADER_SIZE));
  validateLuksHeader(h);
  const p = luksParams(h);
  const read = (off: number, len: number) => area.read(off, len);
  return state === 'active' ? prepareAdd(area, h, p, o, ctx, be) : prepareErase(area, h, p, o, ctx, be, read);
}

async function prepareAdd(area: LuksArea, h: LuksHeader, p: LuksParams, o: LuksAmendOptions, ctx: LuksAmendContext, be: CryptoBackend): Promise<() => Promise<void>> {
  const iterTime = o.iterTime ?? LUKS_DEFAULTS.iterTime;
  if (o.newSecret === undefined) throw fail("'new-secret' is required to activate a keyslot");
  if (o.oldSecret !== undefined) throw fail("'old-secret' must not be given when activating keyslots");
  let index: number;
  if (o.keyslot !== undefined) {
    index = slotNumber(o.keyslot);
    if (index < 0 || index >= LUKS_NUM_SLOTS) {
      throw fail(`Invalid keyslot ${index >>> 0} specified, must be between 0 and ${LUKS_NUM_SLOTS - 1}`);
    }
  } else {
    index = h.slots.findIndex((s) => s.active === LUKS_SLOT_DISABLED);
    if (index < 0) throw fail("Can't add a keyslot - all keyslots are in use");
  }
  if (!ctx.force && h.slots[index]!.active === LUKS_SLOT_ENABLED) {
    throw fail(`Refusing to overwrite active keyslot ${index} - please erase it first`);
  }
  const masterKey = await unlockLuks(h, p, (off, len) => area.read(off, len), ctx.password, be);
  let material: Uint8Array;
  try {
    const newPassword = secretPassword(ctx.secrets, o.newSecret);
    const rate = pbkdf2Rate(be, p.hash, ctx.calibrationMs);
    const iterations = slotIterations(rate, p.hash, h.keyBytes, iterTime);
    material = await fillKeySlot(h, p, h.slots[index]!, masterKey, newPassword, iterations, be);
  } finally {
    wipe(masterKey);
  }
  const slot = h.slots[index]!;
  return async () => {
    await area.write(material, slot.keyMaterialOffset * SECTOR_SIZE);
    await area.flush();
    await area.write(encodeLuksHeader(h), 0);
    await area.flush();
    wipe(material);
  };
}

async function prepareErase(
  area: LuksArea,
  h: LuksHeader,
  p: LuksParams,
  o: LuksAmendOptions,
  ctx: LuksAmendContext,
  be: CryptoBackend,
  read: (off: number, len: number) => Promise<Uint8Array>,
): Promise<() => Promise<void>> {
  if (o.newSecret !== undefined) throw fail("'new-secret' must not be given when erasing keyslots");
  if (o.iterTime !== undefined) throw fail("'iter-time' must not be given when erasing keyslots");
  const oldPassword = o.oldSecret !== undefined ? secretPassword(ctx.secrets, o.oldSecret) : undefined;
  const opens = async (i: number): Promise<boolean> => {
    const mk = await loadKeySlot(h, p, i, read, oldPassword!, be);
    wipe(mk);
    return mk !== undefined;
  };
  let erase: number[];
  if (o.keyslot !== undefined) {
    const index = slotNumber(o.keyslot);
    if (index < 0 || index >= LUKS_NUM_SLOTS) throw fail(`Invalid keyslot ${index} specified, must be between 0 and ${LUKS_NUM_SLOTS - 1}`);
    if (oldPassword !== undefined && !(await opens(index))) {
      throw fail(`Given keyslot ${index} doesn't contain the given old password for erase operation`);
    }
    if (!ctx.force && h.slots[index]!.active !== LUKS_SLOT_ENABLED) throw fail(`Given keyslot ${index} is already erased (inactive) `);
    if (!ctx.force && countActive(h) === 1) {
      throw fail(`Attempt to erase the only active keyslot ${index} which will erase all the data in the image irreversibly - refusing operation`);
    }
    erase = [index];
  } else if (oldPassword !== undefined) {
    erase = [];
    for (let i = 0; i < LUKS_NUM_SLOTS; i++) if (await opens(i)) erase.push(i);
    if (erase.length === 0) throw fail('No keyslots match given (old) password for erase operation');
    if (!ctx.force && erase.length === countActive(h)) {
      throw fail(
        'All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation',
      );
    }
  } else {
    throw fail('To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given');
  }
  return async () => {
    for (const i of erase) {
      const slot = h.slots[i]!;
      slot.salt = new Uint8Array(LUKS_SALT_LEN);
      slot.iterations = 0;
      slot.active = LUKS_SLOT_DISABLED;
      await area.write(encodeLuksHeader(h), 0);
      await area.flush();
      const len = h.keyBytes * slot.stripes;
      for (let k = 0; k < ERASE_ITERATIONS; k++) await area.write(be.randomBytes(len), slot.keyMaterialOffset * SECTOR_SIZE);
      await area.flush();
    }
  };
}

/** What `prepareQcow2LuksAmend` needs of an open qcow2 image. */
export interface Qcow2LuksHost {
  readonly header: Qcow2Header;
  readMetadata(offset: number, length: number, what: string): Promise<Uint8Array>;
  rawWrite(data: Uint8Array, offset: number): Promise<void>;
  flush(): Promise<void>;
}

/** The LUKS area of a qcow2 image (the FDE extension's range; nothing outside it is touched). */
export function qcow2LuksArea(img: Qcow2LuksHost): LuksArea {
  const ext = img.header.cryptoHeader;
  if (!ext) throw new QcowError('ECORRUPT', 'LUKS-encrypted image is missing its encryption header extension');
  const inside = (off: number, len: number) => {
    if (off < 0 || off + len > ext.length) throw fail('Request for data outside of extension header');
  };
  return {
    read: async (off, len) => {
      inside(off, len);
      return img.readMetadata(ext.offset + off, len, 'LUKS header');
    },
    write: async (data, off) => {
      inside(off, data.length);
      await img.rawWrite(data, ext.offset + off);
    },
    flush: () => img.flush(),
  };
}

/** amend on a LUKS qcow2 image opened read-write with its key (`keySecret`). */
export async function prepareQcow2LuksAmend(
  img: Qcow2LuksHost,
  o: LuksAmendOptions,
  ctx: { secrets?: ReadonlyMap<string, Uint8Array>; keySecret: string; force: boolean },
  be?: CryptoBackend,
): Promise<() => Promise<void>> {
  const password = secretPassword(ctx.secrets, ctx.keySecret);
  return prepareLuksAmend(qcow2LuksArea(img), o, { password, force: ctx.force, ...(ctx.secrets ? { secrets: ctx.secrets } : {}) }, be);
}
