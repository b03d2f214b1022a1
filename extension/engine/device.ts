// Which device a run trains on: `--device auto|cuda|cpu` (the qlora.device setting) against what the GPU probe
// found and which backends this build of the engine has. `cuda` that cannot be had is an error saying exactly what
// is missing; `auto` falls back to the CPU and says why. `doctor` shows the same choice.
import * as os from 'node:os';
import type { ComputeDtype, NativeGpuInfo, NativeGpuReport } from './native';

export type DeviceRequest = 'auto' | 'cuda' | 'cpu';
export const DEVICE_REQUESTS: readonly DeviceRequest[] = ['auto', 'cuda', 'cpu'];

export interface DeviceChoice {
  kind: 'cpu' | 'cuda';
  /** The GPU's name, or the CPU model and thread count. */
  name: string;
  computeDtype: ComputeDtype;
  /** The GPU trained on (the first usable one); null on the CPU. */
  gpu: NativeGpuInfo | null;
  /** Why `auto` chose the CPU (what is missing for the GPU), as a warning sentence; null when it was not a fallback. */
  fallback: string | null;
  /** The same reasons in a few words each ("no NVIDIA driver"); empty when it was not a fallback. */
  fallbackReasons: string[];
}

export class DeviceError extends Error {
  override readonly name = 'DeviceError';
}

/** The GPU the engine trains on: CUDA device 0 (CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER apply). */
export function trainingGpu(report: NativeGpuReport): NativeGpuInfo | null {
  return report.gpus.find((g) => g.cudaIndex === 0) ?? null;
}

/** What stands between this machine and training on its GPU, as sentences; empty when nothing does. */
export function cudaBlockers(report: NativeGpuReport, backends: readonly string[]): string[] {
  if (report.problems.length > 0) return report.problems;
  if (report.runtimeDevices === 0) return ['No NVIDIA GPU was found (the CUDA runtime sees none; is CUDA_VISIBLE_DEVICES empty?).'];
  if (report.runtimeError) return [`The CUDA runtime cannot use the GPU: ${report.runtimeError}.`];
  if (!trainingGpu(report)) return ['The CUDA runtime sees a GPU but it could not be identified (QLoRA: Check GPU Setup lists what was found).'];
  if (!backends.includes('cuda'))
    return ['This build of the engine has no CUDA backend (nvcc was not found when it was built), so training runs on the CPU: reinstall the extension\'s engine with the CUDA 13 toolkit present.'];
  return [];
}

/** What is missing, in a few words each, for the CPU-fallback warning ("no NVIDIA driver, cuBLASLt not found"). */
export function cudaBlockersBrief(report: NativeGpuReport, backends: readonly string[]): string[] {
  const brief: string[] = [];
  if (!report.cudaCompiled) brief.push('the engine was built without CUDA');
  if (!report.driver.found) brief.push('no NVIDIA driver');
  else if (report.driverCudaVersion !== null && Number(report.driverCudaVersion) < 13) brief.push(`NVIDIA driver ${report.driverVersion ?? ''} too old for CUDA 13 (580 or newer needed)`.replace('  ', ' '));
  else if (report.runtimeDevices === 0 || (report.gpus.length === 0 && report.runtimeDevices < 0)) brief.push('no NVIDIA GPU');
  if (!report.cublasLt.found) brief.push('cuBLASLt not found');
  if (report.gpus.some((g) => Number(g.computeCapability) > 0 && Number(g.computeCapability) < 7.5)) brief.push('GPU older than Turing');
  if (report.runtimeError && report.driver.found) brief.push('the CUDA runtime cannot use the GPU');
  if (brief.length === 0 && report.problems.length > 0) brief.push(...report.problems);
  if (brief.length === 0 && !backends.includes('cuda')) brief.push('this build of the engine has no CUDA backend');
  return brief;
}

export function cpuName(threads: number): string {
  const model = os.cpus()[0]?.model?.replace(/\s+/g, ' ').trim();
  return `${model || `${os.arch()} CPU`} (${threads} threads)`;
}

/** The CPU as a device; `fallbackReasons` say why `auto` chose it (none: it was asked for). */
export function cpuDevice(threads: number, fallbackReasons: string[] = []): DeviceChoice {
  const fallback =
    fallbackReasons.length > 0
      ? `Training on the CPU: the GPU cannot be used (${fallbackReasons.join('; ')}). QLoRA: Check GPU Setup (qlora-studio doctor) says what to do.`
      : null;
  return { kind: 'cpu', name: cpuName(threads), computeDtype: 'f32', gpu: null, fallback, fallbackReasons };
}

/** What the engine offers: its backends, CPU threads, and the compute dtypes its CUDA backend has. */
export interface EngineCapabilities {
  backends: readonly string[];
  threads: number;
  cudaComputeDtypes: readonly string[];
}

/** The GPU's own dtype (bf16 from Ampere on, fp16 on Turing) when the CUDA backend computes in it, else fp32. */
export function cudaComputeDtype(report: NativeGpuReport, engine: EngineCapabilities): DeviceChoice['computeDtype'] {
  const preferred = report.computeDtype;
  return preferred && engine.cudaComputeDtypes.includes(preferred) ? preferred : 'f32';
}

export function chooseDevice(request: DeviceRequest, report: NativeGpuReport, engine: EngineCapabilities): DeviceChoice {
  if (request === 'cpu') return cpuDevice(engine.threads);
  const blockers = cudaBlockers(report, engine.backends);
  if (blockers.length > 0) {
    if (request === 'cuda') throw new DeviceError(`cannot use the GPU (--device cuda): ${blockers.join(' ')}`);
    return cpuDevice(engine.threads, cudaBlockersBrief(report, engine.backends));
  }
  const gpu = trainingGpu(report)!;
  return { kind: 'cuda', name: gpu.name, computeDtype: cudaComputeDtype(report, engine), gpu, fallback: null, fallbackReasons: [] };
}
