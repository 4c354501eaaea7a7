/** One vitest case per power-cut workload (shared by the power-cut-*.test.ts files). */
import { expect, it } from 'vitest';
import { FULL, runCrashTest, TORN, type Workload } from './harness.js';

const TIMEOUT = FULL ? 6 * 3600_000 : 600_000;

export function crashTest(w: Workload): void {
  it(
    w.name,
    async () => {
      const r = await runCrashTest(w);
      console.log(r.summary);
      if (r.tornFailures.length) {
        console.log(`[crash] ${w.name}: torn-write failures (reported separately):\n${r.tornFailures.map((f) => `  ${f.brief ?? f.problems[0]}`).join('\n')}`);
      }
      expect(r.failures.length, r.report).toBe(0);
      if (TORN) expect(r.tornFailures.length, `torn writes:\n${r.tornFailures.map((f) => f.brief ?? f.problems[0]).join('\n')}`).toBe(0);
    },
    TIMEOUT,
  );
}
