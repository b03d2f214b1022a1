// Typed wrappers of the engine's whole-model tools: merging a LoRA adapter into its base, estimating the memory
// of a training step, and llama.cpp's GGUF block quantizers. Native failures surface as EngineError, as in index.ts.
import { loadAddon } from './addon';
import { EngineError } from './index';
import type { ComputeDtype, MemoryCategory } from './native';

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
  /** With checkpointing: the inputs of the lowest this many blocks move to host memory between their forward and
   * backward (at most all but two count). */
  offloadBlockInputs?: number;
  /** LoRA dropout of the run (default 0): on the GPU under half compute it keeps SwiGLU's output at its fp32 size. */
  loraDropout?: number;
  /** The device the run computes on: the CUDA backend holds a GEMM workspace and attention scratch besides. */
  device?: 'cpu' | 'cuda';
  /** On the GPU: bf16 compute holds bf16 copies of each GEMM's inputs while it runs. */
  computeDtype?: ComputeDtype;
}

export interface MemoryEstimate {
  /** Peak bytes per category over a training step. */
  categories: Record<MemoryCategory, number>;
  /** All categories at once: the engine's allocator peak. */
  peakTotal: number;
  loraParameters: number;
  /** One page of the paged optimizer: AdamW's two moments of one layer's LoRA parameters. */
  optimizerPageBytes: number;
  /** One checkpointed block input: what each activation page event moves. */
  activationPageBytes: number;
  /** How much less a step holds with every block input that can move offloaded (all but two; 0 without gradient
   * checkpointing). */
  offloadableActivationBytes: number;
  /** Host memory held beside the categories on the GPU: an untied embedding table kept there, with the page-locked
   * buffer a step gathers its rows in (0 on the CPU). Pages moved out under a budget come on top. */
  hostBytes: number;
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

/** GGUF tensor types the engine encodes, by ggml's names (lower case). */
export type GgmlType = 'f32' | 'f16' | 'bf16' | 'q5_0' | 'q8_0' | 'q4_k' | 'q6_k';

export interface GgmlTypeInfo {
  /** Values per block; a row's length must be a multiple of it. */
  blockSize: number;
  /** Bytes per block. */
  blockBytes: number;
  /** ggml's GGML_TYPE_* id, as a GGUF tensor info records it. */
  id: number;
}

/** Block geometry of each type (ggml.h's ggml_type ids; ggml-common.h's block structs, which native/src/quant/ggml_quants.h writes). */
export const GGML_TYPES: Readonly<Record<GgmlType, GgmlTypeInfo>> = {
  f32: { blockSize: 1, blockBytes: 4, id: 0 },
  f16: { blockSize: 1, blockBytes: 2, id: 1 },
  q5_0: { blockSize: 32, blockBytes: 2 + 4 + 16, id: 6 }, // fp16 d, qh[4] (the fifth bits), qs[16] (low nibbles)
  q8_0: { blockSize: 32, blockBytes: 2 + 32, id: 8 }, // fp16 d, int8 qs[32]
  q4_k: { blockSize: 256, blockBytes: 2 + 2 + 12 + 128, id: 12 }, // fp16 d, fp16 dmin, scales[12], qs[128]
  q6_k: { blockSize: 256, blockBytes: 128 + 64 + 16 + 2, id: 14 }, // ql[128], qh[64], int8 scales[16], fp16 d
  bf16: { blockSize: 1, blockBytes: 2, id: 30 },
};

/** Bytes of one row of `cols` values; throws EngineError ('argument') when cols is not a multiple of the block size. */
export function ggmlRowBytes(type: GgmlType, cols: number): number {
  const info = GGML_TYPES[type];
  if (!info) throw new EngineError(`unknown ggml type '${String(type)}' (known: ${Object.keys(GGML_TYPES).join(', ')})`, 'argument');
  if (!Number.isInteger(cols) || cols < 0 || cols % info.blockSize !== 0) {
    throw new EngineError(`${type}: cols ${cols} is not a multiple of the block size ${info.blockSize}`, 'argument');
  }
  return (cols / info.blockSize) * info.blockBytes;
}

/** A tensor of a merged model: its name and shape as merge writes them (a bnb-4bit weight's real shape). */
export interface MergedTensorInfo {
  name: string;
  shape: number[];
}

interface NativeMergedWeights {
  tensors(): MergedTensorInfo[];
  values(name: string, into?: Float32Array): Float32Array;
  close(): void;
}

// The addon's tool functions, as native/src/binding/tools_binding.cpp exports them.
interface NativeTools {
  MergedWeights: new (modelDir: string, adapterDir: string) => NativeMergedWeights;
  mergeWeights(modelDir: string, adapterDir: string, folder: string, dtype: string, maxShardBytes?: number): MergeWeightsReport;
  estimateMemory(model: string | { shape: string }, options: EstimateOptions): MemoryEstimate;
  ggmlQuantize(type: string, data: Float32Array, rows: number, cols: number, into?: Uint8Array): Uint8Array;
  ggmlDequantize(type: string, bytes: Uint8Array, rows: number, cols: number): Float32Array;
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

/**
 * The merge of an adapter into its base model (plain or bnb-4bit) in float32, computed a tensor at a time: what
 * mergeWeights writes with dtype float32, with no copy of the model on disk. Checked when opened, as mergeWeights
 * checks; close() unmaps the base model.
 */
export class MergedWeights {
  private constructor(private readonly native: NativeMergedWeights) {}

  static open(modelDir: string, adapterDir: string): MergedWeights {
    const { MergedWeights: Native } = tools();
    return new MergedWeights(call(() => new Native(modelDir, adapterDir)));
  }

  /** Every tensor of the merged model, in the order merge writes them. */
  tensors(): MergedTensorInfo[] {
    return call(() => this.native.tensors());
  }

  /**
   * One tensor's merged values (fp32): in the start of `into` where it is given (the result is a view of it; a
   * shorter one is an EngineError), else in a new array.
   */
  values(name: string, into?: Float32Array): Float32Array {
    return call(() => this.native.values(name, into));
  }

  close(): void {
    this.native.close();
  }
}

/** Memory of one training step by category, from a model folder's config.json alone, or of a benchmark shape ({shape: '8b'}). */
export function estimateMemory(model: string | { shape: string }, options: EstimateOptions = {}): MemoryEstimate {
  return call(() => tools().estimateMemory(model, options));
}

/**
 * Encodes a row-major [rows, cols] fp32 matrix (a whole tensor or a range of its rows) in a GGUF block format:
 * rows * ggmlRowBytes(type, cols) bytes, exactly as a GGUF tensor's data holds them. Rows are independent, so a
 * tensor can be streamed a range of rows at a time and the pieces concatenated. Throws EngineError ('argument') when
 * cols is not a multiple of the type's block size (32 for q8_0, 256 for q4_k and q6_k) or data.length is not
 * rows * cols. The bytes go to the start of `into` where it is given (the result is a view of it; a shorter one
 * throws too). Runs on the calling thread (threaded inside the engine).
 */
export function ggmlQuantize(type: GgmlType, data: Float32Array, rows: number, cols: number, into?: Uint8Array): Uint8Array {
  return call(() => tools().ggmlQuantize(type, data, rows, cols, into));
}

/** Decodes GGUF block bytes to fp32 with llama.cpp's dequantization arithmetic (the inverse view of ggmlQuantize). */
export function ggmlDequantize(type: GgmlType, bytes: Uint8Array, rows: number, cols: number): Float32Array {
  return call(() => tools().ggmlDequantize(type, bytes, rows, cols));
}
