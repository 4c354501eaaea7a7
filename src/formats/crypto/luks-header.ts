/**
 * The LUKS version 1 partition header (LUKS1 on-disk format specification): 592 bytes, big-endian,
 * followed by the key-material areas. Decoding, encoding, the structural checks QEMU 7.2 makes
 * (with its messages) and the mapping between the header's names ("aes", "xts-plain64",
 * "cbc-essiv:sha256", "sha256") and cipher specs.
 *
 *   0 magic[6] "LUKS\xba\xbe" | 6 version u16 | 8 cipher-name[32] | 40 cipher-mode[32]
 *  72 hash-spec[32] | 104 payload-offset u32 (sectors) | 108 key-bytes u32 | 112 mk-digest[20]
 * 132 mk-digest-salt[32] | 164 mk-digest-iterations u32 | 168 uuid[40]
 * 208 + 48*i key slot i: active u32 | iterations u32 | salt[32] | key-material-offset u32 (sectors) | stripes u32
 */
import { QcowError } from '../../core/errors.js';
import { HASH_ALGS, type HashAlg } from '../../codecs/crypto-registry.js';
import { cipherKeyBytes, SECTOR_SIZE, type CipherMode, type IvgenAlg, type SectorCipherSpec } from './sector-cipher.js';

export const LUKS_MAGIC = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe] as const;
export const LUKS_HEADER_SIZE = 592;
export const LUKS_NUM_SLOTS = 8;
export const LUKS_STRIPES = 4000;
export const LUKS_SALT_LEN = 32;
export const LUKS_DIGEST_LEN = 20;
export const LUKS_SLOT_ENABLED = 0x00ac71f3;
export const LUKS_SLOT_DISABLED = 0x0000dead;
/** Key material starts at 4096 bytes and each slot area is aligned to 4096 (QEMU, cryptsetup). */
export const LUKS_KEY_SLOT_OFFSET = 4096;
export const LUKS_ALIGN = 4096;
/** QEMU's floors for PBKDF2 iteration counts. */
export const LUKS_MIN_SLOT_ITERS = 1000;
export const LUKS_MIN_MASTER_KEY_ITERS = 1000;

export interface LuksKeySlot {
  /** Raw state word: LUKS_SLOT_ENABLED or LUKS_SLOT_DISABLED. */
  active: number;
  iterations: number;
  salt: Uint8Array;
  /** In 512-byte sectors from the start of the LUKS header. */
  keyMaterialOffset: number;
  stripes: number;
}

export interface LuksHeader {
  version: number;
  cipherName: string;
  cipherMode: string;
  hashSpec: string;
  /** In 512-byte sectors. */
  payloadOffset: number;
  keyBytes: number;
  mkDigest: Uint8Array;
  mkDigestSalt: Uint8Array;
  mkDigestIterations: number;
  uuid: string;
  slots: LuksKeySlot[];
}

/** What the header's names mean. */
export interface LuksParams {
  /** Cipher, mode and IV generator of the payload and of the key material. */
  spec: SectorCipherSpec;
  /** PBKDF2 and anti-forensic hash. */
  hash: HashAlg;
}

const err = (msg: string) => new QcowError('EINVAL', msg);

function cstr(b: Uint8Array, off: number, len: number): string {
  let end = off;
  while (end < off + len && b[end] !== 0) end++;
  let s = '';
  for (let i = off; i < end; i++) s += String.fromCharCode(b[i]!);
  return s;
}

function putCstr(b: Uint8Array, off: number, len: number, s: string): void {
  if (s.length >= len) throw err(`LUKS header field '${s}' is too long`);
  for (let i = 0; i < s.length; i++) b[off + i] = s.charCodeAt(i) & 0xff;
}

export function decodeLuksHeader(b: Uint8Array): LuksHeader {
  if (b.length < LUKS_HEADER_SIZE) throw err('Volume is not in LUKS format');
  for (let i = 0; i < LUKS_MAGIC.length; i++) if (b[i] !== LUKS_MAGIC[i]) throw err('Volume is not in LUKS format');
  const dv = new DataView(b.buffer, b.byteOffset, LUKS_HEADER_SIZE);
  const version = dv.getUint16(6);
  if (version !== 1) throw err(`LUKS version ${version} is not supported`);
  const slots: LuksKeySlot[] = [];
  for (let i = 0; i < LUKS_NUM_SLOTS; i++) {
    const o = 208 + 48 * i;
    slots.push({
      active: dv.getUint32(o),
      iterations: dv.getUint32(o + 4),
      salt: b.slice(o + 8, o + 40),
      keyMaterialOffset: dv.getUint32(o + 40),
      stripes: dv.getUint32(o + 44),
    });
  }
  return {
    version,
    cipherName: cstr(b, 8, 32),
    cipherMode: cstr(b, 40, 32),
    hashSpec: cstr(b, 72, 32),
    payloadOffset: dv.getUint32(104),
    keyBytes: dv.getUint32(108),
    mkDigest: b.slice(112, 132),
    mkDigestSalt: b.slice(132, 164),
    mkDigestIterations: dv.getUint32(164),
    uuid: cstr(b, 168, 40),
    slots,
  };
}

