// The training panel app (side view and run editor panel share it). The host sends {show} with a run snapshot and
// then streams {event}/{status}; everything drawn comes from the view-model (model.ts), the charts from charts.ts.
// The DOM is built once with textContent only (event text is never parsed as HTML) and toggled with `hidden`.
// Test hooks for UI tests: body data-* attributes (see writeTestHooks) and window.qloraPanel, a frozen summary.
import '@vscode-elements/elements/dist/vscode-badge/index.js';
import '@vscode-elements/elements/dist/vscode-button/index.js';
import '@vscode-elements/elements/dist/vscode-progress-bar/index.js';
import { validateHostMessage, type HostToWebview, type PanelAction, type RunStatus, type WebviewToHost } from '../extension/protocol/webview';
import { RunCharts, CHART_SPECS, type ChartId } from './charts';
import { chartSummaries } from './chartSummary';
import { readPalette, themeKind, type ThemeKind } from './colors';
import { el, guardButtonKeys, hiddenText } from './dom';
import { formatBytes, formatCount, formatDuration, formatNumber, formatRate } from './format';
import { ACTION_LABELS, availableActions, progress, reduceRun, emptyView, applyEvent, hostMemoryNote, sampleRowLabel, sampleRows, statusAnnouncement, type RunView } from './model';
import './styles.css';

interface VsCodeApi {
  postMessage(message: WebviewToHost): void;
  setState(state: PersistedState): void;
}
declare function acquireVsCodeApi(): VsCodeApi;

/**
 * What survives a webview reload. The host reads it back (the panel serializer's state, the view's resolve
 * context) to show the same run again, since {ready} carries no run of its own.
 */
interface PersistedState {
  runDir: string | null;
}

const vscode = acquireVsCodeApi();

// ---------------------------------------------------------------------------------------------------------------
// DOM

function button(action: PanelAction, secondary: boolean): HTMLElement {
  const b = el('vscode-button', { text: ACTION_LABELS[action] });
  b.dataset.action = action;
  if (secondary) b.setAttribute('secondary', '');
  return b;
}

/** A definition list whose values are filled in by key. */
class Facts {
  readonly root = el('dl', { className: 'facts' });
  private readonly values = new Map<string, { dt: HTMLElement; dd: HTMLElement }>();

  set(key: string, label: string, value: string | null): void {
    let row = this.values.get(key);
    if (!row) {
      row = { dt: el('dt', { text: label }), dd: el('dd') };
      row.dd.dataset.fact = key;
      this.values.set(key, row);
      this.root.append(row.dt, row.dd);
    }
    row.dt.hidden = row.dd.hidden = value === null;
    if (value !== null && row.dd.textContent !== value) row.dd.textContent = value;
  }
}

