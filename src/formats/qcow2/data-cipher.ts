/**
 * The hook through which encryption plugs into the qcow2 data path. Guest data is encrypted in
 * 512-byte sectors; QEMU's legacy AES derives the IV from the guest offset, LUKS from the host
 * offset, so both are passed. Buffers are whole sectors, transformed in place.
 */
export const CRYPT_SECTOR = 512;

export interface DataCipher {
  decrypt(buf: Uint8Array, hostOffset: number, guestOffset: number): Promise<void>;
  encrypt(buf: Uint8Array, hostOffset: number, guestOffset: number): Promise<void>;
}
