/**
 * `--image-opts`: the image argument is an option string (QemuOpts syntax) instead of a file name,
 * e.g. `driver=qcow2,file.filename=disk.qcow2`. A comma inside a value is written `,,`.
 */
import { CliError } from './errors.js';

/** Split a QemuOpts string into ordered key/value pairs. A bare word is `key=on` (or the implied key's value when first). */
export function parseQemuOpts(text: string, impliedKey?: string): Array<[string, string]> {
  const items: string[] = [];
  let cur = '';
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === ',') {
      if (text[i + 1] === ',') {
        cur += ',';
        i++;
        continue;
      }
      items.push(cur);
      cur = '';
      continue;
    }
    cur += c;
  }
  items.push(cur);
  const out: Array<[string, string]> = [];
  items.forEach((item, idx) => {
    if (item === '' && idx === items.length - 1 && idx > 0) return; // trailing comma
    const eq = item.indexOf('=');
    if (eq >= 0) out.push([item.slice(0, eq), item.slice(eq + 1)]);
    else if (idx === 0 && impliedKey) out.push([impliedKey, item]);
    else out.push([item, 'on']);
  });
  return out;
}

export interface ImageSpec {
  /** File to open. */
  filename: string;
  /** Format from `driver=`; probed when absent. */
  format?: string;
  /** `data-file.filename=`: external data file override. */
  dataFile?: string;
  /** `encrypt.key-secret=`: id of the `--object secret` holding the image's password. */
  keySecret?: string;
  /** Format-level options we do not know: refused once the format is known (open time). */
  unknown: string[];
}

/** Options accepted and ignored: they tune caching, locking or naming, not what is read. */
const IGNORED = new Set([
  'node-name',
  'read-only',
  'auto-read-only',
  'force-share',
  'discard',
  'detect-zeroes',
  'cache.direct',
  'cache.no-flush',
  'file.driver',
  'file.locking',
  'file.aio',
  'file.node-name',
  'file.read-only',
  'file.cache.direct',
  'file.cache.no-flush',
  'data-file.driver',
  'lazy-refcounts',
  'pass-discard-request',
  'pass-discard-snapshot',
  'pass-discard-other',
  'overlap-check',
  'cache-size',
  'l2-cache-size',
  'l2-cache-entry-size',
  'refcount-cache-size',
  'cache-clean-interval',
]);

/** Interpret `--image-opts` text as the file and format to open. Errors are worded like qemu-img's. */
export function imageSpecFromOpts(text: string): ImageSpec {
  const opts = parseQemuOpts(text, 'file');
  const get = (k: string) => {
    let v: string | undefined;
    for (const [key, val] of opts) if (key === k) v = val;
    return v;
  };
  const fail = (why: string) => new CliError(`Could not open '${text}': ${why}`);
  let driver = get('driver');
  const fileRef = get('file');
  let filename = get('file.filename');
  const fileDriver = get('file.driver');
  if (fileDriver !== undefined && fileDriver !== 'file') throw fail(`Unknown protocol '${fileDriver}'`);
  if (driver === 'file') {
    // The protocol layer itself: the bytes of the file, like raw.
    filename = get('filename');
    driver = 'raw';
    if (filename === undefined) throw fail("The 'file' block driver requires a file name");
  } else if (fileRef !== undefined && filename === undefined) {
    throw fail(`Cannot find device='${fileRef}' nor node-name='${fileRef}'`);
  }
  if (driver === undefined && filename === undefined) throw fail('Must specify either driver or file');
  if (filename === undefined) throw fail('A block device must be specified for "file"');
  const spec: ImageSpec = { filename, unknown: [] };
  if (driver !== undefined) spec.format = driver;
  for (const [key] of opts) {
    if (key === 'driver' || key === 'file' || key === 'file.filename' || key === 'filename') continue;
    if (IGNORED.has(key)) continue;
    if (key === 'data-file.filename') {
      spec.dataFile = get(key);
      continue;
    }
    if (key === 'encrypt.key-secret') {
      spec.keySecret = get(key);
      continue;
    }
    if (key === 'encrypt.format') continue;
    if (key.startsWith('file.')) throw fail(`Block protocol 'file' doesn't support the option '${key.slice(5)}'`);
    spec.unknown.push(key);
  }
  return spec;
}
