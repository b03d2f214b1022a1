// bench: QLoRA training speed and memory on a synthetic model with the exact shapes of Llama-3.2-1B, Llama-3.1-8B or
// Llama-3-70B (random NF4 weights made by the engine, no files), with the settings of the transformers + PEFT +
// bitsandbytes reference benchmark it is compared with: LoRA r 16, alpha 32, dropout 0 on all seven linear layers,
// gradient checkpointing, AdamW, random tokens, warm-up steps then the mean of timed steps. Prints tokens/s, step time, peak
// memory by category, page traffic and model FLOP utilization. With --generate: prefill and decode tokens/s of
// generation at batch 1 with the adapter applied (the chat panel's path), on the same shapes.
import { EngineModel, type MemoryCategory, type OpTime } from '../../engine';
import { estimateMemory } from '../../engine/tools';
import { blockInputsOffloaded, MEMORY_CATEGORIES } from '../../protocol/events';
import { formatBinaryBytes } from '../../util/bytes';
import { integerOption, stringOption, UsageError, type OptionSpec, type ParsedOptions } from '../cliArgs';
import { printWarnings } from '../cliOutput';
import { peakFlops, trainingFlopsPerToken } from '../flops';
import { argmax } from '../../generate/sampling';
import { movableBlockInputs, peakWithOffloadedInputs } from '../memoryPlan';
import { checkMemory, engineOptions, placeRun, placementFromFlags, placementOptions, type Placement, type PlacementOptions } from '../placement';

export const BENCH_SHAPES = ['tiny', '1b', '8b', '70b'] as const;
export type BenchShape = (typeof BENCH_SHAPES)[number];

export interface BenchOptions {
  shape: BenchShape;
  batch: number;
  seq: number;
  steps: number;
  warmup: number;
  rank: number;
  placement: PlacementOptions;
  /** Time every GPU kernel and GEMM of the timed steps (CUDA events; a small cost per launch). */
  profile?: boolean;
  /** Move every checkpointed block input that can move to host memory, even where the budget does not need it. */
  offloadActivations?: boolean;
  /** Called after each step (warm-up included) with its index and time, for progress on a terminal. */
  onStep?: (index: number, ms: number, warmup: boolean) => void;
}

export interface BenchResult {
  shape: BenchShape;
  device: { kind: 'cpu' | 'cuda'; name: string; computeDtype: string };
  batch: number;
  seq: number;
  rank: number;
  steps: number;
  warmup: number;
  tokens_per_s: number;
  step_ms: number;
  step_ms_min: number;
  step_ms_max: number;
  /** The engine's peak bytes by category over the whole benchmark, and their sum at the highest point. */
  peak_bytes: Record<MemoryCategory, number> & { total: number };
  /** The estimate's peak for this run (`estimate`, less the block inputs it offloads): what peak_bytes.total is
   * held to (issue 7: within 10%). A paged run's measured peak stays under its budget instead. */
  estimated_peak_bytes: number;
  memory_budget: number | null;
  paged_optimizer: boolean;
  /** The checkpointed block inputs moved to host memory between forward and backward (asked for, or the budget's need). */
  offloaded_block_inputs: number;
  page_bytes: number;
  page_moves: number;
  page_ms: number;
  flops_per_token: number;
  /** Model FLOPs per second over the GPU's dense bf16 peak; null where the peak is not known (every CPU). */
  mfu: number | null;
  /** The loss of the last step (random tokens: near log(vocabulary)). */
  loss: number;
  trainable_parameters: number;
  /** What --device auto's choice had to say (the CPU fallback and why). */
  warnings: string[];
  /** With --profile on a GPU: device time per timed step by op, the most first; null otherwise. */
  profile: ProfileEntry[] | null;
}

export interface ProfileEntry {
  op: string;
  /** Calls per step. */
  calls: number;
  /** Device milliseconds per step. */
  ms: number;
  /** Share of the profiled device time. */
  share: number;
}

/** A profile taken over `steps` steps, per step. */
export function profilePerStep(times: readonly OpTime[], steps: number): ProfileEntry[] {
  const total = times.reduce((sum, t) => sum + t.ms, 0);
  return times.map((t) => ({ op: t.op, calls: t.calls / steps, ms: t.ms / steps, share: total > 0 ? t.ms / total : 0 }));
}

