// estimate: the memory one QLoRA training step needs, by category, from config.json alone — the engine's own
// allocations (weights, LoRA adapters and gradients, AdamW state, activations, workspace) and their peak, which is
// what --gpu-memory-budget bounds. The CUDA context and NVML's view of other processes come on top.
import { estimateMemory, type MemoryEstimate } from '../../engine/tools';
import type { ComputeDtype, MemoryCategory } from '../../engine/native';
import { integerOption, numberOption, requiredString, stringOption, UsageError, type OptionSpec, type ParsedOptions } from '../cliArgs';
import { PRESETS, type PresetName, type Tunables } from '../config';
import { parseComputeDtype, refuseHalfDtypeOnCpu } from '../placement';

export interface EstimateVerbOptions {
  model: string;
  seq?: number;
  batch?: number;
  rank?: number;
  targets?: string[];
  /** NF4 base weights (default true; a bnb-4bit checkpoint is NF4 either way). */
  quantize?: boolean;
  /** LoRA dropout of the run (default 0, as bench trains). */
  loraDropout?: number;
  gradientCheckpointing?: boolean;
  /** The device the step runs on (default the CPU); the GPU adds cuBLASLt's workspace and attention scratch. */
  device?: 'cpu' | 'cuda';
  /** On the GPU: bf16 compute (the default there, as training on Ampere and newer), fp16 or f32. */
  computeDtype?: ComputeDtype;
}

export interface EstimateResult extends MemoryEstimate {
  options: { seq: number; batch: number; rank: number; targets: string[]; quantize: boolean; loraDropout: number; gradientCheckpointing: boolean; device: 'cpu' | 'cuda'; computeDtype: ComputeDtype };
}

export const DEFAULT_SEQ = 512;
export const DEFAULT_BATCH = 1;
export const DEFAULT_RANK = 8;
export const ALL_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];

export function estimate(options: EstimateVerbOptions): EstimateResult {
  const resolved = {
    seq: options.seq ?? DEFAULT_SEQ,
    batch: options.batch ?? DEFAULT_BATCH,
    rank: options.rank ?? DEFAULT_RANK,
    targets: options.targets ?? ALL_TARGETS,
    quantize: options.quantize ?? true,
    loraDropout: options.loraDropout ?? 0,
    gradientCheckpointing: options.gradientCheckpointing ?? true,
    device: options.device ?? 'cpu',
    computeDtype: options.device === 'cuda' ? (options.computeDtype ?? 'bf16') : 'f32',
  };
  refuseHalfDtypeOnCpu(options.computeDtype, options.device !== 'cuda');
  for (const [name, value] of [['seq-len', resolved.seq], ['batch-size', resolved.batch], ['rank', resolved.rank]] as const)
    if (!Number.isSafeInteger(value) || value < 1) throw new UsageError(`--${name} must be a positive integer, got ${value}`);
  if (!(resolved.loraDropout >= 0 && resolved.loraDropout < 1))
    throw new UsageError(`--lora-dropout must be at least 0 and below 1, got ${resolved.loraDropout}`);
  const result = estimateMemory(options.model, { ...resolved, optimizer: true });
  return { ...result, options: { ...resolved, quantize: resolved.quantize || result.stored4bit } };
}

const CATEGORIES: MemoryCategory[] = ['weights', 'adapters', 'gradients', 'optimizer', 'activations', 'workspace'];

export function formatEstimate(e: EstimateResult): string {
  const mib = (b: number) => (b / 1048576).toFixed(1).padStart(12);
  const c = e.config;
  const o = e.options;
  const lines = [
    `${c.architecture}: ${c.numLayers} layers, hidden ${c.hiddenSize}, vocabulary ${c.vocabSize}`,
    `batch ${o.batch} x ${o.seq} tokens, LoRA rank ${o.rank} on ${o.targets.length} modules (${e.loraParameters} parameters)${o.loraDropout > 0 ? `, dropout ${o.loraDropout}` : ''}, ` +
      `${o.quantize ? 'NF4 base weights' : 'dense base weights in their stored dtype'}, gradient checkpointing ${o.gradientCheckpointing ? 'on' : 'off'}, on the ${o.device === 'cuda' ? `GPU in ${o.computeDtype}` : 'CPU'}`,
    '',
    `  ${'category'.padEnd(12)}${'MiB'.padStart(12)}`,
    ...CATEGORIES.map((k) => `  ${k.padEnd(12)}${mib(e.categories[k])}`),
    `  ${'peak'.padEnd(12)}${mib(e.peakTotal)}`,
    ...(e.hostBytes > 0 ? ['', `Host memory besides: ${(e.hostBytes / 1048576).toFixed(1)} MiB (the embedding table, which the GPU reads only a step's rows of).`] : []),
    // the GPU's budget (--gpu-memory-budget): the CPU has none, and its "host memory" is the same memory
    ...(o.device === 'cuda' && e.offloadableActivationBytes > 0
      ? ['', `Under a GPU memory budget below the peak the optimizer state (${(e.categories.optimizer / 1048576).toFixed(1)} MiB) pages to host memory; ` +
          `below the peak without it, up to ${(e.offloadableActivationBytes / 1048576).toFixed(1)} MiB of the activations (the checkpointed inputs of all but the last two blocks) move there as well.`]
      : []),
  ];
  return lines.join('\n');
}

