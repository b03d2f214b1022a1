// The typed face of the native engine. Every native failure surfaces as an EngineError carrying the engine's own
// message (which names the file, tensor or value at fault), so callers can show it as is.
import { loadAddon } from './addon';
import type {
  NativeAddon,
  NativeGpuInfo,
  NativeGpuReport,
  NativeLoraInfo,
  NativeLoraOptions,
  NativeMemory,
  NativeModel,
  NativeModelConfig,
  NativeModelOptions,
  NativeOpTime,
  NativeOptimizerOptions,
  NativePageMove,
  NativeQuantizeReport,
  NativeRunOptions,
  NativeStepReport,
  NativeTensorToWrite,
  SyntheticModel,
} from './native';

export type {
  NativeGpuReport as GpuReport,
  NativeModelConfig as ModelConfig,
  NativeLoraInfo as LoraInfo,
  NativeLoraOptions as LoraOptions,
  NativeMemory as EngineMemory,
  NativeOpTime as OpTime,
  NativeOptimizerOptions as OptimizerOptions,
  NativePageMove as PageMove,
  NativeQuantizeReport as QuantizeReport,
  NativeStepReport as StepReport,
  NativeTensorToWrite as TensorToWrite,
} from './native';
export type { MemoryCategory } from './native';

/** An error raised by the engine (bad file, bad shape, unsupported model...) or by loading it. */
export class EngineError extends Error {
  override readonly name = 'EngineError';
  constructor(
    message: string,
    /** 'engine': the engine rejected the input; 'load': the addon could not be loaded; 'argument': a bad call. */
    readonly kind: 'engine' | 'load' | 'argument',
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

function translate(err: unknown): EngineError {
  if (err instanceof EngineError) return err;
  if (err instanceof Error) {
    const code = (err as Error & { code?: unknown }).code;
    const kind = code === 'QLORA_ENGINE' ? 'engine' : err instanceof TypeError || err instanceof RangeError ? 'argument' : 'engine';
    return new EngineError(err.message, kind, { cause: err });
  }
  return new EngineError(String(err), 'engine');
}

function call<T>(fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw translate(err);
  }
}

function addon(): NativeAddon {
  try {
    return loadAddon();
  } catch (err) {
    throw new EngineError(err instanceof Error ? err.message : String(err), 'load', { cause: err });
  }
}

export interface RunInput {
  /** Token ids, batch * seq of them, row-major. */
  ids: Int32Array;
  /** Labels aligned with ids (transformers' convention: shifted inside), -100 to ignore; default: the ids. */
  labels?: Int32Array;
  batch: number;
  seq: number;
}

export interface RunOptions extends NativeRunOptions {}

export interface RunResult {
  lossSum: number;
  labelled: number;
  /** Mean loss over labelled positions (NaN when none is labelled, as transformers gives). */
  loss: number;
  /** [batch, seq - 1] log-probabilities of each next label, when asked for. */
  logprobs?: Float64Array;
  /** [batch * seq, vocab] the whole next-token log-distribution at each position, when asked for (logSoftmax). */
  logSoftmax?: Float32Array;
}

/** A model loaded by the engine, with at most one LoRA adapter attached. */
export class EngineModel {
  private constructor(private readonly native: NativeModel) {}

  /** Loads a Hugging Face model folder; `quantize` stores dense linear weights as NF4 (QLoRA training). */
  static load(source: string | SyntheticModel, options: NativeModelOptions = {}): EngineModel {
    const { Model } = addon();
    return new EngineModel(call(() => new Model(source, options)));
  }

  config(): NativeModelConfig {
    return call(() => this.native.config());
  }
  stored4bit(): boolean {
    return call(() => this.native.stored4bit());
  }
  createLora(options: NativeLoraOptions): void {
    call(() => this.native.createLora(options));
  }
  loadAdapter(dir: string): void {
    call(() => this.native.loadAdapter(dir));
  }
  saveAdapter(dir: string, baseModelName: string): void {
    call(() => this.native.saveAdapter(dir, baseModelName));
  }
  loraInfo(): NativeLoraInfo | null {
    return call(() => this.native.loraInfo());
  }

  run(input: RunInput, options: RunOptions = {}): RunResult {
    const { ids, labels, batch, seq } = input;
    if (ids.length !== batch * seq) throw new EngineError(`ids has ${ids.length} tokens, expected batch * seq = ${batch * seq}`, 'argument');
    const r = call(() => this.native.run(ids, labels ?? null, batch, seq, options));
    return { lossSum: r.lossSum, labelled: r.labelled, loss: r.labelled > 0 ? r.lossSum / r.labelled : NaN, logprobs: r.logprobs, logSoftmax: r.logSoftmax };
  }

