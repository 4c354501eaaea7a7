#!/usr/bin/env node
// Encryption throughput (needs a build: npx tsc). Not part of `npm test`.
//
//   node test/crypto/throughput.mjs [--mib N] [--convert SIZE_MIB]
//
// 1. Sector modes on 64 KiB and 1 MiB buffers: our bulk path (ECB + word XOR) against a fresh
//    node:crypto cipher per 512-byte sector, MB/s (CPU bound, single thread).
// 2. --convert: a LUKS aes-256-xts image (made by qemu-img, fully written by qemu-io) converted to
//    raw by qemu-img and by our library (openImage + convertImages), wall time.
import * as nodeCrypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath, pathToFileURL } from 'node:url';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const imp = (p) => import(pathToFileURL(path.join(REPO, 'dist', p)).href);
const { nodeCryptoBackend, registerNodeCrypto } = await imp('codecs/crypto-node.js');
const { makeSectorCipher } = await imp('formats/crypto/sector-cipher.js');

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : dflt;
};
const totalMiB = opt('--mib', 256);
const convertMiB = opt('--convert', 0);

function perSector(alg, key, buf, first, encrypt) {
  for (let off = 0, s = first; off < buf.length; off += 512, s++) {
    const iv = Buffer.alloc(16);
    iv.writeBigUInt64LE(BigInt(s));
    const c = encrypt ? nodeCrypto.createCipheriv(alg, key, iv) : nodeCrypto.createDecipheriv(alg, key, iv);
    c.setAutoPadding(false);
    const out = c.update(buf.subarray(off, off + 512));
    c.final();
    buf.set(out, off);
  }
}

/**
 * MB/s of each function on `bufLen` buffers, measured in interleaved rounds (the functions take
 * turns), so that load changes on a shared machine affect all of them alike.
 */
function rates(fns, bufLen, rounds = 5) {
  const buf = new Uint8Array(nodeCrypto.randomBytes(bufLen));
  const n = Math.max(1, Math.floor((totalMiB * 1048576) / bufLen / rounds));
  const ns = {};
  for (const [k, fn] of Object.entries(fns)) (fn(buf, 0), (ns[k] = 0)); // warm up
  for (let r = 0; r < rounds; r++) {
    for (const [k, fn] of Object.entries(fns)) {
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < n; i++) fn(buf, i * (bufLen / 512));
      ns[k] += Number(process.hrtime.bigint() - t0);
    }
  }
  const out = {};
  for (const k of Object.keys(fns)) out[k] = ((rounds * n * bufLen) / 1048576 / (ns[k] / 1e9)).toFixed(0);
  return out;
}

const rows = [];
for (const [label, nodeAlg, spec, keyLen] of [
  ['aes-256-xts-plain64', 'aes-256-xts', { cipherAlg: 'aes-256', mode: 'xts', ivgen: 'plain64' }, 64],
  ['aes-128-cbc-plain64', 'aes-128-cbc', { cipherAlg: 'aes-128', mode: 'cbc', ivgen: 'plain64' }, 16],
  ['aes-256-cbc-essiv:sha256', null, { cipherAlg: 'aes-256', mode: 'cbc', ivgen: 'essiv', ivgenHash: 'sha256' }, 32],
]) {
  const key = nodeCrypto.randomBytes(keyLen);
  const c = makeSectorCipher(spec, new Uint8Array(key), nodeCryptoBackend);
  const ecb = nodeCrypto.createCipheriv(`aes-${keyLen > 32 ? keyLen * 4 : keyLen * 8}-ecb`, key.subarray(0, Math.min(keyLen, 32)), null).setAutoPadding(false);
  for (const bufLen of [65536, 1048576]) {
    const fns = {
      'ours decrypt MB/s': (b, s) => c.decrypt(b, s),
      'ours encrypt MB/s': (b, s) => c.encrypt(b, s),
    };
    if (nodeAlg) {
      fns['per-sector decrypt MB/s'] = (b, s) => perSector(nodeAlg, key, b, s, false);
      fns['per-sector encrypt MB/s'] = (b, s) => perSector(nodeAlg, key, b, s, true);
    }
    fns['raw ECB (bound) MB/s'] = (b) => ecb.update(b);
    rows.push({ mode: label, buffer: `${bufLen / 1024} KiB`, ...rates(fns, bufLen) });
  }
}
console.table(rows);

if (convertMiB > 0) {
  const { openImage } = await imp('block/open.js');
  const { fileProvider } = await imp('io/file.js');
  const { registerNodeCodecs } = await imp('codecs/node.js');
  const { convertImages } = await imp('ops/convert.js');
  const { RawFileTarget } = await imp('cli/raw-target.js');
  registerNodeCodecs();
  registerNodeCrypto();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qk-xts-bench-'));
  try {
    const img = path.join(dir, 'luks.qcow2');
    const sec = ['--object', 'secret,id=sec0,data=pw'];
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ...sec, '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10', img, `${convertMiB}M`]);
    // Fill with random-ish data (qemu-io pattern writes; -P varies by MiB so nothing is zero).
    const cmds = [];
    for (let m = 0; m < convertMiB; m += 16) cmds.push('-c', `write -P ${(m % 250) + 1} ${m}M 16M`);
    execFileSync('qemu-io', [...sec, '--image-opts', `driver=qcow2,file.filename=${img},encrypt.key-secret=sec0`, ...cmds], { stdio: 'ignore' });
    const time = async (fn) => {
      const t0 = process.hrtime.bigint();
      await fn();
      return Number(process.hrtime.bigint() - t0) / 1e9;
    };
    const best = async (fn, runs = 3) => {
      let b = Infinity;
      for (let i = 0; i < runs; i++) b = Math.min(b, await time(fn));
      return b;
    };
    const qOut = path.join(dir, 'q.raw');
    const oOut = path.join(dir, 'o.raw');
    const tq = await best(async () => {
      fs.rmSync(qOut, { force: true });
      execFileSync('qemu-img', ['convert', ...sec, '--image-opts', `driver=qcow2,file.filename=${img},encrypt.key-secret=sec0`, '-O', 'raw', qOut]);
    });
    let unlockS = 0;
    const to = await best(async () => {
      fs.rmSync(oOut, { force: true });
      const t0 = process.hrtime.bigint();
      const src = await openImage(img, { io: fileProvider, readOnly: true, secrets: new Map([['sec0', new TextEncoder().encode('pw')]]), keySecret: 'sec0' });
      unlockS = Number(process.hrtime.bigint() - t0) / 1e9;
      const out = await fileProvider.create(oOut);
      await out.truncate(src.size);
      await convertImages([src], new RawFileTarget(out, { zeroInit: true, sync: false, unmap: true }));
      await out.close();
      await src.close();
    });
    const same = execFileSync('cmp', [qOut, oOut]).length === 0;
    console.log(
      `convert ${convertMiB} MiB aes-256-xts LUKS → raw: qemu-img ${tq.toFixed(2)} s, qcowkit library ${to.toFixed(2)} s ` +
        `(ratio ${(to / tq).toFixed(2)}; of which open+unlock ${unlockS.toFixed(2)} s); outputs identical: ${same}`,
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
