/**
 * The XTS tweak pass in WebAssembly: `dst = src XOR tweak` over whole 512-byte sectors, the tweak
 * of block 0 of each sector given (the encrypted IV), each next block's tweak the previous one
 * multiplied by x in GF(2^128) — 64-bit words, about three times the speed of the int32 JavaScript
 * loop (which stays as the fallback where WebAssembly is missing, see sector-cipher.ts).
 *
 * The module is tiny and written out here instruction by instruction (no build step, no binary
 * blob). It imports its memory: `[0, SLICE)` holds the data, `[SLICE, SLICE + 16*SLICE/512)` the
 * first tweak of each sector. Pure code; uses only the WebAssembly global.
 *
 *   (func $xts (param $dst i32) (param $src i32) (param $t i32) (param $n i32)
 *     (local $lo i64) (local $hi i64) (local $j i32) (local $c i64)
 *     block  (br_if 0 (i32.eqz n))
 *       loop                                     ;; each sector
 *         lo = i64.load t ; hi = i64.load offset=8 t ; j = 32
 *         loop                                   ;; each 16-byte block
 *           i64.store dst (i64.load src ^ lo) ; i64.store offset=8 dst (i64.load offset=8 src ^ hi)
 *           c = hi >>s 63 ; hi = hi << 1 | lo >>u 63 ; lo = lo << 1 ^ (c & 0x87)
 *           dst += 16 ; src += 16 ; br_if 0 (j -= 1)
 *         end
 *         t += 16 ; br_if 0 (n -= 1)
 *       end
 *     end)
 */

/** Bytes of data the shared memory takes per call (a whole number of sectors). */
export const XTS_WASM_SLICE = 64 * 1024;
const TWEAKS_AT = XTS_WASM_SLICE;
const PAGES = 2; // 128 KiB: the slice and its tweaks

const uleb = (n: number): number[] => {
  const out: number[] = [];
  do {
    let b = n & 0x7f;
    n >>>= 7;
    if (n) b |= 0x80;
    out.push(b);
  } while (n);
  return out;
};
const sleb = (n: number): number[] => {
  const out: number[] = [];
  for (;;) {
    const b = n & 0x7f;
    n >>= 7;
    if ((n === 0 && !(b & 0x40)) || (n === -1 && b & 0x40)) {
      out.push(b);
      return out;
    }
    out.push(b | 0x80);
  }
};
const name = (s: string): number[] => [...uleb(s.length), ...[...s].map((c) => c.charCodeAt(0))];
const section = (id: number, bytes: number[]): number[] => [id, ...uleb(bytes.length), ...bytes];
const vec = (items: number[][]): number[] => [...uleb(items.length), ...items.flat()];

function moduleBytes(): Uint8Array {
  const I32 = 0x7f;
  const I64 = 0x7e;
  const get = (i: number) => [0x20, i];
  const set = (i: number) => [0x21, i];
  const tee = (i: number) => [0x22, i];
  const load64 = (off: number) => [0x29, 3, ...uleb(off)];
  const store64 = (off: number) => [0x37, 3, ...uleb(off)];
  const i32c = (v: number) => [0x41, ...sleb(v)];
  const i64c = (v: number) => [0x42, ...sleb(v)];
  const [DST, SRC, T, N, LO, HI, J, C] = [0, 1, 2, 3, 4, 5, 6, 7];
  const XOR64 = 0x85;
  const SHL64 = 0x86;
  const SHRS64 = 0x87;
  const SHRU64 = 0x88;
  const OR64 = 0x84;
  const AND64 = 0x83;
  const ADD32 = 0x6a;
  const SUB32 = 0x6b;
  const body = [
    ...vec([[1, I64], [1, I64], [1, I32], [1, I64]]),
    0x02, 0x40, ...get(N), 0x45, 0x0d, 0,
    0x03, 0x40,
    ...get(T), ...load64(0), ...set(LO),
    ...get(T), ...load64(8), ...set(HI),
    ...i32c(32), ...set(J),
    0x03, 0x40,
    ...get(DST), ...get(SRC), ...load64(0), ...get(LO), XOR64, ...store64(0),
    ...get(DST), ...get(SRC), ...load64(8), ...get(HI), XOR64, ...store64(8),
    ...get(HI), ...i64c(63), SHRS64, ...set(C),
    ...get(HI), ...i64c(1), SHL64, ...get(LO), ...i64c(63), SHRU64, OR64, ...set(HI),
    ...get(LO), ...i64c(1), SHL64, ...get(C), ...i64c(0x87), AND64, XOR64, ...set(LO),
    ...get(DST), ...i32c(16), ADD32, ...set(DST),
    ...get(SRC), ...i32c(16), ADD32, ...set(SRC),
    ...get(J), ...i32c(1), SUB32, ...tee(J), 0x0d, 0,
    0x0b,
    ...get(T), ...i32c(16), ADD32, ...set(T),
    ...get(N), ...i32c(1), SUB32, ...tee(N), 0x0d, 0,
    0x0b,
    0x0b,
    0x0b,
  ];
  return new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 1, 0, 0, 0,
    ...section(1, vec([[0x60, ...vec([[I32], [I32], [I32], [I32]]), 0]])),
    ...section(2, vec([[...name('env'), ...name('mem'), 0x02, 0x00, ...uleb(PAGES)]])),
    ...section(3, vec([[0]])),
    ...section(7, vec([[...name('xts'), 0x00, 0]])),
    ...section(10, vec([[...uleb(body.length), ...body]])),
  ]);
}

export interface XtsWasm {
  /** The shared memory: data at 0, first tweaks at `tweaksAt`. */
  heap: Uint8Array;
  tweaksAt: number;
  /** heap[dst..] = heap[src..] XOR the tweaks of `n` sectors whose first tweaks are at `tweaksAt`. */
  xor(n: number): void;
}

/** The part of the WebAssembly global used here (not in the ES library typings the build uses). */
interface WasmApi {
  Memory: new (d: { initial: number; maximum: number }) => { buffer: ArrayBuffer };
  Module: new (bytes: Uint8Array) => object;
  Instance: new (m: object, imports: Record<string, Record<string, unknown>>) => { exports: Record<string, unknown> };
}

let instance: XtsWasm | null | undefined;

/** The shared instance, or undefined where WebAssembly is not available (or disabled). */
export function xtsWasm(): XtsWasm | undefined {
  if (instance === undefined) {
    instance = null;
    try {
      const WA = (globalThis as { WebAssembly?: WasmApi }).WebAssembly;
      if (WA) {
        const mem = new WA.Memory({ initial: PAGES, maximum: PAGES });
        const inst = new WA.Instance(new WA.Module(moduleBytes()), { env: { mem } });
        const fn = inst.exports.xts as (dst: number, src: number, t: number, n: number) => void;
        instance = { heap: new Uint8Array(mem.buffer), tweaksAt: TWEAKS_AT, xor: (n) => fn(0, 0, TWEAKS_AT, n) };
      }
    } catch {
      instance = null;
    }
  }
  return instance ?? undefined;
}

/** Tests: use (or stop using) the WebAssembly path. */
export function setXtsWasmEnabled(on: boolean): void {
  instance = on ? undefined : null;
}