  zeroGrad(): void {
    call(() => this.native.zeroGrad());
  }
  saveGradients(path: string): void {
    call(() => this.native.saveGradients(path));
  }
  gradNorm(): number {
    return call(() => this.native.gradNorm());
  }
  optimizerStep(options: NativeOptimizerOptions): NativeStepReport {
    return call(() => this.native.optimizerStep(options));
  }
  /** AdamW's moments and step count, for checkpoints (safetensors, written atomically). */
  saveOptimizerState(path: string): void {
    call(() => this.native.saveOptimizerState(path));
  }
  loadOptimizerState(path: string): void {
    call(() => this.native.loadOptimizerState(path));
  }
  memory(): NativeMemory {
    return call(() => this.native.memory());
  }
  /** Starts a new high-water interval: memory().highWater then covers only what runs after this call. */
  beginMemoryInterval(): void {
    call(() => this.native.beginMemoryInterval());
  }
  /** The paged optimizer's page moves since the last call (none without a memory budget). */
  takePageMoves(): NativePageMove[] {
    return call(() => this.native.takePageMoves());
  }
  /** On the GPU, times every kernel and GEMM from now on (a small cost per launch); no effect on the CPU. */
  setProfiling(on: boolean): void {
    call(() => this.native.setProfiling(on));
  }
  /** Device time by op since the last call, the most first; empty on the CPU, which has no per-op profile. */
  takeProfile(): NativeOpTime[] {
    return call(() => this.native.takeProfile());
  }
  /**
   * A generation (one sequence with its KV cache) run with the adapter scaled by `loraScale` (default 1 when an
   * adapter is loaded; 0 = the base model, exactly as if no adapter were loaded). Replacing the adapter ends it.
   */
  startGeneration(options: { loraScale?: number } = {}): GenerationSession {
    const id = call(() => this.native.generationStart(options));
    return new GenerationSession(this.native, id, this.config().vocabSize);
  }
  dispose(): void {
    this.native.dispose();
  }
}

/** One sequence being generated: its tokens so far live in the engine's KV cache. */
export class GenerationSession {
  private ended = false;
  constructor(private readonly native: NativeModel, private readonly id: number, readonly vocabSize: number) {}

  /**
   * Runs `ids` (a prompt, or the token just sampled) after the tokens so far and returns the raw next-token logits
   * of the last one ([vocab]); with `allLogits`, those of every new position ([ids.length, vocab]).
   */
  append(ids: ArrayLike<number>, options: { allLogits?: boolean } = {}): Float32Array {
    return call(() => this.native.generationAppend(this.id, Int32Array.from(ids), options));
  }
  /** Tokens in the cache. */
  get length(): number {
    return call(() => this.native.generationLength(this.id));
  }
  /** Forgets every token after the first `length` (to reuse a shared prefix). */
  truncate(length: number): void {
    call(() => this.native.generationTruncate(this.id, length));
  }
  /** Frees the cache; the session cannot be used afterwards. */
  end(): void {
    if (this.ended) return;
    this.ended = true;
    this.native.generationEnd(this.id);
  }
}

export function engineVersion(): string {
  return call(() => addon().version());
}
export function engineInfo(): { backends: string[]; threads: number; cudaCompiled: boolean; cudaComputeDtypes: string[]; cpuVectorCode: string } {
  return call(() => addon().engineInfo());
}
/** What this machine offers the GPU engine (driver, NVML, cuBLASLt, GPUs) and each problem as a sentence. */
export function gpuReport(libraryDir?: string): NativeGpuReport {
  return call(() => addon().gpuReport(libraryDir ?? ''));
}
/** The GPUs now (memory, utilization, temperature, power) for telemetry; null without NVML. */
export function gpuTelemetry(libraryDir?: string): NativeGpuInfo[] | null {
  return call(() => addon().gpuTelemetry(libraryDir ?? ''));
}
export function readModelConfig(dir: string): NativeModelConfig {
  return call(() => addon().readModelConfig(dir));
}
export type QuantizeDtype = 'float32' | 'bfloat16' | 'float16';
export function quantizeModel(modelDir: string, outFile: string, doubleQuant: boolean, dtype?: QuantizeDtype): NativeQuantizeReport {
  return call(() => addon().quantizeModel(modelDir, outFile, doubleQuant, dtype ?? ''));
}
export function randomNormal(seed: number, count: number): Float32Array {
  return call(() => addon().randomNormal(seed, count));
}
export function writeSafetensors(path: string, tensors: NativeTensorToWrite[], metadata?: Record<string, string>): void {
  call(() => addon().writeSafetensors(path, tensors, metadata));
}