export function encodeLuksHeader(h: LuksHeader): Uint8Array {
  const b = new Uint8Array(LUKS_HEADER_SIZE);
  const dv = new DataView(b.buffer);
  b.set(LUKS_MAGIC, 0);
  dv.setUint16(6, h.version);
  putCstr(b, 8, 32, h.cipherName);
  putCstr(b, 40, 32, h.cipherMode);
  putCstr(b, 72, 32, h.hashSpec);
  dv.setUint32(104, h.payloadOffset);
  dv.setUint32(108, h.keyBytes);
  b.set(h.mkDigest.subarray(0, LUKS_DIGEST_LEN), 112);
  b.set(h.mkDigestSalt.subarray(0, LUKS_SALT_LEN), 132);
  dv.setUint32(164, h.mkDigestIterations);
  putCstr(b, 168, 40, h.uuid);
  h.slots.forEach((s, i) => {
    const o = 208 + 48 * i;
    dv.setUint32(o, s.active);
    dv.setUint32(o + 4, s.iterations);
    b.set(s.salt.subarray(0, LUKS_SALT_LEN), o + 8);
    dv.setUint32(o + 40, s.keyMaterialOffset);
    dv.setUint32(o + 44, s.stripes);
  });
  return b;
}

/** Sectors of split key material for one slot. */
export function slotSectors(keyBytes: number, stripes: number): number {
  return Math.ceil((keyBytes * stripes) / SECTOR_SIZE);
}

/**
 * The layout checks QEMU makes before using a header (same order, same words): payload past the
 * header, every slot's stripes, state, iterations and place, then slots not overlapping.
 */
export function validateLuksHeader(h: LuksHeader): void {
  const headerSectors = LUKS_KEY_SLOT_OFFSET / SECTOR_SIZE;
  if (h.payloadOffset < headerSectors) throw err('LUKS payload is overlapping with the header');
  h.slots.forEach((s, i) => {
    if (s.stripes !== LUKS_STRIPES) throw err(`Keyslot ${i} is corrupted (stripes ${s.stripes} != ${LUKS_STRIPES})`);
    if (s.active !== LUKS_SLOT_ENABLED && s.active !== LUKS_SLOT_DISABLED) throw err(`Keyslot ${i} state (active/disable) is corrupted`);
    if (s.active === LUKS_SLOT_ENABLED && s.iterations === 0) throw err(`Keyslot ${i} iteration count is zero`);
    if (s.keyMaterialOffset < headerSectors) throw err(`Keyslot ${i} is overlapping with the LUKS header`);
    if (s.keyMaterialOffset + slotSectors(h.keyBytes, s.stripes) > h.payloadOffset) {
      throw err(`Keyslot ${i} is overlapping with the encrypted payload`);
    }
  });
  for (let i = 0; i < h.slots.length; i++) {
    const a = h.slots[i]!;
    const aEnd = a.keyMaterialOffset + slotSectors(h.keyBytes, a.stripes);
    for (let j = i + 1; j < h.slots.length; j++) {
      const b = h.slots[j]!;
      const bEnd = b.keyMaterialOffset + slotSectors(h.keyBytes, b.stripes);
      if (a.keyMaterialOffset < bEnd && b.keyMaterialOffset < aEnd) throw err(`Keyslots ${i} and ${j} are overlapping in the header`);
    }
  }
}

function parseHash(name: string): HashAlg {
  if ((HASH_ALGS as readonly string[]).includes(name)) return name as HashAlg;
  throw err(`Hash algorithm '${name}' not supported`);
}

/** LUKS cipher names by family, and the key sizes QEMU accepts for each. */
const FAMILY_SIZES: Record<string, number[]> = {
  aes: [16, 24, 32],
  serpent: [16, 24, 32],
  twofish: [16, 24, 32],
  cast5: [16],
  sm4: [16],
};

/** Understand the header's cipher, mode and hash names, in the order QEMU checks them. */
export function luksParams(h: LuksHeader): LuksParams {
  const dash = h.cipherMode.indexOf('-');
  if (dash < 0) throw err(`Unexpected cipher mode string format '${h.cipherMode}'`);
  const modeName = h.cipherMode.slice(0, dash);
  let ivgenName = h.cipherMode.slice(dash + 1);
  let ivgenHash: HashAlg | undefined;
  const colon = ivgenName.indexOf(':');
  if (colon >= 0) {
    ivgenHash = parseHash(ivgenName.slice(colon + 1));
    ivgenName = ivgenName.slice(0, colon);
  }
  if (!['ecb', 'cbc', 'xts', 'ctr'].includes(modeName)) throw err(`Cipher mode '${modeName}' not supported`);
  const mode = modeName as CipherMode;
  const cipherBytes = mode === 'xts' ? Math.floor(h.keyBytes / 2) : h.keyBytes;
  const sizes = FAMILY_SIZES[h.cipherName];
  if (!sizes || !sizes.includes(cipherBytes)) {
    throw err(`Algorithm '${h.cipherName}' with key size ${cipherBytes} bytes not supported`);
  }
  const cipherAlg = h.cipherName === 'sm4' ? 'sm4' : `${h.cipherName}-${cipherBytes * 8}`;
  const hash = parseHash(h.hashSpec);
  if (!['plain', 'plain64', 'essiv'].includes(ivgenName)) throw err(`IV generator '${ivgenName}' not supported`);
  const ivgen = ivgenName as IvgenAlg;
  if (ivgen === 'essiv' && !ivgenHash) throw err('Missing IV generator hash specification');
  const spec: SectorCipherSpec = { cipherAlg, mode, ivgen };
  if (ivgenHash) spec.ivgenHash = ivgenHash;
  return { spec, hash };
}

/** The header's names for a spec: cipher family, "mode-ivgen[:hash]". */
export function luksNames(spec: SectorCipherSpec): { cipherName: string; cipherMode: string; keyBytes: number } {
  const family = spec.cipherAlg === 'sm4' ? 'sm4' : spec.cipherAlg.replace(/-\d+$/, '');
  const n = cipherKeyBytes(spec.cipherAlg) ?? 0;
  const cipherMode = `${spec.mode}-${spec.ivgen}${spec.ivgenHash ? `:${spec.ivgenHash}` : ''}`;
  return { cipherName: family, cipherMode, keyBytes: spec.mode === 'xts' ? 2 * n : n };
}
