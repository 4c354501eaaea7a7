/**
 * The native addons (native/, built by `npm run build` into native/build/Release/<name>.node),
 * loaded with process.dlopen rather than require(): the first require() of a .node file sets up
 * ~2 ms of module-loader machinery, where dlopen itself takes ~0.3 ms (start-up counts: `convert`
 * loads two addons before its first read). Each caller keeps what it loaded.
 */
import { fileURLToPath } from 'node:url';

/** The exports of addon `name`, or undefined when it is not built (or not loadable here). */
export function loadNativeAddon<T extends object>(name: string): Partial<T> | undefined {
  try {
    // This module is dist/io/native-addon.js; the addons are at <package>/native/build/Release/.
    const file = fileURLToPath(new URL(`../../native/build/Release/${name}.node`, import.meta.url));
    const module = { exports: {} as Partial<T> };
    process.dlopen(module, file);
    return module.exports;
  } catch {
    return undefined;
  }
}
