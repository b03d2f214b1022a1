// The training configuration: presets, the JSON config file, command-line overrides, and validation. The resolved
// config is written to <run>/config.json and is what `resume` reads back. schemas/train-config.schema.json
// describes the same fields for editors.
import type { ScheduleKind } from './schedule';
import { readJsonFile } from '../util/jsonFile';

export const LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
export type LoraTarget = (typeof LORA_TARGETS)[number];
export const DATA_SHAPES = ['messages', 'sharegpt', 'alpaca', 'completion', 'text'] as const;

export interface TrainConfig {
  model: string;
  data: string;
  /** A separate eval file; otherwise evalFraction of the data is held out (0: no eval). */
  evalData: string | null;
  evalFraction: number;
  /**
   * The most examples evalFraction holds out: evaluating runs every evalEvery steps, and 5% of a large dataset (5,000
   * of 100,000 examples) would take longer each time than the steps between. Older runs' config.json has none: their
   * split is the whole fraction.
   */
  evalMaxExamples?: number;
  /**
   * Seed of the held-out split, apart from `seed` so that runs differing in seed are evaluated on the same examples
   * (as datasets' train_test_split has its own). Older runs' config.json has none: their split follows `seed`.
   */
  evalSeed?: number;
  shape: (typeof DATA_SHAPES)[number] | null;
  skipInvalid: boolean;
  trainOnPrompt: boolean;
  packing: boolean;
  preset: PresetName;
  rank: number;
  alpha: number;
  dropout: number;
  useRslora: boolean;
  targets: LoraTarget[];
  lr: number;
  schedule: ScheduleKind;
  warmupSteps: number;
  weightDecay: number;
  maxGradNorm: number;
  beta1: number;
  beta2: number;
  eps: number;
  batchSize: number;
  gradAccum: number;
  seqLen: number;
  /** Optimizer steps; when null, `epochs` passes over the training data decide. */
  maxSteps: number | null;
  epochs: number;
  evalEvery: number;
  checkpointEvery: number;
  keepCheckpoints: number;
  seed: number;
  gradientCheckpointing: boolean;
  /** Store the base weights as NF4 (QLoRA); false keeps them as the model stores them. */
  quantize: boolean;
  /** User messages answered (greedy) with the current adapter at the start and at every eval: `sample` events. */
  samplePrompts: string[];
  /** Most tokens of each sample answer. */
  sampleMaxTokens: number;
}

export type PresetName = 'qlora' | 'quick';

export type Tunables = Omit<TrainConfig, 'model' | 'data' | 'evalData' | 'shape' | 'preset'>;

const qlora: Tunables = {
  // The QLoRA paper's recipe (artidoro/qlora defaults): r 64, alpha 16, dropout 0.05, lr 2e-4, constant schedule,
  // max grad norm 0.3, AdamW without weight decay; the response only is trained.
  rank: 64,
  alpha: 16,
  dropout: 0.05,
  useRslora: false,
  targets: [...LORA_TARGETS],
  lr: 2e-4,
  schedule: 'constant',
  warmupSteps: 0,
  weightDecay: 0,
  maxGradNorm: 0.3,
  beta1: 0.9,
  beta2: 0.999,
  eps: 1e-8,
  batchSize: 4,
  gradAccum: 4,
  seqLen: 1024,
  maxSteps: null,
  epochs: 1,
  evalFraction: 0.05,
  // an eval costs about a third of training as many examples (forward only, no recomputation or backward): 500 cost
  // about 11% of the 1,600 examples the qlora preset trains between two evals
  evalMaxExamples: 500,
  evalSeed: 0,
  evalEvery: 100,
  checkpointEvery: 100,
  keepCheckpoints: 3,
  seed: 42,
  skipInvalid: false,
  trainOnPrompt: false,
  packing: false,
  gradientCheckpointing: true,
  quantize: true,
  samplePrompts: [],
  sampleMaxTokens: 64,
};

export const PRESETS: Record<PresetName, { description: string; values: Tunables }> = {
  qlora: { description: "the QLoRA paper's recipe: r 64, alpha 16, lr 2e-4 constant, max grad norm 0.3", values: qlora },
  quick: {
    description: 'a short run to try a dataset: r 8, alpha 16, lr 1e-3 (5 warmup steps, then cosine decay), 3 epochs, small batches',
    values: {
      ...qlora,
      rank: 8,
      alpha: 16,
      lr: 1e-3,
      schedule: 'cosine',
      warmupSteps: 5,
      maxGradNorm: 1.0,
      batchSize: 4,
      gradAccum: 1,
      seqLen: 512,
      epochs: 3,
      evalEvery: 20,
      checkpointEvery: 20,
    },
  },
};

export class ConfigError extends Error {
  override readonly name = 'ConfigError';
}

