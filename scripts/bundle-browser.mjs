#!/usr/bin/env node
// Bundle the browser entry (dist/browser.js, compiled from src/browser.ts, and everything it
// imports, fflate and fzstd included) into one ES module for browsers: dist/qcowkit.browser.js.
//
// This is also the proof that the core runs without Node: with `platform: 'browser'` esbuild
// cannot resolve a `node:*` module (none is marked external), so an import of one anywhere in the
// graph fails the build; the output is checked for `node:` imports once more.
//
// Run after `tsc` (npm run build does). Unlike scripts/bundle.mjs, a failure here fails the build.
import { readFileSync, renameSync, rmSync, statSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO = join(dirname(fileURLToPath(import.meta.url)), '..');
const DIST = join(REPO, 'dist');
const ENTRY = join(DIST, 'browser.js');
const OUT = join(DIST, 'qcowkit.browser.js');
const TMP = `${OUT}.${process.pid}.tmp`;

function fail(message) {
  rmSync(TMP, { force: true });
  rmSync(OUT, { force: true });
  process.stderr.write(`bundle-browser: ${message}\n`);
  process.exit(1);
}

let esbuild;
try {
  esbuild = await import('esbuild');
} catch (e) {
  fail(`esbuild is not available (${e.message}); run npm ci`);
}
try {
  statSync(ENTRY);
} catch {
  fail(`${relative(REPO, ENTRY)} missing (run tsc first)`);
}

const started = performance.now();
try {
  await esbuild.build({
    entryPoints: [ENTRY],
    outfile: TMP,
    bundle: true,
    platform: 'browser',
    format: 'esm',
    target: 'es2020',
    minify: true,
    legalComments: 'none',
    logLevel: 'silent',
  });
} catch (e) {
  const errors = (e.errors ?? []).map((m) => `  ${m.location ? `${m.location.file}:${m.location.line}: ` : ''}${m.text}`);
  fail(`bundling ${relative(REPO, ENTRY)} for the browser failed:\n${errors.join('\n') || e.message}`);
}

const text = readFileSync(TMP, 'utf8');
const nodeImport = /\brequire\(\s*["']node:|\bfrom\s*["']node:|\bimport\(\s*["']node:/.exec(text);
if (nodeImport) fail(`the browser bundle imports a Node module (${JSON.stringify(text.slice(nodeImport.index, nodeImport.index + 40))})`);
renameSync(TMP, OUT);
const kib = Math.round(statSync(OUT).size / 1024);
process.stderr.write(`bundle: ${relative(REPO, OUT)} (${kib} KiB, ${Math.round(performance.now() - started)} ms)\n`);
