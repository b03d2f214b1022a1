// Number formatting for the panel's header, counters and chart ticks. Pure; shared by the DOM code and the tests.

import { formatBinaryBytes } from '../extension/util/bytes';

/** 1536 → "1.5 KiB"; binary units, as the engine's memory accounting uses. */
export { formatBinaryBytes as formatBytes };

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

/**
 * The ticks of an axis of bytes from `min` to `max` (the data's range): multiples of a power of two, so that each
 * reads as a round binary size ("512 KiB", "1.5 MiB", "16 GiB"; decimal steps chart.js picks read "977 KiB"),
 * at most `maxSteps` steps from the first, at or below min, to the last, at or above max.
 */
export function binaryByteTicks(min: number, max: number, maxSteps = 6): number[] {
  if (!Number.isFinite(min) || !Number.isFinite(max) || max < min) return [];
  const span = Math.max(max - min, 1);
  let step = Math.max(1, 2 ** Math.ceil(Math.log2(span / maxSteps))); // whole bytes
  let first = Math.floor(min / step) * step;
  let last = Math.ceil(max / step) * step;
  // rounding both ends out can add a step past maxSteps: the next power of two fits
  if ((last - first) / step > maxSteps) {
    step *= 2;
    first = Math.floor(min / step) * step;
    last = Math.ceil(max / step) * step;
  }
  if (last === first) last = first + step;
  const ticks: number[] = [];
  for (let v = first; v <= last; v += step) ticks.push(v);
  return ticks;
}

/** A byte tick as formatBytes writes it, without trailing zeros: "1.5 MiB", "2 MiB". */
export function formatByteTick(bytes: number): string {
  return formatBinaryBytes(bytes).replace(/\.(\d*?)0+ /, (_, kept: string) => (kept ? `.${kept} ` : ' '));
}
