// The training panel's view-model: a realistic run's events become the chart series, header numbers and counters;
// live (one event at a time) equals replayed; failures, resumes and the panel's buttons; number formatting and
// theme colours.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MEMORY_CATEGORIES, type ByCategory, type TrainerEvent } from '../../extension/protocol/events';
import { chartSummaries } from '../../webview/chartSummary';
import { categoryColors, opaque, readPalette, themeKind, withAlpha } from '../../webview/colors';
import { binaryByteTicks, formatByteTick, formatBytes, formatCount, formatDuration, formatNumber, formatRate } from '../../webview/format';
import { applyEvent, availableActions, emptyView, hostMemoryNote, progress, reduceRun, statusAnnouncement } from '../../webview/model';

const GiB = 1024 ** 3;
const at = (seconds: number) => new Date(Date.UTC(2026, 10, 24, 10, 0, 0) + seconds * 1000).toISOString();
const bytes = (weights: number, activations: number): ByCategory => ({
  weights, adapters: 20e6, gradients: 20e6, optimizer: 40e6, activations, workspace: 8e6,
});

const started = (resumedFrom: number | null = null, t = 0): TrainerEvent => ({
  kind: 'run-started', time: at(t), protocol: 1, runDir: '/runs/r1', config: { rank: 64 }, totalSteps: 6, resumedFrom,
  trainableParameters: 6_815_744, memoryEstimate: { categories: bytes(0.9 * GiB, 0.3 * GiB), peakTotal: 1.3 * GiB },
  dataset: {
    file: 'chat.jsonl', format: 'jsonl', shape: 'messages', template: 'model', trainExamples: 90, evalExamples: 10,
    trainTokens: 12_000, trainedTokens: 9_000, truncated: 2, skippedInvalid: 1, droppedEmpty: 0, packed: false,
  },
});
const step = (n: number, loss: number, t = n): TrainerEvent => ({
  kind: 'step', time: at(t), step: n, totalSteps: 6, epoch: n / 3, loss, lr: 2e-4 * (1 - n / 12), gradNorm: 0.3 + n / 100,
  tokensPerSecond: 800 + n, elapsedSeconds: t, etaSeconds: 6 - n,
});
const memory = (n: number, activations: number, device: { total: number; used: number } | null = { total: 24 * GiB, used: 2 * GiB }): TrainerEvent => {
  // Between steps the activations are freed; the high-water mark holds them.
  const current = bytes(GiB, 0);
  const highWater = bytes(GiB, activations);
  const sumOf = (b: Record<string, number>) => Object.values(b).reduce((a, x) => a + x, 0);
  return {
    kind: 'memory', time: at(n), step: n, current, peak: highWater, totalCurrent: sumOf(current), totalPeak: sumOf(highWater) + 1e6,
    highWater, highWaterTotal: sumOf(highWater), device,
  };
};
const page = (dir: 'out' | 'in', t: number, size: number, ms: number): TrainerEvent => ({ kind: 'page', time: at(t), dir, bytes: size, tensor: 'exp_avg.3', ms });

/** A run that trains six steps with evals, memory and paging, a checkpoint and a warning, and completes. */
const completedRun: TrainerEvent[] = [
  started(),
  step(1, 2.8), memory(1, 100e6), page('out', 1.5, 64e6, 12),
  step(2, 2.5), memory(2, 120e6), page('in', 2.5, 64e6, 10),
  step(3, 2.1), { kind: 'eval', time: at(3.2), step: 3, evalLoss: 2.3, evalTokens: 500 }, memory(3, 110e6),
  { kind: 'checkpoint', time: at(3.5), step: 3, path: '/runs/r1/checkpoints/step-3' },
  { kind: 'warning', time: at(3.6), message: '2 examples longer than 1024 tokens were truncated' },
  step(4, 1.9), step(5, 1.7), page('out', 5.5, 32e6, 4.5), step(6, 1.6),
  { kind: 'eval', time: at(6.2), step: 6, evalLoss: 1.8, evalTokens: 500 }, memory(6, 90e6),
  { kind: 'checkpoint', time: at(6.5), step: 6, path: '/runs/r1/checkpoints/step-6' },
  { kind: 'finished', time: at(7), status: 'completed', step: 6, adapterPath: '/runs/r1/adapter', finalLoss: 1.6, elapsedSeconds: 7 },
];

