// The trainer on the GPU (npm run test:gpu runs these only where doctor says training would use the GPU): scoring in
// fp32 against the CPU on the reference fixtures, a 200-step run of the tiny model following the CPU's loss curve,
// resume across devices both ways, the optimizer paged and the block inputs offloaded under small budgets without
// changing the losses, and GPU telemetry in the event log. Issue 6's bounds: loss and log-probs within 1e-4, losses of a run within 2% a step.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { before, test } from 'node:test';
import { estimateMemory } from '../../extension/engine/tools';
import { parseEventLog, type TrainerEvent } from '../../extension/protocol/events';
import { resolveConfig, type TrainConfig } from '../../extension/trainer/config';
import { makeTinyModel } from '../../extension/trainer/tinyModel/makeTinyModel';
import { train, TrainingControl } from '../../extension/trainer/train';
import { score } from '../../extension/trainer/verbs/score';
import { reference, repoRoot, tempDir } from '../helpers/paths';

let model = '';
before(() => {
  model = path.join(tempDir('gpu-model'), 'tiny');
  makeTinyModel({ out: model, arch: 'llama', seed: 5 });
});

const data = () => path.join(repoRoot, 'examples', 'chat-sample.jsonl');

function config(overrides: Partial<TrainConfig> = {}): TrainConfig {
  return resolveConfig(
    {},
    { model, data: data(), preset: 'quick', rank: 8, lr: 0.02, batchSize: 2, gradAccum: 1, seqLen: 64, maxSteps: 25, warmupSteps: 0, evalFraction: 0, checkpointEvery: 0, evalEvery: 0, ...overrides },
  );
}

function events(runDir: string): TrainerEvent[] {
  return parseEventLog(fs.readFileSync(path.join(runDir, 'events.jsonl'), 'utf8')).events;
}
const losses = (runDir: string) => events(runDir).flatMap((e) => (e.kind === 'step' ? [e.loss] : []));

function assertCurvesAgree(gpu: number[], cpu: number[], relative: number): void {
  assert.equal(gpu.length, cpu.length);
  gpu.forEach((l, i) => assert.ok(Math.abs(l - cpu[i]) <= relative * Math.abs(cpu[i]), `step ${i + 1}: GPU loss ${l}, CPU ${cpu[i]}`));
}

test('score on the GPU in fp32 gives the CPU loss and log-probs within 1e-4 on the reference models', () => {
  const ids = Int32Array.from([1, 5, 200, 7, 31, 99, 4, 250, 13, 2, 17, 64]);
  for (const name of ['llama-shared', 'llama3-shared', 'qwen2-shared']) {
    const opts = { model: reference(name), adapter: reference(`${name}-adapter`), ids };
    const cpu = score({ ...opts, engine: { device: 'cpu' } });
    const gpu = score({ ...opts, engine: { device: 'cuda', computeDtype: 'f32' } });
    assert.ok(Math.abs(gpu.loss - cpu.loss) <= 1e-4, `${name}: loss ${gpu.loss} on the GPU, ${cpu.loss} on the CPU`);
    gpu.next_token_logprobs.forEach((lp, i) => assert.ok(Math.abs(lp - cpu.next_token_logprobs[i]) <= 1e-4, `${name} position ${i + 1}`));
    // bf16 compute: within 1% of the fp32 loss (issue 6's bound)
    const bf16 = score({ ...opts, engine: { device: 'cuda', computeDtype: 'bf16' } });
    assert.ok(Math.abs(bf16.loss - cpu.loss) <= 0.01 * Math.abs(cpu.loss), `${name}: bf16 loss ${bf16.loss}, fp32 ${cpu.loss}`);
  }
});

test('200 steps of the tiny model on the GPU follow the CPU loss curve within 2% at every step', async () => {
  const c = config({ maxSteps: 200 });
  const cpu = path.join(tempDir('curve-cpu'), 'run');
  const gpu = path.join(tempDir('curve-gpu'), 'run');
  await train({ runDir: cpu, config: c, resume: false, placement: { device: 'cpu' } });
  await train({ runDir: gpu, config: c, resume: false, placement: { device: 'cuda', computeDtype: 'f32' } });
  assertCurvesAgree(losses(gpu), losses(cpu), 0.02);
  const started = events(gpu).find((e) => e.kind === 'run-started');
  assert.equal(started?.kind === 'run-started' && started.device?.kind, 'cuda');
  assert.equal(started?.kind === 'run-started' && started.device?.computeDtype, 'f32');
  // telemetry: the GPU's own figures beside the engine's
  const samples = events(gpu).flatMap((e) => (e.kind === 'gpu' ? [e] : []));
  assert.ok(samples.length > 0, 'gpu events while training');
  for (const s of samples) assert.ok(s.memoryUsed > 0 && s.memoryTotal >= s.memoryUsed);
});

