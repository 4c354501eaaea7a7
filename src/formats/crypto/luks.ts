/**
 * LUKS1 key handling: unlocking a key slot with a password (PBKDF2 → decrypt the split key
 * material → anti-forensic merge → check against the master-key digest), creating a header with
 * one active slot (PBKDF2 iterations calibrated to the requested time like QEMU does), and the
 * `info` block qemu-img shows.
 */
import { QcowError } from '../../core/errors.js';
import { HASH_LENGTH, type CryptoBackend, type HashAlg } from '../../codecs/crypto-registry.js';
import { afMerge, afSplit } from './af.js';
import { constantTimeEqual, wipe } from './bytes.js';
import {
  LUKS_ALIGN,
  LUKS_DIGEST_LEN,
  LUKS_KEY_SLOT_OFFSET,
  LUKS_MIN_MASTER_KEY_ITERS,
  LUKS_MIN_SLOT_ITERS,
  LUKS_NUM_SLOTS,
  LUKS_SALT_LEN,
  LUKS_SLOT_DISABLED,
  LUKS_SLOT_ENABLED,
  LUKS_STRIPES,
  encodeLuksHeader,
  luksNames,
  slotSectors,
  type LuksHeader,
  type LuksKeySlot,
  type LuksParams,
} from './luks-header.js';
import { checkSupported, makeSectorCipher, masterKeyBytes, SECTOR_SIZE, type CipherMode, type IvgenAlg, type SectorCipherSpec } from './sector-cipher.js';

/** Reads `length` bytes at `offset` from the start of the LUKS header. */
export type LuksReader = (offset: number, length: number) => Promise<Uint8Array>;

export const INVALID_PASSWORD = 'Invalid password, cannot unlock any keyslot';

/** Try every active slot in order; returns the master key or fails with QEMU's message. */
export async function unlockLuks(h: LuksHeader, p: LuksParams, read: LuksReader, password: Uint8Array, be: CryptoBackend): Promise<Uint8Array> {
  checkSupported(p.spec);
  for (const slot of h.slots) {
    if (slot.active !== LUKS_SLOT_ENABLED) continue;
    const mk = await tryKeySlot(h, p, slot, read, password, be);
    if (mk) return mk;
  }
  throw new QcowError('EINVAL', INVALID_PASSWORD);
}

/**
 * The master key if `password` opens slot `index` (undefined when it does not or the slot is
 * inactive), QEMU's qcrypto_block_luks_load_key.
 */
export async function loadKeySlot(h: LuksHeader, p: LuksParams, index: number, read: LuksReader, password: Uint8Array, be: CryptoBackend): Promise<Uint8Array | undefined> {
  checkSupported(p.spec);
  const slot = h.slots[index]!;
  if (slot.active !== LUKS_SLOT_ENABLED) return undefined;
  return tryKeySlot(h, p, slot, read, password, be);
}

