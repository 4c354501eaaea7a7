/**
 * Encryption for the qcow family: LUKS1 (qcow2 crypt_method 2) and the legacy AES method (qcow v1,
 * qcow2 crypt_method 1). Pure logic on the primitives of `codecs/crypto-registry.ts` (the Node
 * adapter is `codecs/crypto-node.ts`: call `registerNodeCrypto()` once).
 */
export { openDataCipher, qcow2EncryptInfo, encryptionLockedError, buildQcow2LuksHeader, readQcow2LuksHeader, luksDataCipher, KEY_SECRET_REQUIRED } from './qcow2.js';
export type { EncryptionOpenOptions, Qcow2LuksBlob } from './qcow2.js';
export { legacyAesCipher, legacyAesKey, openLegacyAes } from './legacy-aes.js';
export { createLuksHeader, luksHeaderLength, luksInfo, unlockLuks, pbkdf2Rate, INVALID_PASSWORD, LUKS_DEFAULTS } from './luks.js';
export type { LuksCreateOptions, LuksCreated } from './luks.js';
export { decodeLuksHeader, encodeLuksHeader, validateLuksHeader, luksParams } from './luks-header.js';
export type { LuksHeader, LuksKeySlot, LuksParams } from './luks-header.js';
export { parseEncryptCreateOptions, parseEncryptCreateChoice, resolveEncryptCreate, secretPassword } from './options.js';
export type { EncryptCreateSpec, EncryptCreateChoice } from './options.js';
export { makeSectorCipher, SECTOR_SIZE } from './sector-cipher.js';
export type { SectorCipher, SectorCipherSpec } from './sector-cipher.js';
export { checkLuksAmendOptions, prepareLuksAmend, prepareQcow2LuksAmend, qcow2LuksArea } from './luks-amend.js';
export type { LuksAmendOptions, LuksArea, LuksAmendContext } from './luks-amend.js';
export { checkLuksKeyMaterial, fillKeySlot, loadKeySlot, slotIterations } from './luks.js';
