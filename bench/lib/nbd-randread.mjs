#!/usr/bin/env node
// A small NBD client for the bench: N random aligned reads of BS bytes with a fixed number in
// flight, over a Unix socket, with a fixed seed — the same requests against any server. It
// negotiates structured replies (as qemu, nbdcopy and other libnbd clients do) and handles data,
// hole, none and error chunks (and simple replies if the server refuses structured replies).
//
//   node bench/lib/nbd-randread.mjs --socket PATH [--export NAME] [--count 40000] [--qd 16]
//                                   [--bs 4096] [--seed 1]
//
// stdout: one line with the request parameters and a checksum of the data read, in request
// order (identical for two servers serving the same image); stderr: `iops=… seconds=…` for the
// I/O phase only (connection and handshake excluded).
import * as net from 'node:net';
import { prng } from './util.mjs';

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPT_REPLY_MAGIC = 0x3e889045565a9n;
const OPT_GO = 7;
const OPT_STRUCTURED_REPLY = 8;
const REP_ACK = 1;
const REP_INFO = 3;
const INFO_EXPORT = 0;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_MAGIC = 0x67446698;
const STRUCTURED_MAGIC = 0x668e33ef;
const CMD_READ = 0;
const CMD_DISC = 2;
const FLAG_DONE = 1;
const TYPE_NONE = 0;
const TYPE_OFFSET_DATA = 1;
const TYPE_OFFSET_HOLE = 2;

function parseArgs(argv) {
  const o = { socket: null, export: '', count: 40000, qd: 16, bs: 4096, seed: 1 };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i].replace(/^--/, '');
    const v = argv[++i];
    if (v === undefined || !(k in o)) throw new Error(`usage: --socket PATH [--export NAME] [--count N] [--qd N] [--bs N] [--seed N] (bad ${argv[i - 1]})`);
    o[k] = k === 'socket' || k === 'export' ? v : Number(v);
  }
  if (!o.socket) throw new Error('--socket is required');
  return o;
}

/** Exact-length reads on a socket, for the handshake. */
class Reader {
  constructor(sock) {
    this.sock = sock;
    this.buf = Buffer.alloc(0);
    this.want = null;
    sock.on('data', (d) => {
      this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
      this.poke();
    });
    sock.on('close', () => this.want?.reject(new Error('server closed the connection')));
    sock.on('error', (e) => this.want?.reject(e));
  }
  poke() {
    if (this.want && this.buf.length >= this.want.n) {
      const { n, resolve } = this.want;
      this.want = null;
      const out = this.buf.subarray(0, n);
      this.buf = this.buf.subarray(n);
      resolve(out);
    }
  }
  read(n) {
    return new Promise((resolve, reject) => {
      this.want = { n, resolve, reject };
      this.poke();
    });
  }
  /** Stop; hand over what was buffered. */
  detach() {
    this.sock.removeAllListeners('data');
    return this.buf;
  }
}

function option(opt, data = Buffer.alloc(0)) {
  const b = Buffer.alloc(16 + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(opt, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, 16);
  return b;
}

async function optionReply(r, opt) {
  const h = await r.read(20);
  if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC || h.readUInt32BE(8) !== opt) throw new Error('bad option reply');
  const type = h.readUInt32BE(12);
  const data = await r.read(h.readUInt32BE(16));
  return { type, data };
}

async function handshake(sock, name) {
  const r = new Reader(sock);
  const g = await r.read(18);
  if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('not a newstyle NBD server');
  sock.write(Buffer.from([0, 0, 0, 3])); // FIXED_NEWSTYLE | NO_ZEROES
  sock.write(option(OPT_STRUCTURED_REPLY));
  const sr = await optionReply(r, OPT_STRUCTURED_REPLY);
  const structured = sr.type === REP_ACK;
  const nameBuf = Buffer.from(name);
  const go = Buffer.alloc(4 + nameBuf.length + 2);
  go.writeUInt32BE(nameBuf.length, 0);
  nameBuf.copy(go, 4);
  sock.write(option(OPT_GO, go));
  let size = null;
  for (;;) {
    const { type, data } = await optionReply(r, OPT_GO);
    if (type === REP_INFO && data.readUInt16BE(0) === INFO_EXPORT) size = Number(data.readBigUInt64BE(2));
    else if (type === REP_ACK) break;
    else if (type & 0x80000000) throw new Error(`NBD_OPT_GO failed: ${data.toString()}`);
  }
  if (size == null) throw new Error('no export size');
  return { size, structured, rest: r.detach() };
}

