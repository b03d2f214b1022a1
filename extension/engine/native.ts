// The shape of the native addon exactly as native/src/binding/addon.cpp exports it. Only extension/engine/ uses
// these raw types; everything else goes through the typed wrapper in index.ts.

export interface NativeModelConfig {
  architecture: string;
  modelType: string;
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling: 'default' | 'linear' | 'llama3';
  /** linear and llama3: the factor; llama3 also the low/high frequency factors and original context length. */
  ropeScalingFactor: number;
  ropeLowFreqFactor: number;
  ropeHighFreqFactor: number;
  ropeOriginalMaxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  qkvBias: boolean;
  maxPositionEmbeddings: number;
  bosTokenId: number | null;
  eosTokenIds: number[];
  dtype: string;
  quantized4bit: boolean;
}

export interface NativeLoraOptions {
  rank?: number;
  alpha?: number;
  dropout?: number;
  useRslora?: boolean;
  targets?: string[];
  seed?: number;
}

export interface NativeLoraInfo {
  rank: number;
  alpha: number;
  dropout: number;
  useRslora: boolean;
  scale: number;
  targets: string[];
  parameters: number;
}

export interface NativeRunOptions {
  computeGrads?: boolean;
  gradientCheckpointing?: boolean;
  /** With gradients and checkpointing: the inputs of the lowest this many blocks move to host memory as forward
   * writes them and come back as backward reaches them (page events), so that a step holds that many fewer (all but
   * two at most). */
  offloadBlockInputs?: number;
  gradNormalizer?: number;
  training?: boolean;
  seed?: number;
  step?: number;
  microBatch?: number;
  logprobs?: boolean;
  /** Return the whole next-token log-distribution at every position ([batch * seq, vocab]). */
  logSoftmax?: boolean;
  /** fp16's loss scaling: gradients of lossScale times the loss (lossSum stays unscaled). Default 1. */
  lossScale?: number;
}

export interface NativeRunResult {
  lossSum: number;
  labelled: number;
  logprobs?: Float64Array;
  logSoftmax?: Float32Array;
}

export interface NativeOptimizerOptions {
  lr?: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  weightDecay?: number;
  maxGradNorm?: number;
  /** The loss scale the gradients were taken with: divided out before clipping and the update. Default 1. */
  lossScale?: number;
  /** Gradients that are not finite (an fp16 overflow) skip the update instead of failing. */
  skipNonFinite?: boolean;
}

export interface NativeStepReport {
  /** Of the unscaled loss. */
  gradNorm: number;
  clipped: boolean;
  step: number;
  /** skipNonFinite and the gradients overflowed: nothing was updated. */
  skipped: boolean;
}

export type MemoryCategory = 'weights' | 'adapters' | 'gradients' | 'optimizer' | 'activations' | 'workspace';

export interface NativeMemory {
  current: Record<MemoryCategory, number>;
  peak: Record<MemoryCategory, number>;
  totalCurrent: number;
  totalPeak: number;
  /** By category at the highest total since the last beginMemoryInterval() (or load). */
  highWater: Record<MemoryCategory, number>;
  highWaterTotal: number;
}

/** One move of a paged-optimizer page between device memory and host memory. */
export interface NativePageMove {
  dir: 'out' | 'in';
  /** The page: "model.layers.7.optimizer" (AdamW's moments of that layer's LoRA parameters). */
  tensor: string;
  bytes: number;
  ms: number;
}

/** Device time of one op (a kernel by name, or a GEMM by types and shape) summed over its calls. */
export interface NativeOpTime {
  op: string;
  calls: number;
  ms: number;
}

/** A benchmark shape with random NF4 weights and no files (native/src/model/bench_shapes.h). */
export interface SyntheticModel {
  shape: 'tiny' | '1b' | '8b' | '70b';
  seed?: number;
}

/** What the engine computes in: fp32 (the CPU, or the GPU with --dtype f32), or bf16/fp16 on the GPU. */
export type ComputeDtype = 'f32' | 'bf16' | 'fp16';

export interface NativeModelOptions {
  /** Store dense linear weights as NF4 (QLoRA training). */
  quantize?: boolean;
  /** Bytes the engine's allocations may hold at once (0 or absent: no budget); the optimizer pages to stay under. */
  memoryBudget?: number;
  /** Where the model lives and computes (default the CPU); 'cuda' is the first CUDA device. */
  device?: 'cpu' | 'cuda';
  /** A folder searched first for cuBLASLt (with device 'cuda'). */
  cudaLibraryDir?: string;
  /** On the GPU: 'bf16' or 'fp16' rounds every GEMM's inputs to that type (fp32 accumulation), as torch.autocast
   * does (fp16 wants loss scaling in training); default 'f32'. */
  computeDtype?: ComputeDtype;
}

