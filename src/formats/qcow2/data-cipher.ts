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

/**
 * Scratch buffers for the encrypted copies of guest data a write makes: reused rather than
 * allocated (and zero-filled, page by page) for every request. `take` gives a buffer of exactly
 * `len` bytes whose content is undefined; `give` returns it once the write that used it is done.
 */
const POOL_MAX_BUFFERS = 8;
const POOL_MAX_BYTES = 4 * 1024 * 1024;
const pool: ArrayBuffer[] = [];

export function takeCryptBuffer(len: number): Uint8Array {
  for (let i = 0; i < pool.length; i++) {
    const b = pool[i]!;
    if (b.byteLength >= len) {
      pool.splice(i, 1);
      return new Uint8Array(b, 0, len);
    }
  }
  return new Uint8Array(len);
}

export function giveCryptBuffer(buf: Uint8Array): void {
  const b = buf.buffer;
  if (!(b instanceof ArrayBuffer) || b.byteLength > POOL_MAX_BYTES || pool.length >= POOL_MAX_BUFFERS) return;
  pool.push(b);
  pool.sort((x, y) => x.byteLength - y.byteLength);
}
