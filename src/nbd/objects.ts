/**
 * `--object` definitions as qemu-nbd takes them (QemuOpts `type,id=ID,key=value,...` or JSON
 * `{"qom-type": ..., "id": ...}`): `secret` (data=, file=, format=raw|base64) and
 * `tls-creds-x509` (dir=, endpoint=, verify-peer=). Secrets are parsed and kept for the image
 * layer (encryption is not implemented yet); TLS credentials are loaded for the server.
 */
import * as fs from 'node:fs';
import { QcowError } from '../core/errors.js';

export interface SecretObject {
  type: 'secret';
  id: string;
  value: Buffer;
}

export interface TlsX509Object {
  type: 'tls-creds-x509';
  id: string;
  dir: string;
  endpoint: 'server' | 'client';
  verifyPeer: boolean;
}

export type UserObject = SecretObject | TlsX509Object;

/** Split `a=b,c=d` with QemuOpts escaping (`,,` is a literal comma). */
export function splitQemuOpts(text: string): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  let cur = '';
  const items: string[] = [];
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
  items.forEach((item, idx) => {
    if (item === '' && idx === items.length - 1 && idx > 0) return;
    const eq = item.indexOf('=');
    if (eq >= 0) out.push([item.slice(0, eq), item.slice(eq + 1)]);
    else if (idx === 0) out.push(['qom-type', item]);
    else out.push([item, 'on']);
  });
  return out;
}

function parseBool(name: string, v: string): boolean {
  if (['on', 'yes', 'true', 'y'].includes(v)) return true;
  if (['off', 'no', 'false', 'n'].includes(v)) return false;
  throw new QcowError('EINVAL', `Parameter '${name}' expects 'on' or 'off'`);
}

function toProps(text: string): Map<string, string> {
  const props = new Map<string, string>();
  if (text.trimStart().startsWith('{')) {
    let obj: unknown;
    try {
      obj = JSON.parse(text);
    } catch (e) {
      throw new QcowError('EINVAL', `Invalid JSON object definition: ${(e as Error).message}`);
    }
    if (!obj || typeof obj !== 'object' || Array.isArray(obj)) throw new QcowError('EINVAL', 'Invalid object definition');
    for (const [k, v] of Object.entries(obj as Record<string, unknown>)) {
      props.set(k, typeof v === 'boolean' ? (v ? 'on' : 'off') : String(v));
    }
    return props;
  }
  for (const [k, v] of splitQemuOpts(text)) props.set(k, v);
  return props;
}

/** Parse one `--object` argument. */
export function parseObject(text: string): UserObject {
  const props = toProps(text);
  const type = props.get('qom-type');
  const id = props.get('id');
  if (!type) throw new QcowError('EINVAL', "Parameter 'qom-type' is missing");
  if (!id) throw new QcowError('EINVAL', "Parameter 'id' is missing");
  if (!/^[A-Za-z][A-Za-z0-9._-]*$/.test(id)) throw new QcowError('EINVAL', `Parameter 'id' expects an identifier`);
  props.delete('qom-type');
  props.delete('id');
  const take = (k: string) => {
    const v = props.get(k);
    props.delete(k);
    return v;
  };
  let obj: UserObject;
  switch (type) {
    case 'secret': {
      const data = take('data');
      const file = take('file');
      const format = take('format') ?? 'raw';
      take('keyid');
      take('iv');
      if ((data === undefined) === (file === undefined)) {
        throw new QcowError('EINVAL', "'data' and 'file' are mutually exclusive; exactly one must be given");
      }
      let raw: Buffer;
      if (file !== undefined) {
        try {
          raw = fs.readFileSync(file);
        } catch (e) {
          throw new QcowError('EINVAL', `Unable to read ${file}: ${(e as Error).message}`);
        }
      } else raw = Buffer.from(data!);
      if (format === 'base64') raw = Buffer.from(raw.toString(), 'base64');
      else if (format !== 'raw') throw new QcowError('EINVAL', `Invalid parameter 'format': ${format}`);
      obj = { type, id, value: raw };
      break;
    }
    case 'tls-creds-x509': {
      const dir = take('dir');
      const endpoint = take('endpoint') ?? 'client';
      const verify = take('verify-peer');
      take('priority');
      take('sanity-check');
      take('loaded');
      take('passwordid');
      if (!dir) throw new QcowError('EINVAL', 'tls-creds-x509 needs dir=');
      if (endpoint !== 'server' && endpoint !== 'client') throw new QcowError('EINVAL', `Invalid parameter 'endpoint': ${endpoint}`);
      obj = { type, id, dir, endpoint, verifyPeer: verify === undefined ? true : parseBool('verify-peer', verify) };
      break;
    }
    case 'tls-creds-psk':
    case 'tls-creds-anon':
      throw new QcowError('ENOTSUP', `Object type '${type}' is not supported by qcowkit; use tls-creds-x509`);
    case 'authz-simple':
    case 'authz-list':
    case 'authz-listfile':
    case 'authz-pam':
      throw new QcowError('ENOTSUP', `Object type '${type}' is not supported by qcowkit`);
    default:
      throw new QcowError('EINVAL', `Invalid object type '${type}'`);
  }
  const extra = [...props.keys()][0];
  if (extra !== undefined) throw new QcowError('EINVAL', `Property '${type}.${extra}' not found`);
  return obj;
}

/** All `--object` arguments by id (duplicate ids are refused, as QEMU does). */
export function parseObjects(texts: string[]): Map<string, UserObject> {
  const out = new Map<string, UserObject>();
  for (const t of texts) {
    const o = parseObject(t);
    if (out.has(o.id)) throw new QcowError('EINVAL', `attempt to add duplicate property '${o.id}' to object (type 'container')`);
    out.set(o.id, o);
  }
  return out;
}