/** The reference's token stream: uniform over the vocabulary, new tokens every step, the same on every run. */
function randomIds(count: number, vocab: number, step: number): Int32Array {
  let state = (0x9e3779b9 ^ Math.imul(step + 1, 0x85ebca6b)) >>> 0;
  const ids = new Int32Array(count);
  for (let i = 0; i < count; i++) {
    // xorshift32
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    ids[i] = state % vocab;
  }
  return ids;
}

type BenchDevice = BenchResult['device'];

function benchDevice(p: Placement): BenchDevice {
  return { kind: p.device.kind, name: p.device.name, computeDtype: p.device.computeDtype };
}

/** The synthetic model of `shape` with a fresh adapter of `rank` (alpha twice the rank, no dropout), under the run's budget. */
function benchModel(shape: BenchShape, rank: number, placement: Placement): EngineModel {
  const model = EngineModel.load({ shape, seed: 1 }, engineOptions(placement));
  try {
    model.createLora({ rank, alpha: 2 * rank, dropout: 0, seed: 1 });
  } catch (err) {
    model.dispose();
    throw err;
  }
  return model;
}

const deviceWord = (d: BenchDevice) => `${d.kind === 'cuda' ? 'GPU' : 'CPU'} ${d.name} (${d.computeDtype})`;

export function bench(o: BenchOptions): BenchResult {
  for (const [name, value] of [['batch', o.batch], ['seq', o.seq], ['steps', o.steps], ['rank', o.rank]] as const)
    if (!Number.isSafeInteger(value) || value < 1) throw new UsageError(`--${name} must be a positive integer, got ${value}`);
  if (!Number.isSafeInteger(o.warmup) || o.warmup < 0) throw new UsageError(`--warmup must be a whole number, got ${o.warmup}`);
  // one token has no next token to predict: the loss would be a mean over nothing (train asks at least 2 too)
  if (o.seq < 2) throw new UsageError(`--seq must be at least 2 (a token and the next one it predicts), got ${o.seq}`);
  const placement = placeRun(o.placement);
  const estimate = estimateMemory({ shape: o.shape }, { batch: o.batch, seq: o.seq, rank: o.rank, device: placement.device.kind, computeDtype: engineOptions(placement).computeDtype });
  const plan = checkMemory(estimate, placement, { batchSize: o.batch, seqLen: o.seq, rank: o.rank, gradientCheckpointing: true, offloadActivations: o.offloadActivations });
  const offloadBlockInputs = plan ? plan.offloadBlockInputs : o.offloadActivations ? movableBlockInputs(estimate) : 0;

  const model = benchModel(o.shape, o.rank, placement);
  try {
    const config = model.config();
    let pageBytes = 0, pageMoves = 0, pageMs = 0;
    let loss = NaN;
    const times: number[] = [];
    for (let i = 0; i < o.warmup + o.steps; i++) {
      if (o.profile && i === o.warmup) {
        model.takeProfile();
        model.setProfiling(true);
      }
      const ids = randomIds(o.batch * o.seq, config.vocabSize, i);
      const t0 = process.hrtime.bigint();
      model.zeroGrad();
      const r = model.run({ ids, labels: ids, batch: o.batch, seq: o.seq }, { computeGrads: true, training: true, gradientCheckpointing: true, offloadBlockInputs, seed: 1, step: i + 1 });
      model.optimizerStep({ lr: 2e-4 });
      const ms = Number(process.hrtime.bigint() - t0) / 1e6;
      loss = r.loss;
      for (const m of model.takePageMoves()) {
        pageBytes += m.bytes;
        pageMoves += 1;
        pageMs += m.ms;
      }
      if (i >= o.warmup) times.push(ms);
      o.onStep?.(i, ms, i < o.warmup);
    }
    const profiled = o.profile ? model.takeProfile() : [];
    if (o.profile) model.setProfiling(false);
    const stepMs = times.reduce((a, b) => a + b, 0) / times.length;
    const flopsPerToken = trainingFlopsPerToken(config, o.rank, o.seq);
    const tokensPerS = (o.batch * o.seq) / (stepMs / 1000);
    const peak = placement.device.kind === 'cuda' ? peakFlops(placement.device.name) : null;
    const m = model.memory();
    const peakBytes = { ...m.peak, total: m.totalPeak };
    return {
      shape: o.shape,
      device: benchDevice(placement),
      batch: o.batch, seq: o.seq, rank: o.rank, steps: o.steps, warmup: o.warmup,
      tokens_per_s: tokensPerS, step_ms: stepMs, step_ms_min: Math.min(...times), step_ms_max: Math.max(...times),
      peak_bytes: peakBytes, estimated_peak_bytes: peakWithOffloadedInputs(estimate, offloadBlockInputs),
      memory_budget: placement.memoryBudget, paged_optimizer: plan?.paged ?? false, offloaded_block_inputs: offloadBlockInputs,
      page_bytes: pageBytes, page_moves: pageMoves, page_ms: pageMs,
      flops_per_token: flopsPerToken, mfu: peak ? (tokensPerS * flopsPerToken) / peak : null,
      loss, trainable_parameters: model.loraInfo()?.parameters ?? 0, warnings: placement.warnings,
      profile: profiled.length > 0 ? profilePerStep(profiled, o.steps) : null,
    };
  } finally {
    model.dispose();
  }
}

