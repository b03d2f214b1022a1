// The training panel's view-model: trainer events in, everything the panel draws out (chart series, header numbers,
// paging counters, warnings). Pure, with no DOM and no chart.js, so it is unit-tested under node and the webview
// only copies its arrays into charts. It imports only from extension/protocol, which the webview bundle shares.
import { MEMORY_CATEGORIES, blockInputsOffloaded, type DatasetStats, type GpuEvent, type MemoryCategory, type MemoryEstimate, type RunDevice, type TrainerEvent } from '../extension/protocol/events';
import type { PanelAction, RunStatus } from '../extension/protocol/webview';

/** One chart point, already in chart.js's internal {x, y} format (the charts skip parsing). */
export interface Point {
  x: number;
  y: number;
}

export interface RunHeader {
  step: number;
  totalSteps: number | null;
  epoch: number | null;
  loss: number | null;
  evalLoss: number | null;
  lr: number | null;
  gradNorm: number | null;
  tokensPerSecond: number | null;
  elapsedSeconds: number | null;
  etaSeconds: number | null;
}

export interface PageCounters {
  moves: number;
  movesOut: number;
  movesIn: number;
  bytesOut: number;
  bytesIn: number;
  totalMs: number;
}

export interface RunSeries {
  /** Training loss per step. */
  loss: Point[];
  /** Held-out loss per evaluated step. */
  evalLoss: Point[];
  lr: Point[];
  gradNorm: Point[];
  tokensPerSecond: Point[];
  /** Bytes per memory category at each interval's high-water mark (x = step of the memory event); drawn stacked. */
  memory: Record<MemoryCategory, Point[]>;
  /** The engine's peak total so far, per memory event. */
  memoryPeak: Point[];
  /** The run's memory budget at each memory event; empty without a budget. */
  memoryBudget: Point[];
  /** The device as its driver sees it; empty when the engine runs on the CPU. */
  deviceTotal: Point[];
  deviceUsed: Point[];
  /** Page moves: x = seconds since the run started, y = bytes moved. */
  pagesOut: Point[];
  pagesIn: Point[];
}

export interface RunStart {
  time: string;
  dataset: DatasetStats;
  trainableParameters: number;
  memoryEstimate: MemoryEstimate | null;
  totalSteps: number;
  resumedFrom: number | null;
  /** Null for runs written before the device was reported. */
  device: RunDevice | null;
}

export interface RunEnd {
  status: 'completed' | 'stopped' | 'failed';
  step: number;
  adapterPath: string | null;
  finalLoss: number | null;
  elapsedSeconds: number;
}

/** One sample prompt and its answers, oldest step first. */
export interface SampleThread {
  index: number;
  prompt: string;
  answers: { step: number; text: string; tokens: number; finishReason: string; ms: number }[];
}

export interface RunView {
  /** From events: running after run-started, then what finished (or an error) says; null before any event. */
  status: RunStatus | null;
  header: RunHeader;
  series: RunSeries;
  pages: PageCounters;
  /** The latest run-started (a resumed run starts again). */
  start: RunStart | null;
  end: RunEnd | null;
  checkpoints: { step: number; path: string }[];
  warnings: { time: string; message: string }[];
  error: { message: string; step: number | null; lastCheckpoint: string | null } | null;
  /** Date.parse of the first run-started: time zero of the page timeline. */
  startMs: number | null;
  /** The run's sample prompts with their answers step by step, by prompt position. */
  samples: SampleThread[];
  /** Time spent generating samples, for comparing with the training time. */
  sampleMs: number;
  /** The latest GPU telemetry sample (runs on a GPU only). */
  gpu: Omit<GpuEvent, 'kind'> | null;
}

export function emptyView(): RunView {
  const memory = {} as Record<MemoryCategory, Point[]>;
  for (const c of MEMORY_CATEGORIES) memory[c] = [];
  return {
    status: null,
    header: {
      step: 0, totalSteps: null, epoch: null, loss: null, evalLoss: null, lr: null, gradNorm: null,
      tokensPerSecond: null, elapsedSeconds: null, etaSeconds: null,
    },
    series: {
      loss: [], evalLoss: [], lr: [], gradNorm: [], tokensPerSecond: [], memory, memoryPeak: [],
      memoryBudget: [], deviceTotal: [], deviceUsed: [], pagesOut: [], pagesIn: [],
    },
    pages: { moves: 0, movesOut: 0, movesIn: 0, bytesOut: 0, bytesIn: 0, totalMs: 0 },
    start: null,
    end: null,
    checkpoints: [],
    warnings: [],
    error: null,
    startMs: null,
    samples: [],
    sampleMs: 0,
    gpu: null,
  };
}

const END_STATUS: Record<RunEnd['status'], RunStatus> = { completed: 'finished', stopped: 'stopped', failed: 'failed' };

// A resumed run redoes the steps after its checkpoint; the old attempt's points past it would otherwise overlap the
// new ones, so step-indexed series are cut back to the checkpoint.
function cutAfter(points: Point[], step: number): Point[] {
  return points.filter((p) => p.x <= step);
}