test('fp16 compute trains with dynamic loss scaling: its loss curve stays within 5% of fp32\'s, and the scale is checkpointed', async () => {
  const c = config({ maxSteps: 30, checkpointEvery: 10 });
  const f32 = path.join(tempDir('fp16-ref'), 'run');
  const f16 = path.join(tempDir('fp16-run'), 'run');
  await train({ runDir: f32, config: c, resume: false, placement: { device: 'cuda', computeDtype: 'f32' } });
  await train({ runDir: f16, config: c, resume: false, placement: { device: 'cuda', computeDtype: 'fp16' } });
  assertCurvesAgree(losses(f16), losses(f32), 0.05);
  const started = events(f16).find((e) => e.kind === 'run-started');
  assert.equal(started?.kind === 'run-started' && started.device?.computeDtype, 'fp16');
  const state = JSON.parse(fs.readFileSync(path.join(f16, 'checkpoints', 'step-20', 'trainer_state.json'), 'utf8')) as { lossScaler?: { scale: number } };
  assert.ok((state.lossScaler?.scale ?? 0) >= 1, 'the loss scale is part of the checkpoint');
});

test('a run resumes across devices: GPU to CPU and CPU to GPU, each close to the uninterrupted run', async () => {
  const c = config({ maxSteps: 8, checkpointEvery: 4 });
  const straight = path.join(tempDir('cross-straight'), 'run');
  await train({ runDir: straight, config: c, resume: false, placement: { device: 'cpu' } });
  for (const [first, second] of [['cuda', 'cpu'], ['cpu', 'cuda']] as const) {
    const runDir = path.join(tempDir(`cross-${first}`), 'run');
    const control = new TrainingControl();
    await train({ runDir, config: c, resume: false, control, placement: { device: first, computeDtype: 'f32' }, onEvent: (e) => { if (e.kind === 'step' && e.step === 4) control.stopRequested = true; } });
    const done = await train({ runDir, resume: true, placement: { device: second, computeDtype: 'f32' } });
    assert.equal(done.status, 'completed');
    assert.equal(done.step, 8);
    assertCurvesAgree(losses(runDir), losses(straight), 0.02);
    const kinds = events(runDir).flatMap((e) => (e.kind === 'run-started' ? [e.device?.kind] : []));
    assert.deepEqual(kinds, [first, second]);
  }
});

test('under a budget half the optimizer state short the GPU run pages and keeps its losses', async () => {
  const c = config({ maxSteps: 6 });
  // bf16 compute, the GPU's default
  const e = estimateMemory(model, { batch: 2, seq: 64, rank: 8, quantize: c.quantize, loraDropout: c.dropout, device: 'cuda', computeDtype: 'bf16' });
  const free = path.join(tempDir('gpu-free'), 'run');
  const paged = path.join(tempDir('gpu-paged'), 'run');
  await train({ runDir: free, config: c, resume: false, placement: { device: 'cuda', computeDtype: 'bf16' } });
  await train({ runDir: paged, config: c, resume: false, placement: { device: 'cuda', computeDtype: 'bf16', memoryBudgetBytes: e.peakTotal - e.categories.optimizer / 2 } });
  assertCurvesAgree(losses(paged), losses(free), 1e-6);
  const pages = events(paged).flatMap((ev) => (ev.kind === 'page' ? [ev] : []));
  assert.ok(pages.some((p) => p.dir === 'out') && pages.some((p) => p.dir === 'in'), `${pages.length} page events`);
  for (const p of pages) assert.ok(p.ms >= 0 && p.bytes === e.optimizerPageBytes);
});

test('under a budget below the step without its optimizer, the GPU run offloads block inputs through pinned memory with the same losses', async () => {
  // four layers in bf16: block 0's input (half of what can move) moves out on the copy stream while the next block
  // computes and comes back a block ahead of its backward; a race between the streams would show in the losses
  const small = path.join(tempDir('gpu-offload-model'), 'small');
  makeTinyModel({ out: small, arch: 'llama', seed: 5, size: 'small' });
  const c = resolveConfig({}, { ...config({ maxSteps: 4, packing: true }), model: small });
  const e = estimateMemory(small, { batch: 2, seq: 64, rank: 8, quantize: c.quantize, loraDropout: c.dropout, device: 'cuda', computeDtype: 'bf16' });
  const free = path.join(tempDir('gpu-offload-free'), 'run');
  const offloaded = path.join(tempDir('gpu-offload-tight'), 'run');
  await train({ runDir: free, config: c, resume: false, placement: { device: 'cuda', computeDtype: 'bf16' } });
  const budget = e.peakTotal - e.categories.optimizer - e.offloadableActivationBytes / 2;
  await train({ runDir: offloaded, config: c, resume: false, placement: { device: 'cuda', computeDtype: 'bf16', memoryBudgetBytes: budget } });
  assertCurvesAgree(losses(offloaded), losses(free), 1e-6);
  const inputs = events(offloaded).flatMap((ev) => (ev.kind === 'page' && ev.tensor.endsWith('.input') ? [ev] : []));
  assert.deepEqual([inputs.filter((p) => p.dir === 'out').length, inputs.filter((p) => p.dir === 'in').length], [4, 4]);
  for (const p of inputs) assert.ok(p.ms >= 0 && p.bytes === e.activationPageBytes);
});
