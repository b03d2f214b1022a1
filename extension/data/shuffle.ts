/**
 * Seeded shuffling and the train/eval split, driven by Philox (stream Shuffle) so the order is a pure function of
 * (seed, epoch): a resumed run sees the same order, and a C++ port gives the same permutation.
 */
import { mulhi32, Philox, RngStream } from './philox';

/**
 * The step used for the eval split's permutation. Epochs use step = epoch number, so the split takes the top of
 * the uint32 range, which no epoch reaches.
 */
export const EVAL_SPLIT_STEP = 0xffffffff;

/**
 * A permutation of 0..n-1: Fisher-Yates from the top, where draw k (k = 0, 1, ...) picks for position i = n-1-k the
 * index j = floor(bits(k) * (i+1) / 2^32) with bits(k) = Philox(seed, Shuffle, epoch).bits(k): the high word of a
 * 32x32-bit product, so every j is exact for n up to 2^32.
 */
export function shuffleIndices(n: number, seed: number | bigint, epoch: number): Uint32Array {
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new RangeError(`n must be a uint32, got ${n}`);
  const rng = new Philox(seed, RngStream.Shuffle, epoch);
  const order = new Uint32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  for (let i = n - 1, k = 0; i > 0; i--, k++) {
    const j = mulhi32(rng.bits(k), i + 1);
    const t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  return order;
}

/** The items in the order of shuffleIndices(items.length, seed, epoch); the input is not modified. */
export function shuffled<T>(items: readonly T[], seed: number | bigint, epoch: number): T[] {
  return Array.from(shuffleIndices(items.length, seed, epoch), (i) => items[i]);
}

export interface EvalSplit<T> {
  train: T[];
  eval: T[];
}

/**
 * Holds out round(n * fraction) items for evaluation, at most maxCount, chosen by a seeded permutation, with at
 * least one item on each side whenever n >= 2 (so a tiny dataset still gets an eval loss). Both sides keep the input
 * order. A capped split is the first maxCount items of the uncapped one's permutation, so it is a subset of it.
 */
export function splitEval<T>(items: readonly T[], fraction: number, seed: number | bigint, maxCount = Infinity): EvalSplit<T> {
  if (!(fraction > 0 && fraction < 1)) throw new RangeError(`eval fraction must be between 0 and 1 (exclusive), got ${fraction}`);
  if (!(maxCount >= 1)) throw new RangeError(`the eval split's largest size must be at least 1, got ${maxCount}`);
  const n = items.length;
  if (n < 2) return { train: [...items], eval: [] };
  const evalCount = Math.min(n - 1, Math.max(1, Math.min(maxCount, Math.round(n * fraction))));
  const held = new Uint8Array(n);
  const order = shuffleIndices(n, seed, EVAL_SPLIT_STEP);
  for (let k = 0; k < evalCount; k++) held[order[k]] = 1;
  const split: EvalSplit<T> = { train: [], eval: [] };
  items.forEach((item, i) => (held[i] ? split.eval : split.train).push(item));
  return split;
}
