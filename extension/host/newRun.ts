// The pure parts of starting and managing runs from VS Code: the train command line from a model, a dataset, a
// preset, the settings and script overrides; run names; which workspace files look like datasets; inspect-data's
// row errors as file positions; and the run argument commands accept.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { DeviceRequest } from '../engine/device';
import { blockInputsOffloaded } from '../protocol/events';
import { defaultGpuBudget, planMemory, type EstimateForPlan } from '../trainer/memoryPlan';

export type PresetName = 'qlora' | 'quick';
export const PRESET_NAMES: readonly PresetName[] = ['qlora', 'quick'];

/**
 * What the memory estimate needs of each preset (LoRA rank, micro-batch, LoRA dropout, sequence length). They
 * mirror PRESETS in extension/trainer/config.ts, which the host does not import (a unit test keeps the two in step).
 */
export interface EstimateShape {
  rank: number;
  batchSize: number;
  dropout: number;
  seqLen: number;
}
export const PRESET_SHAPES: Record<PresetName, EstimateShape> = {
  qlora: { rank: 64, batchSize: 4, dropout: 0.05, seqLen: 1024 },
  quick: { rank: 8, batchSize: 4, dropout: 0.05, seqLen: 512 },
};

/** Training settings a script may override, by config name, with the `train` flag each becomes. */
const OVERRIDE_FLAGS: Record<string, { flag: string; type: 'number' | 'boolean' | 'string' | 'strings' }> = {
  evalData: { flag: 'eval-data', type: 'string' },
  maxSteps: { flag: 'max-steps', type: 'number' },
  epochs: { flag: 'epochs', type: 'number' },
  lr: { flag: 'lr', type: 'number' },
  rank: { flag: 'rank', type: 'number' },
  alpha: { flag: 'alpha', type: 'number' },
  batchSize: { flag: 'batch-size', type: 'number' },
  gradAccum: { flag: 'grad-accum', type: 'number' },
  seqLen: { flag: 'seq-len', type: 'number' },
  checkpointEvery: { flag: 'checkpoint-every', type: 'number' },
  evalEvery: { flag: 'eval-every', type: 'number' },
  seed: { flag: 'seed', type: 'number' },
  skipInvalid: { flag: 'skip-invalid', type: 'boolean' },
  packing: { flag: 'packing', type: 'boolean' },
  samplePrompts: { flag: 'sample-prompt', type: 'strings' },
  sampleMaxTokens: { flag: 'sample-max-tokens', type: 'number' },
};
export const OVERRIDE_KEYS = Object.keys(OVERRIDE_FLAGS);

export interface TrainRequest {
  model: string;
  data: string;
  preset: PresetName;
  /**
   * From the settings qlora.maxSequenceLength, qlora.checkpointEvery, qlora.evalEvery where the user set them; null:
   * the preset's own.
   */
  seqLen: number | null;
  checkpointEvery: number | null;
  evalEvery: number | null;
  /** From qlora.samplePrompts: answered at the start and at every eval, shown in the panel. */
  samplePrompts?: string[];
  /** Config names (maxSteps) or flag names (max-steps); these win over the settings. */
  overrides?: Record<string, unknown>;
}

const camel = (key: string) => key.replace(/-([a-z])/g, (_m, c: string) => c.toUpperCase());

/** Overrides in config names, checked: unknown keys and wrong types are errors naming the key. */
export function normalizeOverrides(overrides: Record<string, unknown> = {}): Record<string, number | boolean | string | string[]> {
  const out: Record<string, number | boolean | string | string[]> = {};
  for (const [rawKey, value] of Object.entries(overrides)) {
    const key = camel(rawKey);
    const spec = OVERRIDE_FLAGS[key];
    if (!spec) throw new Error(`unknown training override "${rawKey}" (known: ${OVERRIDE_KEYS.join(', ')})`);
    if (spec.type === 'number' && (typeof value !== 'number' || !Number.isFinite(value))) throw new Error(`training override "${rawKey}" must be a number`);
    if (spec.type === 'boolean' && typeof value !== 'boolean') throw new Error(`training override "${rawKey}" must be true or false`);
    if (spec.type === 'string' && (typeof value !== 'string' || value === '')) throw new Error(`training override "${rawKey}" must be a non-empty string`);
    if (spec.type === 'strings' && (!Array.isArray(value) || value.some((v) => typeof v !== 'string' || v.trim() === ''))) throw new Error(`training override "${rawKey}" must be a list of non-empty strings`);
    out[key] = value as number | boolean | string | string[];
  }
  return out;
}

