/**
 * TLS for the server: x509 credentials from a folder laid out like QEMU's tls-creds-x509
 * (ca-cert.pem, server-cert.pem, server-key.pem, optional ca-crl.pem and dh-params.pem), and the
 * in-place upgrade of a connection after NBD_OPT_STARTTLS.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as tls from 'node:tls';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { QcowError } from '../core/errors.js';

export interface TlsConfig {
  context: tls.SecureContext;
  /** Require and verify a client certificate signed by the CA (QEMU's verify-peer, default yes). */
  verifyPeer: boolean;
}

export interface X509CredsOptions {
  dir: string;
  endpoint: 'server' | 'client';
  verifyPeer: boolean;
}

function readCred(dir: string, file: string, required: boolean): Buffer | undefined {
  const p = path.join(dir, file);
  try {
    return fs.readFileSync(p);
  } catch (e) {
    if (!required && (e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    const why = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'No such file or directory' : (e as Error).message;
    throw new QcowError('EINVAL', `Unable to access credentials ${p}: ${why}`);
  }
}

/** Load server credentials; errors name the missing or bad file. */
export function loadX509Server(opts: X509CredsOptions): TlsConfig {
  if (opts.endpoint !== 'server') {
    throw new QcowError('EINVAL', "Expecting TLS credentials with a server endpoint");
  }
  const ca = readCred(opts.dir, 'ca-cert.pem', opts.verifyPeer);
  const cert = readCred(opts.dir, 'server-cert.pem', true)!;
  const key = readCred(opts.dir, 'server-key.pem', true)!;
  const crl = readCred(opts.dir, 'ca-crl.pem', false);
  const dhparam = readCred(opts.dir, 'dh-params.pem', false);
  try {
    const context = tls.createSecureContext({ ca, cert, key, crl, dhparam, minVersion: 'TLSv1.2' });
    return { context, verifyPeer: opts.verifyPeer };
  } catch (e) {
    throw new QcowError('EINVAL', `Cannot load TLS credentials from ${opts.dir}: ${(e as Error).message}`);
  }
}

/**
 * Upgrade a plain socket to TLS as the server. Resolves with the TLS stream once the handshake
 * succeeded (and the client certificate verified when required); rejects otherwise.
 */
export function upgradeToTls(socket: Socket | Duplex, cfg: TlsConfig, timeoutMs: number): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const t = new tls.TLSSocket(socket as Socket, {
      isServer: true,
      secureContext: cfg.context,
      requestCert: cfg.verifyPeer,
      rejectUnauthorized: cfg.verifyPeer,
    });
    let settled = false;
    const timer = setTimeout(() => finish(new Error('TLS handshake timed out')), timeoutMs);
    const finish = (err?: Error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      t.off('secure', onSecure);
      t.off('error', onError);
      t.off('close', onClose);
      if (err) {
        t.on('error', () => {});
        t.destroy();
        reject(err);
      } else resolve(t);
    };
    const onSecure = () => {
      if (!cfg.verifyPeer) return finish();
      const why = peerVerifyError(t);
      if (why) finish(new Error(`TLS client certificate rejected: ${why}`));
      else finish();
    };
    const onError = (e: Error) => finish(e);
    const onClose = () => finish(new Error('connection closed during the TLS handshake'));
    t.on('secure', onSecure);
    t.on('error', onError);
    t.on('close', onClose);
  });
}

/**
 * Why the client's certificate did not verify against the CA, or undefined when it did. A TLS
 * socket made by hand (rather than by tls.Server) does not compute `authorized`, so ask OpenSSL's
 * verification result directly; fail closed when that is not available.
 */
function peerVerifyError(t: tls.TLSSocket): string | undefined {
  const cert = t.getPeerCertificate();
  if (!cert || Object.keys(cert).length === 0) return 'no certificate was sent';
  const handle = (t as unknown as { _handle?: { verifyError?: () => Error | null } })._handle;
  if (!handle || typeof handle.verifyError !== 'function') return 'cannot verify the certificate';
  const err = handle.verifyError();
  return err ? String((err as NodeJS.ErrnoException).code ?? err.message) : undefined;
}
