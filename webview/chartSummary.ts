// The charts as text, for screen readers: each canvas is described by a sentence with the latest values (main.ts
// writes it into a visually hidden element the canvas points at with aria-describedby). Pure, unit-tested.
import { MEMORY_CATEGORIES } from '../extension/protocol/events';
import { formatBytes, formatCount, formatDuration, formatNumber, formatRate } from './format';
import type { Point, RunView } from './model';

export type ChartId = 'loss-chart' | 'lr-chart' | 'gradnorm-chart' | 'tps-chart' | 'memory-chart' | 'pages-chart';

const last = (points: readonly Point[]) => points[points.length - 1];

/** "train loss 4.6 at step 60, from 6.7"; null for an empty series. */
function latest(label: string, points: readonly Point[], format: (v: number) => string): string | null {
  const end = last(points);
  if (!end) return null;
  const from = points.length > 1 ? `, from ${format(points[0].y)}` : '';
  return `${label} ${format(end.y)} at step ${formatCount(end.x)}${from}`;
}

const joined = (parts: (string | null)[]) => parts.filter((p) => p !== null).join('; ') || 'no data yet';
const num = (v: number) => formatNumber(v, 3);

function memorySummary(v: RunView): string {
  const s = v.series;
  const at = last(s.memoryPeak) ?? last(s.memory.weights);
  if (!at) return 'no data yet';
  const categories = MEMORY_CATEGORIES.flatMap((c) => {
    const p = last(s.memory[c]);
    return p ? [`${c} ${formatBytes(p.y)}`] : [];
  });
  const used = last(s.deviceUsed), total = last(s.deviceTotal), budget = last(s.memoryBudget), peak = last(s.memoryPeak);
  return joined([
    `at step ${formatCount(at.x)}: ${categories.join(', ')}`,
    peak ? `peak ${formatBytes(peak.y)}` : null,
    budget ? `budget ${formatBytes(budget.y)}` : null,
    used && total ? `device ${formatBytes(used.y)} used of ${formatBytes(total.y)}` : null,
  ]);
}

function pagingSummary(v: RunView): string {
  const p = v.pages;
  if (p.moves === 0) return 'no memory paging';
  const end = Math.max(last(v.series.pagesOut)?.x ?? 0, last(v.series.pagesIn)?.x ?? 0);
  return `${formatCount(p.moves)} page moves: ${formatBytes(p.bytesOut)} out, ${formatBytes(p.bytesIn)} in; the latest ${formatDuration(end)} into the run`;
}

/** One sentence per chart with its latest values. */
export function chartSummaries(v: RunView): Record<ChartId, string> {
  const s = v.series;
  return {
    'loss-chart': joined([latest('train loss', s.loss, num), latest('eval loss', s.evalLoss, num)]),
    'lr-chart': joined([latest('learning rate', s.lr, formatRate)]),
    'gradnorm-chart': joined([latest('grad norm', s.gradNorm, num)]),
    'tps-chart': joined([latest('tokens per second', s.tokensPerSecond, num)]),
    'memory-chart': memorySummary(v),
    'pages-chart': pagingSummary(v),
  };
}
