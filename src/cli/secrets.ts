/**
 * `--object secret,id=ID,data=TEXT|file=PATH[,format=raw|base64][,keyid=ID,iv=BASE64]` as qemu-img
 * takes it (QemuOpts text or JSON `{"qom-type":"secret",...}`), with qemu-img's messages.
 *
 * Secrets are kept as raw bytes in a Map by id, the shape OpenOptions.secrets takes. Their content
 * never goes into a message: errors name the id or the parameter, never the data (JSON parse
 * errors are not passed through since V8 quotes the input in them).
 *
 * `keyid`/`iv`: the data is AES-256-CBC ciphertext (PKCS#7 padded) under the earlier secret `keyid`
 * (32 bytes) with the given IV (base64), as QEMU's secret object allows.
 */
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import { CliError } from './errors.js';

export type SecretMap = Map<string, Uint8Array>;

/** An `--object` that is not a secret: left to whoever handles that type (e.g. TLS credentials). */
export interface OtherObject {
  type: string;
  id?: string;
  props: Map<string, string>;
}

/** Split QemuOpts text: `,,` is a literal comma; a first bare word is the qom-type. */
function splitOpts(text: string): Array<[string, string]> {
  const items: string[] = [];
  let cur = '';
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === ',' && text[i + 1] === ',') {
      cur += ',';
      i++;
    } else if (c === ',') {
      items.push(cur);
      cur = '';
    } else cur += c;
  }
  items.push(cur);
  const out: Array<[string, string]> = [];
  items.forEach((item, idx) => {
    if (item === '' && idx === items.length - 1 && idx > 0) return;
    const eq = item.indexOf('=');
    if (eq >= 0) out.push([item.slice(0, eq), item.slice(eq + 1)]);
    else if (idx === 0) out.push(['qom-type', item]);
    else out.push([item, 'on']);
  });
  return out;
}

function toProps(text: string): Map<string, string> {
  const props = new Map<string, string>();
  if (text.trimStart().startsWith('{')) {
    let obj: unknown;
    try {
      obj = JSON.parse(text);
    } catch {
      throw new CliError('Invalid JSON object given to --object');
    }
    if (!obj || typeof obj !== 'object' || Array.isArray(obj)) throw new CliError('Invalid JSON object given to --object');
    for (const [k, v] of Object.entries(obj as Record<string, unknown>)) props.set(k, typeof v === 'boolean' ? (v ? 'on' : 'off') : String(v));
    return props;
  }
  for (const [k, v] of splitOpts(text)) props.set(k, v);
  return props;
}

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

function base64Decode(s: string): Uint8Array {
  const t = s.replace(/\s+/g, '');
  if (!BASE64.test(t) || t.length % 4 === 1) throw new CliError('Base64 data contains invalid characters');
  return new Uint8Array(Buffer.from(t, 'base64'));
}

function readSecretFile(file: string): Uint8Array {
  try {
    return new Uint8Array(fs.readFileSync(file));
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'No such file or directory' : code === 'EACCES' ? 'Permission denied' : code === 'EISDIR' ? 'Is a directory' : (code ?? 'error');
    throw new CliError(`Unable to read ${file}: Failed to open file \u201c${file}\u201d: ${why}`);
  }
}

/** AES-256-CBC decryption of a secret under a master secret, PKCS#7 padding removed. */
function decryptSecret(ciphertext: Uint8Array, key: Uint8Array, ivText: string | undefined): Uint8Array {
  if (ivText === undefined) throw new CliError('IV is required to decrypt secret');
  const iv = base64Decode(ivText);
  if (key.length !== 32) throw new CliError('Key should be 32 bytes in length');
  if (iv.length !== 16) throw new CliError('IV should be 16 bytes in length not ' + iv.length);
  if (ciphertext.length % 16) throw new CliError(`Length ${ciphertext.length} must be a multiple of block size 16`);
  // node:crypto is loaded only here (it costs every command a few ms of start-up otherwise).
  const nodeCrypto = createRequire(import.meta.url)('node:crypto') as typeof import('node:crypto');
  const d = nodeCrypto.createDecipheriv('aes-256-cbc', key, iv).setAutoPadding(false);
  const plain = new Uint8Array(Buffer.concat([d.update(ciphertext), d.final()]));
  const pad = plain.length ? plain[plain.length - 1]! : 0;
  if (pad > plain.length) throw new CliError(`Incorrect number of padding bytes (${pad}) found on decrypted data`);
  return plain.slice(0, plain.length - pad);
}

function checkId(id: string | undefined): string {
  if (id === undefined) throw new CliError("Parameter 'id' is missing");
  if (!/^[A-Za-z][A-Za-z0-9._-]*$/.test(id)) {
    throw new CliError("Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.");
  }
  return id;
}

/**
 * Parse every `--object` argument in order. Secrets go into the map (later ones may be decrypted
 * with earlier ones); other object types are returned untouched for their own handlers.
 */
export function parseObjectArgs(texts: readonly string[]): { secrets: SecretMap; others: OtherObject[] } {
  const secrets: SecretMap = new Map();
  const others: OtherObject[] = [];
  const ids = new Set<string>();
  for (const text of texts) {
    const props = toProps(text);
    const type = props.get('qom-type');
    props.delete('qom-type');
    if (type === undefined) throw new CliError("Parameter 'qom-type' is missing");
    if (type !== 'secret') {
      const id = props.get('id');
      props.delete('id');
      if (id !== undefined) {
        if (ids.has(id)) throw new CliError(`attempt to add duplicate property '${id}' to object (type 'container')`);
        ids.add(id);
      }
      others.push({ type, ...(id !== undefined ? { id } : {}), props });
      continue;
    }
    const id = checkId(props.get('id'));
    props.delete('id');
    const take = (k: string) => {
      const v = props.get(k);
      props.delete(k);
      return v;
    };
    const data = take('data');
    const file = take('file');
    const format = take('format') ?? 'raw';
    const keyid = take('keyid');
    const iv = take('iv');
    const extra = [...props.keys()][0];
    if (extra !== undefined) throw new CliError(`Parameter '${extra}' is unexpected`);
    if (format !== 'raw' && format !== 'base64') throw new CliError(`Parameter 'format' does not accept value '${format}'`);
    if (data !== undefined && file !== undefined) throw new CliError("'file' and 'data' are mutually exclusive");
    if (data === undefined && file === undefined) throw new CliError("Either 'file' or 'data' must be provided");
    let raw: Uint8Array = file !== undefined ? readSecretFile(file) : new TextEncoder().encode(data!);
    if (format === 'base64') raw = base64Decode(new TextDecoder().decode(raw));
    if (keyid !== undefined) {
      const key = secrets.get(keyid);
      if (key === undefined) throw new CliError(`No secret with id '${keyid}'`);
      raw = decryptSecret(raw, key, iv);
    }
    if (ids.has(id)) throw new CliError(`attempt to add duplicate property '${id}' to object (type 'container')`);
    ids.add(id);
    secrets.set(id, raw);
  }
  return { secrets, others };
}

/** Just the secrets of a list of `--object` arguments. */
export function parseSecrets(texts: readonly string[]): SecretMap {
  return parseObjectArgs(texts).secrets;
}

/**
 * The open options for an encrypted image: the secrets, and the `encrypt.key-secret` id taken
 * from `--image-opts` (pass the option's value, undefined when absent).
 */
export function encryptionOpenOptions(secrets: SecretMap, keySecret: string | undefined): { secrets: SecretMap; keySecret?: string } {
  return keySecret === undefined ? { secrets } : { secrets, keySecret };
}
