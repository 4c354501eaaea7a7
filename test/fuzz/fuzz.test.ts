import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
// @ts-expect-error plain JS harness shared with scripts/fuzz.mjs
import { makeSeeds, mutate, driveOne } from './harness.mjs';

const mutation = fc.record({
  kind: fc.constantFrom('flip', 'u32', 'u64', 'copy', 'truncate'),
  a: fc.nat(),
  b: fc.nat(),
  hot: fc.boolean(),
});

describe('fuzz: mutated qemu-img images never crash, hang or get written', () => {
  const seeds: Record<string, Buffer> = makeSeeds();
  const names = Object.keys(seeds);
  const runs = Number(process.env.QCOWKIT_FUZZ_RUNS ?? 2000);

  it(`survives ${runs} mutated images`, async () => {
    let cases = 0;
    let rejected = 0;
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...names), fc.array(mutation, { minLength: 1, maxLength: 4 }), async (seed, muts) => {
        let bytes = seeds[seed]!;
        for (const m of muts) bytes = mutate(bytes, m);
        const r = await driveOne(bytes, { backing: seeds.plain });
        cases++;
        if (!r.ok && !r.bug) rejected++;
        expect(r.bug, `seed=${seed} mutations=${JSON.stringify(muts)}`).toBeUndefined();
      }),
      { numRuns: runs },
    );
    console.log(`fuzz: ${cases} cases run, ${rejected} rejected with a clean error, ${cases - rejected} opened and read`);
  }, 300_000);
});