async function tryKeySlot(
  h: LuksHeader,
  p: LuksParams,
  slot: LuksKeySlot,
  read: LuksReader,
  password: Uint8Array,
  be: CryptoBackend,
): Promise<Uint8Array | undefined> {
  const slotKey = await be.pbkdf2(p.hash, password, slot.salt, slot.iterations, h.keyBytes);
  const splitLen = h.keyBytes * slot.stripes;
  const material = await read(slot.keyMaterialOffset * SECTOR_SIZE, slotSectors(h.keyBytes, slot.stripes) * SECTOR_SIZE);
  makeSectorCipher(p.spec, slotKey, be).decrypt(material, 0);
  const mk = afMerge(be, p.hash, material.subarray(0, splitLen), h.keyBytes, slot.stripes);
  wipe(slotKey, material);
  if (h.mkDigestIterations === 0) return undefined;
  const digest = await be.pbkdf2(p.hash, mk, h.mkDigestSalt, h.mkDigestIterations, LUKS_DIGEST_LEN);
  if (constantTimeEqual(digest, h.mkDigest)) return mk;
  wipe(mk);
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// Creation

export interface LuksCreateOptions {
  /** Default 'aes-256'. */
  cipherAlg?: string;
  /** Default 'xts'. */
  cipherMode?: CipherMode;
  /** Default 'plain64'. */
  ivgenAlg?: IvgenAlg;
  /** Hash for essiv (default sha256 with essiv; written into the mode string whenever given, as QEMU does). */
  ivgenHashAlg?: HashAlg;
  /** PBKDF2 and anti-forensic hash, default 'sha256'. */
  hashAlg?: HashAlg;
  /** Milliseconds of PBKDF2 for unlocking the slot (default 2000); the master-key digest gets 1/8. */
  iterTime?: number;
  /** The password (secret bytes). */
  secret: Uint8Array;
  /** How long each timing run of the PBKDF2 benchmark lasts at least, in CPU ms (default 100). */
  calibrationMs?: number;
}

export interface LuksCreated {
  header: LuksHeader;
  /** Header and key material: exactly `payloadOffset` sectors (slot areas of inactive slots are zero). */
  blob: Uint8Array;
  masterKey: Uint8Array;
  params: LuksParams;
}

export const LUKS_DEFAULTS = { cipherAlg: 'aes-256', cipherMode: 'xts', ivgenAlg: 'plain64', hashAlg: 'sha256', iterTime: 2000 } as const;

/** The spec and hash a set of create options means (QEMU's defaults filled in). */
export function luksCreateParams(o: Omit<LuksCreateOptions, 'secret'>): LuksParams {
  const spec: SectorCipherSpec = {
    cipherAlg: o.cipherAlg ?? LUKS_DEFAULTS.cipherAlg,
    mode: o.cipherMode ?? LUKS_DEFAULTS.cipherMode,
    ivgen: o.ivgenAlg ?? LUKS_DEFAULTS.ivgenAlg,
  };
  const ivHash = o.ivgenHashAlg ?? (spec.ivgen === 'essiv' ? 'sha256' : undefined);
  if (ivHash) spec.ivgenHash = ivHash;
  return { spec, hash: o.hashAlg ?? LUKS_DEFAULTS.hashAlg };
}

/** Bytes the header and the 8 key-material areas take (the payload offset): 4096 + 8 × round_up(key × 4000, 4096). */
export function luksHeaderLength(o: Pick<LuksCreateOptions, 'cipherAlg' | 'cipherMode'> = {}): number {
  const keyBytes = masterKeyBytes({ cipherAlg: o.cipherAlg ?? LUKS_DEFAULTS.cipherAlg, mode: o.cipherMode ?? LUKS_DEFAULTS.cipherMode });
  return LUKS_KEY_SLOT_OFFSET + LUKS_NUM_SLOTS * slotAreaBytes(keyBytes);
}

/**
 * QEMU 7.2 encrypts a key slot's split key (key bytes × 4000) as whole 512-byte sectors and aborts
 * on anything else (an assertion in crypto/block.c): 24-byte keys (aes-192 in cbc or ecb mode) and
 * 8-byte keys cannot be used. qcowkit refuses to make such a header rather than an image QEMU
 * cannot open.
 */
export function checkLuksKeyMaterial(o: Pick<LuksCreateOptions, 'cipherAlg' | 'cipherMode'> = {}): void {
  const alg = o.cipherAlg ?? LUKS_DEFAULTS.cipherAlg;
  const mode = o.cipherMode ?? LUKS_DEFAULTS.cipherMode;
  const keyBytes = masterKeyBytes({ cipherAlg: alg, mode });
  if ((keyBytes * LUKS_STRIPES) % SECTOR_SIZE) {
    throw new QcowError(
      'ENOTSUP',
      `Cipher ${alg}-${mode} is not supported for LUKS images: its key material (${keyBytes * LUKS_STRIPES} bytes) is not a whole number of 512-byte sectors, which QEMU cannot process`,
    );
  }
}

function slotAreaBytes(keyBytes: number): number {
  return Math.ceil((keyBytes * LUKS_STRIPES) / LUKS_ALIGN) * LUKS_ALIGN;
}

/**
 * PBKDF2 iterations per second of CPU time for `hash`, with a one-block output. Timed like QEMU
 * (CPU time, growing the count until one run lasts at least `minMs`), but shorter by default.
 */
export function pbkdf2Rate(be: CryptoBackend, hash: HashAlg, minMs = 100): number {
  const pw = be.randomBytes(32);
  const salt = be.randomBytes(LUKS_SALT_LEN);
  let iters = 1 << 12;
  for (let round = 0; round < 40; round++) {
    const t0 = be.cpuTimeMs();
    be.pbkdf2Sync(hash, pw, salt, iters, HASH_LENGTH[hash]);
    const dt = be.cpuTimeMs() - t0;
    if (dt >= minMs) return (iters * 1000) / dt;
    iters = dt < minMs / 10 ? iters * 10 : Math.ceil((iters * minMs * 1.25) / dt);
  }
  throw new QcowError('EIO', 'Unable to get accurate CPU usage');
}

/** Iterations for `ms` milliseconds of PBKDF2 producing `outLen` bytes (cost grows with output blocks). */
function itersFor(rate: number, hash: HashAlg, outLen: number, ms: number, divisor: number, floor: number): number {
  const blocks = Math.ceil(outLen / HASH_LENGTH[hash]);
  const n = Math.floor(((rate / blocks) * ms) / 1000 / divisor);
  if (!Number.isFinite(n) || n > 0xffffffff) throw new QcowError('ERANGE', `PBKDF iterations ${Math.floor(rate / blocks)} too large to scale`);
  return Math.max(n, floor);
}

/** QEMU takes iter-time as unsigned: a negative one overflows its scaling (same message). */
export function checkIterTime(rate: number, hash: HashAlg, iterTime: number): void {
  if (!Number.isFinite(iterTime) || iterTime < 0) {
    const perSecond = Math.floor(rate / Math.ceil(LUKS_DIGEST_LEN / HASH_LENGTH[hash]));
    throw new QcowError('ERANGE', `PBKDF iterations ${perSecond} too large to scale: Numerical result out of range`);
  }
}

function uuidV4(be: CryptoBackend): string {
  const b = be.randomBytes(16);
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/**
 * A new LUKS1 header with slot 0 holding a fresh random master key under `secret`. Layout as QEMU
 * writes it: key material from 4096, each slot area aligned to 4096, payload after the 8 areas,
 * 4000 stripes, inactive slots 0x0000DEAD with no iterations and a zero salt.
 */
export async function createLuksHeader(o: LuksCreateOptions, be: CryptoBackend): Promise<LuksCreated> {
  const params = luksCreateParams(o);
  const { spec, hash } = params;
  checkSupported(spec);
  checkLuksKeyMaterial(o);
  const iterTime = o.iterTime ?? LUKS_DEFAULTS.iterTime;
  const names = luksNames(spec);
  const keyBytes = names.keyBytes;
  const masterKey = be.randomBytes(keyBytes);
  // Fails early (before any PBKDF2) for an ESSIV hash no AES key size matches, e.g. sha1 → 20 bytes.
  makeSectorCipher(spec, masterKey, be);

  const rate = pbkdf2Rate(be, hash, o.calibrationMs);
  checkIterTime(rate, hash, iterTime);
  const mkIters = itersFor(rate, hash, LUKS_DIGEST_LEN, iterTime, 8, LUKS_MIN_MASTER_KEY_ITERS);
  const mkDigestSalt = be.randomBytes(LUKS_SALT_LEN);
  const mkDigest = await be.pbkdf2(hash, masterKey, mkDigestSalt, mkIters, LUKS_DIGEST_LEN);

  const area = slotAreaBytes(keyBytes);
  const slots: LuksKeySlot[] = [];
  for (let i = 0; i < LUKS_NUM_SLOTS; i++) {
    slots.push({
      active: LUKS_SLOT_DISABLED,
      iterations: 0,
      salt: new Uint8Array(LUKS_SALT_LEN),
      keyMaterialOffset: (LUKS_KEY_SLOT_OFFSET + i * area) / SECTOR_SIZE,
      stripes: LUKS_STRIPES,
    });
  }
  const payloadBytes = LUKS_KEY_SLOT_OFFSET + LUKS_NUM_SLOTS * area;
  const header: LuksHeader = {
    version: 1,
    cipherName: names.cipherName,
    cipherMode: names.cipherMode,
    hashSpec: hash,
    payloadOffset: payloadBytes / SECTOR_SIZE,
    keyBytes,
    mkDigest,
    mkDigestSalt,
    mkDigestIterations: mkIters,
    uuid: uuidV4(be),
    slots,
  };

  // Slot 0: the password's PBKDF2 key encrypts the anti-forensic split of the master key.
  const slot = slots[0]!;
  const material = await fillKeySlot(header, params, slot, masterKey, o.secret, slotIterations(rate, hash, keyBytes, iterTime), be);

  const blob = new Uint8Array(payloadBytes);
  blob.set(encodeLuksHeader(header), 0);
  blob.set(material, slot.keyMaterialOffset * SECTOR_SIZE);
  wipe(material);
  return { header, blob, masterKey, params };
}

/** PBKDF2 iterations of a key slot for `iterTime` ms (QEMU: the 1-second count scaled, at least 1000). */
export function slotIterations(rate: number, hash: HashAlg, keyBytes: number, iterTime: number): number {
  checkIterTime(rate, hash, iterTime);
  return itersFor(rate, hash, keyBytes, iterTime, 1, LUKS_MIN_SLOT_ITERS);
}

/**
 * Store `masterKey` under `password` in `slot` (in memory): new salt, the given iterations, 4000
 * stripes, active. Returns the slot's encrypted key material (exactly the split key's length) to
 * write at `slot.keyMaterialOffset` sectors — before the header that marks the slot active.
 */
export async function fillKeySlot(
  h: LuksHeader,
  p: LuksParams,
  slot: LuksKeySlot,
  masterKey: Uint8Array,
  password: Uint8Array,
  iterations: number,
  be: CryptoBackend,
): Promise<Uint8Array> {
  slot.salt = be.randomBytes(LUKS_SALT_LEN);
  slot.iterations = iterations;
  slot.stripes = LUKS_STRIPES;
  const slotKey = await be.pbkdf2(p.hash, password, slot.salt, slot.iterations, h.keyBytes);
  const split = afSplit(be, p.hash, masterKey, LUKS_STRIPES);
  const material = new Uint8Array(slotSectors(h.keyBytes, LUKS_STRIPES) * SECTOR_SIZE);
  material.set(split);
  makeSectorCipher(p.spec, slotKey, be).encrypt(material, 0);
  slot.active = LUKS_SLOT_ENABLED;
  const out = material.slice(0, split.length);
  wipe(slotKey, split, material);
  return out;
}

// ---------------------------------------------------------------------------------------------
// info

/**
 * The `encrypt` block of `qemu-img info` for a LUKS image (QAPI QCryptoBlockInfoLUKS, keys in QAPI
 * order; the JSON printer reorders them like QEMU's QDict).
 */
export function luksInfo(h: LuksHeader, p: LuksParams): Record<string, unknown> {
  const out: Record<string, unknown> = {
    format: 'luks',
    'cipher-alg': p.spec.cipherAlg,
    'cipher-mode': p.spec.mode,
    'ivgen-alg': p.spec.ivgen,
  };
  if (p.spec.ivgen === 'essiv' && p.spec.ivgenHash) out['ivgen-hash-alg'] = p.spec.ivgenHash;
  out['hash-alg'] = p.hash;
  out['payload-offset'] = h.payloadOffset * SECTOR_SIZE;
  out['master-key-iters'] = h.mkDigestIterations;
  out.uuid = h.uuid;
  out.slots = h.slots.map((s) => {
    const active = s.active === LUKS_SLOT_ENABLED;
    const slot: Record<string, unknown> = { active };
    if (active) {
      slot.iters = s.iterations;
      slot.stripes = s.stripes;
    }
    slot['key-offset'] = s.keyMaterialOffset * SECTOR_SIZE;
    return slot;
  });
  return out;
}