test('a completed run: series per chart, header, counters, warnings', () => {
  const v = reduceRun(completedRun);
  assert.equal(v.status, 'finished');
  assert.deepEqual(v.series.loss.map((p) => [p.x, p.y]), [[1, 2.8], [2, 2.5], [3, 2.1], [4, 1.9], [5, 1.7], [6, 1.6]]);
  assert.deepEqual(v.series.evalLoss, [{ x: 3, y: 2.3 }, { x: 6, y: 1.8 }]);
  assert.equal(v.series.lr.length, 6);
  assert.equal(v.series.lr[0].y, 2e-4 * (1 - 1 / 12));
  assert.deepEqual(v.series.gradNorm.map((p) => p.y), [1, 2, 3, 4, 5, 6].map((n) => 0.3 + n / 100));
  assert.deepEqual(v.series.tokensPerSecond.map((p) => p.y), [801, 802, 803, 804, 805, 806]);

  // Memory: one point per memory event in every category, at the event's step.
  for (const c of MEMORY_CATEGORIES) assert.deepEqual(v.series.memory[c].map((p) => p.x), [1, 2, 3, 6]);
  assert.deepEqual(v.series.memory.activations.map((p) => p.y), [100e6, 120e6, 110e6, 90e6]);
  assert.equal(v.series.memory.weights[0].y, GiB);
  assert.equal(v.series.memoryPeak[1].y, GiB + 20e6 + 20e6 + 40e6 + 120e6 + 8e6 + 1e6);
  assert.deepEqual(v.series.deviceTotal.map((p) => p.y), [24 * GiB, 24 * GiB, 24 * GiB, 24 * GiB]);
  assert.equal(v.series.deviceUsed[0].y, 2 * GiB);

  // Paging: a timeline in seconds since run-started, split by direction, and the totals.
  assert.deepEqual(v.series.pagesOut, [{ x: 1.5, y: 64e6 }, { x: 5.5, y: 32e6 }]);
  assert.deepEqual(v.series.pagesIn, [{ x: 2.5, y: 64e6 }]);
  assert.deepEqual(v.pages, { moves: 3, movesOut: 2, movesIn: 1, bytesOut: 96e6, bytesIn: 64e6, totalMs: 26.5 });

  assert.deepEqual(v.header, {
    step: 6, totalSteps: 6, epoch: 2, loss: 1.6, evalLoss: 1.8, lr: 2e-4 * (1 - 6 / 12), gradNorm: 0.3 + 6 / 100,
    tokensPerSecond: 806, elapsedSeconds: 7, etaSeconds: null,
  });
  assert.equal(progress(v), 1);
  assert.equal(v.start?.trainableParameters, 6_815_744);
  assert.equal(v.start?.dataset.trainExamples, 90);
  assert.deepEqual(v.checkpoints.map((c) => c.step), [3, 6]);
  assert.deepEqual(v.warnings.map((w) => w.message), ['2 examples longer than 1024 tokens were truncated']);
  assert.equal(v.error, null);
  assert.deepEqual(v.end, { status: 'completed', step: 6, adapterPath: '/runs/r1/adapter', finalLoss: 1.6, elapsedSeconds: 7 });
});

test('applying events one at a time (live) gives the same view as replaying the log, at every prefix', () => {
  const live = emptyView();
  completedRun.forEach((event, i) => {
    applyEvent(live, event);
    assert.deepEqual(live, reduceRun(completedRun.slice(0, i + 1)), `after event ${i} (${event.kind})`);
  });
});

