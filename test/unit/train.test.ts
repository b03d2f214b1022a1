// Training runs end to end on a tiny model: the loss falls on every dataset shape in every file format (BOM and
// CRLF included) and a PEFT adapter comes out; a stopped run resumed gives exactly the uninterrupted run's
// adapter; kill -9 then resume finishes with at most one checkpoint interval lost; bad inputs stop the CLI with
// one sentence and leave no run folder; stop over IPC writes a final checkpoint.
import assert from 'node:assert/strict';
import { fork, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { before, test } from 'node:test';
import { EngineModel } from '../../extension/engine';
import { estimateMemory } from '../../extension/engine/tools';
import { parseEventLog, type PreparingMessage, type TrainerEvent } from '../../extension/protocol/events';
import { resolveConfig, type TrainConfig } from '../../extension/trainer/config';
import { makeTinyModel } from '../../extension/trainer/tinyModel/makeTinyModel';
import { train, TrainingControl } from '../../extension/trainer/train';
import { reduceRun } from '../../webview/model';
import { dataFixtures, shapeRows, toCsv } from '../fixtures/data/helpers';
import { cliPath, repoRoot, tempDir } from '../helpers/paths';

let model = '';
before(() => {
  model = path.join(tempDir('train-model'), 'tiny');
  makeTinyModel({ out: model, arch: 'llama', seed: 5 });
});

function config(data: string, overrides: Partial<TrainConfig> = {}): TrainConfig {
  return resolveConfig(
    {},
    { model, data, preset: 'quick', rank: 8, lr: 0.02, batchSize: 2, gradAccum: 1, seqLen: 96, maxSteps: 25, warmupSteps: 0, evalFraction: 0, checkpointEvery: 0, evalEvery: 0, ...overrides },
  );
}

function events(runDir: string): TrainerEvent[] {
  return parseEventLog(fs.readFileSync(path.join(runDir, 'events.jsonl'), 'utf8')).events;
}

function losses(runDir: string): number[] {
  return events(runDir).flatMap((e) => (e.kind === 'step' ? [e.loss] : []));
}

const shapes = ['messages', 'sharegpt', 'alpaca', 'completion', 'text'] as const;
const rows = shapeRows();

function dataFile(shape: (typeof shapes)[number], format: string): string {
  const dir = tempDir(`data-${shape}`);
  const r = rows[shape];
  switch (format) {
    case 'jsonl':
      // A byte-order mark, CRLF line ends and a blank line: files as Windows editors write them.
      return write(path.join(dir, 'train.jsonl'), '\uFEFF' + r.map((x) => JSON.stringify(x)).join('\r\n') + '\r\n\r\n');
    case 'json':
      return write(path.join(dir, 'train.json'), JSON.stringify({ data: r }, null, 2));
    case 'csv':
      return write(path.join(dir, 'train.csv'), '\uFEFF' + toCsv(r, '\r\n'));
    default:
      return path.join(dataFixtures, `${shape}.parquet`);
  }
}

function write(file: string, text: string): string {
  fs.writeFileSync(file, text);
  return file;
}

for (const shape of shapes) {
  test(`train learns on ${shape} data in JSONL, JSON, CSV and Parquet`, async () => {
    for (const format of ['jsonl', 'json', 'csv', 'parquet']) {
      const runDir = path.join(tempDir(`run-${shape}-${format}`), 'run');
      const outcome = await train({ runDir, config: config(dataFile(shape, format)), resume: false });
      assert.equal(outcome.status, 'completed');
      const l = losses(runDir);
      assert.equal(l.length, 25);
      assert.ok(l[l.length - 1] < 0.5 * l[0], `${format}: loss ${l[0]} -> ${l[l.length - 1]}`);
      const adapter = path.join(runDir, 'adapter');
      const cfg = JSON.parse(fs.readFileSync(path.join(adapter, 'adapter_config.json'), 'utf8'));
      assert.equal(cfg.peft_type, 'LORA');
      assert.equal(cfg.base_model_name_or_path, model);
      const started = events(runDir).find((e) => e.kind === 'run-started');
      assert.ok(started && started.kind === 'run-started' && started.dataset.shape === shape);
      assert.ok(started.memoryEstimate && started.memoryEstimate.peakTotal > 0);
      assert.equal(started.device?.kind, 'cpu');
      assert.equal(started.device?.memoryBudget, null);
    }
  });
}

test('memory events report each interval\'s high-water mark by category, activations included', async () => {
  const runDir = path.join(tempDir('run-memory'), 'run');
  await train({ runDir, config: config(dataFile(shapes[0], 'jsonl')), resume: false });
  const memory = events(runDir).flatMap((e) => (e.kind === 'memory' ? [e] : []));
  assert.ok(memory.length >= 2);
  for (const m of memory) {
    const sum = Object.values(m.highWater).reduce((a, b) => a + b, 0);
    assert.equal(sum, m.highWaterTotal);
    assert.ok(m.highWaterTotal <= m.totalPeak);
    assert.ok(m.highWater.activations > 0, `step ${m.step}: a training step holds activations at its high point`);
    assert.equal(m.current.activations, 0, 'between steps the activations are freed');
    assert.equal(m.highWater.weights, m.current.weights);
  }
  // The lifetime peak is the highest of the interval marks.
  const last = memory[memory.length - 1];
  assert.equal(last.totalPeak, Math.max(...memory.map((m) => m.highWaterTotal)));
});

test('under a memory budget the optimizer pages out and back in every step, with the same losses and adapter', async () => {
  const data = path.join(repoRoot, 'examples', 'chat-sample.jsonl');
  // packed sequences are all seqLen long, so every step reaches the estimate's peak
  const c = config(data, { packing: true, seqLen: 64, batchSize: 2, maxSteps: 6 });
  const e = estimateMemory(model, { batch: 2, seq: 64, rank: 8, quantize: c.quantize, loraDropout: c.dropout });
  const free = path.join(tempDir('budget-free'), 'run');
  await train({ runDir: free, config: c, resume: false, placement: { device: 'cpu' } });
  const paged = path.join(tempDir('budget-paged'), 'run');
  const budget = e.peakTotal - e.categories.optimizer / 2;
  await train({ runDir: paged, config: c, resume: false, placement: { device: 'cpu', memoryBudgetBytes: budget } });

  assert.deepEqual(losses(paged), losses(free));
  const read = (run: string) => fs.readFileSync(path.join(run, 'adapter', 'adapter_model.safetensors'));
  assert.ok(read(paged).equals(read(free)), 'paging changes where the optimizer state is, never the numbers');
  const started = events(paged).find((e) => e.kind === 'run-started');
  assert.deepEqual(started?.kind === 'run-started' && started.device, { kind: 'cpu', name: started?.kind === 'run-started' ? started.device?.name : '', computeDtype: 'f32', memoryBudget: budget, pagedOptimizer: true, offloadedBlockInputs: 0 });
  const pages = events(paged).flatMap((e) => (e.kind === 'page' ? [e] : []));
  assert.equal(events(free).filter((e) => e.kind === 'page').length, 0);
  // the optimizer state comes into being at the first update, so steps 2 to 6 each move a page out and back in
  assert.deepEqual([pages.filter((p) => p.dir === 'out').length, pages.filter((p) => p.dir === 'in').length], [5, 5]);
  for (const p of pages) {
    assert.match(p.tensor, /^model\.layers\.\d+\.optimizer$/);
    assert.equal(p.bytes, e.optimizerPageBytes);
    assert.ok(p.ms >= 0);
  }
  const memory = events(paged).flatMap((e) => (e.kind === 'memory' ? [e] : []));
  for (const m of memory) assert.ok(m.totalPeak <= budget, `peak ${m.totalPeak} over the budget ${budget}`);
});

test('under a budget below the step without its optimizer state, block inputs move to host memory too, with the same numbers', async () => {
  // four layers: the inputs of blocks 0 and 1 can move; a budget half of that short moves block 0's, out as forward
  // writes it and back as backward reaches it
  const small = path.join(tempDir('offload-model'), 'small');
  makeTinyModel({ out: small, arch: 'llama', seed: 5, size: 'small' });
  const data = path.join(repoRoot, 'examples', 'chat-sample.jsonl');
  const c = resolveConfig({}, { ...config(data, { packing: true, seqLen: 64, batchSize: 2, maxSteps: 3 }), model: small });
  const e = estimateMemory(small, { batch: 2, seq: 64, rank: 8, quantize: c.quantize, loraDropout: c.dropout });
  assert.ok(e.offloadableActivationBytes > 0 && e.activationPageBytes === 2 * 64 * 512 * 4);
  const free = path.join(tempDir('offload-free'), 'run');
  await train({ runDir: free, config: c, resume: false, placement: { device: 'cpu' } });
  const offloaded = path.join(tempDir('offload-tight'), 'run');
  const budget = e.peakTotal - e.categories.optimizer - e.offloadableActivationBytes / 2;
  await train({ runDir: offloaded, config: c, resume: false, placement: { device: 'cpu', memoryBudgetBytes: budget } });

  assert.deepEqual(losses(offloaded), losses(free));
  const read = (run: string) => fs.readFileSync(path.join(run, 'adapter', 'adapter_model.safetensors'));
  assert.ok(read(offloaded).equals(read(free)), 'offloading changes where the block inputs are, never the numbers');
  const started = events(offloaded).find((ev) => ev.kind === 'run-started');
  assert.equal(started?.kind === 'run-started' && started.device?.offloadedBlockInputs, 1);
  // the estimate it reports is of the step with that input moved
  assert.equal(started?.kind === 'run-started' && started.memoryEstimate?.peakTotal, e.peakTotal - e.activationPageBytes);
  const inputs = events(offloaded).flatMap((ev) => (ev.kind === 'page' && ev.tensor.endsWith('.input') ? [ev] : []));
  // three steps, one block input out and back in each
  assert.deepEqual([inputs.filter((p) => p.dir === 'out').length, inputs.filter((p) => p.dir === 'in').length], [3, 3]);
  for (const p of inputs) {
    assert.equal(p.tensor, 'model.layers.0.input');
    assert.equal(p.bytes, e.activationPageBytes);
  }
  for (const m of events(offloaded).flatMap((ev) => (ev.kind === 'memory' ? [ev] : []))) assert.ok(m.totalPeak <= budget, `peak ${m.totalPeak} over the budget ${budget}`);
});

test('checkpoints do not depend on where the optimizer state was: a paged run resumes without a budget to the same adapter', async () => {
  const data = path.join(repoRoot, 'examples', 'chat-sample.jsonl');
  const c = config(data, { packing: true, seqLen: 64, batchSize: 2, maxSteps: 6, checkpointEvery: 2 });
  const e = estimateMemory(model, { batch: 2, seq: 64, rank: 8, quantize: c.quantize, loraDropout: c.dropout });
  const straight = path.join(tempDir('paged-straight'), 'run');
  await train({ runDir: straight, config: c, resume: false, placement: { device: 'cpu' } });
  const paged = path.join(tempDir('paged-resumed'), 'run');
  const control = new TrainingControl();
  await train({ runDir: paged, config: c, resume: false, control, placement: { device: 'cpu', memoryBudgetBytes: e.peakTotal - e.categories.optimizer / 2 }, onEvent: (ev) => { if (ev.kind === 'step' && ev.step === 3) control.stopRequested = true; } });
  assert.ok(events(paged).some((ev) => ev.kind === 'page'), 'the first part paged');
  const done = await train({ runDir: paged, resume: true, placement: { device: 'cpu' } });
  assert.equal(done.status, 'completed');
  const read = (run: string) => fs.readFileSync(path.join(run, 'adapter', 'adapter_model.safetensors'));
  assert.ok(read(paged).equals(read(straight)));
});

test('a budget nothing fits in stops the run before its first step with the estimate and what to change', async () => {
  const data = path.join(repoRoot, 'examples', 'chat-sample.jsonl');
  const runDir = path.join(tempDir('budget-small'), 'run');
  const e = estimateMemory(model, { batch: 2, seq: 96, rank: 8 });
  await assert.rejects(
    train({ runDir, config: config(data), resume: false, placement: { device: 'cpu', memoryBudgetBytes: e.categories.weights + e.categories.adapters + e.categories.gradients } }),
    (err: Error) => /^This run needs at least .* of device memory and its budget is .*: weights .*To fit: lower the batch size \(now 2\) or the sequence length \(now 96\)/.test(err.message),
  );
  assert.ok(!fs.existsSync(runDir), 'nothing was written');
});

test('a stopped run resumed computes exactly what the uninterrupted run computes', async () => {
  const data = path.join(repoRoot, 'examples', 'chat-sample.jsonl');
  const c = config(data, { batchSize: 4, gradAccum: 2, maxSteps: 8, dropout: 0.1, checkpointEvery: 3, evalFraction: 0.1, evalEvery: 4 });
  const straight = path.join(tempDir('straight'), 'run');
  await train({ runDir: straight, config: c, resume: false });

  const interrupted = path.join(tempDir('interrupted'), 'run');
  const control = new TrainingControl();
  const first = await train({ runDir: interrupted, config: c, resume: false, control, onEvent: (e) => { if (e.kind === 'step' && e.step === 5) control.stopRequested = true; } });
  assert.equal(first.status, 'stopped');
  assert.equal(first.step, 5);
  assert.ok(fs.existsSync(path.join(interrupted, 'checkpoints', 'step-5', 'DONE')), 'stopping writes a final checkpoint');
  assert.ok(fs.existsSync(path.join(interrupted, 'adapter', 'adapter_model.safetensors')), 'a stop writes the final adapter');
  let adapterWhileResumed: boolean | undefined;
  const second = await train({ runDir: interrupted, resume: true, onEvent: (e) => { if (e.kind === 'step') adapterWhileResumed ??= fs.existsSync(path.join(interrupted, 'adapter')); } });
  assert.equal(adapterWhileResumed, false, 'the stop\'s adapter goes once the resumed run trains past it (a kill then leaves the checkpoints)');
  assert.equal(second.status, 'completed');
  assert.equal(second.step, 8);
  const read = (run: string) => fs.readFileSync(path.join(run, 'adapter', 'adapter_model.safetensors'));
  assert.ok(read(straight).equals(read(interrupted)), 'the resumed adapter equals the uninterrupted one byte for byte');
  assert.deepEqual(losses(interrupted), losses(straight));
  const resumed = events(interrupted).filter((e) => e.kind === 'run-started');
  assert.deepEqual(resumed.map((e) => e.kind === 'run-started' && e.resumedFrom), [null, 5]);
  // keepCheckpoints (3) bounds what stays on disk.
  assert.ok(fs.readdirSync(path.join(interrupted, 'checkpoints')).length <= 3);
});

test('a run killed before its first checkpoint starts over on resume, from step 0, and its chart draws each step once; a torn last log line is cut off', async () => {
  const data = path.join(repoRoot, 'examples', 'chat-sample.jsonl');
  const runDir = path.join(tempDir('start-over'), 'run');
  await train({ runDir, config: config(data, { maxSteps: 4 }), resume: false });
  // as a kill before the first checkpoint leaves it: steps logged, no checkpoint, no adapter, and half a line
  fs.rmSync(path.join(runDir, 'checkpoints'), { recursive: true, force: true });
  fs.rmSync(path.join(runDir, 'adapter'), { recursive: true, force: true });
  const file = path.join(runDir, 'events.jsonl');
  const lines = fs.readFileSync(file, 'utf8').split('\n').filter((l) => l !== '' && !l.includes('"kind":"finished"'));
  fs.writeFileSync(file, lines.join('\n') + '\n{"kind":"step","step":5,"lo');
  const again = await train({ runDir, resume: true });
  assert.equal(again.status, 'completed');
  const all = events(runDir); // parses: the fragment was cut off, not glued to the next event
  assert.deepEqual(all.filter((e) => e.kind === 'run-started').map((e) => e.kind === 'run-started' && e.resumedFrom), [null, 0]);
  assert.deepEqual(reduceRun(all).series.loss.map((p) => p.x), [1, 2, 3, 4]);
});

test('steps stay within an epoch; a run checkpointed before that keeps taking micro-batches across epoch ends when resumed', async () => {
  // 60 examples in batches of 4: 15 micro-batches an epoch; 4 a step: the epoch's last step takes 3
  const data = path.join(repoRoot, 'examples', 'chat-sample.jsonl');
  const c = config(data, { batchSize: 4, gradAccum: 4, maxSteps: null, epochs: 2, checkpointEvery: 2 });
  const runDir = path.join(tempDir('batch-layout'), 'run');
  const stopAt = (n: number) => {
    const control = new TrainingControl();
    return { control, onEvent: (e: TrainerEvent) => { if (e.kind === 'step' && e.step === n) control.stopRequested = true; } };
  };
  const state = (step: number) => JSON.parse(fs.readFileSync(path.join(runDir, 'checkpoints', `step-${step}`, 'trainer_state.json'), 'utf8')) as Record<string, unknown>;
  await train({ runDir, config: c, resume: false, ...stopAt(5) });
  assert.deepEqual([state(4).microBatchesDone, state(4).epoch, state(4).batchLayout], [15, 1, 'epochs']);
  assert.deepEqual([state(5).microBatchesDone, state(5).batchLayout], [19, 'epochs']);
  // a checkpoint written before batchLayout was kept: its run went on across epoch ends
  fs.rmSync(path.join(runDir, 'checkpoints', 'step-5'), { recursive: true });
  const old = state(4);
  delete old.batchLayout;
  fs.writeFileSync(path.join(runDir, 'checkpoints', 'step-4', 'trainer_state.json'), JSON.stringify({ ...old, microBatchesDone: 16, epoch: 16 / 15 }));
  await train({ runDir, resume: true, ...stopAt(5) });
  assert.deepEqual([state(5).microBatchesDone, state(5).batchLayout], [20, 'continuous']);
});

test('before its run starts the trainer says what it prepares: the data tokenized so far, then the model loading', async () => {
  const data = path.join(repoRoot, 'examples', 'chat-sample.jsonl');
  const messages: PreparingMessage[] = [];
  let startedAfter = -1;
  await train({
    runDir: path.join(tempDir('preparing'), 'run'), config: config(data, { maxSteps: 1 }), resume: false,
    onPreparing: (m) => messages.push(m), onEvent: (e) => { if (e.kind === 'run-started') startedAfter = messages.length; },
  });
  assert.deepEqual(messages.at(-2), { kind: 'preparing', stage: 'data', done: 60, total: 60 });
  assert.deepEqual(messages.at(-1), { kind: 'preparing', stage: 'model', done: null, total: null });
  assert.ok(messages.every((m, i) => i === 0 || m.stage === 'model' || (m.done ?? 0) >= (messages[i - 1].done ?? 0)), 'counts only grow');
  assert.equal(startedAfter, messages.length, 'all of it before run-started');
});

test('a stop asked for while the data is prepared ends a new run before anything is written, and leaves a resumed one as it was', async () => {
  const data = path.join(repoRoot, 'examples', 'chat-sample.jsonl');
  const stopWhilePreparing = () => {
    const control = new TrainingControl();
    return { control, onPreparing: () => (control.stopRequested = true) };
  };
  const runDir = path.join(tempDir('stop-preparing'), 'run');
  const fresh = await train({ runDir, config: config(data), resume: false, ...stopWhilePreparing() });
  assert.deepEqual([fresh.status, fresh.step, fresh.beforeStart], ['stopped', 0, true]);
  assert.equal(fs.existsSync(runDir), false, 'no run folder');
  await train({ runDir, config: config(data, { maxSteps: 2 }), resume: false });
  const log = fs.readFileSync(path.join(runDir, 'events.jsonl'), 'utf8');
  const resumed = await train({ runDir, resume: true, ...stopWhilePreparing() });
  assert.deepEqual([resumed.status, resumed.step, resumed.beforeStart], ['stopped', 2, true]);
  assert.equal(fs.readFileSync(path.join(runDir, 'events.jsonl'), 'utf8'), log);
});

test('a run resumed on data that changed since its checkpoint says so, and one on the same data does not', async () => {
  const dir = tempDir('changed-data');
  const data = path.join(dir, 'train.jsonl');
  fs.copyFileSync(path.join(repoRoot, 'examples', 'chat-sample.jsonl'), data);
  const runDir = path.join(dir, 'run');
  const warnings = () => events(runDir).flatMap((e) => (e.kind === 'warning' ? [e.message] : []));
  const stopAt = (n: number) => {
    const control = new TrainingControl();
    return { control, onEvent: (e: TrainerEvent) => { if (e.kind === 'step' && e.step === n) control.stopRequested = true; } };
  };
  await train({ runDir, config: config(data, { maxSteps: 6 }), resume: false, ...stopAt(2) });
  await train({ runDir, resume: true, ...stopAt(4) });
  assert.deepEqual(warnings().filter((w) => w.includes('training data')), []);
  fs.appendFileSync(data, JSON.stringify({ messages: [{ role: 'user', content: 'new?' }, { role: 'assistant', content: 'yes' }] }) + '\n');
  const resumed = await train({ runDir, resume: true });
  assert.equal(resumed.status, 'completed');
  assert.deepEqual(warnings().filter((w) => w.includes('training data')), [`the training data is not what it was at checkpoint step 4 (${data} changed, or the model's tokenizer or chat template did); the run goes on with the data as it is now`]);
});

function cliTrainArgs(data: string, runDir: string, extra: string[] = []): string[] {
  return [cliPath, 'train', '--model', model, '--data', data, '--out', runDir, '--preset', 'quick', '--rank', '8', '--lr', '0.01',
    '--batch-size', '4', '--seq-len', '96', '--max-steps', '30', '--checkpoint-every', '3', '--eval-every', '0', '--json', ...extra];
}

test('kill -9 during training, then resume, finishes with the adapter of an uninterrupted run', async () => {
  const data = path.join(repoRoot, 'examples', 'chat-sample.jsonl');
  const reference = path.join(tempDir('ref'), 'run');
  assert.equal(spawnSync(process.execPath, cliTrainArgs(data, reference)).status, 0);

  const runDir = path.join(tempDir('killed'), 'run');
  const child = spawn(process.execPath, cliTrainArgs(data, runDir), { stdio: 'ignore' });
  // Kill it as soon as a second checkpoint exists, mid-way through the steps that follow.
  await new Promise<void>((resolve, reject) => {
    const timer = setInterval(() => {
      const file = path.join(runDir, 'events.jsonl');
      const text = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
      if ((text.match(/"kind":"checkpoint"/g) ?? []).length >= 2) {
        child.kill('SIGKILL');
        clearInterval(timer);
        resolve();
      }
    }, 5);
    child.on('exit', () => {
      clearInterval(timer);
      reject(new Error('the trainer finished before it could be killed'));
    });
  });
  await new Promise((resolve) => child.on('exit', resolve));
  for (const name of fs.readdirSync(path.join(runDir, 'checkpoints')))
    assert.ok(name.includes('.tmp-') || fs.existsSync(path.join(runDir, 'checkpoints', name, 'DONE')), `${name} is a complete checkpoint or a temp folder`);
  const stepsBefore = losses(runDir).length;
  const resumed = spawnSync(process.execPath, [cliPath, 'resume', '--run', runDir, '--json'], { encoding: 'utf8' });
  assert.equal(resumed.status, 0, resumed.stderr);
  assert.equal(JSON.parse(resumed.stdout).status, 'completed');
  const started = events(runDir).filter((e) => e.kind === 'run-started');
  const from = started[1].kind === 'run-started' ? started[1].resumedFrom! : -1;
  assert.ok(from >= 6 && stepsBefore - from <= 3, `resumed from ${from} after ${stepsBefore} steps: at most one interval lost`);
  const read = (run: string) => fs.readFileSync(path.join(run, 'adapter', 'adapter_model.safetensors'));
  assert.ok(read(runDir).equals(read(reference)));
  const m = EngineModel.load(model, { quantize: true });
  m.loadAdapter(path.join(runDir, 'adapter'));
  m.dispose();
});

test('bad input stops train with one sentence, exit 1, and no run folder', () => {
  const dir = tempDir('bad');
  const broken = write(path.join(dir, 'train.jsonl'), '{"text": "ok"}\n{"text": "cut\n');
  const role = write(path.join(dir, 'roles.jsonl'), JSON.stringify({ messages: [{ role: 'robot', content: 'x' }, { role: 'assistant', content: 'y' }] }) + '\n');
  const empty = write(path.join(dir, 'empty.jsonl'), '');
  const binary = path.join(dir, 'blob.jsonl');
  fs.writeFileSync(binary, Buffer.from([0, 1, 2, 0xff, 0xfe, 0]));
  const unknownShape = write(path.join(dir, 'shape.jsonl'), '{"question": "q", "answer": "a"}\n');
  const notModel = tempDir('not-a-model');
  const truncated = path.join(tempDir('truncated'), 'model');
  fs.cpSync(model, truncated, { recursive: true });
  const weights = path.join(truncated, 'model.safetensors');
  fs.writeFileSync(weights, fs.readFileSync(weights).subarray(0, 5000));
  const cases: [string[], string | RegExp][] = [
    [['--data', broken], 'train.jsonl line 2: not valid JSON'],
    [['--data', role], /roles.jsonl line 1: .*role "robot"/],
    [['--data', empty], 'empty.jsonl'],
    [['--data', binary], 'blob.jsonl'],
    [['--data', unknownShape], 'shape.jsonl'],
    [['--data', path.join(dir, 'missing.jsonl')], `qlora-studio: missing.jsonl: file not found (${path.join(dir, 'missing.jsonl')})`],
    [['--data', path.join(repoRoot, 'examples', 'chat-sample.jsonl'), '--model', notModel], 'no config.json'],
    [['--data', path.join(repoRoot, 'examples', 'chat-sample.jsonl'), '--model', truncated], weights],
  ];
  for (const [args, fragment] of cases) {
    const runDir = path.join(tempDir('bad-run'), 'run');
    const base = cliTrainArgs('unused', runDir).filter((a) => a !== '--json');
    const argv = [...base];
    for (let i = 0; i < args.length; i += 2) argv[argv.indexOf(args[i]) + 1] = args[i + 1];
    const r = spawnSync(process.execPath, argv, { encoding: 'utf8' });
    assert.equal(r.status, 1, `${args.join(' ')}: ${r.stderr}`);
    // what it was preparing may come first ("tokenizing the data: ..."); the error is one sentence
    const lines = r.stderr.split('\n').filter((l) => l !== '');
    const firstLine = lines.find((l) => l.startsWith('qlora-studio: ')) ?? lines[0];
    assert.ok(lines.every((l) => l === firstLine || /^(tokenizing the data|loading the model|run ")/.test(l)), r.stderr);
    if (typeof fragment === 'string') assert.ok(firstLine.includes(fragment), `${firstLine} lacks ${fragment}`);
    else assert.match(firstLine, fragment);
    assert.ok(!/\n\s+at /.test(r.stderr), 'no stack trace');
    assert.ok(!fs.existsSync(runDir), `no run folder left for ${args.join(' ')}`);
  }
});

test('stop over IPC ends the run with a final checkpoint and events over IPC', async () => {
  const runDir = path.join(tempDir('ipc'), 'run');
  const data = path.join(repoRoot, 'examples', 'chat-sample.jsonl');
  const args = cliTrainArgs(data, runDir, []).slice(1).map((a) => (a === '30' ? '1000' : a));
  const child = fork(cliPath, args, { stdio: ['ignore', 'ignore', 'ignore', 'ipc'] });
  const received: TrainerEvent[] = [];
  child.on('message', (m) => {
    received.push(m as TrainerEvent);
    if ((m as TrainerEvent).kind === 'step' && (m as { step: number }).step === 4) child.send({ kind: 'stop' });
  });
  const code = await new Promise((resolve) => child.on('exit', resolve));
  assert.equal(code, 0);
  const finished = received.find((e) => e.kind === 'finished');
  assert.ok(finished && finished.kind === 'finished' && finished.status === 'stopped');
  assert.ok(finished.step >= 4 && finished.step < 1000);
  assert.ok(fs.existsSync(path.join(runDir, 'checkpoints', `step-${finished.step}`, 'DONE')));
  // and before them, what it prepared (not events: the host shows them while the run starts)
  const preparing = received.filter((e) => (e.kind as string) === 'preparing');
  assert.deepEqual(preparing.at(-1), { kind: 'preparing', stage: 'model', done: null, total: null });
  assert.deepEqual(received.filter((e) => (e.kind as string) !== 'preparing').map((e) => e.kind), events(runDir).map((e) => e.kind), 'IPC carries the same events as events.jsonl');
});

test('a stop asked for during an eval ends it between micro-batches: no eval event, no samples, a checkpoint at that step', async () => {
  const dir = tempDir('stop-in-eval');
  // 2,000 rows, 1,000 held out and scored one a micro-batch: an eval far longer than a message takes to arrive
  const rows = Array.from({ length: 2000 }, (_, i) => JSON.stringify({ messages: [{ role: 'user', content: `What is ${i} plus one?` }, { role: 'assistant', content: `It is ${i + 1}.` }] }));
  const data = write(path.join(dir, 'train.jsonl'), rows.join('\n') + '\n');
  const settings = write(path.join(dir, 'train.json'), JSON.stringify({ evalFraction: 0.5, evalMaxExamples: 1000 }));
  const runDir = path.join(dir, 'run');
  const args = cliTrainArgs(data, runDir, ['--config', settings, '--eval-every', '2', '--batch-size', '1', '--sample-prompt', 'Hello']).slice(1);
  const child = fork(cliPath, args, { stdio: ['ignore', 'ignore', 'ignore', 'ipc'] });
  child.on('message', (m) => {
    // sent as the eval of step 2 begins; the trainer hears it at its next micro-batch
    if ((m as TrainerEvent).kind === 'step' && (m as { step: number }).step === 2) child.send({ kind: 'stop' });
  });
  const code = await new Promise((resolve) => child.on('exit', resolve));
  assert.equal(code, 0);
  const log = events(runDir);
  const finished = log.find((e) => e.kind === 'finished');
  assert.ok(finished && finished.kind === 'finished' && finished.status === 'stopped' && finished.step === 2, JSON.stringify(finished));
  assert.deepEqual(log.filter((e) => e.kind === 'eval'), [], 'the eval was left unfinished');
  assert.deepEqual(log.filter((e) => e.kind === 'sample').map((e) => e.step), [0], 'samples at the start only');
  const started = log.find((e) => e.kind === 'run-started');
  assert.ok(started && started.kind === 'run-started' && started.dataset.evalExamples === 1000 && started.dataset.trainExamples === 1000);
  assert.ok(fs.existsSync(path.join(runDir, 'checkpoints', 'step-2', 'DONE')));
});

test('a trainer whose host went away stops with a checkpoint and no final eval; meanwhile its folder is locked', async () => {
  const runDir = path.join(tempDir('orphan'), 'run');
  const data = path.join(repoRoot, 'examples', 'chat-sample.jsonl');
  const args = cliTrainArgs(data, runDir, ['--eval-every', '2']).slice(1).map((a) => (a === '30' ? '1000' : a));
  const child = fork(cliPath, args, { stdio: ['ignore', 'ignore', 'pipe', 'ipc'] });
  let refusal = '';
  child.on('message', (m) => {
    if ((m as TrainerEvent).kind !== 'step' || (m as { step: number }).step !== 3) return;
    // a second trainer on the same folder, while this one trains, is refused at once
    const second = spawnSync(process.execPath, [cliPath, 'resume', '--run', runDir], { encoding: 'utf8' });
    refusal = second.stderr.split('\n')[0];
    child.disconnect();
  });
  const code = await new Promise((resolve) => child.on('exit', resolve));
  assert.equal(code, 0);
  assert.match(refusal, new RegExp(`is being trained by process ${child.pid} \\(started .*\\); stop that run first`));
  const log = events(runDir);
  const finished = log.find((e) => e.kind === 'finished');
  assert.ok(finished && finished.kind === 'finished' && finished.status === 'stopped' && finished.step >= 3 && finished.step < 1000);
  assert.ok(fs.existsSync(path.join(runDir, 'checkpoints', `step-${finished.step}`, 'DONE')));
  // evals ran every 2 steps while it trained (5% of the data held out), and no final one after the stop (an eval at
  // an even last step is the one due there, unless the stop was heard during it)
  assert.ok(log.some((e) => e.kind === 'eval' && e.step === 2));
  assert.ok(log.filter((e) => e.kind === 'eval' && e.step === finished.step).length <= (finished.step % 2 === 0 ? 1 : 0));
  assert.equal(fs.existsSync(path.join(runDir, 'trainer.lock')), false, 'the lock goes with the trainer');
});

test('a loss that turns NaN stops the run with a clear error and keeps the last good checkpoint', async () => {
  // A model whose embedding of "~" is NaN: the loss is finite until the one example holding "~" comes up.
  const poisoned = path.join(tempDir('nan-model'), 'model');
  fs.cpSync(model, poisoned, { recursive: true });
  const vocab = JSON.parse(fs.readFileSync(path.join(poisoned, 'tokenizer.json'), 'utf8')).model.vocab as Record<string, number>;
  const file = path.join(poisoned, 'model.safetensors');
  const bytes = fs.readFileSync(file);
  const headerLen = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + headerLen).toString('utf8'));
  const embed = header['model.embed_tokens.weight'];
  const hidden = embed.shape[1];
  const rowStart = 8 + headerLen + embed.data_offsets[0] + vocab['~'] * hidden * 2;
  for (let i = 0; i < hidden; i++) bytes.writeUInt16LE(0x7fc0, rowStart + 2 * i); // bf16 NaN
  fs.writeFileSync(file, bytes);

  const rows = Array.from({ length: 12 }, (_, i) => ({ text: i === 7 ? 'a tilde ~ here' : `plain sentence number ${i}` }));
  const data = write(path.join(tempDir('nan-data'), 'train.jsonl'), rows.map((r) => JSON.stringify(r)).join('\n'));
  const runDir = path.join(tempDir('nan-run'), 'run');
  const c = { ...config(data, { batchSize: 1, checkpointEvery: 1, maxSteps: 12, keepCheckpoints: 20 }), model: poisoned };
  await assert.rejects(train({ runDir, config: c, resume: false }), /the loss became NaN at step (\d+); resuming repeats the same steps, so the way on is a new run/);
  const log = events(runDir);
  const error = log.find((e) => e.kind === 'error');
  assert.ok(error && error.kind === 'error' && error.step !== null);
  const failedAt = Number(/step (\d+)/.exec(error.message)![1]);
  assert.ok(failedAt > 1, 'the poisoned example is not the first (seeded order)');
  assert.equal(error.lastCheckpoint, path.join(runDir, 'checkpoints', `step-${failedAt - 1}`));
  assert.ok(fs.existsSync(path.join(error.lastCheckpoint!, 'DONE')));
  assert.ok(!fs.existsSync(path.join(runDir, 'adapter')), 'no adapter is written from a diverged run');
  assert.equal(log[log.length - 1].kind, 'finished');
});
