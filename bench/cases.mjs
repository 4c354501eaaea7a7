// The bench cases. To add one, append an object to CASES:
//
//   {
//     id:      'convert-raw-qcow2',           // short, unique; --only matches id or name
//     name:    'raw → qcow2',                 // shown in the table
//     setup:   async (ctx) => ({ src: await ctx.inputs.get('raw') }),
//                                             // → params p; inputs live in lib/inputs.mjs
//     output:  'qcow2',                       // optional: case writes file p.out (this is its
//                                             // extension); deleted before/after every run
//     qemu:    (p) => ['convert', '-O', 'qcow2', p.src.path, p.out],   // argv after `qemu-img`
//     ours:    (p) => [...],                  // optional, argv after `qcowkit`; default = qemu(p)
//     verify:  'raw-output'     // output file == qemu-img's output == source contents (sha256)
//            | 'image-compare'  // `qemu-img compare SRC OUT` (for image outputs, e.g. → qcow2)
//            | 'stdout'         // stdout byte-identical to qemu-img's
//            | async (ctx, p, tool, r, state) => ({ ok, detail }) | null,
//                                             // optional; called after every run of each tool
//                                             // ('qemu' | 'ours'); r.outPath, r.stdout, ...;
//                                             // state is a scratch object shared across runs
//     target:  { ratio: 1.1 } | { seconds: 1 }, // optional, on qcowkit's best wall time
//     required: true,                         // part of the target set (else "extra")
//   }
//
// The peak-RSS target (200 MB) applies to every case (see run.mjs, --rss-target).

import { CHECK_CASES } from './cases-check.mjs';
import { LUKS_CASES } from './cases-luks.mjs';
import { NBD_CASES } from './cases-nbd.mjs';

export const CASES = [
  // ---- targets from the issue -------------------------------------------
  {
    id: 'convert-qcow2-raw',
    name: 'qcow2 → raw',
    required: true,
    setup: async (ctx) => ({ src: await ctx.inputs.get('qcow2') }),
    output: 'raw',
    qemu: (p) => ['convert', '-O', 'raw', p.src.path, p.out],
    verify: 'raw-output',
    target: { ratio: 1.1 },
  },
  {
    id: 'convert-zlib-qcow2-raw',
    name: 'zlib qcow2 → raw',
    required: true,
    setup: async (ctx) => ({ src: await ctx.inputs.get('qcow2zlib') }),
    output: 'raw',
    qemu: (p) => ['convert', '-O', 'raw', p.src.path, p.out],
    verify: 'raw-output',
    target: { ratio: 1.1 },
  },
  {
    id: 'info-64t',
    name: 'info, empty 64 TiB',
    required: true,
    setup: async (ctx) => ({ src: await ctx.inputs.get('empty64t') }),
    qemu: (p) => ['info', p.src.path],
    verify: 'stdout',
    target: { seconds: 1 },
  },
  {
    id: 'map-64t',
    name: 'map, empty 64 TiB',
    required: true,
    setup: async (ctx) => ({ src: await ctx.inputs.get('empty64t') }),
    qemu: (p) => ['map', p.src.path],
    verify: 'stdout',
    target: { seconds: 1 },
  },

  // ---- write path (issue: write path) ------------------------------------------------
  {
    id: 'convert-raw-qcow2',
    name: 'raw → qcow2',
    required: true,
    setup: async (ctx) => ({ src: await ctx.inputs.get('raw') }),
    output: 'qcow2',
    qemu: (p) => ['convert', '-f', 'raw', '-O', 'qcow2', p.src.path, p.out],
    verify: 'image-compare',
    target: { ratio: 1.0 },
  },
  {
    id: 'convert-raw-qcow2-c',
    name: 'raw → qcow2 -c (zlib)',
    required: true,
    setup: async (ctx) => ({ src: await ctx.inputs.get('raw') }),
    output: 'qcow2',
    qemu: (p) => ['convert', '-c', '-f', 'raw', '-O', 'qcow2', p.src.path, p.out],
    verify: 'image-compare',
    target: { ratio: 0.6 },
  },
  {
    id: 'check-qcow2',
    name: 'check, 1 GiB half allocated',
    required: true,
    setup: async (ctx) => ({ src: await ctx.inputs.get('qcow2') }),
    qemu: (p) => ['check', p.src.path],
    verify: 'stdout',
    target: { ratio: 1.5 },
  },

  // ---- extras (no target from the issue; informative) ---------------------
  {
    id: 'map-json-64t',
    name: 'map --output=json, empty 64 TiB',
    setup: async (ctx) => ({ src: await ctx.inputs.get('empty64t') }),
    qemu: (p) => ['map', '--output=json', p.src.path],
    verify: 'stdout',
    target: { seconds: 1 },
  },
  {
    id: 'map-json-qcow2',
    name: 'map --output=json, half-allocated qcow2',
    setup: async (ctx) => ({ src: await ctx.inputs.get('qcow2') }),
    qemu: (p) => ['map', '--output=json', p.src.path],
    verify: 'stdout',
  },
  {
    id: 'convert-qcow2-qcow2',
    name: 'qcow2 → qcow2',
    setup: async (ctx) => ({ src: await ctx.inputs.get('qcow2') }),
    output: 'qcow2',
    qemu: (p) => ['convert', '-O', 'qcow2', p.src.path, p.out],
    verify: 'image-compare',
  },
  {
    id: 'compare-qcow2-raw',
    name: 'compare qcow2 with raw',
    setup: async (ctx) => ({ src: await ctx.inputs.get('qcow2'), raw: await ctx.inputs.get('raw') }),
    qemu: (p) => ['compare', p.src.path, p.raw.path],
    verify: 'stdout',
  },
  ...CHECK_CASES,
  ...LUKS_CASES,
  ...NBD_CASES,
];
