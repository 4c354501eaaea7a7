#!/usr/bin/env node
// Long fuzz run: `npm run fuzz -- SECONDS` (default 60). Crashes are saved under fuzz-crashes/.
import fc from 'fast-check';
import { mkdirSync } from 'node:fs';
import { makeSeeds, mutate, driveOne, saveCrash } from '../test/fuzz/harness.mjs';

const seconds = Number(process.argv[2] ?? 60);
const seeds = makeSeeds();
const names = Object.keys(seeds);
const mutation = fc.record({ kind: fc.constantFrom('flip', 'u32', 'u64', 'copy', 'truncate'), a: fc.nat(), b: fc.nat(), hot: fc.boolean() });
const gen = fc.tuple(fc.constantFrom(...names), fc.array(mutation, { minLength: 1, maxLength: 6 }));
const end = Date.now() + seconds * 1000;
let cases = 0;
let bugs = 0;
mkdirSync('fuzz-crashes', { recursive: true });
while (Date.now() < end) {
  for (const [seed, muts] of fc.sample(gen, 200)) {
    let bytes = seeds[seed];
    for (const m of muts) bytes = mutate(bytes, m);
    const r = await driveOne(bytes, { backing: seeds.plain });
    cases++;
    if (r.bug) {
      bugs++;
      const name = `crash-${Date.now()}-${bugs}.qcow2`;
      saveCrash('fuzz-crashes', name, bytes);
      console.log(`BUG (${name}): ${r.bug}\n  seed=${seed} mutations=${JSON.stringify(muts)}`);
    }
  }
}
console.log(`fuzz: ${cases} cases in ${seconds}s, ${bugs} bugs`);
process.exitCode = bugs ? 1 : 0;
