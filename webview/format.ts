// Number formatting for the panel's header, counters and chart ticks. Pure; shared by the DOM code and the tests.

/** 1536 → "1.5 KiB"; binary units, as the engine's memory accounting uses. */
export { formatBinaryBytes as formatBytes } from '../extension/util/bytes';

/** Seconds → "45s", "3m 05s", "2h 07m". */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '–';
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, '0')}m`;
}

/** Losses and norms: four significant digits; a diverged value (NaN, Infinity) shows as itself. */
export function formatNumber(value: number | null, digits = 4): string {
  if (value === null) return '–';
  if (!Number.isFinite(value)) return String(value);
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e6)) return value.toExponential(digits - 1);
  return String(Number(value.toPrecision(digits)));
}

/** Learning rates are small: always exponent form ("2.00e-4"). */
export function formatRate(value: number | null): string {
  if (value === null) return '–';
  return Number.isFinite(value) ? value.toExponential(2) : String(value);
}

/** 6_815_744 → "6,815,744". */
export function formatCount(value: number): string {
  return Number.isFinite(value) ? Math.round(value).toLocaleString('en-US') : String(value);
}