const ui = (() => {
  const empty = el('section', { id: 'empty' },
    el('p', { text: 'No training run yet. Start a finetune to see its loss, learning rate, memory and paging here as it trains.' }),
    button('newFinetune', false));

  const name = el('h1', { id: 'run-name' });
  const badge = el('vscode-badge', { id: 'run-status' });
  const progressBar = el('vscode-progress-bar', { id: 'run-progress' });
  progressBar.setAttribute('aria-label', 'Training progress');
  const progressText = el('div', { id: 'progress-text', className: 'muted' });
  const stats = new Facts();
  stats.root.id = 'run-stats';
  const actions = el('div', { id: 'actions', className: 'actions' });
  const header = el('header', {}, el('div', { className: 'title-row' }, name, badge), progressBar, progressText, stats.root, actions);

  const error = el('div', { id: 'run-error', className: 'error' });
  error.setAttribute('role', 'alert');
  const warnings = el('ul', { id: 'run-warnings', className: 'warnings' });
  const problems = el('section', { id: 'problems' }, error, warnings);

  const canvases = {} as Record<ChartId, HTMLCanvasElement>;
  const figures = {} as Record<ChartId, HTMLElement>;
  const chartTexts = {} as Record<ChartId, HTMLElement>;
  for (const spec of CHART_SPECS) {
    const canvas = el('canvas', { id: spec.id });
    canvas.setAttribute('role', 'img');
    canvas.setAttribute('aria-label', `${spec.title} chart`);
    // the latest values as text: a canvas has none of its own
    chartTexts[spec.id] = hiddenText('', { id: `${spec.id}-summary` });
    canvas.setAttribute('aria-describedby', chartTexts[spec.id].id);
    canvases[spec.id] = canvas;
    const box = el('div', { className: `chart-box${spec.id === 'memory-chart' ? ' tall' : ''}` }, canvas);
    figures[spec.id] = el('figure', { className: 'chart' }, el('h2', { text: spec.title }), box, chartTexts[spec.id]);
  }
  // The paging figure also holds the counters and, with no page events, says so instead of an empty plot.
  const pageCounters = new Facts();
  const noPaging = el('p', { id: 'no-paging', className: 'muted' });
  figures['pages-chart'].append(noPaging, pageCounters.root);
  const charts = el('section', { className: 'charts' }, ...CHART_SPECS.map((s) => figures[s.id]));

  // Sample answers: one block per prompt, newest answer first.
  const samplesNote = el('p', { id: 'samples-note', className: 'muted' });
  const sampleThreads = el('div', { id: 'sample-threads' });
  const samples = el('section', { id: 'samples' }, el('h2', { text: 'Samples' }), samplesNote, sampleThreads);

  const details = new Facts();
  details.root.id = 'run-details';
  const detailsSection = el('section', { id: 'details' }, el('h2', { text: 'Run' }), details.root);

  const run = el('section', { id: 'run' }, header, problems, charts, samples, detailsSection);
  // status changes, said once (outside #run, which is hidden while no run is shown)
  const announcer = el('div', { id: 'run-announcer', className: 'visually-hidden' });
  announcer.setAttribute('role', 'status');
  document.body.append(el('main', {}, announcer, empty, run));
  return { empty, run, name, badge, progressBar, progressText, stats, actions, error, warnings, canvases, figures, chartTexts, pageCounters, noPaging, samples, samplesNote, sampleThreads, details, announcer };
})();

// ---------------------------------------------------------------------------------------------------------------
// State

/** False until the host's first {show}: until then neither the run nor the "no run" text is shown. */
let received = false;
let shown: { runDir: string; name: string } | null = null;
let status: RunStatus | null = null;
let statusMessage: string | undefined;
let view: RunView = emptyView();
let shownActions = '';

const currentTheme = (): ThemeKind => themeKind([...document.body.classList]);
const palette = () => readPalette((name) => getComputedStyle(document.body).getPropertyValue(name), currentTheme());
const charts = new RunCharts(ui.canvases, palette());

// ---------------------------------------------------------------------------------------------------------------
// Rendering: text and test hooks at once on every message; charts at most every CHART_INTERVAL_MS, since a run can
// send many events a second.

const CHART_INTERVAL_MS = 100;
let chartTimer: ReturnType<typeof setTimeout> | undefined;

function scheduleCharts(): void {
  chartTimer ??= setTimeout(() => {
    chartTimer = undefined;
    charts.update(view);
    writeChartSummaries();
  }, CHART_INTERVAL_MS);
}

function writeChartSummaries(): void {
  for (const [id, text] of Object.entries(chartSummaries(view)) as [ChartId, string][]) {
    if (ui.chartTexts[id].textContent !== text) ui.chartTexts[id].textContent = text;
  }
}

