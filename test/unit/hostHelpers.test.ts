// The host's pure helpers: train arguments and overrides, presets in step with the trainer, run names, dataset
// files, "file line N" errors, run arguments, adapters, model folders and the Hugging Face cache, and formatting.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { formatBytes, formatRelativeTime, runDescription, runTooltip, statusBarText } from '../../extension/host/format';
import { describeModelFolder, huggingFaceHubDirectory, isFourBit, isModelFolder, listHubSnapshots } from '../../extension/host/models';
import {
  adapterOfRun,
  defaultRunName,
  estimateShape,
  isLikelyDatasetFile,
  estimateDeviceArgs,
  hostMemoryUse,
  memoryFit,
  placementArgs,
  modelOfRun,
  normalizeOverrides,
  parseDataError,
  PRESET_SHAPES,
  runDirOf,
  runNameProblem,
  trainArgs,
  uniqueRunName,
} from '../../extension/host/newRun';
import type { RunInfo } from '../../extension/host/runs/types';
import { PRESETS } from '../../extension/trainer/config';
import { trainOptions } from '../../extension/trainer/verbs/train';
import { tempDir } from '../helpers/paths';
import { ev } from './hostFakes';
import { expandHome } from '../../extension/util/homePath';

test('train arguments: settings, then overrides by config or flag name; every flag is one train knows', () => {
  const args = trainArgs({ model: '/m s', data: '/d.jsonl', preset: 'quick', seqLen: 1024, checkpointEvery: 100, evalEvery: 50, overrides: { maxSteps: 5, 'batch-size': 2, seqLen: 64, skipInvalid: true, packing: false } });
  assert.deepEqual(args, ['--model', '/m s', '--data', '/d.jsonl', '--preset', 'quick', '--seq-len', '64', '--checkpoint-every', '100', '--eval-every', '50', '--max-steps', '5', '--batch-size', '2', '--skip-invalid']);
  for (const a of args.filter((x) => x.startsWith('--'))) assert.ok(a.slice(2) in trainOptions, `${a} is a train option`);
  // settings the user left unset leave the preset's values alone (quick's seq-len 512, eval and checkpoints every 20)
  assert.deepEqual(trainArgs({ model: 'm', data: 'd', preset: 'quick', seqLen: null, checkpointEvery: null, evalEvery: null }), ['--model', 'm', '--data', 'd', '--preset', 'quick']);
  assert.throws(() => normalizeOverrides({ targets: ['q_proj'] }), /unknown training override "targets"/);
  assert.throws(() => normalizeOverrides({ maxSteps: '5' }), /"maxSteps" must be a number/);
  assert.throws(() => normalizeOverrides({ packing: 1 }), /must be true or false/);
});

test('the presets the estimate uses match the trainer\'s', () => {
  for (const [name, shape] of Object.entries(PRESET_SHAPES)) {
    const values = PRESETS[name as keyof typeof PRESETS].values;
    assert.deepEqual(shape, { rank: values.rank, batchSize: values.batchSize, dropout: values.dropout, seqLen: values.seqLen });
  }
  assert.deepEqual(estimateShape('qlora', { rank: 16 }), { rank: 16, batchSize: 4, dropout: 0.05, seqLen: 1024 });
  // the sequence length: an override's, else the setting's, else the preset's
  assert.equal(estimateShape('quick').seqLen, 512);
  assert.equal(estimateShape('quick', {}, 2048).seqLen, 2048);
  assert.equal(estimateShape('quick', { seqLen: 96 }, 2048).seqLen, 96);
});

