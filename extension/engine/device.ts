// Which device a run trains on: `--device auto|cuda|cpu` (the qlora.device setting) against what the GPU probe
// found and which backends this build of the engine has. `cuda` that cannot be had is an error saying exactly what
// is missing; `auto` falls back to the CPU and says why. `doctor` shows the same choice.
import * as os from 'node:os';
import type { NativeGpuInfo, NativeGpuReport } from './native';

export type DeviceRequest = 'auto' | 'cuda' | 'cpu';
export const DEVICE_REQUESTS: readonly DeviceRequest[] = ['auto', 'cuda', 'cpu'];

export interface DeviceChoice {
  kind: 'cpu' | 'cuda';
  /** The GPU's name, or the CPU model and thread count. */
  name: string;
  computeDtype: 'f32' | 'bf16' | 'fp16';
  /** The GPU trained on (the first usable one); null on the CPU. */
  gpu: NativeGpuInfo | null;
  /** Why `auto` chose the CPU (what is missing for the GPU); null when it was not a fallback. */
  fallback: string | null;
}

export class DeviceError extends Error {
  override readonly name = 'DeviceError';
}

/** What stands between this machine and training on its GPU, as sentences; empty when nothing does. */
export function cudaBlockers(report: NativeGpuReport, backends: readonly string[]): string[] {
  if (report.problems.length > 0) return report.problems;
  if (report.gpus.length === 0 || report.runtimeDevices === 0) return ['No NVIDIA GPU was found.'];
  if (report.runtimeError) return [`The CUDA runtime cannot use the GPU: ${report.runtimeError}.`];
  if (!backends.includes('cuda'))
    return ['This version of the engine cannot train on the GPU yet: its CUDA training backend is not part of this build, so training runs on the CPU.'];
  return [];
}

export function cpuName(threads: number): string {
  const model = os.cpus()[0]?.model?.replace(/\s+/g, ' ').trim();
  return `${model || `${os.arch()} CPU`} (${threads} threads)`;
}

export function chooseDevice(request: DeviceRequest, report: NativeGpuReport, engine: { backends: readonly string[]; threads: number }): DeviceChoice {
  const cpu = (fallback: string | null): DeviceChoice => ({ kind: 'cpu', name: cpuName(engine.threads), computeDtype: 'f32', gpu: null, fallback });
  if (request === 'cpu') return cpu(null);
  const blockers = cudaBlockers(report, engine.backends);
  if (blockers.length > 0) {
    if (request === 'cuda') throw new DeviceError(`cannot train on the GPU (--device cuda): ${blockers.join(' ')}`);
    return cpu(`No usable GPU, so training runs on the CPU. ${blockers.join(' ')}`);
  }
  const gpu = report.gpus[0];
  return { kind: 'cuda', name: gpu.name, computeDtype: report.computeDtype ?? 'bf16', gpu, fallback: null };
}