function renderHeader(): void {
  const h = view.header;
  ui.name.textContent = shown?.name ?? '';
  ui.badge.textContent = status ?? 'no events';
  ui.badge.dataset.status = status ?? '';
  const fraction = progress(view);
  if (fraction === null) ui.progressBar.removeAttribute('value');
  else {
    // a percentage: the bar rounds aria-valuenow to a whole number, so a 0..1 fraction would read 0 all run
    ui.progressBar.setAttribute('max', '100');
    ui.progressBar.setAttribute('value', String(Math.round(fraction * 1000) / 10));
  }
  // A finished run's bar should not pulse as indeterminate.
  ui.progressBar.toggleAttribute('indeterminate', fraction === null && status === 'running');
  ui.progressBar.hidden = fraction === null && status !== 'running';
  const parts = [h.totalSteps !== null ? `step ${formatCount(h.step)} / ${formatCount(h.totalSteps)}` : view.start ? 'starting' : ''];
  if (status === 'running' && h.etaSeconds !== null) parts.push(`ETA ${formatDuration(h.etaSeconds)}`);
  if (h.elapsedSeconds !== null) parts.push(`${formatDuration(h.elapsedSeconds)} elapsed`);
  ui.progressText.textContent = parts.filter(Boolean).join(' · ');

  ui.stats.set('loss', 'loss', h.loss === null ? null : formatNumber(h.loss));
  ui.stats.set('evalLoss', 'eval loss', h.evalLoss === null ? null : formatNumber(h.evalLoss));
  ui.stats.set('lr', 'learning rate', h.lr === null ? null : formatRate(h.lr));
  ui.stats.set('gradNorm', 'grad norm', h.gradNorm === null ? null : formatNumber(h.gradNorm));
  ui.stats.set('tps', 'tokens/s', h.tokensPerSecond === null ? null : formatNumber(h.tokensPerSecond, 3));
  ui.stats.set('epoch', 'epoch', h.epoch === null ? null : formatNumber(h.epoch, 3));

  const actions = availableActions(status, shown !== null);
  const key = actions.join(',');
  if (key !== shownActions) {
    // Rebuilt only when the set changes, so a button being clicked is not replaced under the pointer.
    shownActions = key;
    ui.actions.replaceChildren(...actions.map((a, i) => button(a, i > 0)));
  }
}

let shownWarnings = '[]';
let shownError = '';

function renderProblems(): void {
  const message = view.error?.message ?? (status === 'failed' ? statusMessage : undefined);
  ui.error.hidden = message === undefined;
  const where = view.error?.step != null ? ` (step ${view.error.step})` : '';
  const resume = view.error?.lastCheckpoint ? `Resume continues from ${view.error.lastCheckpoint}.` : '';
  // rewritten only when it changes: the element is an alert, and every rewrite is read out again
  const errorKey = message === undefined ? '' : JSON.stringify([where, message, resume]);
  if (message !== undefined && errorKey !== shownError) {
    ui.error.replaceChildren(el('strong', { text: `Failed${where}: ` }), document.createTextNode(message), ...(resume ? [el('div', { className: 'muted', text: resume })] : []));
  }
  shownError = errorKey;
  // redrawn when the list changes: a count alone would keep another run's warnings when both have as many
  const key = JSON.stringify(view.warnings.map((w) => w.message));
  if (key !== shownWarnings) {
    shownWarnings = key;
    ui.warnings.replaceChildren(...view.warnings.map((w) => el('li', {}, el('strong', { text: 'Warning: ' }), document.createTextNode(w.message))));
  }
  ui.warnings.hidden = view.warnings.length === 0;
}

function renderPaging(): void {
  const p = view.pages;
  const none = p.moves === 0;
  ui.noPaging.hidden = !none;
  ui.noPaging.textContent = status === 'running' ? 'No memory paging in this run so far.' : 'No memory paging in this run.';
  (ui.canvases['pages-chart'].parentElement as HTMLElement).hidden = none;
  ui.pageCounters.root.hidden = none;
  ui.pageCounters.set('moves', 'moves', `${formatCount(p.moves)} (${formatCount(p.movesOut)} out, ${formatCount(p.movesIn)} in)`);
  ui.pageCounters.set('bytesOut', 'bytes out', formatBytes(p.bytesOut));
  ui.pageCounters.set('bytesIn', 'bytes in', formatBytes(p.bytesIn));
  ui.pageCounters.set('ms', 'time paging', p.totalMs < 1000 ? `${formatNumber(p.totalMs, 3)} ms` : formatDuration(p.totalMs / 1000));
}