test('memory fit: on the CPU the peak against the free RAM; on the GPU the trainer\'s plan against the budget', () => {
  const MiB = 1048576;
  const GiB = 1024 * MiB;
  const e = {
    categories: { weights: 3 * GiB, adapters: 50 * MiB, gradients: 50 * MiB, optimizer: 100 * MiB, activations: 1 * GiB, workspace: 100 * MiB },
    peakTotal: 3 * GiB + 1300 * MiB,
    optimizerPageBytes: 4 * MiB,
    activationPageBytes: 128 * MiB,
    offloadableActivationBytes: 512 * MiB,
  };
  const peak = e.peakTotal;
  assert.deepEqual(memoryFit(e, { kind: 'cpu', freeBytes: 8 * GiB }), { fits: true, limit: 'the 8,192 MiB free on this machine', paged: false, offloaded: 0, peak });
  assert.equal(memoryFit(e, { kind: 'cpu', freeBytes: 4 * GiB }).fits, false);
  const gpu = { kind: 'gpu' as const, name: 'NVIDIA L4', memoryTotal: 24 * GiB, memoryFree: 23 * GiB, budgetGiB: 0, computeDtype: 'bf16' };
  assert.deepEqual(memoryFit(e, gpu), { fits: true, limit: 'the 22,323 MiB usable on NVIDIA L4', paged: false, offloaded: 0, peak });
  // 4.25 GiB: below the peak (so the optimizer pages), above the peak without the optimizer
  const paged = memoryFit(e, { ...gpu, budgetGiB: 4.25 });
  assert.deepEqual(paged, { fits: true, limit: 'the budget of 4.25 GiB on NVIDIA L4 (qlora.gpuMemoryBudget)', paged: true, offloaded: 0, peak });
  assert.equal(hostMemoryUse(paged), ' with the optimizer paging to host memory');
  // 4.15 GiB: 22 MiB below that too, so one block input of 128 MiB moves to host memory, and then the optimizer
  // fits beside the rest; 3.7 GiB: all four move and the optimizer pages; 3.5 GiB is too little even so
  const offloaded = memoryFit(e, { ...gpu, budgetGiB: 4.15 });
  assert.deepEqual([offloaded.fits, offloaded.paged, offloaded.offloaded, offloaded.peak], [true, false, 1, peak - 128 * MiB]);
  assert.equal(hostMemoryUse(offloaded), ' with 1 block input offloaded to host memory');
  const both = memoryFit(e, { ...gpu, budgetGiB: 3.7 });
  assert.deepEqual([both.fits, both.paged, both.offloaded], [true, true, 4]);
  assert.equal(hostMemoryUse(both), ' with the optimizer paging and 4 block inputs offloaded to host memory');
  assert.equal(hostMemoryUse({ paged: false, offloaded: 0 }), '');
  assert.equal(memoryFit(e, { ...gpu, budgetGiB: 3.5 }).fits, false);
  // the estimate the check asks for: the GPU's buffers in the GPU's dtype
  assert.deepEqual(estimateDeviceArgs(gpu), ['--device', 'cuda', '--dtype', 'bf16']);
  assert.deepEqual(estimateDeviceArgs({ ...gpu, computeDtype: null }), ['--device', 'cuda', '--dtype', 'f32']);
  assert.deepEqual(estimateDeviceArgs({ kind: 'cpu', freeBytes: 1 }), []);
});

test('the trainer\'s placement flags from the settings', () => {
  assert.deepEqual(placementArgs({ device: 'auto', gpuMemoryBudget: 0, cudaLibraryPath: '' }), ['--device', 'auto']);
  assert.deepEqual(placementArgs({ device: 'cuda', gpuMemoryBudget: 10.5, cudaLibraryPath: '/opt/cuda/lib' }), ['--device', 'cuda', '--gpu-memory-budget', '10.5', '--cuda-lib-dir', '/opt/cuda/lib']);
});

test('run names: a readable default, validation, and a free folder', () => {
  const runs = tempDir('host-names');
  const name = defaultRunName('/models/Llama 3.2 1B', '/data/chat.train.jsonl', new Date(2026, 10, 24, 15, 30, 12));
  assert.equal(name, 'Llama-3.2-1B-chat.train-20261124-153012');
  assert.equal(runNameProblem(name, runs), undefined);
  assert.match(runNameProblem('', runs) ?? '', /name/);
  assert.match(runNameProblem('../escape', runs) ?? '', /letters/);
  fs.mkdirSync(path.join(runs, 'taken'));
  fs.mkdirSync(path.join(runs, 'taken-2'));
  assert.match(runNameProblem('taken', runs) ?? '', /already exists/);
  assert.equal(uniqueRunName(runs, 'taken'), 'taken-3');
});