function resumeFrom(view: RunView, step: number): void {
  const s = view.series;
  for (const key of ['loss', 'evalLoss', 'lr', 'gradNorm', 'tokensPerSecond', 'memoryPeak', 'memoryBudget', 'deviceTotal', 'deviceUsed'] as const) s[key] = cutAfter(s[key], step);
  for (const c of MEMORY_CATEGORIES) s.memory[c] = cutAfter(s.memory[c], step);
  view.checkpoints = view.checkpoints.filter((c) => c.step <= step);
  for (const thread of view.samples) thread.answers = thread.answers.filter((a) => a.step <= step);
  view.sampleMs = view.samples.reduce((ms, t) => t.answers.reduce((m, a) => m + a.ms, ms), 0);
  const last = s.loss[s.loss.length - 1];
  view.header.step = step;
  view.header.loss = last ? last.y : null;
  const lastEval = s.evalLoss[s.evalLoss.length - 1];
  view.header.evalLoss = lastEval ? lastEval.y : null;
}

/** Applies one event to the view in place (the live path: one event per message) and returns it. */
export function applyEvent(view: RunView, event: TrainerEvent): RunView {
  const { header, series } = view;
  switch (event.kind) {
    case 'run-started':
      view.startMs ??= Date.parse(event.time);
      if (event.resumedFrom !== null) resumeFrom(view, event.resumedFrom);
      view.start = {
        time: event.time, dataset: event.dataset, trainableParameters: event.trainableParameters,
        memoryEstimate: event.memoryEstimate, totalSteps: event.totalSteps, resumedFrom: event.resumedFrom,
        device: event.device ?? null,
      };
      view.status = 'running';
      view.end = null;
      view.error = null;
      header.totalSteps = event.totalSteps;
      header.etaSeconds = null;
      break;
    case 'step':
      series.loss.push({ x: event.step, y: event.loss });
      series.lr.push({ x: event.step, y: event.lr });
      if (event.gradNorm !== null) series.gradNorm.push({ x: event.step, y: event.gradNorm });
      series.tokensPerSecond.push({ x: event.step, y: event.tokensPerSecond });
      Object.assign(header, {
        step: event.step, totalSteps: event.totalSteps, epoch: event.epoch, loss: event.loss, lr: event.lr,
        gradNorm: event.gradNorm, tokensPerSecond: event.tokensPerSecond, elapsedSeconds: event.elapsedSeconds,
        etaSeconds: event.etaSeconds,
      });
      break;
    case 'eval':
      // a non-finite eval loss (its warning says why) leaves no point and no figure
      if (event.evalLoss !== null) series.evalLoss.push({ x: event.step, y: event.evalLoss });
      header.evalLoss = event.evalLoss;
      break;
    case 'sample': {
      let thread = view.samples.find((t) => t.index === event.index);
      if (!thread) {
        thread = { index: event.index, prompt: event.prompt, answers: [] };
        view.samples.push(thread);
        view.samples.sort((a, b) => a.index - b.index);
      }
      thread.prompt = event.prompt;
      // an answer for a step already shown (the final eval after a stop at an eval step) replaces it
      for (const old of thread.answers.filter((a) => a.step === event.step)) view.sampleMs -= old.ms;
      thread.answers = thread.answers.filter((a) => a.step !== event.step);
      thread.answers.push({ step: event.step, text: event.text, tokens: event.tokens, finishReason: event.finishReason, ms: event.ms });
      view.sampleMs += event.ms;
      break;
    }
    case 'memory':
      // The interval's high-water mark by category: what the steps since the previous event held at once (the
      // current figures, taken between steps, have no activations in them).
      for (const c of MEMORY_CATEGORIES) series.memory[c].push({ x: event.step, y: event.highWater[c] });
      // totalPeak is the engine's own lifetime high-water mark, never below an interval's.
      series.memoryPeak.push({ x: event.step, y: Math.max(event.totalPeak, event.highWaterTotal) });
      if (view.start?.device?.memoryBudget != null) series.memoryBudget.push({ x: event.step, y: view.start.device.memoryBudget });
      if (event.device) {
        series.deviceTotal.push({ x: event.step, y: event.device.total });
        series.deviceUsed.push({ x: event.step, y: event.device.used });
      }
      break;
    case 'page': {
      view.startMs ??= Date.parse(event.time);
      const point = { x: (Date.parse(event.time) - view.startMs) / 1000, y: event.bytes };
      const p = view.pages;
      p.moves++;
      p.totalMs += event.ms;
      if (event.dir === 'out') {
        series.pagesOut.push(point);
        p.movesOut++;
        p.bytesOut += event.bytes;
      } else {
        series.pagesIn.push(point);
        p.movesIn++;
        p.bytesIn += event.bytes;
      }
      break;
    }
    case 'gpu': {
      const { kind: _kind, ...sample } = event;
      view.gpu = sample;
      break;
    }
    case 'checkpoint':
      view.checkpoints.push({ step: event.step, path: event.path });
      break;
    case 'warning':
      // a resumed run says again what it said at its start (the CPU fallback, truncated examples): once is enough
      if (!view.warnings.some((w) => w.message === event.message)) view.warnings.push({ time: event.time, message: event.message });
      break;
    case 'error':
      view.error = { message: event.message, step: event.step, lastCheckpoint: event.lastCheckpoint };
      view.status = 'failed';
      break;
    case 'finished':
      view.end = {
        status: event.status, step: event.step, adapterPath: event.adapterPath, finalLoss: event.finalLoss,
        elapsedSeconds: event.elapsedSeconds,
      };
      view.status = END_STATUS[event.status];
      header.step = event.step;
      header.elapsedSeconds = event.elapsedSeconds;
      header.etaSeconds = null;
      break;
  }
  return view;
}

