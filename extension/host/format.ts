// Text the host shows: the runs tree's descriptions, the status bar, end-of-run notifications, sizes and times.
import type { StepEvent } from '../protocol/events';
import type { RunInfo } from './runs/types';

/** "just now", "12m ago", "3h ago", "2d ago", then the date. */
export function formatRelativeTime(date: Date, now: Date = new Date()): string {
  const seconds = Math.max(0, (now.getTime() - date.getTime()) / 1000);
  if (seconds < 60) return 'just now';
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ago`;
  if (seconds < 7 * 86400) return `${Math.floor(seconds / 86400)}d ago`;
  return date.toISOString().slice(0, 10);
}

export function formatLoss(loss: number | null, digits = 3): string {
  return loss === null || !Number.isFinite(loss) ? String(loss) : loss.toFixed(digits);
}

/** 1536 → "1.5 KB"; decimal units, as file managers show disk sizes. */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

export function formatMiB(bytes: number): string {
  return `${Math.round(bytes / 1048576).toLocaleString('en-US')} MiB`;
}

/** The runs tree's description: "step 120/500 · loss 1.234 · 12m ago". */
export function runDescription(run: RunInfo, now: Date = new Date()): string {
  const parts: string[] = [];
  if (run.step > 0 || run.totalSteps !== null) parts.push(`step ${run.step}${run.totalSteps === null ? '' : `/${run.totalSteps}`}`);
  if (run.loss !== null) parts.push(`loss ${formatLoss(run.loss)}`);
  parts.push(formatRelativeTime(run.updated, now));
  return parts.join(' · ');
}

const STATUS_WORDS: Record<RunInfo['status'], string> = { running: 'Running', finished: 'Finished', stopped: 'Stopped', failed: 'Failed' };

/** The runs tree's tooltip: status, progress, folder and, for a failed run, why. */
export function runTooltip(run: RunInfo): string {
  const lines = [`${run.name}: ${STATUS_WORDS[run.status]}`];
  if (run.totalSteps !== null || run.step > 0) lines.push(`Step ${run.step}${run.totalSteps === null ? '' : ` of ${run.totalSteps}`}`);
  if (run.loss !== null) lines.push(`Loss ${formatLoss(run.loss, 4)}`);
  lines.push(`Updated ${run.updated.toLocaleString()}`);
  if (run.trainedBy) lines.push(`Trained by ${run.trainedBy}, in another window or a terminal`);
  if (run.error) lines.push(`Error: ${run.error}`);
  lines.push(run.runDir);
  return lines.join('\n');
}

/** The status bar while a run trains: "$(sync~spin) QLoRA 120/500 · loss 1.23 · 850 tok/s". */
export function statusBarText(step: StepEvent | undefined): string {
  if (!step) return '$(sync~spin) QLoRA starting…';
  return `$(sync~spin) QLoRA ${step.step}/${step.totalSteps} · loss ${formatLoss(step.loss, 2)} · ${Math.round(step.tokensPerSecond)} tok/s`;
}

