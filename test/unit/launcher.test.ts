/**
 * bin/qcowkit is both a shell script and a CommonJS file: executed, /bin/sh starts Node on it with
 * NODE_EXTRA_CA_CERTS removed (Node would parse that certificate file before our code runs);
 * run as `node bin/qcowkit`, the shell lines are inert JavaScript.
 */
import { describe, expect, it } from 'vitest';
import { CLI, run } from '../helpers/proc.js';

const env = { ...process.env, LC_ALL: 'C', NODE_EXTRA_CA_CERTS: '/nonexistent/qcowkit-test-ca.pem' };

describe('bin/qcowkit launcher', () => {
  it('executed directly: runs, and Node never loads NODE_EXTRA_CA_CERTS', async () => {
    const r = await run(CLI, ['--version'], { env });
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^qcowkit version /);
    // Node warns about an unreadable NODE_EXTRA_CA_CERTS file when it loads it at start-up.
    expect(r.stderr).toBe('');
  });

  it('run by node: the same CLI (and Node does load the variable, so the test above can fail)', async () => {
    const r = await run(process.execPath, [CLI, '--version'], { env });
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^qcowkit version /);
    expect(r.stderr).toMatch(/extra certs/i);
  });

  it('keeps NODE_EXTRA_CA_CERTS when an argument is an https:// image (a private CA may sign it)', async () => {
    const r = await run(CLI, ['info', 'https://127.0.0.1:9/none.qcow2'], { env });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/extra certs/i);
  });

  it('passes arguments with spaces and quotes through the shell unchanged', async () => {
    const r = await run(CLI, ['info', "/nonexistent dir/it's.qcow2"], { env });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("/nonexistent dir/it's.qcow2");
  });
});
