/**
 * QEMU's rule for raw images whose format was guessed by probing: a write must not make the first
 * sector look like another image format (a guest could otherwise turn the file into, say, a qcow2
 * image pointing at host files the next time it is probed). Such writes fail with EPERM.
 */

const ASCII = (s: string) => Buffer.from(s, 'latin1');

/** [offset, magic] pairs of formats QEMU can probe. */
const MAGICS: Array<[number, Buffer]> = [
  [0, ASCII('QED\0')],
  [0, ASCII('KDMV')], // vmdk sparse
  [0, ASCII('COWD')], // vmdk 3
  [0, ASCII('# Disk DescriptorFile')], // vmdk descriptor
  [0, ASCII('conectix')], // vpc
  [0, ASCII('vhdxfile')],
  [0, Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe])], // LUKS
  [0, ASCII('WithoutFreeSpace')], // parallels
  [0, ASCII('WithouFreSpacExt')],
  [0, ASCII('Bochs Virtual HD Image')],
  [0x40, Buffer.from([0x7f, 0x10, 0xda, 0xbe])], // vdi signature (little-endian 0xbeda107f)
];

/** True when these first-sector bytes would be probed as a format other than raw. */
export function looksLikeImageHeader(sector: Uint8Array): boolean {
  const b = Buffer.from(sector.buffer, sector.byteOffset, sector.byteLength);
  // qcow (version 1) and qcow2 (version 2 or 3, or later): the magic and a version number.
  if (b.length >= 8 && b.readUInt32BE(0) === 0x514649fb && b.readUInt32BE(4) >= 1) return true;
  return MAGICS.some(([off, magic]) => b.length >= off + magic.length && b.subarray(off, off + magic.length).equals(magic));
}