/** Fields a config file or the command line may set, with their types, for validation and the JSON schema. */
export const CONFIG_FIELDS: Record<keyof TrainConfig, { type: 'string' | 'number' | 'integer' | 'boolean' | 'enum' | 'targets' | 'strings' | 'string|null'; values?: readonly string[]; min?: number; max?: number; below?: number; description: string }> = {
  model: { type: 'string', description: 'Hugging Face model folder (config.json, safetensors, tokenizer.json)' },
  data: { type: 'string', description: 'training data: .jsonl, .json, .csv or .parquet' },
  evalData: { type: 'string|null', description: 'separate evaluation data file' },
  evalFraction: { type: 'number', min: 0, max: 0.5, description: 'fraction of the data held out for evaluation when evalData is not given' },
  evalMaxExamples: { type: 'integer', min: 1, description: 'the most examples evalFraction holds out (each evaluation scores them all)' },
  evalSeed: { type: 'integer', min: 0, max: Number.MAX_SAFE_INTEGER, description: 'seed of the held-out split (apart from seed, so that runs with different seeds are evaluated on the same examples)' },
  shape: { type: 'enum', values: DATA_SHAPES, description: 'dataset shape; detected from the fields when absent' },
  skipInvalid: { type: 'boolean', description: 'skip invalid rows (and say how many) instead of refusing to start' },
  trainOnPrompt: { type: 'boolean', description: 'train on prompt tokens too (default: only the response)' },
  packing: { type: 'boolean', description: 'pack several examples into each sequence of seqLen tokens' },
  preset: { type: 'enum', values: ['qlora', 'quick'], description: 'defaults to start from' },
  rank: { type: 'integer', min: 1, max: 4096, description: 'LoRA rank r' },
  alpha: { type: 'number', min: 0, description: 'LoRA alpha (scale = alpha / r)' },
  dropout: { type: 'number', min: 0, max: 0.99, description: 'LoRA dropout on the input of A' },
  useRslora: { type: 'boolean', description: 'rank-stabilized LoRA (scale = alpha / sqrt(r))' },
  targets: { type: 'targets', values: LORA_TARGETS, description: 'linear layers that get LoRA adapters' },
  lr: { type: 'number', min: 0, max: 1, description: 'peak learning rate' },
  schedule: { type: 'enum', values: ['constant', 'linear', 'cosine'], description: 'learning-rate schedule after warmup' },
  warmupSteps: { type: 'integer', min: 0, description: 'linear warmup steps from 0' },
  weightDecay: { type: 'number', min: 0, description: 'AdamW decoupled weight decay' },
  maxGradNorm: { type: 'number', min: 0, description: 'clip the global gradient norm to this (0: no clipping)' },
  // below 1, as torch.optim.AdamW requires: at 1 the bias correction 1 - beta^t is 0
  beta1: { type: 'number', min: 0, below: 1, description: 'AdamW beta1' },
  beta2: { type: 'number', min: 0, below: 1, description: 'AdamW beta2' },
  eps: { type: 'number', min: 0, description: 'AdamW epsilon' },
  batchSize: { type: 'integer', min: 1, description: 'sequences per micro-batch' },
  gradAccum: { type: 'integer', min: 1, description: 'micro-batches per optimizer step' },
  seqLen: { type: 'integer', min: 2, description: 'maximum tokens per sequence (longer examples are truncated)' },
  maxSteps: { type: 'integer', min: 1, description: 'optimizer steps (overrides epochs)' },
  epochs: { type: 'number', min: 0, description: 'passes over the training data' },
  evalEvery: { type: 'integer', min: 0, description: 'evaluate every N steps (0: only at the end)' },
  checkpointEvery: { type: 'integer', min: 0, description: 'checkpoint every N steps (0: only at the end)' },
  keepCheckpoints: { type: 'integer', min: 1, description: 'complete checkpoints to keep' },
  seed: { type: 'integer', min: 0, max: Number.MAX_SAFE_INTEGER, description: 'seed of every random choice (init, dropout, shuffle)' },
  gradientCheckpointing: { type: 'boolean', description: 'recompute activations in backward to save memory' },
  quantize: { type: 'boolean', description: 'store base weights as NF4 (QLoRA)' },
  samplePrompts: { type: 'strings', max: 16, description: 'user messages the model answers (greedy, with the current adapter) at the start and at every evaluation, so the answers can be watched as they change' },
  sampleMaxTokens: { type: 'integer', min: 1, max: 4096, description: 'most tokens of each sample answer' },
};

function checkValue(key: keyof TrainConfig, value: unknown, source: string): unknown {
  return checkSetting(key, value, `${source}: "${key}"`);
}