export interface NativeModel {
  config(): NativeModelConfig;
  stored4bit(): boolean;
  createLora(options: NativeLoraOptions): void;
  loadAdapter(dir: string): void;
  saveAdapter(dir: string, baseModelName: string): void;
  loraInfo(): NativeLoraInfo | null;
  run(ids: Int32Array, labels: Int32Array | null, batch: number, seq: number, options: NativeRunOptions): NativeRunResult;
  zeroGrad(): void;
  saveGradients(path: string): void;
  gradNorm(): number;
  optimizerStep(options: NativeOptimizerOptions): NativeStepReport;
  saveOptimizerState(path: string): void;
  loadOptimizerState(path: string): void;
  memory(): NativeMemory;
  beginMemoryInterval(): void;
  takePageMoves(): NativePageMove[];
  setProfiling(on: boolean): void;
  takeProfile(): NativeOpTime[];
  generationStart(options: { loraScale?: number }): number;
  generationAppend(id: number, ids: Int32Array, options: { allLogits?: boolean }): Float32Array;
  generationTruncate(id: number, length: number): void;
  generationLength(id: number): number;
  generationEnd(id: number): void;
  dispose(): void;
}

export interface NativeTensorToWrite {
  name: string;
  dtype: 'F32' | 'BF16' | 'F16';
  shape: number[];
  data: Float32Array;
}

export interface NativeQuantizeReport {
  quantizedTensors: number;
  copiedTensors: number;
  bytesIn: number;
  bytesOut: number;
}

export interface NativeAddon {
  version(): string;
  /** cpuVectorCode: the CPU kernels' version this machine runs ("AVX-512, 16-lane vectors"). */
  engineInfo(): { backends: string[]; threads: number; cudaCompiled: boolean; cudaComputeDtypes: string[]; cpuVectorCode: string };
  gpuReport(libraryDir?: string): NativeGpuReport;
  /** The GPUs now, from NVML (started once per process); null without NVML. */
  gpuTelemetry(libraryDir?: string): NativeGpuInfo[] | null;
  readModelConfig(dir: string): NativeModelConfig;
  /** dtype: '' keeps stored dtypes; 'float32' | 'bfloat16' | 'float16' casts first, as transformers' torch_dtype. */
  quantizeModel(modelDir: string, outFile: string, doubleQuant: boolean, dtype: string): NativeQuantizeReport;
  randomNormal(seed: number, count: number): Float32Array;
  writeSafetensors(path: string, tensors: NativeTensorToWrite[], metadata?: Record<string, string>): void;
  Model: new (source: string | SyntheticModel, options?: NativeModelOptions) => NativeModel;
}

/** One NVIDIA library as the GPU probe found it (or every file it tried). */
export interface NativeLibraryReport {
  found: boolean;
  path: string | null;
  tried: string[];
  /** The folders looked in, in order ("" is the loader's own search path: LD_LIBRARY_PATH, PATH on Windows). */
  searched: string[];
  error: string | null;
}

export interface NativeGpuInfo {
  index: number;
  name: string;
  memoryTotal: number;
  memoryUsed: number;
  memoryFree: number;
  /** "8.9" */
  computeCapability: string;
  utilization: number | null;
  temperature: number | null;
  powerW: number | null;
  /** The CUDA runtime's number for this GPU (the engine trains on 0); null when the runtime does not see it. */
  cudaIndex: number | null;
}

/** native/src/gpu/probe.h's GpuReport. */
export interface NativeGpuReport {
  cudaCompiled: boolean;
  /** The CUDA runtime the engine was built with, "13.0"; null without CUDA. */
  cudaRuntimeVersion: string | null;
  driver: NativeLibraryReport;
  driverVersion: string | null;
  /** The newest CUDA the driver supports. */
  driverCudaVersion: string | null;
  nvml: NativeLibraryReport;
  cublasLt: NativeLibraryReport;
  gpus: NativeGpuInfo[];
  runtimeDevices: number;
  runtimeError: string | null;
  computeDtype: 'bf16' | 'fp16' | null;
  /** Each stands between this machine and training on its GPU, as a sentence saying what to do. */
  problems: string[];
  /** Worth knowing but not in the way (GPU telemetry unavailable). */
  notes: string[];
}