function targetsOption(text: string | undefined): string[] | undefined {
  if (text === undefined) return undefined;
  const targets = text.split(',').map((s) => s.trim()).filter((s) => s.length > 0);
  for (const t of targets) if (!ALL_TARGETS.includes(t)) throw new UsageError(`--targets: unknown module '${t}' (known: ${ALL_TARGETS.join(', ')})`);
  if (targets.length === 0) throw new UsageError('--targets needs at least one module');
  return targets;
}

function deviceOption(text: string | undefined): 'cpu' | 'cuda' | undefined {
  if (text === undefined || text === 'cpu' || text === 'cuda') return text;
  throw new UsageError(`--device must be cpu or cuda, got '${text}'`);
}

/** The preset a `train` would use, by name (the command line's default is train's: qlora). */
function presetOption(text: string | undefined): Tunables {
  const name = text ?? 'qlora';
  if (!(name in PRESETS)) throw new UsageError(`--preset must be ${Object.keys(PRESETS).join(' or ')}, got '${name}'`);
  return PRESETS[name as PresetName].values;
}

const qlora = PRESETS.qlora.values;

export const estimateVerb = {
  summary: 'estimate the memory of one training step by category (weights, adapters, optimizer, activations...)',
  options: {
    model: { type: 'string', required: true, description: 'Hugging Face model folder (only config.json is read)' },
    preset: { type: 'string', description: 'the run\'s preset, whose settings are the defaults below: qlora (default, as train) or quick' },
    'seq-len': { type: 'string', description: `tokens per sequence (default: the preset's, qlora ${qlora.seqLen})` },
    'batch-size': { type: 'string', description: `sequences per micro-batch (default: the preset's, qlora ${qlora.batchSize})` },
    rank: { type: 'string', description: `LoRA rank (default: the preset's, qlora ${qlora.rank})` },
    targets: { type: 'string', description: 'comma-separated LoRA target modules (default: the preset\'s, all seven)' },
    'lora-dropout': { type: 'string', description: `LoRA dropout of the run (default: the preset's, qlora ${qlora.dropout}); on the GPU it keeps one MLP activation a block in fp32` },
    'no-quantize': { type: 'boolean', description: 'keep dense base weights, in the dtype the model files store (bf16, fp16 or fp32), instead of NF4' },
    'no-checkpointing': { type: 'boolean', description: 'keep every block\'s activations instead of recomputing them' },
    device: { type: 'string', description: 'cpu (default) or cuda: on the GPU the engine also holds cuBLASLt\'s workspace and attention scratch' },
    dtype: { type: 'string', description: 'with --device cuda: bf16 (default), fp16 or f32 compute' },
    json: { type: 'boolean', description: 'print JSON (bytes)' },
  } satisfies Record<string, OptionSpec>,
  run(o: ParsedOptions): void {
    const preset = presetOption(stringOption(o, 'preset'));
    const result = estimate({
      model: requiredString(o, 'model'),
      seq: integerOption(o, 'seq-len', preset.seqLen),
      batch: integerOption(o, 'batch-size', preset.batchSize),
      rank: integerOption(o, 'rank', preset.rank),
      targets: targetsOption(stringOption(o, 'targets')) ?? preset.targets,
      quantize: !o['no-quantize'],
      loraDropout: numberOption(o, 'lora-dropout') ?? preset.dropout,
      gradientCheckpointing: !o['no-checkpointing'],
      device: deviceOption(stringOption(o, 'device')),
      computeDtype: parseComputeDtype(stringOption(o, 'dtype')),
    });
    process.stdout.write((o.json ? JSON.stringify(result) : formatEstimate(result)) + '\n');
  },
};