export interface GenerateBenchOptions {
  shape: BenchShape;
  promptTokens: number;
  newTokens: number;
  rank: number;
  placement: PlacementOptions;
  /** Run the same a third time with every GPU kernel and GEMM of its decode timed (not the timed run's figures). */
  profile?: boolean;
}

export interface GenerateBenchResult {
  shape: BenchShape;
  device: BenchDevice;
  rank: number;
  prompt_tokens: number;
  new_tokens: number;
  prefill_tokens_per_s: number;
  decode_tokens_per_s: number;
  decode_ms_per_token: number;
  peak_bytes: number;
  warnings: string[];
  /** With --profile on a GPU: device time per decoded token by op, the most first; null otherwise. */
  decode_profile: ProfileEntry[] | null;
}

/** Prefill of a random prompt, then greedy decode token by token, after one untimed warm-up of the same. */
export function benchGenerate(o: GenerateBenchOptions): GenerateBenchResult {
  for (const [name, value] of [['prompt-tokens', o.promptTokens], ['new-tokens', o.newTokens], ['rank', o.rank]] as const)
    if (!Number.isSafeInteger(value) || value < 1) throw new UsageError(`--${name} must be a positive integer, got ${value}`);
  const placement = placeRun(o.placement);
  const model = benchModel(o.shape, o.rank, placement);
  try {
    const prompt = randomIds(o.promptTokens, model.config().vocabSize, 0);
    const once = (profileDecode = false) => {
      const session = model.startGeneration();
      try {
        const t0 = process.hrtime.bigint();
        let logits = session.append(prompt);
        const t1 = process.hrtime.bigint();
        if (profileDecode) {
          model.takeProfile();
          model.setProfiling(true);
        }
        for (let i = 0; i < o.newTokens; i++) logits = session.append([argmax(logits)]);
        const t2 = process.hrtime.bigint();
        return { prefillMs: Number(t1 - t0) / 1e6, decodeMs: Number(t2 - t1) / 1e6 };
      } finally {
        session.end();
        if (profileDecode) model.setProfiling(false);
      }
    };
    once();
    const t = once();
    // the kernels' timing events slow decode down: their run is a third one, apart from the figures above
    let decodeProfile: ProfileEntry[] | null = null;
    if (o.profile) {
      once(true);
      const profiled = model.takeProfile();
      if (profiled.length > 0) decodeProfile = profilePerStep(profiled, o.newTokens);
    }
    return {
      shape: o.shape,
      device: benchDevice(placement),
      rank: o.rank, prompt_tokens: o.promptTokens, new_tokens: o.newTokens,
      prefill_tokens_per_s: o.promptTokens / (t.prefillMs / 1000),
      decode_tokens_per_s: o.newTokens / (t.decodeMs / 1000),
      decode_ms_per_token: t.decodeMs / o.newTokens,
      peak_bytes: model.memory().totalPeak,
      warnings: placement.warnings,
      decode_profile: decodeProfile,
    };
  } finally {
    model.dispose();
  }
}

