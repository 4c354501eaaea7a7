/**
 * The Node codecs' raw inflate (native/zlib.c on the thread pool when built, node:zlib otherwise):
 * QEMU's rules — exactly the cluster's bytes, padding after the stream ignored, bad or short
 * data refused — and many clusters inflating at once into their own buffers.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { deflateRawSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { nodeCodecs } from '../../src/codecs/node.js';
import { REPO_ROOT } from '../helpers/proc.js';

function cluster(seed: number, size = 65536): Uint8Array {
  const out = new Uint8Array(size);
  const text = `seed ${seed}: the quick brown fox ${seed * 7} jumps over the lazy dog\n`;
  for (let i = 0; i < size; i++) out[i] = text.charCodeAt(i % text.length);
  return out;
}

describe('node codecs: inflateRaw', () => {
  it('the native addon is built here (CI builds it with npm ci)', () => {
    expect(fs.existsSync(path.join(REPO_ROOT, 'native/build/Release/qcowkit_zlib.node'))).toBe(true);
  });

  it('inflates a 4 KiB-window cluster, ignoring the sector padding after it', async () => {
    const data = cluster(1);
    const packed = deflateRawSync(data, { windowBits: 12 });
    const input = new Uint8Array(packed.length + 300).fill(0xa5);
    input.set(packed);
    expect(Buffer.from(await nodeCodecs.inflateRaw(input, data.length)).equals(Buffer.from(data))).toBe(true);
  });

  it('writes into the buffer given, and returns it', async () => {
    const data = cluster(2);
    const out = new Uint8Array(data.length);
    const r = await nodeCodecs.inflateRaw(deflateRawSync(data), data.length, out);
    expect(r).toBe(out);
    expect(Buffer.from(out).equals(Buffer.from(data))).toBe(true);
  });

  it('refuses bad data, and a stream that ends before the cluster is full', async () => {
    await expect(nodeCodecs.inflateRaw(new Uint8Array([0xff, 0xff, 0xff, 0xff]), 65536)).rejects.toThrow(/bad compressed cluster/);
    const short = deflateRawSync(cluster(3, 1000));
    await expect(nodeCodecs.inflateRaw(short, 65536)).rejects.toThrow(/bad compressed cluster/);
    const truncated = deflateRawSync(cluster(4)).subarray(0, 50);
    await expect(nodeCodecs.inflateRaw(truncated, 65536)).rejects.toThrow(/bad compressed cluster/);
  });

  it('many clusters at once each get their own bytes', async () => {
    const inputs = Array.from({ length: 64 }, (_, i) => ({ data: cluster(i + 10, 16384 << (i % 3)), i }));
    const outs = await Promise.all(inputs.map(({ data }) => nodeCodecs.inflateRaw(deflateRawSync(data, { windowBits: 12 }), data.length)));
    inputs.forEach(({ data }, k) => expect(Buffer.from(outs[k]!).equals(Buffer.from(data))).toBe(true));
  });
});
