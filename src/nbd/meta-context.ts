/**
 * Metadata contexts: which ones an export offers and how LIST/SET_META_CONTEXT queries select them
 * (qemu-nbd's namespace rules: `base:allocation`, `qemu:allocation-depth`, `qemu:dirty-bitmap:NAME`;
 * a bare namespace such as `base:` or `qemu:` lists everything in it but selects nothing).
 */
import * as C from './constants.js';

/** A context the server can answer BLOCK_STATUS for. */
export type ContextKind = 'base:allocation' | 'qemu:allocation-depth';

export interface MetaContext {
  id: number;
  name: string;
  kind: ContextKind;
}

/** What an export offers. Dirty bitmaps cannot be read yet, so none are ever offered. */
export interface ContextSource {
  allocationDepth: boolean;
}

const BASE_ALLOCATION: MetaContext = { id: 0, name: C.CONTEXT_BASE_ALLOCATION, kind: 'base:allocation' };
const ALLOCATION_DEPTH: MetaContext = { id: 1, name: C.CONTEXT_ALLOCATION_DEPTH, kind: 'qemu:allocation-depth' };

export function availableContexts(src: ContextSource): MetaContext[] {
  return src.allocationDepth ? [BASE_ALLOCATION, ALLOCATION_DEPTH] : [BASE_ALLOCATION];
}

/**
 * Contexts matched by `queries` (deduplicated, in the server's order). For LIST with no query
 * every context matches; bare namespaces match only when listing.
 */
export function matchContexts(src: ContextSource, queries: string[], listing: boolean): MetaContext[] {
  const all = availableContexts(src);
  if (listing && queries.length === 0) return all;
  const picked = new Set<MetaContext>();
  for (const q of queries) {
    for (const ctx of all) {
      if (q === ctx.name) picked.add(ctx);
      else if (listing && (q === 'base:' || q === 'qemu:') && ctx.name.startsWith(q)) picked.add(ctx);
    }
    // qemu:dirty-bitmap:NAME and qemu:dirty-bitmap: match no bitmap: none can be read.
  }
  return all.filter((c) => picked.has(c));
}