/** Checks one setting's value; what is wrong is said of `subject` (`train.json: "rank"`, or the flag `--rank`). */
export function checkSetting(key: keyof TrainConfig, value: unknown, subject: string): unknown {
  const field = CONFIG_FIELDS[key];
  const fail = (what: string): never => {
    throw new ConfigError(`${subject} ${what}`);
  };
  if (value === null && (field.type === 'string|null' || key === 'shape' || key === 'maxSteps')) return null;
  switch (field.type) {
    case 'string':
    case 'string|null':
      if (typeof value !== 'string' || value === '') fail('must be a non-empty string');
      return value;
    case 'boolean':
      if (typeof value !== 'boolean') fail('must be true or false');
      return value;
    case 'enum':
      if (typeof value !== 'string' || !field.values!.includes(value)) fail(`must be one of ${field.values!.join(', ')}`);
      return value;
    case 'targets': {
      if (!Array.isArray(value) || value.length === 0) fail(`must be a non-empty list of ${LORA_TARGETS.join(', ')}`);
      for (const t of value as unknown[])
        if (typeof t !== 'string' || !(LORA_TARGETS as readonly string[]).includes(t)) fail(`has unknown module ${JSON.stringify(t)} (known: ${LORA_TARGETS.join(', ')})`);
      return [...new Set(value as string[])];
    }
    case 'strings': {
      if (!Array.isArray(value)) fail('must be a list of strings');
      const list = value as unknown[];
      if (list.some((t) => typeof t !== 'string' || t.trim() === '')) fail('must hold non-empty strings');
      if (field.max !== undefined && list.length > field.max) fail(`holds ${list.length} entries; at most ${field.max}`);
      return list;
    }
    case 'number':
    case 'integer': {
      if (typeof value !== 'number' || !Number.isFinite(value)) fail('must be a number');
      const n = value as number;
      if (field.type === 'integer' && !Number.isInteger(n)) fail('must be an integer');
      if (field.min !== undefined && n < field.min) fail(`must be at least ${field.min}`);
      if (field.max !== undefined && n > field.max) fail(`must be at most ${field.max}`);
      if (field.below !== undefined && n >= field.below) fail(`must be less than ${field.below}`);
      return n;
    }
  }
}

/** Reads a JSON config file: an object of TrainConfig fields (any subset), unknown keys rejected. */
export function readConfigFile(file: string): Partial<TrainConfig> {
  let parsed: unknown;
  try {
    parsed = readJsonFile(file);
  } catch (err) {
    throw new ConfigError((err as Error).message);
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new ConfigError(`${file}: must hold a JSON object`);
  const out: Partial<TrainConfig> = {};
  for (const [key, value] of Object.entries(parsed)) {
    if (key === '$schema') continue;
    if (!(key in CONFIG_FIELDS)) throw new ConfigError(`${file}: unknown setting "${key}" (known: ${Object.keys(CONFIG_FIELDS).join(', ')})`);
    (out as Record<string, unknown>)[key] = checkValue(key as keyof TrainConfig, value, file);
  }
  return out;
}

/** Preset defaults, then the config file, then command-line overrides; model, data and out are required. */
export function resolveConfig(fileValues: Partial<TrainConfig>, overrides: Partial<TrainConfig>): TrainConfig {
  const merged = { ...fileValues, ...overrides };
  const preset = merged.preset ?? 'qlora';
  if (!(preset in PRESETS)) throw new ConfigError(`unknown preset "${preset}" (known: ${Object.keys(PRESETS).join(', ')})`);
  const config: TrainConfig = { ...PRESETS[preset].values, model: '', data: '', evalData: null, shape: null, preset, ...merged };
  if (!config.model) throw new ConfigError('no model: pass --model or set "model" in the config file');
  if (!config.data) throw new ConfigError('no training data: pass --data or set "data" in the config file');
  for (const key of Object.keys(CONFIG_FIELDS) as (keyof TrainConfig)[]) checkValue(key, config[key], 'config');
  if (config.maxSteps === null && config.epochs <= 0) throw new ConfigError('set maxSteps or a positive number of epochs');
  return config;
}

/** JSON schema of a config file (what schemas/train-config.schema.json holds; a test keeps the two in step). */
export function trainConfigSchema(): Record<string, unknown> {
  const properties: Record<string, unknown> = { $schema: { type: 'string' } };
  for (const [key, f] of Object.entries(CONFIG_FIELDS)) {
    const p: Record<string, unknown> = { description: f.description };
    switch (f.type) {
      case 'string':
        p.type = 'string';
        break;
      case 'string|null':
        p.type = ['string', 'null'];
        break;
      case 'boolean':
        p.type = 'boolean';
        break;
      case 'enum':
        p.enum = [...f.values!];
        break;
      case 'targets':
        p.type = 'array';
        p.items = { enum: [...f.values!] };
        p.minItems = 1;
        p.uniqueItems = true;
        break;
      case 'strings':
        p.type = 'array';
        p.items = { type: 'string', minLength: 1 };
        if (f.max !== undefined) p.maxItems = f.max;
        break;
      case 'number':
      case 'integer':
        p.type = key === 'maxSteps' ? [f.type, 'null'] : f.type;
        if (f.min !== undefined) p.minimum = f.min;
        if (f.max !== undefined) p.maximum = f.max;
        if (f.below !== undefined) p.exclusiveMaximum = f.below;
        break;
    }
    const preset = PRESETS.qlora.values as unknown as Record<string, unknown>;
    if (key in preset && preset[key] !== null) p.default = preset[key];
    properties[key] = p;
  }
  return {
    $schema: 'http://json-schema.org/draft-07/schema#',
    $id: 'https://qlora-studio/schemas/train-config.schema.json',
    title: 'QLoRA Studio training configuration',
    description: 'Settings of `qlora-studio train --config FILE`; command-line flags override them. Paths are relative to this file.',
    type: 'object',
    additionalProperties: false,
    properties,
  };
}
