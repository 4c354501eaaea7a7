/**
 * TLS: x509 credentials generated at test time with openssl (CA, server and client certificates
 * in QEMU's folder layout); nbdinfo (nbds://) and qemu-img (tls-creds-x509) as TLS clients;
 * clients without TLS, or with a certificate from another CA, are refused.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { create, io } from '../helpers/build.js';
import { makeTmpDir, removeTmpDir } from '../helpers/files.js';
import { describeResult, must, qemuImg, run } from '../helpers/proc.js';
import { nbdinfo, startServer, type Served, stopAll } from './harness.js';
import { RawClient, REP_ERR_TLS_REQD } from './raw-client.js';

let dir: string;
let pki: string;
let rogue: string;
let server: Served;

async function openssl(args: string[], cwd: string): Promise<void> {
  await must(run('openssl', args, { cwd }));
}

/** A CA and a certificate/key pair signed by it, written as QEMU expects them. */
async function makePki(folder: string, opts: { caName: string; server: boolean; client: boolean }): Promise<void> {
  fs.mkdirSync(folder, { recursive: true });
  fs.writeFileSync(
    path.join(folder, 'ext.cnf'),
    [
      '[req]', 'distinguished_name=dn', 'prompt=no', '[dn]', `CN=${opts.caName}`,
      '[ca]', 'basicConstraints=critical,CA:TRUE', 'keyUsage=critical,keyCertSign,cRLSign',
      '[server]', 'basicConstraints=critical,CA:FALSE', 'keyUsage=critical,digitalSignature,keyEncipherment',
      'extendedKeyUsage=serverAuth', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
      '[client]', 'basicConstraints=critical,CA:FALSE', 'keyUsage=critical,digitalSignature,keyEncipherment',
      'extendedKeyUsage=clientAuth',
    ].join('\n'),
  );
  const key = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  await openssl(['req', '-x509', ...key, '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-config', 'ext.cnf', '-extensions', 'ca'], folder);
  for (const who of ['server', 'client'] as const) {
    if (!opts[who]) continue;
    await openssl(['req', ...key, '-keyout', `${who}-key.pem`, '-out', `${who}.csr`, '-subj', `/CN=${who === 'server' ? 'localhost' : 'qcowkit client'}`], folder);
    await openssl(
      ['x509', '-req', '-in', `${who}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', `${who}-cert.pem`,
        '-days', '2', '-extfile', 'ext.cnf', '-extensions', who],
      folder,
    );
  }
}

beforeAll(async () => {
  dir = makeTmpDir('qk-nbd-tls-');
  pki = path.join(dir, 'pki');
  rogue = path.join(dir, 'rogue');
  await makePki(pki, { caName: 'qcowkit test CA', server: true, client: true });
  // A client whose certificate comes from another CA, but which trusts our server's CA.
  await makePki(rogue, { caName: 'rogue CA', server: false, client: true });
  fs.copyFileSync(path.join(pki, 'ca-cert.pem'), path.join(rogue, 'ca-cert.pem'));
  await create(dir, 'img.qcow2', 4 << 20, { cluster_size: 65536 });
  await io(dir, 'img.qcow2', ['write -q -P 0x5c 64k 1M']);
  await must(qemuImg(['convert', '-O', 'raw', 'img.qcow2', 'img.raw'], { cwd: dir }));
  server = await startServer(
    ['-t', '-e', '0', '-x', 'exp', '--object', `tls-creds-x509,id=tls0,dir=${pki},endpoint=server`, '--tls-creds', 'tls0', 'img.qcow2'],
    { dir },
  );
}, 60_000);

afterAll(async () => {
  await stopAll();
  removeTmpDir(dir);
});

const tlsUri = (certs: string) => `nbds://127.0.0.1:${server.port}/exp?tls-certificates=${certs}`;

describe('nbd over TLS', () => {
  it('nbdinfo with nbds:// and the client certificate', async () => {
    const r = await nbdinfo(['--json', tlsUri(pki)]);
    expect(r.code, describeResult(r)).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j.TLS).toBe(true);
    expect(j.exports[0]['export-size']).toBe(4 << 20);
    const m = await nbdinfo(['--map', tlsUri(pki)]);
    expect(m.stdout).toMatch(/65536\s+1048576\s+0\s+data/);
  });

  it('qemu-img info and compare with tls-creds-x509', async () => {
    const obj = `tls-creds-x509,id=tls0,dir=${pki},endpoint=client`;
    const spec = `driver=nbd,host=127.0.0.1,port=${server.port},export=exp,tls-creds=tls0`;
    const i = await qemuImg(['info', '--object', obj, '--image-opts', spec]);
    expect(i.stdout, describeResult(i)).toContain('virtual size: 4 MiB');
    const c = await qemuImg(['compare', '--object', obj, '--image-opts', spec, `driver=raw,file.filename=${path.join(dir, 'img.raw')}`]);
    expect(c.stdout, describeResult(c)).toContain('Images are identical');
  });

  it('clients without TLS are refused', async () => {
    const r = await nbdinfo([`nbd://127.0.0.1:${server.port}/exp`]);
    expect(r.code).not.toBe(0);
    const q = await qemuImg(['info', `nbd://127.0.0.1:${server.port}/exp`]);
    expect(q.code).not.toBe(0);
    expect(q.stderr).toMatch(/TLS/);
    // At the protocol level: options other than STARTTLS get TLS_REQD, EXPORT_NAME is dropped.
    const c = await RawClient.connect(server.port!);
    await c.greet();
    c.sendOption(3);
    expect((await c.readOptionReply()).type).toBe(REP_ERR_TLS_REQD);
    c.sendOption(1, Buffer.from('exp'));
    expect(await c.waitClosed()).toBe(true);
  });

  it('a client certificate from another CA is refused; the server keeps serving', async () => {
    const r = await nbdinfo(['--size', tlsUri(rogue)]);
    expect(r.code).not.toBe(0);
    const ok = await nbdinfo(['--size', tlsUri(pki)]);
    expect(ok.stdout.trim(), describeResult(ok)).toBe(String(4 << 20));
  });

  it('TLS over a Unix socket is refused at start, like qemu-nbd', async () => {
    const r = await run(process.execPath, [
      (await import('../helpers/proc.js')).CLI, 'nbd', '-k', path.join(dir, 's.sock'),
      '--object', `tls-creds-x509,id=tls0,dir=${pki},endpoint=server`, '--tls-creds', 'tls0', path.join(dir, 'img.qcow2'),
    ]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('TLS is only supported with IPv4/IPv6');
  });

  it('shuts down cleanly', async () => {
    expect(await server.stop()).toEqual({ code: 0, signal: null });
  });
});