test('an eval whose loss was not finite (written as null) leaves no point and no header figure', () => {
  const v = reduceRun([...completedRun.slice(0, 9), { kind: 'eval', time: at(3.3), step: 3, evalLoss: null, evalTokens: 500 }]);
  assert.deepEqual(v.series.evalLoss, [{ x: 3, y: 2.3 }]);
  assert.equal(v.header.evalLoss, null);
});

test('mid-run: running, progress and ETA from the latest step; no paging and no device on the CPU', () => {
  const v = reduceRun([started(), step(1, 2.8), memory(1, 1e6, null), step(2, 2.6)]);
  assert.equal(v.status, 'running');
  assert.equal(progress(v), 2 / 6);
  assert.equal(v.header.etaSeconds, 4);
  assert.equal(v.series.deviceTotal.length, 0);
  assert.equal(v.series.deviceUsed.length, 0);
  assert.equal(v.pages.moves, 0);
  assert.equal(v.series.pagesOut.length + v.series.pagesIn.length, 0);
  assert.equal(v.end, null);
});

test('the device a run trains on and the latest GPU sample; older runs without a device', () => {
  const device = { kind: 'cuda' as const, name: 'NVIDIA H100 80GB HBM3', computeDtype: 'bf16' as const, memoryBudget: 70 * GiB, pagedOptimizer: true };
  const gpu = (t: number, utilization: number): TrainerEvent => ({
    kind: 'gpu', time: at(t), index: 0, name: device.name, memoryTotal: 80 * GiB, memoryUsed: 61 * GiB, memoryFree: 19 * GiB, utilization, temperature: 55, powerW: 402.5,
  });
  const v = reduceRun([{ ...started(), device } as TrainerEvent, gpu(0.5, 40), step(1, 2.8), gpu(1.5, 97), memory(1, 100e6), memory(2, 90e6)]);
  assert.deepEqual(v.series.memoryBudget, [{ x: 1, y: 70 * GiB }, { x: 2, y: 70 * GiB }], 'the budget line beside the memory');
  assert.deepEqual(reduceRun([started(), memory(1, 100e6)]).series.memoryBudget, [], 'no budget, no line');
  assert.deepEqual(v.start?.device, device);
  assert.deepEqual(v.gpu, { time: at(1.5), index: 0, name: device.name, memoryTotal: 80 * GiB, memoryUsed: 61 * GiB, memoryFree: 19 * GiB, utilization: 97, temperature: 55, powerW: 402.5 });
  // a resumed run repeats its start's warnings; the panel shows each once
  const fallback: TrainerEvent = { kind: 'warning', time: at(0), message: 'Training on the CPU: the GPU cannot be used (no NVIDIA driver).' };
  const resumed = reduceRun([started(), fallback, step(1, 2.8), started(1, 5), { ...fallback, time: at(5) }]);
  assert.deepEqual(resumed.warnings, [{ time: at(0), message: fallback.message }]);
  const old = reduceRun([started()]);
  assert.equal(old.start?.device, null);
  assert.equal(old.gpu, null);
  // what moves to host memory, after the budget in the details (runs from before activations moved say nothing of them)
  assert.equal(hostMemoryNote(device), ', optimizer paged to host memory');
  assert.equal(hostMemoryNote({ ...device, offloadedBlockInputs: 30 }), ', optimizer paged and 30 block inputs offloaded to host memory');
  assert.equal(hostMemoryNote({ ...device, pagedOptimizer: false, offloadedBlockInputs: 1 }), ', 1 block input offloaded to host memory');
  assert.equal(hostMemoryNote({ ...device, pagedOptimizer: false }), '');
});

test('a failed run shows its error, step and the checkpoint resume continues from', () => {
  const v = reduceRun([
    started(), step(1, 2.8), step(2, 9.5), step(3, Number.NaN),
    { kind: 'error', time: at(4), message: 'loss diverged (NaN) at step 3', step: 3, lastCheckpoint: '/runs/r1/checkpoints/step-2' },
    { kind: 'finished', time: at(4), status: 'failed', step: 3, adapterPath: null, finalLoss: null, elapsedSeconds: 4 },
  ]);
  assert.equal(v.status, 'failed');
  assert.deepEqual(v.error, { message: 'loss diverged (NaN) at step 3', step: 3, lastCheckpoint: '/runs/r1/checkpoints/step-2' });
  assert.ok(Number.isNaN(v.header.loss));
  assert.equal(v.end?.adapterPath, null);
});