/** FNV-1a over 32-bit words (cheap; only has to tell two servers' data apart). */
function fnv(buf) {
  let h = 0x811c9dc5;
  const n = buf.length >> 2;
  for (let i = 0; i < n; i++) h = Math.imul(h ^ buf.readUInt32LE(i << 2), 0x01000193);
  return h >>> 0;
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  const sock = net.connect(o.socket);
  sock.setNoDelay(true);
  await new Promise((res, rej) => sock.once('connect', res).once('error', rej));
  const { size, structured, rest } = await handshake(sock, o.export);
  const blocks = Math.floor(size / o.bs);
  const rand = prng(o.seed);
  const offsets = new Float64Array(o.count);
  for (let i = 0; i < o.count; i++) offsets[i] = Math.floor(rand() * blocks) * o.bs;
  const sums = new Uint32Array(o.count);
  const bufs = Array.from({ length: o.qd }, () => Buffer.alloc(o.bs));
  const slotOf = new Int32Array(o.count); // request index -> buffer slot
  const free = Array.from({ length: o.qd }, (_, i) => i);

  let next = 0;
  let done = 0;
  let t0 = 0n;
  const finished = new Promise((resolve, reject) => {
    sock.on('error', reject);
    sock.on('close', () => (done < o.count ? reject(new Error('server closed the connection')) : resolve()));
    const req = Buffer.alloc(28);
    req.writeUInt32BE(REQUEST_MAGIC, 0);
    const send = () => {
      let batch = null;
      while (next < o.count && free.length) {
        const i = next++;
        slotOf[i] = free.pop();
        req.writeUInt16BE(0, 4);
        req.writeUInt16BE(CMD_READ, 6);
        req.writeUInt32BE(0, 8);
        req.writeUInt32BE(i, 12);
        req.writeBigUInt64BE(BigInt(offsets[i]), 16);
        req.writeUInt32BE(o.bs, 24);
        (batch ??= []).push(Buffer.from(req));
      }
      if (batch) sock.write(batch.length === 1 ? batch[0] : Buffer.concat(batch));
    };
    const complete = (i) => {
      const s = slotOf[i];
      sums[i] = fnv(bufs[s]);
      free.push(s);
      if (++done === o.count) {
        const t = process.hrtime.bigint() - t0;
        const disc = Buffer.alloc(28);
        disc.writeUInt32BE(REQUEST_MAGIC, 0);
        disc.writeUInt16BE(CMD_DISC, 6);
        sock.end(disc);
        resolve(t);
      }
    };

    // Reply parser over a list of received chunks.
    let buf = rest;
    const parse = () => {
      for (;;) {
        if (buf.length < 4) return;
        const magic = buf.readUInt32BE(0);
        if (magic === SIMPLE_MAGIC) {
          if (buf.length < 16 + o.bs) return;
          const err = buf.readUInt32BE(4);
          const i = buf.readUInt32BE(12);
          if (err) return reject(new Error(`read ${i} failed: error ${err}`));
          buf.copy(bufs[slotOf[i]], 0, 16, 16 + o.bs);
          buf = buf.subarray(16 + o.bs);
          complete(i);
        } else if (magic === STRUCTURED_MAGIC) {
          if (buf.length < 20) return;
          const len = buf.readUInt32BE(16);
          if (buf.length < 20 + len) return;
          const flags = buf.readUInt16BE(4);
          const type = buf.readUInt16BE(6);
          const i = buf.readUInt32BE(12);
          const target = bufs[slotOf[i]];
          const base = offsets[i];
          if (type === TYPE_OFFSET_DATA) {
            const off = Number(buf.readBigUInt64BE(20)) - base;
            buf.copy(target, off, 28, 20 + len);
          } else if (type === TYPE_OFFSET_HOLE) {
            const off = Number(buf.readBigUInt64BE(20)) - base;
            target.fill(0, off, off + buf.readUInt32BE(28));
          } else if (type !== TYPE_NONE) {
            return reject(new Error(`read ${i}: reply chunk type ${type}${type & 0x8000 ? ` (error ${buf.readUInt32BE(20)})` : ''}`));
          }
          buf = buf.subarray(20 + len);
          if (flags & FLAG_DONE) complete(i);
        } else {
          return reject(new Error(`bad reply magic 0x${magic.toString(16)}`));
        }
        if (done < o.count) send();
      }
    };
    sock.on('data', (d) => {
      buf = buf.length ? Buffer.concat([buf, d]) : d;
      parse();
    });
    t0 = process.hrtime.bigint();
    send();
    parse();
  });
  const ns = await finished;
  const seconds = Number(ns) / 1e9;
  // Checksum of the per-request digests, in request order.
  let h = 0x811c9dc5;
  for (let i = 0; i < o.count; i++) h = Math.imul(h ^ sums[i], 0x01000193);
  process.stdout.write(`reads=${o.count} bs=${o.bs} qd=${o.qd} seed=${o.seed} structured=${structured} checksum=${(h >>> 0).toString(16)}\n`);
  process.stderr.write(`iops=${Math.round(o.count / seconds)} seconds=${seconds.toFixed(3)}\n`);
}

main().catch((e) => {
  process.stderr.write(`nbd-randread: ${e.message}\n`);
  process.exit(1);
});