/** The view of a whole event log (a snapshot): the same as applying each event in turn. */
export function reduceRun(events: readonly TrainerEvent[]): RunView {
  return events.reduce(applyEvent, emptyView());
}

/** Fraction of the run done, 0..1; null when the total is unknown. */
export function progress(view: RunView): number | null {
  const total = view.header.totalSteps;
  if (!total || total <= 0) return null;
  return Math.min(1, Math.max(0, view.header.step / total));
}

/** The polite announcement of a status change: "run1 finished, final loss 4.597", "run1 stopped at step 30". */
export function statusAnnouncement(name: string, status: RunStatus, view: RunView): string {
  const step = view.end?.step ?? view.header.step;
  switch (status) {
    case 'running':
      return `${name} running`;
    case 'finished':
      return view.end?.finalLoss != null ? `${name} finished, final loss ${Number(view.end.finalLoss.toPrecision(4))}` : `${name} finished`;
    case 'stopped':
      return `${name} stopped at step ${step.toLocaleString('en-US')}`;
    case 'failed':
      return `${name} failed`;
  }
}

/**
 * The buttons a run offers, in display order. Stop only while running; Resume after a stop or failure; the adapter
 * exists once a run finished or stopped (a stop writes a final checkpoint and adapter); the folder always.
 * Without a run: New Finetune.
 */
export function availableActions(status: RunStatus | null, hasRun: boolean): PanelAction[] {
  if (!hasRun) return ['newFinetune'];
  const actions: PanelAction[] = [];
  if (status === 'running') actions.push('stop');
  if (status === 'stopped' || status === 'failed') actions.push('resume');
  if (status === 'finished' || status === 'stopped') actions.push('try', 'export', 'merge', 'gguf');
  actions.push('openFolder');
  return actions;
}

export const ACTION_LABELS: Record<PanelAction, string> = {
  stop: 'Stop',
  resume: 'Resume',
  try: 'Try Model',
  export: 'Export Adapter',
  merge: 'Merge and Save',
  gguf: 'Export GGUF',
  openFolder: 'Open Run Folder',
  newFinetune: 'New Finetune',
};

/** What the run's memory plan moves to host memory, after its budget in the details ("" when nothing does). */
export function hostMemoryNote(dev: RunDevice): string {
  const inputs = dev.offloadedBlockInputs ?? 0;
  const moved = [...(dev.pagedOptimizer ? ['optimizer paged'] : []), ...(inputs > 0 ? [blockInputsOffloaded(inputs)] : [])];
  return moved.length > 0 ? `, ${moved.join(' and ')} to host memory` : '';
}

/** One row of a sample prompt's list: an answer and the steps (one, or a run of evals in a row) that gave it. */
export interface SampleRow {
  /** The first and last step that gave this answer; equal for one step. */
  firstStep: number;
  lastStep: number;
  /** How many evals gave it. */
  count: number;
  text: string;
  /** The answer ran out of tokens (max tokens or the model's context) before it ended. */
  cut: boolean;
  /** The newest of the steps' answers: its length and time (the row's tooltip). */
  tokens: number;
  ms: number;
}

/**
 * A prompt's answers as the panel lists them, newest first, with answers the same as the step before (text and
 * how they ended) in one row: once training settles most evals answer alike, and dozens of the same line would hide
 * the steps where the answer changed. Step 0 (the base model) always has its own row.
 */
export function sampleRows(thread: SampleThread): SampleRow[] {
  const rows: SampleRow[] = [];
  for (const a of [...thread.answers].sort((x, y) => x.step - y.step)) {
    const cut = a.finishReason === 'length' || a.finishReason === 'context';
    const prev = rows[rows.length - 1];
    if (prev && prev.firstStep > 0 && a.step > 0 && prev.text === a.text && prev.cut === cut) {
      prev.lastStep = a.step;
      prev.count++;
      prev.tokens = a.tokens;
      prev.ms = a.ms;
    } else {
      rows.push({ firstStep: a.step, lastStep: a.step, count: 1, text: a.text, cut, tokens: a.tokens, ms: a.ms });
    }
  }
  return rows.reverse();
}

/** "step 0 (base)", "step 1,200", "steps 300–1,200 (10 evals)". */
export function sampleRowLabel(row: SampleRow): string {
  const count = (n: number) => n.toLocaleString('en-US');
  if (row.count === 1) return `step ${count(row.firstStep)}${row.firstStep === 0 ? ' (base)' : ''}`;
  return `steps ${count(row.firstStep)}–${count(row.lastStep)} (${count(row.count)} evals)`;
}
