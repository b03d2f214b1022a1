// Where a run, a scoring pass or a benchmark computes: the device (`--device`, qlora.device) and the engine's memory
// budget (`--gpu-memory-budget`, qlora.gpuMemoryBudget; by default what the GPU has free less a margin). Shared by
// train, resume, score and bench so that each says the same thing about the same machine.
import * as os from 'node:os';
import { engineInfo, gpuReport } from '../engine';
import { chooseDevice, cpuDevice, DEVICE_REQUESTS, type DeviceChoice, type DeviceRequest, type EngineCapabilities } from '../engine/device';
import type { ComputeDtype, NativeGpuReport, NativeModelOptions } from '../engine/native';
import type { RunDevice } from '../protocol/events';
import { numberOption, stringOption, UsageError, type OptionSpec, type ParsedOptions } from './cliArgs';
import { defaultGpuBudget, overBudgetMessage, planMemory, type EstimateForPlan, type MemoryPlan, type RunShape } from './memoryPlan';
import { formatBinaryBytes } from '../util/bytes';

const GiB = 1024 ** 3;

export interface PlacementOptions {
  device?: DeviceRequest;
  /** GiB the engine may hold on the GPU (--gpu-memory-budget). */
  gpuMemoryBudget?: number;
  /** A budget in bytes on whatever device is chosen, instead of the above: tests page on the CPU with it (the paging
   * logic is the backend-independent part of the engine). */
  memoryBudgetBytes?: number;
  /** A folder searched first for cuBLASLt (qlora.cudaLibraryPath). */
  cudaLibraryDir?: string;
  /** The GPU's compute dtype (--dtype): f32, bf16 (the default from Ampere on) or fp16 (Turing's default). */
  computeDtype?: ComputeDtype;
}

/** --dtype's value, checked. */
export function parseComputeDtype(text: string | undefined): ComputeDtype | undefined {
  if (text === undefined || text === 'f32' || text === 'bf16' || text === 'fp16') return text;
  throw new UsageError(`--dtype must be bf16, fp16 or f32, got '${text}'`);
}

/**
 * Where a verb computes on the CPU for certain (`--device cpu`, or estimate's CPU), a half-precision --dtype is a
 * mistake, not a wish to ignore. `--device auto` falling back to the CPU is another matter: a run then warns
 * (placeRun), and score, whose numbers are the point, refuses with the fallback's reason (refuseHalfDtypeFallback).
 */
export function refuseHalfDtypeOnCpu(dtype: ComputeDtype | undefined, onCpu: boolean): void {
  if (onCpu && dtype !== undefined && dtype !== 'f32')
    throw new UsageError(`--dtype ${dtype} is the GPU's (--device cuda); the CPU computes in fp32, so leave --dtype out there`);
}

/** A half-precision --dtype where `--device auto` chose the CPU: an error saying why the GPU could not be used. */
export function refuseHalfDtypeFallback(dtype: ComputeDtype | undefined, placement: Placement): void {
  if (placement.device.kind === 'cuda' || dtype === undefined || dtype === 'f32') return;
  const why = placement.device.fallbackReasons.join('; ');
  throw new UsageError(
    `--dtype ${dtype} is the GPU's, and the GPU cannot be used here${why ? ` (${why})` : ''}; leave --dtype out to compute in fp32 on the CPU`,
  );
}

export interface Placement {
  device: DeviceChoice;
  /** Bytes; null: no budget. */
  memoryBudget: number | null;
  /** For warning events: the CPU fallback and why, a GPU budget given for a CPU run. */
  warnings: string[];
  /** A half-precision --dtype that does not apply because the run is on the CPU (one of the warnings says so). */
  ignoredDtype?: ComputeDtype;
  /** A folder searched first for cuBLASLt. */
  cudaLibraryDir?: string;
}

export type MachineProbe = () => { report: NativeGpuReport; engine: EngineCapabilities };

const probeThisMachine =
  (libraryDir: string | undefined): MachineProbe =>
  () => ({ report: gpuReport(libraryDir), engine: engineInfo() });

export function placeRun(o: PlacementOptions, probe: MachineProbe = probeThisMachine(o.cudaLibraryDir)): Placement {
  // --device cpu needs no look at the GPU (loading the driver and NVML takes a moment)
  let device: DeviceChoice;  // reassigned below when --dtype overrides the GPU's compute dtype
  if (o.device === 'cpu') {
    device = cpuDevice(engineInfo().threads);
  } else {
    const { report, engine } = probe();
    device = chooseDevice(o.device ?? 'auto', report, engine);
  }
  const warnings = device.fallback ? [device.fallback] : [];
  let ignoredDtype: ComputeDtype | undefined;
  if (o.computeDtype !== undefined) {
    if (device.kind === 'cuda') {
      if (o.computeDtype === 'bf16' && device.computeDtype !== 'bf16')
        throw new UsageError(`--dtype bf16: ${device.name} computes in ${device.computeDtype} here (bf16 needs an Ampere or newer GPU)`);
      device = { ...device, computeDtype: o.computeDtype };
    } else if (o.computeDtype !== 'f32') {
      ignoredDtype = o.computeDtype;
      warnings.push(`--dtype ${o.computeDtype} applies on the GPU; this run is on the CPU, which computes in fp32.`);
    }
  }
  let memoryBudget: number | null = null;
  if (o.memoryBudgetBytes !== undefined) {
    memoryBudget = o.memoryBudgetBytes;
  } else if (device.kind === 'cuda' && device.gpu) {
    memoryBudget = o.gpuMemoryBudget !== undefined ? Math.floor(o.gpuMemoryBudget * GiB) : defaultGpuBudget(device.gpu);
  } else if (o.gpuMemoryBudget !== undefined) {
    warnings.push(`--gpu-memory-budget ${o.gpuMemoryBudget} applies on the GPU; this run is on the CPU and has no memory budget.`);
  }
  return { device, memoryBudget, warnings, ...(ignoredDtype ? { ignoredDtype } : {}), cudaLibraryDir: o.cudaLibraryDir };
}