test('an error event alone (no finished: the process died) already marks the run failed', () => {
  const v = reduceRun([started(), step(1, 2.8), { kind: 'error', time: at(2), message: 'out of memory', step: 1, lastCheckpoint: null }]);
  assert.equal(v.status, 'failed');
  assert.equal(v.error?.message, 'out of memory');
});

test('a resumed run redraws from its checkpoint: the old attempt past it is cut, the new one continues', () => {
  const v = reduceRun([
    started(), step(1, 2.8), memory(1, 1e6), step(2, 2.5),
    { kind: 'checkpoint', time: at(2.5), step: 2, path: '/runs/r1/checkpoints/step-2' },
    step(3, 2.2), memory(3, 1e6), { kind: 'eval', time: at(3.1), step: 3, evalLoss: 2.4, evalTokens: 10 },
    { kind: 'finished', time: at(4), status: 'stopped', step: 3, adapterPath: '/runs/r1/adapter', finalLoss: 2.2, elapsedSeconds: 4 },
    started(2, 100), step(3, 2.15, 101),
  ]);
  assert.equal(v.status, 'running');
  assert.equal(v.end, null);
  assert.deepEqual(v.series.loss.map((p) => [p.x, p.y]), [[1, 2.8], [2, 2.5], [3, 2.15]]);
  assert.deepEqual(v.series.evalLoss, []);
  assert.equal(v.header.evalLoss, null);
  assert.deepEqual(v.series.memory.weights.map((p) => p.x), [1]);
  assert.deepEqual(v.checkpoints.map((c) => c.step), [2]);
  assert.equal(v.start?.resumedFrom, 2);
  assert.equal(v.header.step, 3);
});

test('buttons follow the run status', () => {
  assert.deepEqual(availableActions(null, false), ['newFinetune']);
  assert.deepEqual(availableActions('running', true), ['stop', 'openFolder']);
  assert.deepEqual(availableActions('stopped', true), ['resume', 'try', 'export', 'merge', 'gguf', 'openFolder']);
  assert.deepEqual(availableActions('failed', true), ['resume', 'openFolder']);
  assert.deepEqual(availableActions('finished', true), ['try', 'export', 'merge', 'gguf', 'openFolder']);
  assert.deepEqual(availableActions(null, true), ['openFolder']);
});

test('number formatting for the header, counters and ticks', () => {
  assert.equal(formatBytes(0), '0 B');
  assert.equal(formatBytes(1536), '1.50 KiB');
  assert.equal(formatBytes(1.3 * GiB), '1.30 GiB');
  assert.equal(formatBytes(150 * 1024 ** 2), '150 MiB');
  assert.equal(formatDuration(45), '45s');
  assert.equal(formatDuration(185), '3m 05s');
  assert.equal(formatDuration(7620), '2h 07m');
  assert.equal(formatNumber(2.34567), '2.346');
  assert.equal(formatNumber(null), '–');
  assert.equal(formatNumber(Number.NaN), 'NaN');
  assert.equal(formatNumber(1.5e-5), '1.500e-5');
  assert.equal(formatRate(2e-4), '2.00e-4');
  assert.equal(formatCount(6_815_744), '6,815,744');
});

