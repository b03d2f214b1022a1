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
