/** Token-length statistics of a tokenized dataset. */

export interface TokenLengthStats {
  count: number;
  min: number;
  max: number;
  mean: number;
  /** Median (nearest rank). */
  p50: number;
  /** 95th percentile (nearest rank). */
  p95: number;
  /** Examples longer than maxLength, cut to it. */
  truncated: number;
}

/** Nearest-rank percentile of sorted values: the smallest value with at least p of the values at or below it. */
function percentile(sorted: readonly number[], p: number): number {
  return sorted[Math.max(0, Math.ceil(p * sorted.length) - 1)];
}

/** Statistics of example lengths in tokens; all zeros for no examples. */
export function tokenLengthStats(lengths: readonly number[], truncated = 0): TokenLengthStats {
  if (lengths.length === 0) return { count: 0, min: 0, max: 0, mean: 0, p50: 0, p95: 0, truncated };
  const sorted = [...lengths].sort((a, b) => a - b);
  const sum = sorted.reduce((a, b) => a + b, 0);
  return {
    count: sorted.length,
    min: sorted[0],
    max: sorted[sorted.length - 1],
    mean: sum / sorted.length,
    p50: percentile(sorted, 0.5),
    p95: percentile(sorted, 0.95),
    truncated,
  };
}

/** Example lengths in equal bins from 0: bin i counts lengths in [i·binWidth, (i+1)·binWidth). */
export interface LengthHistogram {
  binWidth: number;
  counts: number[];
}

/** The smallest of 1, 2, 5 × 10^k that is at least `x`. */
function niceStep(x: number): number {
  const p = 10 ** Math.floor(Math.log10(x));
  for (const m of [1, 2, 5, 10]) if (m * p >= x) return m * p;
  return 10 * p;
}

/**
 * A histogram of example lengths over [0, max(maxLength, longest)] in about `targetBins` bins of a round width, so
 * the maximum length falls on a bin edge region a reader can see.
 */
export function lengthHistogram(lengths: readonly number[], maxLength?: number, targetBins = 24): LengthHistogram {
  let top = Math.max(maxLength ?? 0, 1);
  for (const n of lengths) top = Math.max(top, n); // no spread: datasets have millions of rows
  const binWidth = Math.max(1, niceStep(top / targetBins)); // token counts are whole numbers
  const counts = new Array<number>(Math.floor(top / binWidth) + 1).fill(0);
  for (const n of lengths) counts[Math.floor(n / binWidth)]++;
  return { binWidth, counts };
}
