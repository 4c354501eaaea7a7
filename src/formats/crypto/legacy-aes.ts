/**
 * The legacy qcow encryption (qcow v1 and qcow2 crypt_method 1): AES-128-CBC per 512-byte sector,
 * IV = the sector number as a little-endian u64 (plain64) of the **guest** offset, key = the
 * password's first 16 bytes, zero-padded. No key check: a wrong password reads as garbage.
 */
import { cryptoBackend, type CryptoBackend } from '../../codecs/crypto-registry.js';
import type { DataCipher } from '../qcow2/data-cipher.js';
import { QcowError } from '../../core/errors.js';
import { makeSectorCipher, SECTOR_SIZE, type SectorCipher } from './sector-cipher.js';
import { secretPassword } from './options.js';

export const LEGACY_AES_KEY_BYTES = 16;

/** Key from a password: up to 16 bytes of it, the rest zeros. */
export function legacyAesKey(password: Uint8Array): Uint8Array {
  const key = new Uint8Array(LEGACY_AES_KEY_BYTES);
  key.set(password.subarray(0, LEGACY_AES_KEY_BYTES));
  return key;
}

/** The sector cipher of the legacy method (sectors numbered by guest offset / 512). */
export function legacyAesSectorCipher(password: Uint8Array, be: CryptoBackend): SectorCipher {
  const key = legacyAesKey(password);
  const c = makeSectorCipher({ cipherAlg: 'aes-128', mode: 'cbc', ivgen: 'plain64' }, key, be);
  key.fill(0);
  return c;
}

/**
 * A DataCipher for drivers: buffers are whole sectors at a sector-aligned guest offset. Usable by
 * the qcow2 driver (method 1) and the qcow v1 driver alike; the host offset is not used.
 */
export function legacyAesCipher(password: Uint8Array, be: CryptoBackend): DataCipher {
  const c = legacyAesSectorCipher(password, be);
  const sector = (guest: number) => {
    if (guest % SECTOR_SIZE) throw new QcowError('EINVAL', 'Encrypted I/O must start on a 512-byte sector');
    return guest / SECTOR_SIZE;
  };
  return {
    decrypt: async (buf, _host, guest) => c.decrypt(buf, sector(guest)),
    encrypt: async (buf, _host, guest) => c.encrypt(buf, sector(guest)),
  };
}

/**
 * Open-time setup of the legacy method for a driver (qcow v1 or qcow2 method 1): the cipher when
 * `encrypt.key-secret` is given; undefined for a read-only open without it (data reads must then
 * be refused, e.g. with `encryptionLockedError`); a writable open without it fails like QEMU.
 */
export function openLegacyAes(
  opts: { readOnly?: boolean; secrets?: ReadonlyMap<string, Uint8Array>; keySecret?: string },
  be?: CryptoBackend,
): DataCipher | undefined {
  if (opts.keySecret === undefined) {
    if (!opts.readOnly) throw new QcowError('EINVAL', "Parameter 'encrypt.key-secret' is required for cipher");
    return undefined;
  }
  return legacyAesCipher(secretPassword(opts.secrets, opts.keySecret), be ?? cryptoBackend());
}
