// Where a run computes and whether it fits: --device against what the GPU probe reports (every way the GPU can be
// out of reach names what is missing; auto falls back with a warning), the memory budget (default: the GPU's free
// memory less a margin; a GPU budget on a CPU run is a warning), and the plan made from the engine's estimate before
// the first step: when the optimizer pages, when nothing fits, and the message that says what to change.
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { gpuTelemetry } from '../../extension/engine';
import { chooseDevice, cudaBlockers, DeviceError } from '../../extension/engine/device';
import type { NativeGpuReport } from '../../extension/engine/native';
import { GpuMonitor } from '../../extension/trainer/gpuTelemetry';
import { defaultGpuBudget, overBudgetMessage, planMemory } from '../../extension/trainer/memoryPlan';
import { parseOptions, UsageError } from '../../extension/trainer/cliArgs';
import { checkMemory, engineOptions, placeRun, placementFromFlags, placementOptions, refuseHalfDtypeFallback } from '../../extension/trainer/placement';
import { cliPath, tempDir } from '../helpers/paths';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const lib = (found: boolean) => ({ found, path: found ? '/usr/lib/x.so' : null, tried: [], searched: [], error: found ? null : 'cannot open shared object file' });
const h100 = { index: 0, name: 'NVIDIA H100 80GB HBM3', memoryTotal: 80 * GiB, memoryUsed: 1 * GiB, memoryFree: 79 * GiB, computeCapability: '9.0', utilization: 0, temperature: 31, powerW: 70, cudaIndex: 0 };

function report(overrides: Partial<NativeGpuReport> = {}): NativeGpuReport {
  return {
    cudaCompiled: true, cudaRuntimeVersion: '13.0', driver: lib(true), driverVersion: '580.65.06', driverCudaVersion: '13.0',
    nvml: lib(true), cublasLt: lib(true), gpus: [h100], runtimeDevices: 1, runtimeError: null, computeDtype: 'bf16', problems: [], notes: [],
    ...overrides,
  };
}
const withCuda = { backends: ['cpu', 'cuda'], threads: 16, cudaComputeDtypes: ['f32', 'bf16', 'fp16'] };
const cpuOnly = { backends: ['cpu'], threads: 16, cudaComputeDtypes: [] };

test('--device: cuda when the GPU is usable, the CPU when asked; auto falls back naming what is missing', () => {
  const gpu = chooseDevice('auto', report(), withCuda);
  assert.deepEqual({ kind: gpu.kind, name: gpu.name, dtype: gpu.computeDtype, fallback: gpu.fallback }, { kind: 'cuda', name: h100.name, dtype: 'bf16', fallback: null });
  assert.equal(chooseDevice('cuda', report({ computeDtype: 'fp16' }), withCuda).computeDtype, 'fp16');
  // a CUDA backend that computes in fp32 only trains in fp32, whatever the GPU would prefer; without fp16 compute a
  // Turing GPU trains in fp32
  assert.equal(chooseDevice('auto', report(), { ...withCuda, cudaComputeDtypes: ['f32'] }).computeDtype, 'f32');
  assert.equal(chooseDevice('auto', report({ computeDtype: 'fp16' }), { ...withCuda, cudaComputeDtypes: ['f32', 'bf16'] }).computeDtype, 'f32');
  const cpu = chooseDevice('cpu', report(), withCuda);
  assert.equal(cpu.kind, 'cpu');
  assert.equal(cpu.computeDtype, 'f32');
  assert.equal(cpu.fallback, null);
  assert.match(cpu.name, /\(16 threads\)$/);

  const noCublas = report({ cublasLt: lib(false), problems: ['cuBLASLt (libcublasLt.so.13) was not found in /usr/local/cuda/lib64: install the CUDA 13 toolkit.'] });
  const fallback = chooseDevice('auto', noCublas, withCuda);
  assert.equal(fallback.kind, 'cpu');
  assert.equal(fallback.fallback, 'Training on the CPU: the GPU cannot be used (cuBLASLt not found). QLoRA: Check GPU Setup (qlora-studio doctor) says what to do.');
  const bare = report({ cudaCompiled: false, driver: lib(false), nvml: lib(false), cublasLt: lib(false), gpus: [], runtimeDevices: -1, computeDtype: null, problems: ['x.'] });
  assert.equal(chooseDevice('auto', bare, cpuOnly).fallback, 'Training on the CPU: the GPU cannot be used (the engine was built without CUDA; no NVIDIA driver; cuBLASLt not found). QLoRA: Check GPU Setup (qlora-studio doctor) says what to do.');
  const oldDriver = report({ driverCudaVersion: '12.4', driverVersion: '550.54.15', problems: ['update the driver.'] });
  assert.match(chooseDevice('auto', oldDriver, withCuda).fallback ?? '', /\(NVIDIA driver 550\.54\.15 too old for CUDA 13 \(580 or newer needed\)\)/);
  assert.match(chooseDevice('auto', report(), cpuOnly).fallback ?? '', /\(this build of the engine has no CUDA backend\)/);
  assert.throws(() => chooseDevice('cuda', noCublas, withCuda), (e: unknown) => e instanceof DeviceError && /^cannot use the GPU \(--device cuda\): cuBLASLt \(libcublasLt\.so\.13\) was not found/.test(e.message));
});