/** The engine model's options for this placement: its device, compute dtype, budget and where cuBLASLt is. */
export function engineOptions(p: Placement): NativeModelOptions {
  return {
    device: p.device.kind,
    memoryBudget: p.memoryBudget ?? 0,
    ...(p.device.kind === 'cuda' ? { computeDtype: p.device.computeDtype } : {}),
    ...(p.cudaLibraryDir ? { cudaLibraryDir: p.cudaLibraryDir } : {}),
  };
}

/** The run-started event's device, with what its memory plan moves to host memory. */
export function runDevice(p: Placement, plan: MemoryPlan | null): RunDevice {
  return {
    kind: p.device.kind, name: p.device.name, computeDtype: p.device.computeDtype, memoryBudget: p.memoryBudget,
    pagedOptimizer: plan?.paged ?? false, offloadedBlockInputs: plan?.offloadBlockInputs ?? 0,
  };
}

export const placementOptions: Record<string, OptionSpec> = {
  device: { type: 'string', description: 'auto (default: the GPU when it can be used, else the CPU with a warning), cuda or cpu' },
  'gpu-memory-budget': { type: 'string', description: 'GiB the engine may use on the GPU (default, or 0: what is free, less a margin); the optimizer pages, and if need be the checkpointed block inputs, move to host memory to stay under' },
  'cuda-lib-dir': { type: 'string', description: 'a folder holding cuBLASLt, searched first (the qlora.cudaLibraryPath setting; else QLORA_CUDA_LIB_DIR)' },
  dtype: { type: 'string', description: 'compute dtype on the GPU: bf16 (default on Ampere and newer: GEMM inputs in bf16, as torch.autocast), fp16 (default on Turing, with dynamic loss scaling) or f32' },
};

export function placementFromFlags(o: ParsedOptions): PlacementOptions {
  const device = stringOption(o, 'device');
  if (device !== undefined && !(DEVICE_REQUESTS as readonly string[]).includes(device))
    throw new UsageError(`--device must be one of ${DEVICE_REQUESTS.join(', ')}, got '${device}'`);
  const given = numberOption(o, 'gpu-memory-budget');
  if (given !== undefined && !(given >= 0)) throw new UsageError(`--gpu-memory-budget must be a number of GiB (0: the default), got ${given}`);
  // 0, as the qlora.gpuMemoryBudget setting has it: what is free, less a margin
  const budget = given === 0 ? undefined : given;
  const computeDtype = parseComputeDtype(stringOption(o, 'dtype'));
  refuseHalfDtypeOnCpu(computeDtype, device === 'cpu');
  return { device: device as DeviceRequest | undefined, gpuMemoryBudget: budget, cudaLibraryDir: stringOption(o, 'cuda-lib-dir'), computeDtype };
}

/**
 * Before anything runs: under a budget, the plan (does the optimizer page; does the run fit at all), and a run that
 * cannot fit is an Error with the estimate by category and what to change; without a budget (the CPU) a peak beyond
 * this machine's memory is refused the same way instead of ending in the system's out-of-memory killer.
 */
export function checkMemory(estimate: EstimateForPlan, placement: Placement, run: RunShape, totalMemory = os.totalmem()): MemoryPlan | null {
  if (placement.memoryBudget === null) {
    if (estimate.peakTotal > totalMemory) {
      const c = estimate.categories;
      throw new Error(
        `This run needs ${formatBinaryBytes(estimate.peakTotal)} of memory at its peak and this machine has ${formatBinaryBytes(totalMemory)} ` +
          `(weights ${formatBinaryBytes(c.weights)}, activations ${formatBinaryBytes(c.activations)}, workspace ${formatBinaryBytes(c.workspace)}): ` +
          `lower the batch size (now ${run.batchSize}) or the sequence length (now ${run.seqLen}), or train a smaller model.`,
      );
    }
    return null;
  }
  const plan = planMemory(estimate, placement.memoryBudget, run.offloadActivations ?? false);
  if (!plan.fits) throw new Error(overBudgetMessage(estimate, plan, run, placement.device.kind === 'cuda' ? 'GPU' : 'device'));
  return plan;
}
