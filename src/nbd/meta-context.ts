/**
 * Metadata contexts: which ones an export offers and how LIST/SET_META_CONTEXT queries select them
 * (qemu-nbd's namespace rules: `base:allocation`, `qemu:allocation-depth`, `qemu:dirty-bitmap:NAME`;
 * a bare namespace such as `base:`, `qemu:` or `qemu:dirty-bitmap:` lists everything in it but
 * selects nothing).
 */
import * as C from './constants.js';

/** A context the server can answer BLOCK_STATUS for. */
export type ContextKind = 'base:allocation' | 'qemu:allocation-depth' | 'qemu:dirty-bitmap';

export interface MetaContext {
  id: number;
  name: string;
  kind: ContextKind;
  /** For `qemu:dirty-bitmap`: index into the export's bitmaps. */
  bitmap?: number;
}

/** What an export offers. */
export interface ContextSource {
  allocationDepth: boolean;
  /** Names of the exported dirty bitmaps, in the export's order (qemu-nbd: last -B first). */
  bitmaps?: readonly string[];
}

const BASE_ALLOCATION: MetaContext = { id: 0, name: C.CONTEXT_BASE_ALLOCATION, kind: 'base:allocation' };
const ALLOCATION_DEPTH: MetaContext = { id: 1, name: C.CONTEXT_ALLOCATION_DEPTH, kind: 'qemu:allocation-depth' };
/** qemu-nbd numbers bitmap contexts from 2 (NBD_META_ID_DIRTY_BITMAP). */
const FIRST_BITMAP_ID = 2;

export function availableContexts(src: ContextSource): MetaContext[] {
  const out = src.allocationDepth ? [BASE_ALLOCATION, ALLOCATION_DEPTH] : [BASE_ALLOCATION];
  (src.bitmaps ?? []).forEach((name, i) => {
    out.push({ id: FIRST_BITMAP_ID + i, name: C.CONTEXT_DIRTY_BITMAP_PREFIX + name, kind: 'qemu:dirty-bitmap', bitmap: i });
  });
  return out;
}

/**
 * Contexts matched by `queries` (deduplicated, in the server's order). For LIST with no query
 * every context matches; bare namespaces match only when listing. A bitmap name exported twice
 * is selected once, by its first entry (as qemu-nbd).
 */
export function matchContexts(src: ContextSource, queries: string[], listing: boolean): MetaContext[] {
  const all = availableContexts(src);
  if (listing && queries.length === 0) return all;
  const picked = new Set<MetaContext>();
  const bare = ['base:', 'qemu:', C.CONTEXT_DIRTY_BITMAP_PREFIX];
  for (const q of queries) {
    if (bare.includes(q)) {
      if (listing) for (const ctx of all) if (ctx.name.startsWith(q)) picked.add(ctx);
      continue;
    }
    const ctx = all.find((c) => c.name === q);
    if (ctx) picked.add(ctx);
  }
  return all.filter((c) => picked.has(c));
}
