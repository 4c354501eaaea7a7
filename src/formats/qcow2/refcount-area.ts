/**
 * Where new refcount structures go when the refcount table must grow (QEMU's "refcount area"):
 * past everything the existing blocks describe, a run of new self-describing refcount blocks and
 * right after them the new, larger table. The same rule serves image creation (create.ts replays
 * qemu-img's allocator) and a growing image (refcount.ts), so both lay the file out as QEMU does.
 * Pure computation on cluster indices.
 */

/**
 * Refcount blocks needed to describe `clusters` clusters plus the refcount metadata itself (the
 * fixed point where no more blocks or table clusters are needed). `generous`: leave room for the
 * table to grow by half once more, as QEMU does when it grows a table.
 */
export function refcountMetadataBlocks(clusters: number, perBlock: number, perTableCluster: number, generous: boolean): number {
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last: number;
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / perBlock);
    table = Math.ceil(blocks / perTableCluster);
    n = clusters + blocks + table;
    if (n === last && generous) {
      clusters += Math.ceil(table / 2);
      n = 0;
      generous = false;
    }
  } while (n !== last);
  return blocks;
}

export interface RefcountArea {
  /** The new table: the refcount block cluster of each index (0: none). */
  table: number[];
  tableCluster: number;
  tableClusters: number;
  /** Blocks made for the area: [table index, cluster], in file order. */
  created: Array<[number, number]>;
  /** The new structures occupy clusters [start, endCluster): each gets refcount 1. */
  endCluster: number;
  /** Table indices [areaIndex, total) are the blocks that describe them. */
  areaIndex: number;
  total: number;
}

/**
 * New refcount structures at cluster `start`, able to describe everything up to there plus
 * `additional` clusters: the missing blocks from `start` on, then the table (sized exactly, or half
 * as large again). `old` is the current table; `newBlock` (when non-zero) is a block just made for
 * index `newIndex` that the new table takes over.
 */
export function planRefcountArea(
  old: readonly number[],
  perBlock: number,
  perTableCluster: number,
  start: number,
  additional: number,
  exact: boolean,
  newIndex: number,
  newBlock: number,
): RefcountArea {
  const total = refcountMetadataBlocks(start + additional, perBlock, perTableCluster, !exact);
  const areaIndex = Math.floor(start / perBlock);
  let tableSize = exact ? total : total + Math.ceil(total / 2);
  tableSize = Math.ceil(tableSize / perTableCluster) * perTableCluster;
  const tableClusters = tableSize / perTableCluster;
  const table = new Array<number>(tableSize).fill(0);
  for (let i = 0; i < Math.min(tableSize, old.length); i++) table[i] = old[i]!;
  if (newBlock) table[newIndex] = newBlock;
  let missing = 0;
  for (let i = areaIndex; i < total; i++) if (!table[i]) missing++;
  const tableCluster = start + missing;
  const created: Array<[number, number]> = [];
  let next = start;
  for (let i = areaIndex; i < total; i++) {
    if (!table[i]) {
      table[i] = next++;
      created.push([i, table[i]!]);
    }
  }
  return { table, tableCluster, tableClusters, created, endCluster: tableCluster + tableClusters, areaIndex, total };
}