test('the GPU trained on is CUDA device 0, whatever NVML\'s order; telemetry follows it by NVML\'s index', () => {
  const l4 = { ...h100, index: 0, name: 'NVIDIA L4', memoryTotal: 24 * GiB, memoryFree: 20 * GiB, cudaIndex: 1 };
  const hopper = { ...h100, index: 1, cudaIndex: 0 };
  const d = chooseDevice('auto', report({ gpus: [l4, hopper], runtimeDevices: 2 }), withCuda);
  assert.equal(d.name, h100.name);
  assert.equal(d.gpu?.index, 1);
  const p = placeRun({}, () => ({ report: report({ gpus: [l4, hopper], runtimeDevices: 2 }), engine: withCuda }));
  assert.equal(p.memoryBudget, defaultGpuBudget(hopper));
  // CUDA_VISIBLE_DEVICES hides the only GPU from the runtime
  assert.match(cudaBlockers(report({ gpus: [{ ...h100, cudaIndex: null }], runtimeDevices: 0 }), withCuda.backends)[0], /^No NVIDIA GPU was found \(the CUDA runtime sees none/);
  assert.match(cudaBlockers(report({ gpus: [{ ...h100, cudaIndex: null }] }), withCuda.backends)[0], /sees a GPU but it could not be identified/);
});

test('every way the GPU is out of reach is one sentence', () => {
  assert.match(cudaBlockers(report({ gpus: [], runtimeDevices: 0 }), withCuda.backends)[0], /^No NVIDIA GPU was found/);
  assert.deepEqual(cudaBlockers(report({ runtimeError: 'cudaErrorInsufficientDriver' }), withCuda.backends), ['The CUDA runtime cannot use the GPU: cudaErrorInsufficientDriver.']);
  assert.match(cudaBlockers(report(), cpuOnly.backends)[0], /^This build of the engine has no CUDA backend/);
  // telemetry notes are not in the way
  assert.deepEqual(cudaBlockers(report({ notes: ['NVML could not start (Unknown Error); GPU telemetry is unavailable.'] }), withCuda.backends), []);
  assert.deepEqual(cudaBlockers(report({ problems: ['a', 'b'] }), withCuda.backends), ['a', 'b']);
});

test('the budget: the GPU\'s free memory less a margin by default, --gpu-memory-budget when given, none on the CPU', () => {
  const probe = () => ({ report: report(), engine: withCuda });
  assert.equal(defaultGpuBudget(h100), 79 * GiB - 4 * GiB);
  assert.equal(defaultGpuBudget({ memoryTotal: 8 * GiB, memoryFree: 6 * GiB }), 6 * GiB - 512 * MiB);
  assert.equal(placeRun({}, probe).memoryBudget, 75 * GiB);
  assert.equal(placeRun({ gpuMemoryBudget: 10.5 }, probe).memoryBudget, 10.5 * GiB);
  const onCpu = placeRun({ device: 'cpu', gpuMemoryBudget: 8 }, probe);
  assert.equal(onCpu.memoryBudget, null);
  assert.deepEqual(onCpu.warnings, ['--gpu-memory-budget 8 applies on the GPU; this run is on the CPU and has no memory budget.']);
  assert.equal(placeRun({ device: 'cpu', memoryBudgetBytes: 12345 }, probe).memoryBudget, 12345);
});

test('--dtype: bf16 by default where the GPU has it, f32 when asked; the engine options follow the placement', () => {
  const probe = () => ({ report: report(), engine: withCuda });
  assert.equal(placeRun({}, probe).device.computeDtype, 'bf16');
  assert.deepEqual(engineOptions(placeRun({}, probe)), { device: 'cuda', memoryBudget: 75 * GiB, computeDtype: 'bf16' });
  const f32 = placeRun({ computeDtype: 'f32', cudaLibraryDir: '/opt/cuda/lib' }, probe);
  assert.equal(f32.device.computeDtype, 'f32');
  assert.deepEqual(engineOptions(f32), { device: 'cuda', memoryBudget: 75 * GiB, computeDtype: 'f32', cudaLibraryDir: '/opt/cuda/lib' });
  const turing = () => ({ report: report({ computeDtype: 'fp16' }), engine: withCuda });
  assert.throws(() => placeRun({ computeDtype: 'bf16' }, turing), /--dtype bf16: NVIDIA H100 80GB HBM3 computes in fp16 here/);
  // Turing trains in fp16 (with loss scaling) by default
  assert.equal(engineOptions(placeRun({}, turing)).computeDtype, 'fp16');
  assert.equal(engineOptions(placeRun({ computeDtype: 'fp16' }, probe)).computeDtype, 'fp16');
  // auto falling back to the CPU: a run warns and goes on in fp32; score, whose numbers are the point, refuses
  const noGpu = () => ({ report: report({ driver: lib(false), nvml: lib(false), gpus: [], runtimeDevices: -1, computeDtype: null, problems: ['x.'] }), engine: withCuda });
  const cpu = placeRun({ computeDtype: 'bf16' }, noGpu);
  assert.equal(cpu.warnings[1], '--dtype bf16 applies on the GPU; this run is on the CPU, which computes in fp32.');
  assert.deepEqual(engineOptions(cpu), { device: 'cpu', memoryBudget: 0 });
  assert.throws(() => refuseHalfDtypeFallback('bf16', cpu), (e: unknown) => e instanceof UsageError &&
    e.message === "--dtype bf16 is the GPU's, and the GPU cannot be used here (no NVIDIA driver); leave --dtype out to compute in fp32 on the CPU");
  const oldDriver = placeRun({ computeDtype: 'fp16' }, () => ({ report: report({ driverCudaVersion: '12.4', driverVersion: '550.54.15', problems: ['update the driver.'] }), engine: withCuda }));
  assert.throws(() => refuseHalfDtypeFallback('fp16', oldDriver), /cannot be used here \(NVIDIA driver 550\.54\.15 too old for CUDA 13 \(580 or newer needed\)\); leave/);
  refuseHalfDtypeFallback('f32', cpu);
  refuseHalfDtypeFallback('bf16', placeRun({}, probe));
});

test('--dtype bf16 or fp16 with --device cpu is refused by every verb that takes both flags', () => {
  for (const dtype of ['bf16', 'fp16']) {
    const o = parseOptions('train', ['--device', 'cpu', '--dtype', dtype], placementOptions);
    assert.throws(() => placementFromFlags(o), new RegExp(`^UsageError: --dtype ${dtype} is the GPU's \\(--device cuda\\); the CPU computes in fp32, so leave --dtype out there$`));
  }
  assert.equal(placementFromFlags(parseOptions('train', ['--device', 'cpu', '--dtype', 'f32'], placementOptions)).computeDtype, 'f32');
  assert.equal(placementFromFlags(parseOptions('train', ['--dtype', 'bf16'], placementOptions)).computeDtype, 'bf16');
});

const estimate = {
  categories: { weights: 4 * GiB, adapters: 100 * MiB, gradients: 100 * MiB, optimizer: 200 * MiB, activations: 2 * GiB, workspace: 300 * MiB },
  peakTotal: 4 * GiB + 700 * MiB + 2 * GiB,
  optimizerPageBytes: 25 * MiB,
  // four block inputs of 256 MiB can move
  activationPageBytes: 256 * MiB,
  offloadableActivationBytes: 1 * GiB,
};
const shape = { batchSize: 4, seqLen: 2048, rank: 16, gradientCheckpointing: true };

test('the plan: everything fits, the optimizer pages, the block inputs move too, or the run cannot start', () => {
  const peak = estimate.peakTotal;
  // the least budget it trains under: the step without its optimizer state and without the block inputs that can move
  const least = peak - 200 * MiB - 1 * GiB;
  assert.deepEqual(planMemory(estimate, 8 * GiB), { budget: 8 * GiB, required: least, fits: true, paged: false, offloadBlockInputs: 0, peak });
  const paged = planMemory(estimate, peak - 100 * MiB);
  assert.deepEqual([paged.fits, paged.paged, paged.offloadBlockInputs], [true, true, 0]);
  const tight = planMemory(estimate, peak - 200 * MiB);
  assert.ok(tight.fits && tight.paged && tight.offloadBlockInputs === 0, 'all of the optimizer state out during the step is still a run');
  // below the step's peak without the optimizer: as few block inputs move as close the gap (200 MiB: one of 256 MiB;
  // 500 MiB: two), and the optimizer pages where what is left does not fit beside it
  assert.deepEqual(planMemory(estimate, peak - 400 * MiB), { budget: peak - 400 * MiB, required: least, fits: true, paged: true, offloadBlockInputs: 1, peak: peak - 256 * MiB });
  const two = planMemory(estimate, 6 * GiB);
  assert.deepEqual([two.offloadBlockInputs, two.peak, two.paged], [2, peak - 512 * MiB, true]);
  // close to the least: all four
  const all = planMemory(estimate, 5.6 * GiB);
  assert.ok(all.fits && all.paged && all.offloadBlockInputs === 4);
  // asked for all of them where none is needed: the peak they leave decides whether the optimizer pages
  assert.deepEqual(planMemory(estimate, peak - 100 * MiB, true), { budget: peak - 100 * MiB, required: least, fits: true, paged: false, offloadBlockInputs: 4, peak: peak - 1 * GiB });
  // without gradient checkpointing nothing of the activations can move
  assert.equal(planMemory({ ...estimate, offloadableActivationBytes: 0 }, 6 * GiB).fits, false);
  const no = planMemory(estimate, 5 * GiB);
  assert.equal(no.fits, false);
  assert.equal(
    overBudgetMessage(estimate, no, shape, 'GPU'),
    'This run needs at least 5.49 GiB of GPU memory and its budget is 5.00 GiB: weights 4.00 GiB, adapters 100 MiB, gradients 100 MiB, ' +
      'activations 2.00 GiB, workspace 300 MiB, and optimizer state 200 MiB of which all but one 25.0 MiB page can move to host memory, ' +
      'as can 1.00 GiB of the activations (the checkpointed block inputs). ' +
      'To fit: lower the batch size (now 4) or the sequence length (now 2048): activations grow with both; lower the LoRA rank (now 16): ' +
      'adapters and gradients grow with it; or raise the memory budget (--gpu-memory-budget, the qlora.gpuMemoryBudget setting).',
  );
  const weightsTooBig = overBudgetMessage(estimate, planMemory(estimate, 3 * GiB), { ...shape, gradientCheckpointing: false }, 'GPU');
  assert.match(weightsTooBig, /The model's weights alone take 4\.00 GiB: choose a smaller model or a device with more memory\.$/);
});

test('train --device cuda without a usable GPU says what is missing and writes nothing; --device must be known', () => {
  const out = path.join(tempDir('device-cli'), 'run');
  const r = spawnSync(process.execPath, [cliPath, 'train', '--model', 'nowhere', '--data', 'nothing.jsonl', '--out', out, '--device', 'cuda'], { encoding: 'utf8' });
  assert.equal(r.status, 1);
  const doctor = JSON.parse(execFileSync(process.execPath, [cliPath, 'doctor', '--json'], { encoding: 'utf8' })) as { device: string; problems: string[] };
  if (doctor.device === 'cpu') assert.equal(r.stderr.trim(), `qlora-studio: cannot use the GPU (--device cuda): ${doctor.problems.join(' ')}`);
  assert.ok(!fs.existsSync(out));
  const bad = spawnSync(process.execPath, [cliPath, 'train', '--out', out, '--device', 'gpu'], { encoding: 'utf8' });
  assert.equal(bad.status, 1);
  assert.match(bad.stderr, /--device must be one of auto, cuda, cpu, got 'gpu'/);
});

test('GPU telemetry: one gpu event a second at most, of the GPU trained on, and the memory events\' device figure', () => {
  let calls = 0;
  const monitor = new GpuMonitor(1, () => {
    calls++;
    return [h100, { ...h100, index: 1, name: 'NVIDIA L4', memoryTotal: 24 * GiB, memoryUsed: calls * GiB, memoryFree: (24 - calls) * GiB, utilization: 90 + calls }];
  });
  assert.equal(monitor.device(), null);
  assert.deepEqual(monitor.poll(10_000), { kind: 'gpu', index: 1, name: 'NVIDIA L4', memoryTotal: 24 * GiB, memoryUsed: 1 * GiB, memoryFree: 23 * GiB, utilization: 91, temperature: 31, powerW: 70 });
  assert.equal(monitor.poll(10_400), null, 'not twice within a second');
  assert.equal(calls, 1, 'and NVML is not asked in between');
  assert.equal(monitor.poll(11_000)?.memoryUsed, 2 * GiB);
  assert.deepEqual(monitor.device(), { total: 24 * GiB, used: 2 * GiB });
  assert.equal(new GpuMonitor(0, () => null).poll(0), null, 'no NVML, no events');
});

test('gpuTelemetry: null without NVML (this machine), else one entry per GPU', () => {
  const gpus = gpuTelemetry();
  const doctor = JSON.parse(execFileSync(process.execPath, [cliPath, 'doctor', '--json'], { encoding: 'utf8' })) as { nvml: { found: boolean }; gpus: unknown[] };
  if (!doctor.nvml.found) assert.equal(gpus, null);
  else assert.equal(gpus?.length, doctor.gpus.length);
});

test('without a budget (the CPU) a peak beyond the machine\'s memory is refused before anything runs', () => {
  const cpu = placeRun({ device: 'cpu' }, () => ({ report: report(), engine: withCuda }));
  assert.equal(checkMemory(estimate, cpu, shape, 64 * GiB), null);
  assert.throws(
    () => checkMemory(estimate, cpu, shape, 4 * GiB),
    /^Error: This run needs 6\.68 GiB of memory at its peak and this machine has 4\.00 GiB \(weights 4\.00 GiB, activations 2\.00 GiB, workspace 300 MiB\): lower the batch size \(now 4\) or the sequence length \(now 2048\), or train a smaller model\.$/,
  );
  const gpu = placeRun({ gpuMemoryBudget: 5 }, () => ({ report: report(), engine: withCuda }));
  assert.throws(() => checkMemory(estimate, gpu, shape), /^Error: This run needs at least 5\.49 GiB of GPU memory and its budget is 5\.00 GiB/);
  assert.equal(checkMemory(estimate, placeRun({ gpuMemoryBudget: 6 }, () => ({ report: report(), engine: withCuda })), shape)?.offloadBlockInputs, 2);
  assert.equal(checkMemory(estimate, placeRun({ gpuMemoryBudget: 6.6 }, () => ({ report: report(), engine: withCuda })), shape)?.paged, true);
});