let shownSamples = '';

function renderSamples(): void {
  const threads = view.samples;
  ui.samples.hidden = threads.length === 0;
  const key = threads.map((t) => `${t.index}:${t.answers.map((a) => `${a.step}/${a.text.length}`).join(',')}`).join(';');
  if (key === shownSamples) return;
  shownSamples = key;
  const trainingSeconds = view.header.elapsedSeconds;
  const share = trainingSeconds && trainingSeconds > 0 ? ` (${formatNumber((100 * view.sampleMs) / 1000 / trainingSeconds, 2)}% of the run's time)` : '';
  ui.samplesNote.textContent = `Greedy answers with the adapter of each step (step 0: the base model). Generating them took ${formatDuration(view.sampleMs / 1000)}${share}.`;
  ui.sampleThreads.replaceChildren(...threads.map((t) => {
    const answers = sampleRows(t).map((row) => {
      const item = el('li', {}, el('span', { className: 'sample-step', text: sampleRowLabel(row) }), el('span', { className: 'sample-text', text: row.text + (row.cut ? ' …' : '') }));
      item.title = `${row.count > 1 ? `at step ${formatCount(row.lastStep)}: ` : ''}${row.tokens} tokens in ${formatNumber(row.ms, 3)} ms`;
      return item;
    });
    const block = el('div', { className: 'sample-thread' }, el('h3', { className: 'sample-prompt', text: t.prompt }), el('ol', { className: 'sample-answers' }, ...answers));
    block.dataset.index = String(t.index);
    return block;
  }));
}

function renderDetails(): void {
  const s = view.start;
  const d = s?.dataset;
  const f = ui.details;
  f.set('trainable', 'trainable parameters', s ? formatCount(s.trainableParameters) : null);
  f.set('resumed', 'resumed from step', s?.resumedFrom != null ? formatCount(s.resumedFrom) : null);
  const dev = s?.device;
  f.set('device', 'device', dev
    ? `${dev.kind === 'cuda' ? 'GPU' : 'CPU'}: ${dev.name}, ${dev.computeDtype}` +
      (dev.memoryBudget !== null ? `; budget ${formatBytes(dev.memoryBudget)}${hostMemoryNote(dev)}` : '')
    : null);
  const g = view.gpu;
  f.set('gpu', 'GPU now', g
    ? [`${formatBytes(g.memoryUsed)} of ${formatBytes(g.memoryTotal)} used`, g.utilization !== null ? `${g.utilization}% busy` : null,
      g.temperature !== null ? `${g.temperature} °C` : null, g.powerW !== null ? `${Math.round(g.powerW)} W` : null].filter((x) => x !== null).join(', ')
    : null);
  f.set('estimate', 'estimated peak memory', s?.memoryEstimate ? formatBytes(s.memoryEstimate.peakTotal) : null);
  f.set('dataset', 'dataset', d ? `${d.file} (${d.format}, ${d.shape}, template ${d.template})` : null);
  f.set('examples', 'examples', d ? `${formatCount(d.trainExamples)} train, ${formatCount(d.evalExamples)} eval` : null);
  f.set('tokens', 'tokens', d ? `${formatCount(d.trainTokens)} train, ${formatCount(d.trainedTokens)} trained on${d.packed ? ', packed' : ''}` : null);
  f.set('dropped', 'left out', d && d.truncated + d.skippedInvalid + d.droppedEmpty > 0
    ? `${formatCount(d.truncated)} truncated, ${formatCount(d.skippedInvalid)} invalid, ${formatCount(d.droppedEmpty)} empty` : null);
  const last = view.checkpoints[view.checkpoints.length - 1];
  f.set('checkpoint', 'latest checkpoint', last ? `step ${formatCount(last.step)}: ${last.path}` : null);
  f.set('adapter', 'adapter', view.end?.adapterPath ?? null);
  f.set('finalLoss', 'final loss', view.end?.finalLoss != null ? formatNumber(view.end.finalLoss) : null);
}

