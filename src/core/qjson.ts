/**
 * JSON printed the way QEMU prints QAPI objects (qobject_to_json_pretty): 4-space indentation and
 * object keys in QDict order — QEMU stores objects in a 512-bucket hash table and prints bucket by
 * bucket, so the key order is a function of the key names. Reproducing it keeps our output
 * byte-identical to qemu-img's for scripts that compare text.
 */
const BUCKETS = 512;

/** QDict's hash of a key (tdb hash), 32-bit unsigned arithmetic. */
export function qdictBucket(key: string): number {
  const bytes = new TextEncoder().encode(key);
  let value = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) {
    value = (value + ((bytes[i]! << ((i * 5) % 24)) >>> 0)) >>> 0;
  }
  return ((Math.imul(1103515243, value) + 12345) >>> 0) % BUCKETS;
}

/** Keys in the order QEMU would print them, given insertion order (later inserts first within a bucket). */
export function qdictOrder(keys: string[]): string[] {
  const indexed = keys.map((k, i) => ({ k, i, b: qdictBucket(k) }));
  indexed.sort((x, y) => x.b - y.b || y.i - x.i);
  return indexed.map((x) => x.k);
}

function quote(s: string): string {
  let out = '"';
  for (const ch of s) {
    const c = ch.codePointAt(0)!;
    if (ch === '"') out += '\\"';
    else if (ch === '\\') out += '\\\\';
    else if (ch === '\b') out += '\\b';
    else if (ch === '\f') out += '\\f';
    else if (ch === '\n') out += '\\n';
    else if (ch === '\r') out += '\\r';
    else if (ch === '\t') out += '\\t';
    else if (c < 0x20 || c === 0x7f) out += `\\u${c.toString(16).toUpperCase().padStart(4, '0')}`;
    else if (c > 0xffff) {
      const v = c - 0x10000;
      out += `\\u${(0xd800 + (v >> 10)).toString(16).toUpperCase()}\\u${(0xdc00 + (v & 0x3ff)).toString(16).toUpperCase()}`;
    } else if (c > 0x7e) out += `\\u${c.toString(16).toUpperCase().padStart(4, '0')}`;
    else out += ch;
  }
  return out + '"';
}

/** Pretty JSON like QEMU's. Objects' key order follows QDict; undefined values are omitted. */
export function qjson(value: unknown, level = 0): string {
  const pad = (n: number) => '    '.repeat(n);
  if (value === null) return 'null';
  if (typeof value === 'boolean') return value ? 'true' : 'false';
  if (typeof value === 'number' || typeof value === 'bigint') return String(value);
  if (typeof value === 'string') return quote(value);
  if (Array.isArray(value)) {
    if (value.length === 0) return '[\n' + pad(level) + ']';
    return '[\n' + value.map((v) => pad(level + 1) + qjson(v, level + 1)).join(',\n') + '\n' + pad(level) + ']';
  }
  if (typeof value === 'object') {
    const obj = value as Record<string, unknown>;
    const keys = qdictOrder(Object.keys(obj).filter((k) => obj[k] !== undefined));
    if (keys.length === 0) return '{\n' + pad(level) + '}';
    return '{\n' + keys.map((k) => `${pad(level + 1)}${quote(k)}: ${qjson(obj[k], level + 1)}`).join(',\n') + '\n' + pad(level) + '}';
  }
  return 'null';
}