test('byte axes tick at round binary sizes from zero past the data, in at most six steps', () => {
  const MiB = 1024 ** 2;
  // the CPU run of the e2e screenshots: chart.js's decimal ticks read 488 KiB, 977 KiB, 1.43 MiB ... 4.77 MiB
  const memory = binaryByteTicks(0, 4.6 * MiB);
  assert.deepEqual(memory, [0, 1, 2, 3, 4, 5].map((n) => n * MiB));
  assert.deepEqual(memory.map(formatByteTick), ['0 B', '1 MiB', '2 MiB', '3 MiB', '4 MiB', '5 MiB']);
  assert.deepEqual(binaryByteTicks(0, 1.4 * MiB).map(formatByteTick), ['0 B', '256 KiB', '512 KiB', '768 KiB', '1 MiB', '1.25 MiB', '1.5 MiB']);
  // an 80 GB card's total over a 20 GiB run
  assert.deepEqual(binaryByteTicks(0, 79.6 * GiB).map(formatByteTick), ['0 B', '16 GiB', '32 GiB', '48 GiB', '64 GiB', '80 GiB']);
  // off zero: both ends rounded out, and a step more where that would make seven
  assert.deepEqual(binaryByteTicks(3.1 * MiB, 5.9 * MiB).map((v) => v / MiB), [3, 3.5, 4, 4.5, 5, 5.5, 6]);
  assert.deepEqual(binaryByteTicks(2.9 * MiB, 5.9 * MiB).map((v) => v / MiB), [2, 3, 4, 5, 6]);
  for (const [lo, hi] of [[0, 1], [0, 0], [5, 5], [0, 3e9], [1e6, 1.000001e6], [0, 123456789]]) {
    const ticks = binaryByteTicks(lo, hi);
    const step = ticks[1] - ticks[0];
    assert.ok(ticks.length >= 2 && ticks.length <= 7, `${lo}..${hi}: ${ticks}`);
    assert.ok(ticks[0] <= lo && ticks[ticks.length - 1] >= hi, `${lo}..${hi}: ${ticks}`);
    assert.ok(Number.isInteger(Math.log2(step)) && step >= 1, `${lo}..${hi}: step ${step}`);
    assert.ok(ticks.every((v, i) => v === ticks[0] + i * step));
  }
  assert.deepEqual(binaryByteTicks(Number.NaN, 1), []);
  assert.equal(formatByteTick(1.5 * 1024), '1.5 KiB');
  assert.equal(formatByteTick(10 * GiB), '10 GiB');
  assert.equal(formatByteTick(100), '100 B');
});