/** Read-only facts for UI tests (vscode-lean4 style): what the panel holds, without scraping pixels. */
function summary() {
  return {
    runDir: shown?.runDir ?? null,
    status: status ?? 'none',
    steps: view.series.loss.length,
    evalPoints: view.series.evalLoss.length,
    memoryPoints: view.series.memoryPeak.length,
    pageEvents: view.pages.moves,
    warnings: view.warnings.length,
    samples: view.samples.reduce((n, t) => n + t.answers.length, 0),
    error: view.error?.message ?? null,
    actions: availableActions(status, shown !== null),
    theme: currentTheme(),
  };
}

function writeTestHooks(): void {
  const s = summary();
  const data = document.body.dataset;
  data.runDir = s.runDir ?? '';
  data.runStatus = s.status;
  data.steps = String(s.steps);
  data.evalPoints = String(s.evalPoints);
  data.memoryPoints = String(s.memoryPoints);
  data.pageEvents = String(s.pageEvents);
  data.warnings = String(s.warnings);
  data.samples = String(s.samples);
  data.error = s.error === null ? 'false' : 'true';
  data.actions = s.actions.join(',');
  data.theme = s.theme;
}
Object.defineProperty(window, 'qloraPanel', { get: () => Object.freeze(summary()), enumerable: false, configurable: false });

function render(): void {
  ui.empty.hidden = !received || shown !== null;
  ui.run.hidden = shown === null;
  if (shown === null) shownActions = '';
  renderHeader();
  renderProblems();
  renderPaging();
  renderSamples();
  renderDetails();
  writeTestHooks();
  scheduleCharts();
}

// ---------------------------------------------------------------------------------------------------------------
// Messages

/** Says a status change of the shown run once; nothing for the first status of a run just shown. */
function announceStatus(was: { runDir: string | undefined; status: RunStatus | null }): void {
  if (!shown || shown.runDir !== was.runDir || status === null || status === was.status) return;
  if (status === 'failed' && !ui.error.hidden) return; // the error is an alert: it says the run failed, and why
  ui.announcer.textContent = statusAnnouncement(shown.name, status, view);
}

function receive(message: HostToWebview): void {
  const was = { runDir: shown?.runDir, status };
  switch (message.type) {
    case 'show':
      received = true;
      shown = message.run && { runDir: message.run.runDir, name: message.run.name };
      view = reduceRun(message.run?.events ?? []);
      shownSamples = ''; // another run's answers can have the same steps and lengths
      // The host's status wins on show: a killed trainer leaves a log that still reads as running.
      status = message.run?.status ?? null;
      statusMessage = undefined;
      vscode.setState({ runDir: shown?.runDir ?? null });
      break;
    case 'event': {
      if (message.runDir !== shown?.runDir) return;
      const before = view.status;
      applyEvent(view, message.event);
      if (view.status !== before) status = view.status;
      break;
    }
    case 'status':
      if (message.runDir !== shown?.runDir) return;
      status = message.status;
      statusMessage = message.message;
      break;
  }
  render();
  announceStatus(was);
}

window.addEventListener('message', (e: MessageEvent<unknown>) => {
  let message: HostToWebview;
  try {
    message = validateHostMessage(e.data);
  } catch (err) {
    console.warn('qlora panel: dropped an invalid host message:', err instanceof Error ? err.message : err);
    return;
  }
  receive(message);
});

guardButtonKeys(document);
document.body.addEventListener('click', (e) => {
  const target = (e.target as Element | null)?.closest<HTMLElement>('[data-action]');
  const action = target?.dataset.action as PanelAction | undefined;
  if (!action) return;
  vscode.postMessage({ type: 'action', action, runDir: shown?.runDir ?? null });
});

// VS Code swaps the body's vscode-light / vscode-dark / vscode-high-contrast class on a theme change; the CSS
// variables change with it, so the charts re-read their colours.
new MutationObserver(() => {
  charts.restyle(palette(), view);
  writeTestHooks();
}).observe(document.body, { attributes: true, attributeFilter: ['class'] });

render();
vscode.postMessage({ type: 'ready' });
