// Bench cases for the check/repair issue. Appended to CASES by cases.mjs.
export const CHECK_CASES = [];
