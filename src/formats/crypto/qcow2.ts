/**
 * Encryption glue for qcow2 (and the pieces qcow v1 and `create` need):
 *
 * - `openDataCipher(header, io, opts)`: called by Qcow2Driver.open. Legacy AES (method 1) or LUKS
 *   (method 2, header blob at the FDE extension's offset): parses and checks the LUKS header,
 *   unlocks it with the `encrypt.key-secret` secret when one is given and returns the DataCipher.
 *   Without a key a read-only open still works (for `info`); reads then fail clearly.
 * - `qcow2EncryptInfo(header)`: the `encrypt` block of `info` (format aes, or the LUKS details).
 * - `buildQcow2LuksHeader(clusterSize, options)`: the LUKS blob `create` stores in clusters after
 *   the qcow2 header, and the length for the FDE extension.
 */
import type { ByteIO } from '../../core/byte-io.js';
import { readFully } from '../../core/byte-io.js';
import { QcowError } from '../../core/errors.js';
import { cryptoBackend, type CryptoBackend } from '../../codecs/crypto-registry.js';
import type { Qcow2Header } from '../qcow2/header.js';
import type { DataCipher } from '../qcow2/data-cipher.js';
import { CRYPT_AES, CRYPT_LUKS, CRYPT_NONE } from '../qcow2/constants.js';
import { openLegacyAes } from './legacy-aes.js';
import { decodeLuksHeader, LUKS_HEADER_SIZE, luksParams, validateLuksHeader, type LuksHeader, type LuksParams } from './luks-header.js';
import { createLuksHeader, luksInfo, unlockLuks, type LuksCreateOptions } from './luks.js';
import { makeSectorCipher, SECTOR_SIZE, type SectorCipher } from './sector-cipher.js';
import { secretPassword } from './options.js';
import { wipe } from './bytes.js';

export interface EncryptionOpenOptions {
  readOnly?: boolean;
  /** Secrets by id (`--object secret,...`). */
  secrets?: ReadonlyMap<string, Uint8Array>;
  /** `encrypt.key-secret`: id of the secret holding the password. */
  keySecret?: string;
}

export const KEY_SECRET_REQUIRED = "Parameter 'encrypt.key-secret' is required for cipher";

/** The parsed LUKS header of each open image, for `info` (keyed by the driver's header object). */
const luksByHeader = new WeakMap<Qcow2Header, { header: LuksHeader; params: LuksParams }>();

/** Read and check the LUKS header a qcow2 image points to (no key needed). */
export async function readQcow2LuksHeader(header: Qcow2Header, io: ByteIO): Promise<{ header: LuksHeader; params: LuksParams; read: (off: number, len: number) => Promise<Uint8Array> }> {
  const ext = header.cryptoHeader;
  if (!ext) throw new QcowError('ECORRUPT', 'LUKS-encrypted image is missing its encryption header extension');
  const read = async (off: number, len: number): Promise<Uint8Array> => {
    if (off + len > ext.length) throw new QcowError('EINVAL', 'Request for data outside of extension header');
    return readFully(io, ext.offset + off, len);
  };
  const luks = decodeLuksHeader(await read(0, LUKS_HEADER_SIZE));
  validateLuksHeader(luks);
  const params = luksParams(luks);
  return { header: luks, params, read };
}

/**
 * Set up encryption for an opened qcow2 header. Returns undefined for unencrypted images and for
 * encrypted ones opened read-only without a key (data reads must then be refused by the driver).
 */
export async function openDataCipher(header: Qcow2Header, io: ByteIO, opts: EncryptionOpenOptions, be?: CryptoBackend): Promise<DataCipher | undefined> {
  if (header.cryptMethod === CRYPT_NONE) return undefined;
  if (header.cryptMethod === CRYPT_AES) return openLegacyAes(opts, be);
  if (header.cryptMethod !== CRYPT_LUKS) throw new QcowError('ENOTSUP', `Unsupported encryption method ${header.cryptMethod}`);
  const luks = await readQcow2LuksHeader(header, io);
  luksByHeader.set(header, { header: luks.header, params: luks.params });
  if (opts.keySecret === undefined) {
    if (!opts.readOnly) throw new QcowError('EINVAL', KEY_SECRET_REQUIRED);
    return undefined;
  }
  const password = secretPassword(opts.secrets, opts.keySecret);
  const backend = be ?? cryptoBackend();
  const mk = await unlockLuks(luks.header, luks.params, luks.read, password, backend);
  const cipher = makeSectorCipher(luks.params.spec, mk, backend);
  wipe(mk);
  return luksDataCipher(cipher);
}

/** LUKS in qcow2: sectors numbered by their **host** offset in the file holding the data. */
export function luksDataCipher(c: SectorCipher): DataCipher {
  const sector = (host: number) => {
    if (host % SECTOR_SIZE) throw new QcowError('EINVAL', 'Encrypted I/O must start on a 512-byte sector');
    return host / SECTOR_SIZE;
  };
  return {
    decrypt: async (buf, host) => c.decrypt(buf, sector(host)),
    encrypt: async (buf, host) => c.encrypt(buf, sector(host)),
  };
}

/** The error for data access to an encrypted image opened without its key. */
export function encryptionLockedError(filename: string): QcowError {
  return new QcowError('EINVAL', `Could not read '${filename}': the image is encrypted and was opened without a key: ${KEY_SECRET_REQUIRED}`);
}

/** The `encrypt` block of qcow2's format-specific info (undefined for unencrypted images). */
export function qcow2EncryptInfo(header: Qcow2Header): Record<string, unknown> | undefined {
  if (header.cryptMethod === CRYPT_AES) return { format: 'aes' };
  if (header.cryptMethod !== CRYPT_LUKS) return undefined;
  const luks = luksByHeader.get(header);
  return luks ? luksInfo(luks.header, luks.params) : { format: 'luks' };
}

export interface Qcow2LuksBlob {
  /** Header + key material, zero-padded to whole clusters: write it at a cluster-aligned offset. */
  blob: Uint8Array;
  /** The FDE extension's length field (bytes of LUKS data, = the LUKS payload offset). */
  length: number;
  /** Clusters to allocate (and refcount) for it. */
  clusters: number;
  /** The data cipher of the new master key (for writing preallocated data without unlocking again). */
  cipher: DataCipher;
}

/**
 * A new LUKS header for a qcow2 image of `clusterSize`: what `qemu-img create -o encrypt.format=luks`
 * stores (QEMU places it in the first free clusters after the L1 table).
 */
export async function buildQcow2LuksHeader(clusterSize: number, opts: LuksCreateOptions, be?: CryptoBackend): Promise<Qcow2LuksBlob> {
  const backend = be ?? cryptoBackend();
  const created = await createLuksHeader(opts, backend);
  const cipher = luksDataCipher(makeSectorCipher(created.params.spec, created.masterKey, backend));
  wipe(created.masterKey);
  const length = created.blob.length;
  const clusters = Math.ceil(length / clusterSize);
  const blob = new Uint8Array(clusters * clusterSize);
  blob.set(created.blob);
  return { blob, length, clusters, cipher };
}
