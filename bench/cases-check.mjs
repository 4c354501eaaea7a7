// Bench cases for the check/repair issue. Appended to CASES by cases.mjs.
// (The 1 GiB half-allocated case, `check-qcow2`, is in cases.mjs.)
import { million4k } from './lib/inputs-check.mjs';

const memo = new WeakMap();
/** Inputs are generated once per run (per Inputs object), like ctx.inputs.get does. */
function once(ctx, key, make) {
  let m = memo.get(ctx.inputs);
  if (!m) memo.set(ctx.inputs, (m = new Map()));
  if (!m.has(key)) m.set(key, make(ctx.inputs));
  return m.get(key);
}

export const CHECK_CASES = [
  {
    id: 'check-1m-4k',
    name: 'check, 1M allocated 4 KiB clusters',
    required: true,
    setup: async (ctx) => ({ src: await once(ctx, 'million4k', million4k) }),
    qemu: (p) => ['check', p.src.path],
    verify: 'stdout',
    target: { ratio: 1.5 },
  },
  {
    id: 'check-1m-4k-json',
    name: 'check --output=json, 1M allocated 4 KiB clusters',
    setup: async (ctx) => ({ src: await once(ctx, 'million4k', million4k) }),
    qemu: (p) => ['check', '--output=json', p.src.path],
    verify: 'stdout',
    target: { ratio: 1.5 },
  },
];
