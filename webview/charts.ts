// The chart.js side: builds the six charts once and copies the view-model's series into them. Only the pieces
// registered here are bundled (chart.js tree-shakes). CSP note: chart.js sizes its canvas through the CSSOM
// (canvas.style.width = …) and watches size with a ResizeObserver; neither is an inline style attribute, so the
// webview needs no 'unsafe-inline' for style-src.
import {
  Chart,
  Decimation,
  Filler,
  Legend,
  LinearScale,
  LineController,
  LineElement,
  PointElement,
  Tooltip,
  type Scale,
  type ChartDataset,
  type ChartOptions,
} from 'chart.js';
import { MEMORY_CATEGORIES } from '../extension/protocol/events';
import type { ChartId } from './chartSummary';
import { categoryColors, withAlpha, type Palette } from './colors';
import { binaryByteTicks, formatByteTick, formatBytes, formatDuration, formatNumber, formatRate } from './format';
import type { Point, RunView } from './model';

Chart.register(LineController, LineElement, PointElement, LinearScale, Legend, Tooltip, Filler, Decimation);

export type { ChartId } from './chartSummary';

type LineDataset = ChartDataset<'line', Point[]>;

interface ChartSpec {
  id: ChartId;
  title: string;
  xTitle: string;
  /** A title for the y axis, where its ticks alone do not say what it shows. */
  yTitle?: string;
  yTick: (value: number) => string;
  /** The y axis is bytes: ticks at round binary sizes (binaryByteTicks). */
  bytes?: boolean;
  stacked?: boolean;
  /** Long series are thinned to the canvas width (LTTB); stacked charts are not, as stacking needs equal x values. */
  decimate?: boolean;
  datasets(view: RunView, p: Palette): LineDataset[];
}

const line = (label: string, data: Point[], color: string, extra: Partial<LineDataset> = {}): LineDataset => ({
  label, data, borderColor: color, backgroundColor: color, borderWidth: 1.5, pointRadius: 0, pointHitRadius: 6, ...extra,
});

export const CHART_SPECS: readonly ChartSpec[] = [
  {
    id: 'loss-chart', title: 'Loss', xTitle: 'step', yTick: (v) => formatNumber(v, 3), decimate: true,
    datasets: (v, p) => [
      // Lower order is drawn on top: the few eval points must not sink into the noisy band of train steps.
      line('train loss', v.series.loss, p.blue, { order: 1 }),
      line('eval loss', v.series.evalLoss, p.orange, { order: 0, pointRadius: 3.5, borderWidth: 2.5 }),
    ],
  },
  {
    id: 'lr-chart', title: 'Learning rate', xTitle: 'step', yTick: (v) => formatRate(v), decimate: true,
    datasets: (v, p) => [line('learning rate', v.series.lr, p.purple)],
  },
  {
    id: 'gradnorm-chart', title: 'Gradient norm', xTitle: 'step', yTick: (v) => formatNumber(v, 3), decimate: true,
    datasets: (v, p) => [line('grad norm', v.series.gradNorm, p.yellow)],
  },
  {
    id: 'tps-chart', title: 'Tokens per second', xTitle: 'step', yTick: (v) => formatNumber(v, 3), decimate: true,
    datasets: (v, p) => [line('tokens/s', v.series.tokensPerSecond, p.green)],
  },
  {
    id: 'memory-chart', title: 'Memory', xTitle: 'step', yTick: (v) => formatBytes(v), bytes: true, stacked: true,
    datasets: (v, p) => {
      const colors = categoryColors(p);
      // Categories share one stack and fill down to the one below; the totals each get their own stack so they
      // are drawn at their value, not on top of the categories.
      const areas = MEMORY_CATEGORIES.map((c) =>
        line(c, v.series.memory[c], colors[c], { stack: 'categories', fill: 'stack', backgroundColor: withAlpha(colors[c], 0.45, p.kind), borderWidth: 1 }),
      );
      const totals = [line('peak', v.series.memoryPeak, p.red, { stack: 'peak', borderDash: [6, 3] })];
      // under a budget, where the paged optimizer starts moving pages to host memory
      if (v.series.memoryBudget.length > 0) totals.push(line('budget', v.series.memoryBudget, p.orange, { stack: 'budget', borderDash: [10, 4] }));
      if (v.series.deviceTotal.length > 0) {
        totals.push(
          line('device total', v.series.deviceTotal, p.foreground, { stack: 'device-total', borderDash: [2, 2] }),
          line('device used', v.series.deviceUsed, p.muted, { stack: 'device-used' }),
        );
      }
      return [...areas, ...totals];
    },
  },
  {
    // every step of a run with offloaded block inputs moves dozens of pages: thinned like the step series
    // Moves out are drawn above zero and moves in below it (the axis reads sizes both ways): a page goes out and
    // comes back in at the same size, and on one side the later points hid the others.
    id: 'pages-chart', title: 'Memory paging', xTitle: 'seconds', yTitle: 'in  ·  out', yTick: (v) => formatBytes(Math.abs(v)), bytes: true, decimate: true,
    datasets: (v, p) => [
      line('paged out', v.series.pagesOut, p.orange, { showLine: false, pointRadius: 2.5 }),
      line('paged in', v.series.pagesIn.map((q) => ({ x: q.x, y: -q.y })), p.blue, { showLine: false, pointRadius: 2.5, pointStyle: 'triangle' }),
    ],
  },
];