/** The `train` arguments before --out and --json (an argument array: paths are never shell-parsed). */
export function trainArgs(r: TrainRequest): string[] {
  const values: Record<string, number | boolean | string | string[]> = {
    ...(r.seqLen !== null ? { seqLen: r.seqLen } : {}),
    ...(r.checkpointEvery !== null ? { checkpointEvery: r.checkpointEvery } : {}),
    ...(r.evalEvery !== null ? { evalEvery: r.evalEvery } : {}),
    ...(r.samplePrompts && r.samplePrompts.length > 0 ? { samplePrompts: r.samplePrompts } : {}),
    ...normalizeOverrides(r.overrides),
  };
  const args = ['--model', r.model, '--data', r.data, '--preset', r.preset];
  for (const [key, value] of Object.entries(values)) {
    const { flag, type } = OVERRIDE_FLAGS[key];
    if (type === 'boolean') {
      if (value === true) args.push(`--${flag}`);
    } else if (type === 'strings') {
      // --flag=text: free text such as "--help me" would otherwise read as the next flag
      for (const v of value as string[]) args.push(`--${flag}=${v}`);
    } else {
      args.push(`--${flag}`, String(value));
    }
  }
  return args;
}

/**
 * The rank, micro-batch, LoRA dropout and sequence length a run will use, for the memory estimate: the overrides',
 * else qlora.maxSequenceLength where the user set it (`seqLenSetting`), else the preset's.
 */
export function estimateShape(preset: PresetName, overrides: Record<string, unknown> = {}, seqLenSetting: number | null = null): EstimateShape {
  const o = normalizeOverrides(overrides);
  const base = PRESET_SHAPES[preset];
  return {
    rank: typeof o.rank === 'number' ? o.rank : base.rank,
    batchSize: typeof o.batchSize === 'number' ? o.batchSize : base.batchSize,
    dropout: base.dropout,
    seqLen: typeof o.seqLen === 'number' ? o.seqLen : (seqLenSetting ?? base.seqLen),
  };
}

/** The trainer's --device, --gpu-memory-budget and --cuda-lib-dir from the settings (for train and resume alike). */
export function placementArgs(p: { device: DeviceRequest; gpuMemoryBudget: number; cudaLibraryPath: string }): string[] {
  return [
    '--device', p.device,
    ...(p.gpuMemoryBudget > 0 ? ['--gpu-memory-budget', String(p.gpuMemoryBudget)] : []),
    ...(p.cudaLibraryPath !== '' ? ['--cuda-lib-dir', p.cudaLibraryPath] : []),
  ];
}

/** The chat server's --device and --cuda-lib-dir from the settings: the chat answers where training would run. */
export function chatPlacementArgs(p: { device: DeviceRequest; cudaLibraryPath: string }): string[] {
  return ['--device', p.device, ...(p.cudaLibraryPath !== '' ? ['--cuda-lib-dir', p.cudaLibraryPath] : [])];
}

/** Where New Finetune's check measures: the GPU the run would train on (from `doctor --json`), or this machine's RAM. */
export type FitTarget =
  | { kind: 'gpu'; name: string; memoryTotal: number; memoryFree: number; budgetGiB: number; computeDtype: string | null }
  | { kind: 'cpu'; freeBytes: number };

/** estimate's --device and --dtype for the target: on the GPU its buffers and dtype count too. */
export function estimateDeviceArgs(target: FitTarget): string[] {
  if (target.kind === 'cpu') return [];
  return ['--device', 'cuda', '--dtype', target.computeDtype ?? 'f32'];
}

/**
 * Whether a run's estimate fits where it will train, as the trainer decides it before its first step: on the GPU
 * against qlora.gpuMemoryBudget (or the free memory less the trainer's margin), the paged optimizer and offloaded
 * block inputs counted; on the CPU the peak against the memory free now. The sentence goes into New Finetune's
 * confirmation.
 */
export interface MemoryFit {
  fits: boolean;
  limit: string;
  paged: boolean;
  /** Block inputs moved to host memory. */
  offloaded: number;
  /** The step's peak with them moved. */
  peak: number;
}

export function memoryFit(e: EstimateForPlan, target: FitTarget): MemoryFit {
  const mib = (b: number) => `${Math.round(b / 1048576).toLocaleString('en-US')} MiB`;
  if (target.kind === 'cpu')
    return { fits: e.peakTotal <= target.freeBytes, limit: `the ${mib(target.freeBytes)} free on this machine`, paged: false, offloaded: 0, peak: e.peakTotal };
  const budget = target.budgetGiB > 0 ? target.budgetGiB * 1024 ** 3 : defaultGpuBudget(target);
  const plan = planMemory(e, budget);
  const limit = target.budgetGiB > 0 ? `the budget of ${target.budgetGiB} GiB on ${target.name} (qlora.gpuMemoryBudget)` : `the ${mib(budget)} usable on ${target.name}`;
  return { fits: plan.fits, limit, paged: plan.paged, offloaded: plan.offloadBlockInputs, peak: plan.peak };
}

/** What of a fitting run moves to host memory, for New Finetune's confirmation ("" when nothing does). */
export function hostMemoryUse(fit: { paged: boolean; offloaded: number }): string {
  const parts = [...(fit.paged ? ['the optimizer paging'] : []), ...(fit.offloaded > 0 ? [blockInputsOffloaded(fit.offloaded)] : [])];
  return parts.length > 0 ? ` with ${parts.join(' and ')} to host memory` : '';
}

const pad = (n: number) => String(n).padStart(2, '0');

