/**
 * `qcowkit snapshot [--object OBJ] [--image-opts] [-U] [-q] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILE`:
 * qemu-img 7.2's internal snapshot command — list, create, apply (revert to) and delete, with its
 * messages and exit codes. As in qemu-img: there is no -f (the format is always probed); -a finds
 * the snapshot by ID, then by name, -d by name only; -U is only for -l.
 */
import type { BlockDriver } from '../core/block-driver.js';
import { QcowError } from '../core/errors.js';
import { Qcow2Driver } from '../formats/qcow2/driver.js';
import { SnapshotOps } from '../formats/qcow2/snapshot.js';
import { snapshotToJson } from '../ops/info.js';
import { CliError, HelpRequested, UsageError, messageOf } from './errors.js';
import { getopt } from './getopt.js';
import { snapshotHeader, snapshotLine } from './info-format.js';
import { closeAll, openForCli, secretsFromObjects } from './open.js';
import type { Io } from './output.js';
import { errnoOf, openWritable, rawProbeWarning } from './toolbox-common.js';

type Action = 'list' | 'apply' | 'create' | 'delete';

/** The snapshot list as qemu-img prints it (nothing at all when there are no snapshots). */
export function snapshotListText(drv: BlockDriver): string {
  const list = drv.info().snapshots ?? [];
  if (!list.length) return '';
  return 'Snapshot list:\n' + snapshotHeader() + list.map((s) => snapshotLine(snapshotToJson(s))).join('');
}

/** Wall-clock time with microsecond precision, as QEMU stamps snapshots (g_get_real_time). */
function nowForSnapshot(): { dateSec: number; dateNsec: number } {
  const us = BigInt(Math.round((performance.timeOrigin + performance.now()) * 1000));
  return { dateSec: Number(us / 1000000n), dateNsec: Number(us % 1000000n) * 1000 };
}

export async function cmdSnapshot(argv: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(argv, {
    short: ':la:c:d:hqU',
    long: { help: false, object: true, 'image-opts': false, 'force-share': false },
  });
  let action: Action | undefined;
  let name = '';
  let imageOpts = false;
  let forceShare = false;
  const objects: string[] = [];
  const set = (a: Action, v = '') => {
    if (action !== undefined) throw new UsageError("Cannot mix '-l', '-a', '-c', '-d'");
    action = a;
    name = v;
  };
  for (const o of options) {
    switch (o.name) {
      case 'h':
      case 'help':
        throw new HelpRequested();
      case 'l':
        set('list');
        break;
      case 'a':
        set('apply', o.value!);
        break;
      case 'c':
        set('create', o.value!);
        break;
      case 'd':
        set('delete', o.value!);
        break;
      case 'image-opts':
        imageOpts = true;
        break;
      case 'U':
      case 'force-share':
        forceShare = true;
        break;
      case 'object':
        objects.push(o.value!);
        break;
      default:
        break; // -q (nothing to print anyway)
    }
  }
  const secrets = secretsFromObjects(objects);
  if (operands.length !== 1) throw new UsageError('Expecting one image file name');
  const file = operands[0]!;

  if (action === 'list') {
    // Like every qemu-img open but info's, listing needs an encrypted image's key.
    const drv = await openForCli(file, { imageOpts, needKey: true, ...(secrets ? { secrets } : {}) });
    try {
      io.out.write(snapshotListText(drv));
    } finally {
      await drv.close();
    }
    return 0;
  }

  if (forceShare) throw new CliError(`Could not open '${file}': force-share=on can only be used with read-only images`);
  const drv = await openWritable(file, { imageOpts, ...(secrets ? { secrets } : {}) }, io);
  try {
    const ops = drv instanceof Qcow2Driver && drv.writer ? new SnapshotOps(drv, drv.writer) : undefined;
    switch (action) {
      case 'create':
        if (!ops) throw new CliError(`Could not create snapshot '${name}': -95 (Operation not supported)`);
        if (drv instanceof Qcow2Driver && drv.g.dataFile) {
          throw new CliError(`Could not create snapshot '${name}': -95 (Operation not supported)`);
        }
        try {
          await ops.create({ name, ...nowForSnapshot() });
        } catch (e) {
          // Refcounts too narrow for one more reference (refcount_bits=1 with data): qemu-img
          // fails with EINVAL (leaking a cluster); the library refuses before writing anything.
          if (e instanceof QcowError && e.code === 'ERANGE') throw new CliError(`Could not create snapshot '${name}': -22 (Invalid argument)`);
          const [n, text] = errnoOf(e);
          throw new CliError(`Could not create snapshot '${name}': -${n} (${text})`);
        }
        break;
      case 'apply':
        if (!ops) {
          // qemu-img falls back to the protocol layer, reopening the file: a probed raw image warns twice.
          if (drv.format === 'raw' && !imageOpts) io.err.write(rawProbeWarning(file));
          throw new CliError(`Could not apply snapshot '${name}': Block driver does not support snapshots`);
        }
        try {
          await ops.apply(name);
        } catch (e) {
          const msg = messageOf(e);
          throw new CliError(msg.startsWith('Could not apply snapshot') ? msg : `Could not apply snapshot '${name}': ${msg}`);
        }
        break;
      case 'delete': {
        // qemu-img finds the snapshot to delete by name only (bdrv_snapshot_find), then deletes it by ID.
        const sn = drv instanceof Qcow2Driver ? drv.snapshots.find((s) => s.name === name) : undefined;
        if (!ops || !sn) throw new CliError(`Could not delete snapshot '${name}': snapshot not found`);
        try {
          await ops.delete(sn.id);
        } catch (e) {
          const msg = messageOf(e);
          throw new CliError(msg.startsWith('Could not delete snapshot') ? msg : `Could not delete snapshot '${name}': ${msg}`);
        }
        break;
      }
      default:
        break; // no action: qemu-img opens the image and does nothing
    }
    await drv.close();
  } catch (e) {
    await closeAll([drv]);
    if (e instanceof CliError || e instanceof QcowError) throw e;
    throw new CliError(messageOf(e));
  }
  return 0;
}
