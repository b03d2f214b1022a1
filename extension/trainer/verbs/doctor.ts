// doctor verb: what this machine offers the GPU engine and, for each problem, one sentence on what to do. This is
// what a user reads when "it does not use my GPU" (the extension's QLoRA: Check GPU Setup shows the same).
import * as os from 'node:os';
import { engineInfo, engineVersion, gpuReport, type GpuReport } from '../../engine';
import { chooseDevice, cpuName, cudaBlockers } from '../../engine/device';
import { stringOption, type OptionSpec, type ParsedOptions } from '../cliArgs';
import { placementOptions } from '../placement';
import { isFolder } from '../../util/isFolder';

export const doctorOptions: Record<string, OptionSpec> = {
  'cuda-lib-dir': placementOptions['cuda-lib-dir'],
  json: { type: 'boolean', description: 'print the report as JSON' },
};

export interface DoctorReport extends Omit<GpuReport, 'computeDtype'> {
  /** What training on the GPU would compute in (null without a usable GPU). */
  computeDtype: 'bf16' | 'fp16' | 'f32' | null;
  platform: string;
  node: string;
  engine: string;
  /** The device `--device auto` would train on. */
  device: 'cuda' | 'cpu';
  /** The CPU, its threads, and the version of the CPU kernels' vector code this machine runs. */
  cpu: { name: string; vectorCode: string };
}

export function doctorReport(libraryDir?: string): DoctorReport {
  const g = gpuReport(libraryDir);
  const engine = engineInfo();
  // The same choice and the same sentences as `train --device auto`.
  const choice = chooseDevice('auto', g, engine);
  // computeDtype: what training would compute in (the engine's CUDA backend may not have the GPU's own dtype yet)
  const cpu = { name: cpuName(engine.threads), vectorCode: engine.cpuVectorCode };
  const problems = cudaBlockers(g, engine.backends);
  // a folder the user named that is not there is searched in vain, and its absence said nowhere else
  if (libraryDir !== undefined && libraryDir !== '' && !isFolder(libraryDir))
    problems.push(`The CUDA library folder given (${libraryDir}) does not exist or is not a folder; correct qlora.cudaLibraryPath (or --cuda-lib-dir), or leave it empty to search the usual places.`);
  return { platform: `${os.platform()} ${os.arch()} (${os.release()})`, node: process.version, engine: engineVersion(), ...g, computeDtype: choice.kind === 'cuda' ? choice.computeDtype : null, problems, device: choice.kind, cpu };
}

/** Where a library was looked for, every folder ("" is the loader's own search path). */
export function searchedText(searched: readonly string[]): string {
  return searched.map((d) => (d === '' ? "the loader's search path" : d)).join(', ');
}

const GiB = 1024 ** 3;

/** The report as the terminal (and the extension's document) shows it. */
export function doctorText(r: DoctorReport): string {
  const lib = (name: string, l: GpuReport['cublasLt']) =>
    `${name}: ${l.found ? `found at ${l.path}` : `not found${l.error ? ` (${l.error})` : ''}${l.searched.length > 0 ? `; searched ${searchedText(l.searched)}` : ''}`}`;
  const lines = [
    `platform: ${r.platform}, Node ${r.node}`,
    `CPU: ${r.cpu.name}; vector code: ${r.cpu.vectorCode}`,
    `engine: ${r.engine}; CUDA backend ${r.cudaCompiled ? `compiled in (CUDA ${r.cudaRuntimeVersion} runtime, linked statically)` : 'not compiled in'}`,
    `${lib('NVIDIA driver', r.driver)}${r.driverVersion ? `; version ${r.driverVersion}` : ''}${r.driverCudaVersion ? `, supports CUDA ${r.driverCudaVersion}` : ''}`,
    lib('NVML', r.nvml),
    lib('cuBLASLt', r.cublasLt),
  ];
  if (r.gpus.length === 0) lines.push('GPUs: none');
  for (const g of r.gpus) {
    const extra = [g.utilization !== null ? `${g.utilization}% busy` : null, g.temperature !== null ? `${g.temperature} °C` : null, g.powerW !== null ? `${g.powerW.toFixed(0)} W` : null].filter(Boolean).join(', ');
    lines.push(`GPU ${g.index}: ${g.name}, compute capability ${g.computeCapability}, ${(g.memoryTotal / GiB).toFixed(1)} GiB (${(g.memoryFree / GiB).toFixed(1)} GiB free)${extra ? `, ${extra}` : ''}`);
  }
  lines.push(`training would run on: ${r.device === 'cuda' ? `the GPU, in ${r.computeDtype}` : 'the CPU'}`);
  if (r.problems.length === 0) lines.push('no problems found');
  else lines.push('problems:', ...r.problems.map((p) => `  - ${p}`));
  if (r.notes.length > 0) lines.push('notes:', ...r.notes.map((p) => `  - ${p}`));
  return lines.join('\n');
}

export function doctorVerb(o: ParsedOptions): void {
  const report = doctorReport(stringOption(o, 'cuda-lib-dir'));
  process.stdout.write((o.json ? JSON.stringify(report) : doctorText(report)) + '\n');
}
