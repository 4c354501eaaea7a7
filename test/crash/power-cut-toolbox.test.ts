/**
 * Power-cut tests of the toolbox operations: snapshot create/delete/apply, commit, safe rebase,
 * amend (compat both ways, lazy_refcounts, refcount_bits). See toolbox-workloads.ts for what each
 * rebuilt image must satisfy. Env: QCOWKIT_CRASH_FULL=1 checks every distinct rebuild,
 * QCOWKIT_CRASH_JOBS (parallel checks, default 2), QCOWKIT_TOOLBOX_CRASH=name,... runs a subset.
 */
import { describe, expect, it } from 'vitest';
import { runToolboxCrash, TOOLBOX } from './toolbox-workloads.js';

const only = process.env.QCOWKIT_TOOLBOX_CRASH?.split(',');

describe('power cut: toolbox operations', () => {
  for (const w of TOOLBOX.filter((x) => !only || only.includes(x.name))) {
    it(
      w.name,
      async () => {
        const r = await runToolboxCrash(w);
        console.log(r.summary);
        // Every flush window was checked at least once.
        expect(r.checked).toBeGreaterThanOrEqual(Math.min(r.windows, r.distinct));
        expect(r.failures.length, `${r.summary}\n${r.failures.slice(0, 3).join('\n---\n')}`).toBe(0);
      },
      600_000,
    );
  }
});
