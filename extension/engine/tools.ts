// Typed wrappers of the engine's whole-model tools: merging a LoRA adapter into its base and estimating the memory
// of a training step. Native failures surface as EngineError, as in index.ts.
import { loadAddon } from './addon';
import { EngineError } from './index';
import type { MemoryCategory } from './native';

/** Output dtype of a merged model. */
export type MergeDtype = 'bfloat16' | 'float16' | 'float32';

export interface MergeWeightsReport {
  /** 1 means a single model.safetensors; more means model-0000i-of-0000N shards plus an index. */
  shards: number;
  tensors: number;
  /** Tensor bytes written (the index's total_size). */
  bytes: number;
  /** Names of the files written in the folder, the index included. */
  files: string[];
}

export interface EstimateOptions {
  batch?: number;
  seq?: number;
  rank?: number;
  /** LoRA target modules (q_proj ... down_proj); default all seven. */
  targets?: string[];
  /** Quantize dense linear weights to NF4 on load (a bnb-4bit checkpoint is NF4 either way); default true. */
  quantize?: boolean;
  gradientCheckpointing?: boolean;
  /** Count AdamW's state; default true. */
  optimizer?: boolean;
}

export interface MemoryEstimate {
  /** Peak bytes per category over a training step. */
  categories: Record<MemoryCategory, number>;
  /** All categories at once: the engine's allocator peak. */
  peakTotal: number;
  loraParameters: number;
  stored4bit: boolean;
  config: {
    architecture: string;
    modelType: string;
    numLayers: number;
    hiddenSize: number;
    intermediateSize: number;
    numHeads: number;
    numKvHeads: number;
    headDim: number;
    vocabSize: number;
    tieWordEmbeddings: boolean;
    dtype: string;
  };
}

// The addon's tool functions, as native/src/binding/tools_binding.cpp exports them.
interface NativeTools {
  mergeWeights(modelDir: string, adapterDir: string, folder: string, dtype: string, maxShardBytes?: number): MergeWeightsReport;
  estimateMemory(modelDir: string, options: EstimateOptions): MemoryEstimate;
}

function tools(): NativeTools {
  try {
    return loadAddon() as unknown as NativeTools;
  } catch (err) {
    throw new EngineError(err instanceof Error ? err.message : String(err), 'load', { cause: err });
  }
}

function call<T>(fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    if (err instanceof EngineError) throw err;
    if (err instanceof Error) {
      const engine = (err as Error & { code?: unknown }).code === 'QLORA_ENGINE';
      const kind = !engine && (err instanceof TypeError || err instanceof RangeError) ? 'argument' : 'engine';
      throw new EngineError(err.message, kind, { cause: err });
    }
    throw new EngineError(String(err), 'engine');
  }
}

/**
 * Writes base + LoRA (W + scale * B @ A) as plain Hugging Face weights into `folder` (new or empty): tensors only,
 * no config.json or tokenizer files.
 */
export function mergeWeights(modelDir: string, adapterDir: string, folder: string, dtype: MergeDtype, maxShardBytes?: number): MergeWeightsReport {
  return call(() => tools().mergeWeights(modelDir, adapterDir, folder, dtype, maxShardBytes));
}

/** Memory of one training step by category, from the model's config.json alone. */
export function estimateMemory(modelDir: string, options: EstimateOptions = {}): MemoryEstimate {
  return call(() => tools().estimateMemory(modelDir, options));
}
