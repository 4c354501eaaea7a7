/**
 * Progress reporting from operations: `done` out of `total` units (bytes). Operations call it
 * with (0, total) first and (total, total) when finished; callers decide how to show it.
 */
export type ProgressFn = (done: number, total: number) => void;
