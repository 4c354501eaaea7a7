/**
 * qcowkit for browsers (and other runtimes without Node): the core API with byte I/O over HTTP(S)
 * range requests, Blobs/Files and memory, and pure-JS decompression (zlib, zstd), registered on
 * import. Nothing here imports `node:*`, directly or indirectly: `npm run build` bundles this
 * module for the browser into dist/qcowkit.browser.js and fails if anything does.
 *
 *   import { openImage, httpProvider, BlobProvider } from 'qcowkit/browser';
 *   const img = await openImage('https://example.org/disk.qcow2', { io: httpProvider });
 *   const fromFiles = await openImage(top.name, { io: new BlobProvider([top, base]) });
 *
 * Not here: compression (`convert -c`), encryption (no AES primitive is registered; a caller can
 * register one with `setCryptoBackend`), files, the NBD server and the CLI.
 */
import { registerBrowserCodecs } from './codecs/browser.js';

registerBrowserCodecs();

// contracts
export type { BlockDriver, DriverInfo, Extent, ExtentKind, OpenOptions, SnapshotInfo } from './core/block-driver.js';
export type { ByteIO, IOProvider } from './core/byte-io.js';
export { readFully } from './core/byte-io.js';
export { QcowError, type ErrorCode } from './core/errors.js';
export { parseSize } from './core/util.js';

// opening images, byte I/O
export { openImage, probeFormat, FORMATS, type OpenImageOptions } from './block/open.js';
export { MemoryIO, MemoryProvider } from './io/memory.js';
export { HttpIO, httpProvider, createHttpProvider, resolveUrl, isHttpUrl, type HttpIOOptions, type HttpStats } from './io/http.js';
export { BlobIO, BlobProvider } from './io/blob.js';

// format drivers
export { Qcow2Driver } from './formats/qcow2/driver.js';
export { QcowDriver } from './formats/qcow/driver.js';
export { RawDriver } from './formats/raw/driver.js';

// operations
export { convertImages, convertedSize, driverTarget, type ConvertOptions, type ConvertTarget } from './ops/convert.js';
export { mapImage, type MapEntry, type MapOptions } from './ops/map.js';
export { compareImages, type CompareOptions, type CompareResult } from './ops/compare.js';
export { collectImageInfo, type ImageInfo } from './ops/info.js';

// codecs and crypto (for other adapters)
export { setCodecs, type Codecs } from './codecs/registry.js';
export { browserCodecs, registerBrowserCodecs } from './codecs/browser.js';
export { setCryptoBackend, type CryptoBackend } from './codecs/crypto-registry.js';
