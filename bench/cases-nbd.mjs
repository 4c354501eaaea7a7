// Bench cases for the NBD server issue (qcowkit nbd vs qemu-nbd). Appended to CASES by cases.mjs.
export const NBD_CASES = [];