test('theme: kind from the body classes, variables with fallbacks, translucent fills', () => {
  assert.equal(themeKind(['vscode-light']), 'light');
  assert.equal(themeKind(['vscode-dark']), 'dark');
  assert.equal(themeKind(['vscode-high-contrast']), 'high-contrast');
  assert.equal(themeKind(['vscode-high-contrast', 'vscode-high-contrast-light']), 'high-contrast-light');
  const vars: Record<string, string> = { '--vscode-charts-blue': ' #0000ff ', '--vscode-foreground': 'rgb(10, 20, 30)' };
  const p = readPalette((name) => vars[name] ?? '', 'light');
  assert.equal(p.blue, '#0000ff');
  assert.equal(p.foreground, 'rgb(10, 20, 30)');
  assert.match(p.red, /^#[0-9a-f]{6}$/i); // a fallback where the host defines nothing
  assert.equal(categoryColors(p).weights, p.blue);
  assert.equal(withAlpha('#0000ff', 0.5), 'rgba(0, 0, 255, 0.5)');
  assert.equal(withAlpha('#f00', 0.25), 'rgba(255, 0, 0, 0.25)');
  assert.equal(withAlpha('rgba(10, 20, 30, 1)', 0.4), 'rgba(10, 20, 30, 0.4)');
  assert.equal(withAlpha('red', 0.4), 'red');
  assert.equal(withAlpha('#0000ff', 0.5, 'high-contrast'), '#0000ff');
});

test('theme colours: translucent ones made opaque, high contrast gaps filled from the warning colour, the font', () => {
  assert.equal(opaque('rgba(234, 92, 0, 0.33)'), 'rgb(234, 92, 0)');
  assert.equal(opaque('rgb(234 92 0 / 0.5)'), 'rgb(234, 92, 0)');
  assert.equal(opaque('#ea5c0055'), '#ea5c00');
  assert.equal(opaque('#f008'), '#f00');
  assert.equal(opaque('#3794ff'), '#3794ff');
  assert.equal(opaque('red'), 'red');
  // Dark Modern: a 33% orange
  const dark = readPalette((n) => ({ '--vscode-charts-orange': 'rgba(234, 92, 0, 0.33)', '--vscode-font-family': ' "Segoe WPC", sans-serif', '--vscode-font-size': '15px' })[n] ?? '', 'dark');
  assert.equal(dark.orange, 'rgb(234, 92, 0)');
  assert.equal(dark.fontFamily, '"Segoe WPC", sans-serif');
  assert.equal(dark.fontSize, 15);
  // high contrast: no charts-orange; the warning colour stands in, unless it is the theme's yellow already
  const hc = { '--vscode-charts-yellow': '#ffd370', '--vscode-editorWarning-foreground': '#ff8800', '--vscode-descriptionForeground': 'rgba(255, 255, 255, 0.7)' } as Record<string, string>;
  const p = readPalette((n) => hc[n] ?? '', 'high-contrast');
  assert.equal(p.orange, '#ff8800');
  assert.equal(p.muted, 'rgb(255, 255, 255)');
  const same = readPalette((n) => ({ ...hc, '--vscode-editorWarning-foreground': '#ffd370' })[n] ?? '', 'high-contrast');
  assert.notEqual(same.orange, same.yellow);
  assert.notEqual(categoryColors(same).optimizer, categoryColors(same).gradients);
  // fallbacks follow the theme kind: dark text on light, light text on high contrast black
  assert.equal(readPalette(() => '', 'light').background, '#ffffff');
  assert.equal(readPalette(() => '', 'high-contrast').foreground, '#ffffff');
  assert.equal(readPalette(() => '', 'dark').fontSize, 13);
});

test('charts as text: the latest values of each chart for screen readers', () => {
  const s = chartSummaries(reduceRun(completedRun));
  assert.equal(s['loss-chart'], 'train loss 1.6 at step 6, from 2.8; eval loss 1.8 at step 6, from 2.3');
  assert.equal(s['lr-chart'], 'learning rate 1.00e-4 at step 6, from 1.83e-4');
  assert.equal(s['gradnorm-chart'], 'grad norm 0.36 at step 6, from 0.31');
  assert.equal(s['tps-chart'], 'tokens per second 806 at step 6, from 801');
  assert.equal(s['memory-chart'], 'at step 6: weights 1.00 GiB, adapters 19.1 MiB, gradients 19.1 MiB, optimizer 38.1 MiB, activations 85.8 MiB, workspace 7.63 MiB; peak 1.17 GiB; device 2.00 GiB used of 24.0 GiB');
  assert.equal(s['pages-chart'], '3 page moves: 91.6 MiB out, 61.0 MiB in; the latest 6s into the run');
  const empty = chartSummaries(emptyView());
  assert.equal(empty['loss-chart'], 'no data yet');
  assert.equal(empty['memory-chart'], 'no data yet');
  assert.equal(empty['pages-chart'], 'no memory paging');
  // one step so far: no "from"
  assert.equal(chartSummaries(reduceRun([started(), step(1, 2.8)]))['loss-chart'], 'train loss 2.8 at step 1');
});

test('status changes said once: finished with its final loss, stopped at its step, failed', () => {
  const done = reduceRun(completedRun);
  assert.equal(statusAnnouncement('run1', 'finished', done), 'run1 finished, final loss 1.6');
  assert.equal(statusAnnouncement('run1', 'running', reduceRun([started(), step(1, 2.8)])), 'run1 running');
  assert.equal(statusAnnouncement('run1', 'stopped', reduceRun([started(), step(1, 2.8), step(2, 2.5)])), 'run1 stopped at step 2');
  assert.equal(statusAnnouncement('run1', 'failed', emptyView()), 'run1 failed');
  assert.equal(statusAnnouncement('run1', 'finished', emptyView()), 'run1 finished');
});