/** "<model folder>-<dataset file stem>-20261124-153012": readable, sortable, and safe as a folder name everywhere. */
export function defaultRunName(model: string, data: string, now: Date = new Date()): string {
  const stem = (p: string) => path.basename(p).replace(/\.[^.]+$/, '');
  const stamp = `${now.getFullYear()}${pad(now.getMonth() + 1)}${pad(now.getDate())}-${pad(now.getHours())}${pad(now.getMinutes())}${pad(now.getSeconds())}`;
  const clean = (s: string) => s.replace(/[^A-Za-z0-9._-]+/g, '-').replace(/^[-.]+|-+$/g, '').slice(0, 40);
  return [clean(path.basename(model)), clean(stem(data)), stamp].filter((s) => s !== '').join('-');
}

/** Why a run name is not usable as a folder in the runs directory, or undefined when it is. */
export function runNameProblem(name: string, runsDir: string): string | undefined {
  if (name.trim() === '') return 'Give the run a name.';
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(name)) return 'Use letters, digits, ".", "_" and "-" only, starting with a letter or digit.';
  if (name.length > 120) return 'Use at most 120 characters.';
  if (fs.existsSync(path.join(runsDir, name))) return `A run named "${name}" already exists.`;
  return undefined;
}

/** A free folder name: `base`, else `base-2`, `base-3`... */
export function uniqueRunName(runsDir: string, base: string): string {
  let name = base;
  for (let i = 2; fs.existsSync(path.join(runsDir, name)); i++) name = `${base}-${i}`;
  return name;
}

export const DATASET_EXTENSIONS = ['.jsonl', '.json', '.csv', '.parquet'];

// JSON files that are configuration, not data (packages, editors, models, adapters, our own run files).
const NOT_DATA = /^(package(-lock)?|tsconfig.*|jsconfig|config|generation_config|tokenizer(_config)?|special_tokens_map|added_tokens|adapter_config|preprocessor_config|vocab|trainer_state|launch|settings|tasks|extensions|.*\.schema|.*\.qlora|.*\.index)\.json$/i;
const NOT_DATA_DIRS = /(^|[\\/])(node_modules|\.git|\.vscode|\.qlora|dist|out)([\\/]|$)/;

/** Whether a workspace file is worth offering in the dataset picker. */
export function isLikelyDatasetFile(file: string): boolean {
  const ext = path.extname(file).toLowerCase();
  if (!DATASET_EXTENSIONS.includes(ext)) return false;
  if (NOT_DATA_DIRS.test(path.dirname(file))) return false;
  return !(ext === '.json' && NOT_DATA.test(path.basename(file)));
}

export interface DataErrorLocation {
  file: string;
  /** 1-based text line (JSONL, CSV). */
  line?: number;
  /** 1-based row index (JSON array, Parquet), which has no line of its own. */
  row?: number;
  message: string;
}

/** "train.jsonl line 3: field ..." → file, line and message; undefined for a sentence of another form. */
export function parseDataError(text: string): DataErrorLocation | undefined {
  const m = /^(.+?) (line|row) (\d+): (.*)$/s.exec(text);
  if (!m) return undefined;
  const n = Number(m[3]);
  return m[2] === 'line' ? { file: m[1], line: n, message: m[4] } : { file: m[1], row: n, message: m[4] };
}

/** The run folder a command was given: a path, or a tree item / object carrying `runDir`. */
export function runDirOf(arg: unknown): string | undefined {
  if (typeof arg === 'string' && arg !== '') return arg;
  if (typeof arg === 'object' && arg !== null) {
    const r = (arg as { runDir?: unknown }).runDir;
    if (typeof r === 'string' && r !== '') return r;
    const fsPath = (arg as { fsPath?: unknown }).fsPath; // a vscode.Uri of the folder
    if (typeof fsPath === 'string' && fsPath !== '') return fsPath;
  }
  return undefined;
}

/** The adapter a merge uses: the run's final adapter, else its newest complete checkpoint's. */
export function adapterOfRun(runDir: string): string | undefined {
  const final = path.join(runDir, 'adapter');
  if (fs.existsSync(path.join(final, 'adapter_model.safetensors'))) return final;
  const dir = path.join(runDir, 'checkpoints');
  let steps: number[];
  try {
    steps = fs
      .readdirSync(dir)
      .map((n) => /^step-(\d+)$/.exec(n))
      .filter((m): m is RegExpExecArray => m !== null && fs.existsSync(path.join(dir, m[0], 'DONE')))
      .map((m) => Number(m[1]));
  } catch {
    return undefined;
  }
  if (steps.length === 0) return undefined;
  return path.join(dir, `step-${Math.max(...steps)}`, 'adapter');
}

/** The base model a run trained on (its config.json's "model"). */
export function modelOfRun(runDir: string): string {
  const file = path.join(runDir, 'config.json');
  let config: unknown;
  try {
    config = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    throw new Error(`${file}: cannot read the run's configuration (${err instanceof Error ? err.message : String(err)})`);
  }
  const model = (config as { model?: unknown } | null)?.model;
  if (typeof model !== 'string' || model === '') throw new Error(`${file} names no model`);
  return model;
}