export function formatGenerateBench(r: GenerateBenchResult): string {
  const lines = [
    `bench ${r.shape} generation on ${deviceWord(r.device)}: batch 1, NF4 base, LoRA r ${r.rank} applied`,
    `  prefill       ${r.prefill_tokens_per_s.toFixed(r.prefill_tokens_per_s < 100 ? 1 : 0)} tokens/s (${r.prompt_tokens}-token prompt)`,
    `  decode        ${r.decode_tokens_per_s.toFixed(r.decode_tokens_per_s < 100 ? 2 : 0)} tokens/s (${r.decode_ms_per_token.toFixed(1)} ms a token, ${r.new_tokens} tokens)`,
    `  peak memory   ${formatBinaryBytes(r.peak_bytes)}`,
  ];
  if (r.decode_profile) {
    // device time against the token's wall time: the rest is the host's (launches, the logits' copy, sampling)
    const deviceMs = r.decode_profile.reduce((sum, e) => sum + e.ms, 0);
    lines.push(`  profile       ${deviceMs.toFixed(2)} ms of device time a decoded token in ${r.decode_profile.length} ops (of a ${r.decode_ms_per_token.toFixed(2)} ms token); the most:`);
    for (const e of r.decode_profile.slice(0, PROFILE_LINES))
      lines.push(profileLine(e, 3));
  }
  return lines.join('\n');
}

function profileLine(e: ProfileEntry, digits: number): string {
  return `    ${e.op.padEnd(44)}${e.ms.toFixed(digits).padStart(10)} ms ${(100 * e.share).toFixed(1).padStart(5)}%  ${formatCalls(e.calls)}`;
}

/** How far the measured peak is from the estimate's: "equal to", or e.g. "3.1% below". */
export function estimateDeviation(r: Pick<BenchResult, 'peak_bytes' | 'estimated_peak_bytes'>): string {
  const off = (r.peak_bytes.total - r.estimated_peak_bytes) / r.estimated_peak_bytes;
  return off === 0 ? 'equal to' : `${Math.abs(100 * off).toFixed(1)}% ${off < 0 ? 'below' : 'above'}`;
}

export function formatBench(r: BenchResult): string {
  const lines = [
    `bench ${r.shape} on ${deviceWord(r.device)}: batch ${r.batch} x ${r.seq} tokens, ` +
      `LoRA r ${r.rank} on all linear layers (${r.trainable_parameters.toLocaleString('en-US')} parameters), ${r.steps} steps after ${r.warmup} warm-up`,
    `  tokens/s      ${r.tokens_per_s.toFixed(r.tokens_per_s < 100 ? 1 : 0)}`,
    `  step          ${r.step_ms.toFixed(1)} ms (min ${r.step_ms_min.toFixed(1)}, max ${r.step_ms_max.toFixed(1)})`,
    `  MFU           ${r.mfu === null ? `unknown (no peak FLOP/s figure for ${r.device.name})` : `${(100 * r.mfu).toFixed(1)}%`} at ${(r.flops_per_token / 1e9).toFixed(2)} GFLOP per token`,
    `  peak memory   ${formatBinaryBytes(r.peak_bytes.total)}${r.memory_budget !== null ? ` of a ${formatBinaryBytes(r.memory_budget)} budget` : ''}` +
      `${r.paged_optimizer ? ', optimizer paged' : ''}${r.offloaded_block_inputs > 0 ? `, ${blockInputsOffloaded(r.offloaded_block_inputs)}` : ''}`,
    ...MEMORY_CATEGORIES.map((c) => `    ${c.padEnd(12)}${formatBinaryBytes(r.peak_bytes[c]).padStart(12)}`),
    `  estimate      ${formatBinaryBytes(r.estimated_peak_bytes)}` +
      (r.paged_optimizer ? ' (paged: the measured peak stays under the budget instead)' : ` (the measured peak ${estimateDeviation(r)} it)`),
    `  paging        ${r.page_moves === 0 ? 'none' : `${r.page_moves} moves, ${formatBinaryBytes(r.page_bytes)} in ${r.page_ms.toFixed(1)} ms`}`,
    `  loss          ${r.loss.toFixed(4)} (random tokens)`,
  ];
  if (r.profile) {
    const deviceMs = r.profile.reduce((sum, e) => sum + e.ms, 0);
    lines.push(`  profile       ${deviceMs.toFixed(1)} ms of device time a step in ${r.profile.length} ops (of a ${r.step_ms.toFixed(1)} ms step); the most:`);
    for (const e of r.profile.slice(0, PROFILE_LINES)) lines.push(profileLine(e, 2));
  }
  return lines.join('\n');
}

