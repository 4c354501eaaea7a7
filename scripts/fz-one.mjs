import { readFileSync } from 'node:fs';
import { driveOne } from '../test/fuzz/harness.mjs';
for (const f of process.argv.slice(2)) {
  const t = performance.now();
  const r = await driveOne(readFileSync(f), { budgetMs: 60000 });
  console.log(f, (performance.now() - t).toFixed(0), 'ms', JSON.stringify(r).slice(0, 200));
}
