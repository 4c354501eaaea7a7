/**
 * Run power-cut workloads outside vitest, printing the summary (and the report on failure):
 *   npx vite-node test/crash/run-workload.mts [workload-name ...]
 * Honours QCOWKIT_CRASH_FULL / _TORN / _JOBS / _MAX_CUTS / _KEEP (see harness.ts).
 */
import { runCrashTest } from './harness.js';
import { ALL } from './workloads.js';

const names = process.argv.slice(2);
let failed = 0;
for (const w of ALL.filter((x) => !names.length || names.includes(x.name))) {
  const r = await runCrashTest(w);
  console.log(r.failures.length ? r.report : r.summary);
  if (r.tornFailures.length) {
    console.log(`torn-write failures:\n${r.tornFailures.map((f) => `  ${f.brief ?? f.problems[0]}`).join('\n')}\n${r.tornFailures[0]!.repro}`);
  }
  failed += r.failures.length + r.tornFailures.length;
}
process.exitCode = failed ? 1 : 0;
