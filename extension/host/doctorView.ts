// The GPU-setup report (`doctor --json`) as the Markdown document QLoRA: Check GPU Setup opens. Pure, unit-tested.

/** What the host reads of the doctor verb's JSON report. */
export interface DoctorSummary {
  platform: string;
  engine: string;
  cudaCompiled: boolean;
  cudaRuntimeVersion: string | null;
  driver: { found: boolean; path: string | null; error: string | null };
  driverVersion: string | null;
  driverCudaVersion: string | null;
  nvml: { found: boolean; path: string | null; error: string | null };
  cublasLt: { found: boolean; path: string | null; error: string | null; tried: string[]; searched?: string[] };
  gpus: { index: number; name: string; memoryTotal: number; memoryFree: number; computeCapability: string; cudaIndex?: number | null }[];
  computeDtype: string | null;
  device: 'cuda' | 'cpu';
  problems: string[];
  /** Absent in reports of engines before notes were split from problems. */
  notes?: string[];
  /** Absent in reports of engines before the CPU was reported. */
  cpu?: { name: string; vectorCode: string };
}

const GiB = 1024 ** 3;
const found = (l: { found: boolean; path: string | null; error: string | null }) => (l.found ? `found: \`${l.path}\`` : `**not found**${l.error ? ` (${l.error})` : ''}`);

export function doctorMarkdown(r: DoctorSummary): string {
  const lines = [
    '# QLoRA Studio: GPU setup',
    '',
    r.device === 'cuda' ? `Training runs on **GPU ${r.gpus.find((g) => g.cudaIndex === 0)?.index ?? 0}** in **${r.computeDtype}**.` : 'Training runs on the **CPU**.',
    '',
    '| Component | Status |',
    '|---|---|',
    `| Platform | ${r.platform} |`,
    ...(r.cpu ? [`| CPU | ${r.cpu.name}; vector code: ${r.cpu.vectorCode} |`] : []),
    `| Engine | ${r.engine}, CUDA backend ${r.cudaCompiled ? `compiled in (CUDA ${r.cudaRuntimeVersion})` : 'not compiled in'} |`,
    `| NVIDIA driver | ${found(r.driver)}${r.driverVersion ? `, version ${r.driverVersion}` : ''}${r.driverCudaVersion ? `, supports CUDA ${r.driverCudaVersion}` : ''} |`,
    `| NVML | ${found(r.nvml)} |`,
    `| cuBLASLt | ${found(r.cublasLt)} |`,
  ];
  for (const g of r.gpus) lines.push(`| GPU ${g.index} | ${g.name}, compute capability ${g.computeCapability}, ${(g.memoryTotal / GiB).toFixed(1)} GiB (${(g.memoryFree / GiB).toFixed(1)} GiB free) |`);
  if (r.gpus.length === 0) lines.push('| GPUs | none found |');
  const searched = r.cublasLt.found ? [] : (r.cublasLt.searched ?? []);
  if (searched.length > 0) lines.push('', 'Folders searched for cuBLASLt, in order:', '', ...searched.map((d) => `- ${d === '' ? "the loader's search path (LD_LIBRARY_PATH and the system folders; PATH on Windows)" : `\`${d}\``}`));
  lines.push('', r.problems.length === 0 ? 'No problems found.' : '## What to do', '');
  for (const p of r.problems) lines.push(`- ${p.replace(/\|/g, '\\|')}`);
  if ((r.notes ?? []).length > 0) lines.push('', '## Notes', '', ...(r.notes ?? []).map((p) => `- ${p.replace(/\|/g, '\\|')}`));
  lines.push('', 'The same report: `qlora-studio doctor` on the command line.', '');
  return lines.join('\n');
}
