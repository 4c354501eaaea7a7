/**
 * `encrypt.*` options: the creation options of qcow2/qcow (`-o encrypt.format=luks,...`) checked
 * with qemu-img's messages, and secrets turned into passwords the way QEMU reads them.
 */
import { QcowError } from '../../core/errors.js';
import { HASH_ALGS, type HashAlg } from '../../codecs/crypto-registry.js';
import { CIPHER_MODES, IVGEN_ALGS, type CipherMode, type IvgenAlg } from './sector-cipher.js';
import type { LuksCreateOptions } from './luks.js';

/** Cipher algorithm names qemu-img 7.2 accepts for encrypt.cipher-alg (qcowkit computes the AES ones). */
export const CREATE_CIPHER_ALGS = [
  'aes-128',
  'aes-192',
  'aes-256',
  'des',
  '3des',
  'cast5-128',
  'serpent-128',
  'serpent-192',
  'serpent-256',
  'twofish-128',
  'twofish-192',
  'twofish-256',
] as const;

/** LUKS-only creation options, in the order QEMU reports them. */
export const LUKS_ONLY_OPTIONS = [
  'encrypt.cipher-alg',
  'encrypt.cipher-mode',
  'encrypt.ivgen-alg',
  'encrypt.ivgen-hash-alg',
  'encrypt.hash-alg',
  'encrypt.iter-time',
] as const;

export type EncryptCreateSpec = { format: 'aes'; secret: Uint8Array } | { format: 'luks'; luks: LuksCreateOptions };

const fail = (msg: string) => new QcowError('EINVAL', msg);

/** Strict UTF-8 check (no NUL either: QEMU reads the secret as a C string). */
function isUtf8NoNul(b: Uint8Array): boolean {
  for (let i = 0; i < b.length; ) {
    const c = b[i]!;
    if (c === 0) return false;
    let n: number;
    let min: number;
    if (c < 0x80) {
      i++;
      continue;
    } else if (c >= 0xc2 && c <= 0xdf) {
      n = 1;
      min = 0x80;
    } else if (c >= 0xe0 && c <= 0xef) {
      n = 2;
      min = 0x800;
    } else if (c >= 0xf0 && c <= 0xf4) {
      n = 3;
      min = 0x10000;
    } else return false;
    let cp = c & (0x3f >> n);
    for (let k = 1; k <= n; k++) {
      const d = b[i + k];
      if (d === undefined || (d & 0xc0) !== 0x80) return false;
      cp = (cp << 6) | (d & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += n + 1;
  }
  return true;
}

/**
 * The password a secret gives (its bytes), refusing what QEMU refuses. Messages name the secret's
 * id, never its content.
 */
export function secretPassword(secrets: ReadonlyMap<string, Uint8Array> | undefined, id: string): Uint8Array {
  const data = secrets?.get(id);
  if (data === undefined) throw fail(`No secret with id '${id}'`);
  if (!isUtf8NoNul(data)) throw fail(`Data from secret ${id} is not valid UTF-8`);
  return data;
}

function oneOf<T extends string>(param: string, v: string | undefined, allowed: readonly T[]): T | undefined {
  if (v === undefined) return undefined;
  if (!(allowed as readonly string[]).includes(v)) throw fail(`Parameter '${param}' does not accept value '${v}'`);
  return v as T;
}

/** The encryption a set of creation options asks for, before the secret is looked up. */
export type EncryptCreateChoice =
  | { format: 'aes'; keySecret?: string }
  | { format: 'luks'; keySecret?: string; luks: Omit<LuksCreateOptions, 'secret'> };

/**
 * Read the encryption creation options, checking their values (what QEMU checks while converting
 * the options, before the image is made). `get` returns an option's text (`encrypt.iter-time` may
 * also come as a number); `legacyEncryption` is the deprecated `encryption=on` (= format aes).
 * Returns undefined when the image is not to be encrypted.
 */
export function parseEncryptCreateChoice(
  get: (name: string) => string | number | undefined,
  legacyEncryption = false,
): EncryptCreateChoice | undefined {
  const str = (k: string) => {
    const v = get(k);
    return v === undefined ? undefined : String(v);
  };
  const format = str('encrypt.format') ?? (legacyEncryption ? 'aes' : undefined);
  if (format === undefined) return undefined;
  oneOf('format', format, ['aes', 'luks']);
  const id = str('encrypt.key-secret');
  if (format === 'aes') {
    for (const k of LUKS_ONLY_OPTIONS) if (get(k) !== undefined) throw fail(`Parameter '${k}' is unexpected`);
    return id === undefined ? { format: 'aes' } : { format: 'aes', keySecret: id };
  }
  const cipherAlg = oneOf('cipher-alg', str('encrypt.cipher-alg'), CREATE_CIPHER_ALGS);
  const cipherMode = oneOf<CipherMode>('cipher-mode', str('encrypt.cipher-mode'), CIPHER_MODES);
  const ivgenAlg = oneOf<IvgenAlg>('ivgen-alg', str('encrypt.ivgen-alg'), IVGEN_ALGS);
  const ivgenHashAlg = oneOf<HashAlg>('ivgen-hash-alg', str('encrypt.ivgen-hash-alg'), HASH_ALGS);
  const hashAlg = oneOf<HashAlg>('hash-alg', str('encrypt.hash-alg'), HASH_ALGS);
  const it = get('encrypt.iter-time');
  let iterTime: number | undefined;
  if (it !== undefined) {
    iterTime = typeof it === 'number' ? it : /^\s*-?\d+\s*$/.test(it) ? Number(it) : NaN;
    if (!Number.isFinite(iterTime)) throw fail("Parameter 'encrypt.iter-time' expects a number");
  }
  const luks: Omit<LuksCreateOptions, 'secret'> = {};
  if (cipherAlg !== undefined) luks.cipherAlg = cipherAlg;
  if (cipherMode !== undefined) luks.cipherMode = cipherMode;
  if (ivgenAlg !== undefined) luks.ivgenAlg = ivgenAlg;
  if (ivgenHashAlg !== undefined) luks.ivgenHashAlg = ivgenHashAlg;
  if (hashAlg !== undefined) luks.hashAlg = hashAlg;
  if (iterTime !== undefined) luks.iterTime = iterTime;
  return id === undefined ? { format: 'luks', luks } : { format: 'luks', keySecret: id, luks };
}

/** The secret of a choice: QEMU's "key-secret is required" / "No secret with id" checks. */
export function resolveEncryptCreate(choice: EncryptCreateChoice, secrets: ReadonlyMap<string, Uint8Array> | undefined): EncryptCreateSpec {
  if (choice.keySecret === undefined) throw fail("Parameter 'encrypt.key-secret' is required for cipher");
  const secret = secretPassword(secrets, choice.keySecret);
  if (choice.format === 'aes') return { format: 'aes', secret };
  return { format: 'luks', luks: { ...choice.luks, secret } };
}

/**
 * Read the encryption creation options and look up the secret (both steps above).
 * Returns undefined when the image is not to be encrypted.
 */
export function parseEncryptCreateOptions(
  get: (name: string) => string | number | undefined,
  secrets: ReadonlyMap<string, Uint8Array> | undefined,
  legacyEncryption = false,
): EncryptCreateSpec | undefined {
  const choice = parseEncryptCreateChoice(get, legacyEncryption);
  return choice && resolveEncryptCreate(choice, secrets);
}
