// Bench cases for the encryption issue (LUKS qcow2). Appended to CASES by cases.mjs.
export const LUKS_CASES = [];
