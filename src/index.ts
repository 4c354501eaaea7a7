/**
 * qcowkit as a library (Node): open, create, read, write, convert, map, compare and check qcow,
 * qcow2 and raw images. Importing this module registers Node's codecs (node:zlib, zstd-napi) and
 * crypto (node:crypto), so compressed and encrypted images work at once.
 *
 *   import { openImage, fileProvider } from 'qcowkit';
 *   const img = await openImage('disk.qcow2', { io: fileProvider, readOnly: true });
 *   const head = await img.read(0, 512);
 *   await img.close();
 *
 * The core (`core`, `block`, `formats`, `ops`) uses no Node module: a browser build supplies its
 * own `IOProvider` (see `MemoryIO`) and codecs (`setCodecs`).
 */
import { registerNodeCodecs } from './codecs/node.js';
import { registerNodeCrypto } from './codecs/crypto-node.js';
import { nativeZeroRuns } from './io/sparse.js';
import { setZeroRunScan } from './ops/bytes.js';

registerNodeCodecs();
registerNodeCrypto();
setZeroRunScan(nativeZeroRuns);

// contracts
export type { BlockDriver, DriverInfo, Extent, ExtentKind, OpenOptions, SnapshotInfo } from './core/block-driver.js';
export type { ByteIO, IOProvider } from './core/byte-io.js';
export { QcowError, type ErrorCode } from './core/errors.js';
export { parseSize } from './core/util.js';

// opening images, byte I/O
export { openImage, probeFormat, FORMATS, type OpenImageOptions } from './block/open.js';
export { FileIO, fileProvider } from './io/file.js';
export { MemoryIO, MemoryProvider } from './io/memory.js';

// format drivers
export { Qcow2Driver } from './formats/qcow2/driver.js';
export { QcowDriver } from './formats/qcow/driver.js';
export { RawDriver } from './formats/raw/driver.js';

// operations
export { createImage, type CreateImageRequest, type CreateImageResult } from './ops/create.js';
export { convertImages, convertedSize, driverTarget, ConvertFailure, type ConvertOptions, type ConvertTarget } from './ops/convert.js';
export { mapImage, type MapEntry, type MapOptions } from './ops/map.js';
export { compareImages, type CompareOptions, type CompareResult } from './ops/compare.js';
export { checkQcow2Image, checkExitCode, humanImageCheck, toImageCheck, type ImageCheck } from './ops/check.js';
export { collectImageInfo, type ImageInfo } from './ops/info.js';
export { measure, type MeasureResult } from './ops/measure.js';
export { commit, type CommitOptions } from './ops/commit.js';
export { rebase, type RebaseOptions } from './ops/rebase.js';

// codecs (for other runtimes)
export { setCodecs, type Codecs } from './codecs/registry.js';