test('dataset files and "file line N: message" errors', () => {
  assert.ok(isLikelyDatasetFile('/w/data/train.jsonl'));
  assert.ok(isLikelyDatasetFile('/w/chat.json'));
  assert.ok(isLikelyDatasetFile('/w/a.parquet'));
  assert.ok(!isLikelyDatasetFile('/w/package.json'));
  assert.ok(!isLikelyDatasetFile('/w/models/x/config.json'));
  assert.ok(!isLikelyDatasetFile('/w/models/x/tokenizer_config.json'));
  assert.ok(!isLikelyDatasetFile('/w/node_modules/p/data.jsonl'));
  assert.ok(!isLikelyDatasetFile('/w/.qlora/runs/r/events.jsonl'));
  assert.ok(!isLikelyDatasetFile('/w/readme.md'));
  assert.deepEqual(parseDataError('train.jsonl line 3: field "output" must be a string, got number'), { file: 'train.jsonl', line: 3, message: 'field "output" must be a string, got number' });
  assert.deepEqual(parseDataError('my data.parquet row 12: no text'), { file: 'my data.parquet', row: 12, message: 'no text' });
  assert.equal(parseDataError('train.jsonl: the file is empty'), undefined);
});

test('commands take a run folder, a tree item or a Uri', () => {
  assert.equal(runDirOf('/runs/a'), '/runs/a');
  assert.equal(runDirOf({ runDir: '/runs/b', label: 'b' }), '/runs/b');
  assert.equal(runDirOf({ fsPath: '/runs/c' }), '/runs/c');
  assert.equal(runDirOf(undefined), undefined);
  assert.equal(runDirOf(''), undefined);
  assert.equal(runDirOf(42), undefined);
});

test('a run\'s adapter (final, else newest complete checkpoint) and base model', () => {
  const run = tempDir('host-adapter');
  fs.writeFileSync(path.join(run, 'config.json'), JSON.stringify({ model: '/models/base' }));
  assert.equal(adapterOfRun(run), undefined);
  for (const step of [5, 10, 20]) fs.mkdirSync(path.join(run, 'checkpoints', `step-${step}`, 'adapter'), { recursive: true });
  for (const step of [5, 10]) fs.writeFileSync(path.join(run, 'checkpoints', `step-${step}`, 'DONE'), '{}');
  assert.equal(adapterOfRun(run), path.join(run, 'checkpoints', 'step-10', 'adapter'), 'step-20 has no DONE');
  fs.mkdirSync(path.join(run, 'adapter'));
  fs.writeFileSync(path.join(run, 'adapter', 'adapter_model.safetensors'), '');
  assert.equal(adapterOfRun(run), path.join(run, 'adapter'));
  assert.equal(modelOfRun(run), '/models/base');
  assert.throws(() => modelOfRun(path.join(run, 'nope')), /cannot read the run's configuration/);
});

function writeModel(dir: string, config: Record<string, unknown>, weights: Record<string, number>): string {
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config));
  for (const [name, bytes] of Object.entries(weights)) fs.writeFileSync(path.join(dir, name), Buffer.alloc(bytes));
  return dir;
}

