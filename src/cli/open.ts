/** Opening images named on the command line, with qemu-img's error wording. */
import * as fsCalls from '../io/fs-calls.js';
import type { BlockDriver } from '../core/block-driver.js';
import type { IOProvider } from '../core/byte-io.js';
import { openImage } from '../block/open.js';
import { fileProvider } from '../io/file.js';
import { withHttp } from '../io/http.js';
import { parseObjects } from '../nbd/objects.js';
import { CliError, messageOf } from './errors.js';
import { imageSpecFromOpts, type ImageSpec } from './image-opts.js';

export interface CliOpenOptions {
  /** Open encrypted images without unlocking them (info). */
  noUnlock?: boolean;
  /** `-f`: format of the image (probed when absent). */
  format?: string;
  /** `--image-opts`: the argument is an option string. */
  imageOpts?: boolean;
  /** Do not open the backing chain (qemu-img info). */
  noBacking?: boolean;
  /** Read an internal snapshot instead of the active image. */
  snapshot?: { id?: string; name?: string };
  /** Open for writing (default read-only). */
  writable?: boolean;
  /** Secrets from `--object secret,...` (see `secretsFromObjects`). */
  secrets?: Map<string, Uint8Array>;
  /** The image's data will be read: an encrypted image needs its key (qemu-img's open check). */
  needKey?: boolean;
  /** Files are opened through this provider (default: cliProvider). */
  provider?: IOProvider;
}

/** Local files, and http(s) URLs read-only (as qemu-img's curl driver): the CLI's source images. */
export const cliProvider: IOProvider = withHttp(fileProvider);

/** `--object` arguments → the secrets they define, by id. Other object types are accepted and unused. */
export function secretsFromObjects(texts: string[]): Map<string, Uint8Array> | undefined {
  if (texts.length === 0) return undefined;
  let objects;
  try {
    objects = parseObjects(texts);
  } catch (e) {
    throw new CliError(messageOf(e));
  }
  const secrets = new Map<string, Uint8Array>();
  for (const [id, o] of objects) if (o.type === 'secret') secrets.set(id, new Uint8Array(o.value));
  return secrets;
}

const KEY_REQUIRED = "Parameter 'encrypt.key-secret' is required for cipher";

/** The file and format an image argument names. */
export function resolveImageArg(arg: string, o: Pick<CliOpenOptions, 'format' | 'imageOpts'>): ImageSpec {
  if (o.imageOpts) return imageSpecFromOpts(arg);
  const spec: ImageSpec = { filename: arg, unknown: [] };
  if (o.format !== undefined) spec.format = o.format;
  return spec;
}

/** Open an image argument; failures become `Could not open 'ARG': reason` (exit 1). */
export async function openForCli(arg: string, o: CliOpenOptions = {}): Promise<BlockDriver> {
  const spec = resolveImageArg(arg, o);
  try {
    const st = await fsCalls.stat(spec.filename);
    if (st.isDirectory()) {
      throw new CliError(`Could not open '${arg}': 'file' driver requires '${spec.filename}' to be a regular file`);
    }
  } catch (e) {
    if (e instanceof CliError) throw e;
    // missing files etc.: let the open below report it in the usual words
  }
  let drv: BlockDriver;
  try {
    drv = await openImage(spec.filename, {
      io: o.provider ?? cliProvider,
      readOnly: !o.writable,
      ...(spec.format !== undefined ? { format: spec.format } : {}),
      ...(o.noBacking ? { noBacking: true } : {}),
      ...(o.snapshot ? { snapshot: o.snapshot } : {}),
      ...(spec.dataFile !== undefined ? { dataFile: spec.dataFile } : {}),
      ...(o.secrets ? { secrets: o.secrets } : {}),
      // `info` never unlocks (qemu-img shows an encrypted image whatever the password).
      ...(spec.keySecret !== undefined && !o.noUnlock ? { keySecret: spec.keySecret } : {}),
    });
  } catch (e) {
    const msg = messageOf(e);
    if (process.env.QCOWKIT_DEBUG === '1' && e instanceof Error && e.stack) process.stderr.write(`${e.stack}\n`);
    if (msg.startsWith('Failed to load snapshot')) throw new CliError(msg);
    throw new CliError(`Could not open '${arg}': ${msg}`);
  }
  if (o.needKey && spec.keySecret === undefined && drv.info().encrypted) {
    await drv.close().catch(() => {});
    throw new CliError(`Could not open '${arg}': ${KEY_REQUIRED}`);
  }
  if (spec.unknown.length) {
    await drv.close().catch(() => {});
    throw new CliError(`Could not open '${arg}': Block format '${drv.format}' does not support the option '${spec.unknown[0]}'`);
  }
  if (o.snapshot && drv.format !== 'qcow2') {
    await drv.close().catch(() => {});
    throw new CliError(
      `Failed to load snapshot: Block format '${drv.format}' used by device '' does not support temporarily loading internal snapshots`,
    );
  }
  return drv;
}

/** Close drivers, ignoring errors (used on the way out of a failed command). */
export async function closeAll(drivers: Array<BlockDriver | undefined>): Promise<void> {
  for (const d of drivers) if (d) await d.close().catch(() => {});
}
