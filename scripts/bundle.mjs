#!/usr/bin/env node
// Bundle the compiled CLI (dist/cli/main.js and everything it imports) into one CommonJS file,
// dist/qcowkit.cjs, which bin/qcowkit loads instead of the ESM module graph: one file to read and
// compile instead of ~60 modules to resolve, load and link, and no ESM loader start-up; then a V8
// code cache of it (dist/qcowkit.cjs.cache), so little is compiled at start. Short commands (info,
// map, check of small images) are dominated by start-up: this cuts ~45 ms of the ~60 ms qcowkit
// added to Node's own start-up (see bin/qcowkit).
//
// Run after `tsc` (npm run build does). bin/qcowkit uses the bundle only while it is newer than
// dist/cli/main.js, so a later plain `tsc` run (without re-bundling) falls back to dist/ as before.
// If esbuild is missing or fails, the build goes on without a bundle (bin/qcowkit then uses dist/).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO = join(dirname(fileURLToPath(import.meta.url)), '..');
const DIST = join(REPO, 'dist');
const OUT = join(DIST, 'qcowkit.cjs');
const CACHE = `${OUT}.cache`;

let esbuild;
try {
  esbuild = await import('esbuild');
} catch {
  rmSync(OUT, { force: true });
  rmSync(CACHE, { force: true });
  process.stderr.write('warning: esbuild not available; bin/qcowkit will load dist/ module by module\n');
  process.exit(0);
}
if (!existsSync(join(DIST, 'cli', 'main.js'))) {
  process.stderr.write('bundle: dist/cli/main.js missing (run tsc first)\n');
  process.exit(1);
}

// `import.meta.url` means "this module's file" (worker scripts, the native addon and
// package.json are found relative to it): in the bundle, each module gets its own original
// dist/ file's URL back, computed from the bundle's own location at run time.
const metaUrl = {
  name: 'import-meta-url',
  setup(build) {
    build.onLoad({ filter: /[\\/]dist[\\/].*\.js$/ }, async (args) => {
      const { readFile } = await import('node:fs/promises');
      let contents = await readFile(args.path, 'utf8');
      if (contents.includes('import.meta.url')) {
        const rel = relative(DIST, args.path).split(sep).join('/');
        contents = contents.replaceAll('import.meta.url', `__qcowkitModuleUrl(${JSON.stringify(rel)})`);
      }
      return { contents, loader: 'js' };
    });
  },
};

// Written under another name, then renamed: a qcowkit run meanwhile sees the old or the new file.
const TMP = `${OUT}.${process.pid}.tmp`;
rmSync(CACHE, { force: true });
try {
  await esbuild.build({
    entryPoints: [join(DIST, 'cli', 'main.js')],
    outfile: TMP,
    bundle: true,
    platform: 'node',
    format: 'cjs',
    target: 'node20',
    // Dependencies stay in node_modules (zstd-napi is a native addon, loaded only when needed).
    packages: 'external',
    minifyWhitespace: true,
    minifySyntax: true,
    legalComments: 'none',
    // ASCII only (non-ASCII characters escaped): bin/qcowkit reads the bundle as latin1, which
    // Node decodes in about half the time UTF-8 takes; for ASCII both give the same string.
    charset: 'ascii',
    logLevel: 'warning',
    banner: {
      js:
        '"use strict";' +
        'const __qcowkitModuleUrl=(rel)=>require("node:url").pathToFileURL(require("node:path").join(__dirname,rel)).href;',
    },
    plugins: [metaUrl],
  });
  if (readFileSync(TMP).some((b) => b > 0x7f)) throw new Error('the bundle is not ASCII');
  renameSync(TMP, OUT);
} catch (e) {
  // The bundle only makes start-up faster: without it bin/qcowkit loads dist/ as before.
  rmSync(TMP, { force: true });
  rmSync(OUT, { force: true });
  process.stderr.write(`warning: bundling failed (${e.message}); bin/qcowkit will load dist/ module by module\n`);
  process.exit(0);
}

// The V8 code cache: run the short commands on a small image through bin/qcowkit, each run adding
// what it compiled to the cache (bin/qcowkit writes it with QCOWKIT_WRITE_CODE_CACHE=1). Optional:
// without it the bundle is compiled at every start, a little slower.
const work = mkdtempSync(join(tmpdir(), 'qcowkit-cache-'));
try {
  const img = join(work, 'a.qcow2');
  // the converts copy a raw file with data and holes (the bench's main paths)
  const raw = join(work, 'r.raw');
  const data = Buffer.alloc(4 << 20);
  for (let i = 0; i < 2 << 20; i++) data[i] = (i * 2654435761) >>> 24;
  writeFileSync(raw, data);
  const runs = [
    ['create', '-q', '-f', 'qcow2', img, '64M'],
    ['info', img],
    ['info', '--output=json', img],
    ['map', img],
    ['map', '--output=json', img],
    ['check', img],
    ['check', '--output=json', img],
    ['convert', '-f', 'raw', '-O', 'qcow2', raw, join(work, 'c.qcow2')],
    ['convert', '-O', 'raw', join(work, 'c.qcow2'), join(work, 'c.raw')],
    ['convert', '-O', 'qcow2', join(work, 'c.qcow2'), join(work, 'd.qcow2')],
    ['compare', join(work, 'c.qcow2'), raw],
  ];
  for (const args of runs) {
    // through the launcher's shell line, as users run it: Node gets the same flags (V8 takes a
    // code cache only under the flags it was made with)
    const r = spawnSync('/bin/sh', [join(REPO, 'bin', 'qcowkit'), ...args], {
      env: { ...process.env, QCOWKIT_WRITE_CODE_CACHE: '1' },
      stdio: ['ignore', 'ignore', 'pipe'],
      encoding: 'utf8',
    });
    if (r.status !== 0) {
      rmSync(CACHE, { force: true });
      process.stderr.write(`warning: code cache not made (qcowkit ${args[0]} failed: ${(r.stderr || r.error || '').toString().trim()})\n`);
      break;
    }
  }
} finally {
  rmSync(work, { recursive: true, force: true });
}
process.stderr.write(`bundle: ${relative(REPO, OUT)}${existsSync(CACHE) ? ` (+ ${relative(REPO, CACHE)})` : ''}\n`);