function options(spec: ChartSpec, p: Palette): ChartOptions<'line'> {
  // the workbench's font family and size (--vscode-font-*), as the rest of the panel's text
  const font = { family: p.fontFamily, size: p.fontSize };
  const ticks = { color: p.muted, font };
  const beginAtZero = spec.stacked || spec.id === 'pages-chart' || spec.id === 'tps-chart';
  return {
    // Streaming redraws many times a second; animation would only lag behind the data.
    animation: false,
    responsive: true,
    maintainAspectRatio: false,
    parsing: false,
    normalized: true,
    interaction: { mode: 'nearest', axis: 'x', intersect: false },
    color: p.foreground,
    scales: {
      x: {
        type: 'linear',
        title: { display: true, text: spec.xTitle, color: p.muted, font },
        ticks: { ...ticks, callback: spec.xTitle === 'seconds' ? (v) => formatDuration(Number(v)) : undefined },
        grid: { color: p.grid },
        border: { color: p.grid },
      },
      y: {
        type: 'linear',
        stacked: spec.stacked ?? false,
        beginAtZero,
        title: { display: spec.yTitle !== undefined, text: spec.yTitle ?? '', color: p.muted, font },
        ticks: { ...ticks, callback: (v) => (spec.bytes ? formatByteTick(Math.abs(Number(v))) : spec.yTick(Number(v))) },
        grid: { color: p.grid },
        border: { color: p.grid },
        ...(spec.bytes ? binaryTickCallbacks(beginAtZero) : {}),
      },
    },
    plugins: {
      legend: { display: true, labels: { color: p.foreground, boxWidth: 12, boxHeight: 12, font } },
      tooltip: {
        backgroundColor: p.background,
        titleColor: p.foreground,
        bodyColor: p.foreground,
        borderColor: p.grid,
        borderWidth: 1,
        titleFont: font,
        bodyFont: font,
        callbacks: { label: (item) => `${item.dataset.label}: ${spec.yTick((item.raw as Point).y)}` },
      },
      decimation: { enabled: spec.decimate ?? false, algorithm: 'lttb' },
    },
  };
}

/**
 * Scale callbacks that put a byte axis's ticks at binaryByteTicks of the data's range: chart.js's own ticks (decimal
 * steps, with the axis's ends stretched to them) are replaced, and the axis ends at the first and the last tick.
 */
function binaryTickCallbacks(beginAtZero: boolean) {
  const dataRange = new WeakMap<Scale, { min: number; max: number }>();
  return {
    afterDataLimits: (scale: Scale) => {
      dataRange.set(scale, { min: beginAtZero ? Math.min(0, scale.min) : scale.min, max: beginAtZero ? Math.max(0, scale.max) : scale.max });
    },
    afterBuildTicks: (scale: Scale) => {
      const range = dataRange.get(scale);
      const values = range ? binaryByteTicks(range.min, range.max) : [];
      if (values.length < 2) return; // no data yet: chart.js's default axis
      scale.ticks = values.map((value) => ({ value }));
      scale.min = values[0];
      scale.max = values[values.length - 1];
    },
  };
}

/** The panel's charts: one per canvas, fed from the view-model. */
export class RunCharts {
  private readonly charts = new Map<ChartId, Chart<'line', Point[]>>();

  constructor(canvases: Record<ChartId, HTMLCanvasElement>, private palette: Palette) {
    for (const spec of CHART_SPECS) {
      const chart = new Chart<'line', Point[]>(canvases[spec.id], { type: 'line', data: { datasets: [] }, options: options(spec, palette) });
      this.charts.set(spec.id, chart);
    }
  }

  /**
   * Redraws every chart from the view. Datasets are rebuilt (cheap: references to the model's arrays, copied so
   * chart.js never patches the model's own arrays) and drawn without animation.
   */
  update(view: RunView): void {
    for (const spec of CHART_SPECS) {
      const chart = this.charts.get(spec.id)!;
      chart.data.datasets = spec.datasets(view, this.palette).map((d) => ({ ...d, data: d.data.slice() }));
      chart.update('none');
    }
  }

  /** A theme change: new colours for axes, legends and lines. */
  restyle(palette: Palette, view: RunView): void {
    this.palette = palette;
    for (const spec of CHART_SPECS) this.charts.get(spec.id)!.options = options(spec, palette);
    this.update(view);
  }

  dispose(): void {
    for (const chart of this.charts.values()) chart.destroy();
    this.charts.clear();
  }
}