test('model folders: architecture, size on disk, 4-bit; Hugging Face cache snapshots', () => {
  const root = tempDir('host-models');
  const plain = writeModel(path.join(root, 'plain'), { architectures: ['LlamaForCausalLM'] }, { 'model-00001-of-00002.safetensors': 1000, 'model-00002-of-00002.safetensors': 500 });
  assert.deepEqual(describeModelFolder(plain), { dir: plain, name: 'plain', architecture: 'LlamaForCausalLM', bytes: 1500, fourBit: false });
  const q = writeModel(path.join(root, 'q'), { model_type: 'qwen2', quantization_config: { quant_method: 'bitsandbytes', load_in_4bit: true } }, { 'model.safetensors': 10 });
  assert.deepEqual(describeModelFolder(q), { dir: q, name: 'q', architecture: 'qwen2', bytes: 10, fourBit: true });
  assert.equal(isFourBit({ quantization_config: { load_in_8bit: true } }), false);
  assert.equal(describeModelFolder(writeModel(path.join(root, 'noweights'), {}, {})), undefined);
  assert.equal(isModelFolder(path.join(root, 'noweights')), false);

  const hub = path.join(root, 'hub');
  const blob = path.join(hub, 'models--org--tiny', 'blobs', 'abc');
  fs.mkdirSync(path.dirname(blob), { recursive: true });
  fs.writeFileSync(blob, Buffer.alloc(2048));
  const snap = writeModel(path.join(hub, 'models--org--tiny', 'snapshots', '0123456789'), { architectures: ['LlamaForCausalLM'] }, {});
  fs.symlinkSync(blob, path.join(snap, 'model.safetensors'));
  fs.mkdirSync(path.join(hub, 'datasets--org--d', 'snapshots', 'x'), { recursive: true });
  const found = listHubSnapshots(hub);
  assert.deepEqual(found.map((m) => [m.name, m.bytes]), [['org/tiny', 2048]], 'sizes follow the links to the blobs');
  assert.deepEqual(listHubSnapshots(path.join(root, 'none')), []);

  assert.equal(huggingFaceHubDirectory('/x/hub', {}, '/home/u'), '/x/hub');
  assert.equal(huggingFaceHubDirectory('~/hf', {}, '/home/u'), path.join('/home/u', 'hf'));
  // the path settings (runs directory, Node, CUDA libraries) take ~ the same way
  assert.equal(expandHome('~', '/home/u'), '/home/u');
  assert.equal(expandHome('~/qlora-runs', '/home/u'), '/home/u/qlora-runs');
  assert.equal(expandHome('~\\runs', 'C:\\Users\\u'), 'C:\\Users\\u\\runs');
  assert.equal(expandHome('~other/runs', '/home/u'), '~other/runs');
  assert.equal(expandHome('/srv/~/runs', '/home/u'), '/srv/~/runs');
  assert.equal(huggingFaceHubDirectory('', { HF_HOME: '/hf' }, '/home/u'), path.join('/hf', 'hub'));
  assert.equal(huggingFaceHubDirectory('', { HF_HUB_CACHE: '/c', HF_HOME: '/hf' }, '/home/u'), '/c');
  assert.equal(huggingFaceHubDirectory('', {}, '/home/u'), path.join('/home/u', '.cache', 'huggingface', 'hub'));
});

test('formatting: relative times, run descriptions, the status bar', () => {
  const now = new Date('2026-11-24T12:00:00Z');
  assert.equal(formatRelativeTime(new Date('2026-11-24T11:59:30Z'), now), 'just now');
  assert.equal(formatRelativeTime(new Date('2026-11-24T11:48:00Z'), now), '12m ago');
  assert.equal(formatRelativeTime(new Date('2026-11-24T09:00:00Z'), now), '3h ago');
  assert.equal(formatRelativeTime(new Date('2026-11-22T12:00:00Z'), now), '2d ago');
  assert.equal(formatRelativeTime(new Date('2026-10-01T12:00:00Z'), now), '2026-10-01');
  const run: RunInfo = { runDir: '/runs/r', name: 'r', status: 'running', step: 120, totalSteps: 500, loss: 1.2344, updated: new Date('2026-11-24T11:48:00Z') };
  assert.equal(runDescription(run, now), 'step 120/500 · loss 1.234 · 12m ago');
  assert.equal(runDescription({ ...run, step: 0, totalSteps: null, loss: null }, now), '12m ago');
  assert.match(runTooltip({ ...run, status: 'failed', error: 'boom' }), /Failed[\s\S]*Error: boom/);
  assert.equal(statusBarText(ev.step(120, 1.2345, 500) as never), '$(sync~spin) QLoRA 120/500 · loss 1.23 · 850 tok/s');
  assert.equal(statusBarText(undefined), '$(sync~spin) QLoRA starting…');
  assert.equal(formatBytes(512), '512 B');
  assert.equal(formatBytes(1_500_000), '1.5 MB');
  assert.equal(formatBytes(2_470_000_000), '2.5 GB');
});