export const benchOptions: Record<string, OptionSpec> = {
  shape: { type: 'string', required: true, description: `model shape: ${BENCH_SHAPES.join(', ')} (Llama-3.2-1B, Llama-3.1-8B, Llama-3-70B; tiny for a quick run)` },
  batch: { type: 'string', description: 'sequences per step (default 1)' },
  seq: { type: 'string', description: 'tokens per sequence (default 2048)' },
  steps: { type: 'string', description: 'timed steps (default 10)' },
  warmup: { type: 'string', description: 'untimed steps first (default 3)' },
  rank: { type: 'string', description: 'LoRA rank (default 16; alpha is twice the rank)' },
  generate: { type: 'boolean', description: 'measure generation instead: prefill and decode tokens/s at batch 1 with the adapter applied' },
  'prompt-tokens': { type: 'string', description: 'with --generate: prompt length (default 512)' },
  'new-tokens': { type: 'string', description: 'with --generate: tokens decoded one by one (default 128)' },
  ...placementOptions,
  profile: { type: 'boolean', description: 'time every GPU kernel and GEMM of the timed steps (with --generate: of a third run\'s decode, per token) and print where the time goes (CUDA events)' },
  'offload-activations': { type: 'boolean', description: 'move the checkpointed block inputs (all but the last two) to host memory between forward and backward even where the budget does not need it (it moves as many as it needs by itself)' },
  json: { type: 'boolean', description: 'print the result as JSON' },
};

const PROFILE_LINES = 25;

function warnNoProfile(device: BenchDevice): void {
  process.stderr.write(`warning: --profile times GPU kernels; this run was on the ${device.kind === 'cuda' ? 'GPU but took no profile' : 'CPU, which has none'}\n`);
}
const formatCalls = (calls: number) => `${Number.isInteger(calls) ? calls : calls.toFixed(1)} call${calls === 1 ? '' : 's'}`;

export function benchVerb(o: ParsedOptions): void {
  const shape = stringOption(o, 'shape');
  if (!shape || !(BENCH_SHAPES as readonly string[]).includes(shape)) throw new UsageError(`--shape must be one of ${BENCH_SHAPES.join(', ')}, got '${shape ?? ''}'`);
  const json = Boolean(o.json);
  if (o.generate) {
    const g = benchGenerate({
      shape: shape as BenchShape,
      promptTokens: integerOption(o, 'prompt-tokens', 512),
      newTokens: integerOption(o, 'new-tokens', 128),
      rank: integerOption(o, 'rank', 16),
      placement: placementFromFlags(o),
      profile: Boolean(o.profile),
    });
    printWarnings(g.warnings);
    if (o.profile && g.decode_profile === null) warnNoProfile(g.device);
    process.stdout.write((json ? JSON.stringify(g) : formatGenerateBench(g)) + '\n');
    return;
  }
  const result = bench({
    shape: shape as BenchShape,
    batch: integerOption(o, 'batch', 1),
    seq: integerOption(o, 'seq', 2048),
    steps: integerOption(o, 'steps', 10),
    warmup: integerOption(o, 'warmup', 3),
    rank: integerOption(o, 'rank', 16),
    placement: placementFromFlags(o),
    profile: Boolean(o.profile),
    offloadActivations: Boolean(o['offload-activations']),
    onStep: json ? undefined : (i, ms, warm) => process.stderr.write(`${warm ? 'warm-up' : 'step'} ${i + 1}: ${ms.toFixed(1)} ms\n`),
  });
  printWarnings(result.warnings);
  if (o.profile && result.profile === null) warnNoProfile(result.device);
  process.stdout.write((json ? JSON.stringify(result) : formatBench(result)) + '\n');
}
