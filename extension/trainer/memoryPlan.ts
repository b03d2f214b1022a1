// Whether a run fits its memory budget, decided before its first step from the engine's estimate: everything but
// the optimizer state must fit beside a step's peak (the paged optimizer moves its pages to host memory to make
// room; where that is not enough, the checkpointed block inputs move to host memory between their forward and
// backward too), and the optimizer update needs the weights, adapters, gradients and one page at once. A run that
// cannot fit even so stops here, with the estimate by category and what to change, never with an out-of-memory
// error halfway through.
import type { MemoryCategory } from '../engine';
import { formatBinaryBytes as formatBytes } from '../util/bytes';

export interface EstimateForPlan {
  categories: Record<MemoryCategory, number>;
  peakTotal: number;
  /** AdamW's two moments of one layer's LoRA parameters: what the update holds in device memory at least. */
  optimizerPageBytes: number;
  /** One checkpointed block input, and how much less a step holds with all of those that can move offloaded (0
   * without gradient checkpointing). */
  activationPageBytes: number;
  offloadableActivationBytes: number;
}

export interface MemoryPlan {
  budget: number;
  /** The least budget the run trains under. */
  required: number;
  fits: boolean;
  /** Not all of the optimizer state fits beside a step's peak: pages move between device and host memory. */
  paged: boolean;
  /** Not even without the optimizer state: the inputs of this many of the lowest blocks move to host memory too. */
  offloadBlockInputs: number;
  /** The step's peak with those inputs moved (the estimate's peak less them). */
  peak: number;
}

const MiB = 1024 ** 2;

/** The block inputs that can move to host memory (all but the last two blocks'; none without checkpointing). */
export function movableBlockInputs(e: EstimateForPlan): number {
  return e.activationPageBytes > 0 ? Math.round(e.offloadableActivationBytes / e.activationPageBytes) : 0;
}

/** A step's peak with the inputs of its `offloaded` lowest blocks moved to host memory (the estimate's peak less them). */
export function peakWithOffloadedInputs(e: Pick<EstimateForPlan, 'peakTotal' | 'activationPageBytes'>, offloaded: number): number {
  return e.peakTotal - offloaded * e.activationPageBytes;
}

/**
 * force: offload every block input that can move, even where the budget does not need it (`bench
 * --offload-activations`); otherwise as few as bring the step without its optimizer state under the budget.
 */
export function planMemory(e: EstimateForPlan, budget: number, force = false): MemoryPlan {
  const c = e.categories;
  const forwardBackward = e.peakTotal - c.optimizer;
  const movable = movableBlockInputs(e);
  const short = Math.max(0, forwardBackward - budget);
  const offloadBlockInputs = force ? movable : Math.min(movable, short > 0 ? Math.ceil(short / e.activationPageBytes) : 0);
  const update = c.weights + c.adapters + c.gradients + e.optimizerPageBytes;
  const required = Math.max(forwardBackward - e.offloadableActivationBytes, update);
  const peak = peakWithOffloadedInputs(e, offloadBlockInputs);
  return { budget, required, fits: budget >= required, paged: budget < peak, offloadBlockInputs, peak };
}

/**
 * The budget when none is set: what the GPU has free, less a margin for the CUDA context, cuBLASLt's workspace and
 * allocator slack (5% of the GPU, at least 512 MiB).
 */
export function defaultGpuBudget(gpu: { memoryTotal: number; memoryFree: number }): number {
  // at least one byte: a budget of 0 would mean "no budget" to the engine; a run never fits in 1 byte, so it is refused
  return Math.max(1, Math.floor(gpu.memoryFree - Math.max(512 * MiB, 0.05 * gpu.memoryTotal)));
}

export interface RunShape {
  batchSize: number;
  seqLen: number;
  rank: number;
  gradientCheckpointing: boolean;
  /** Offload every block input that can move, even where the budget does not need it (`bench --offload-activations`). */
  offloadActivations?: boolean;
}

/** One paragraph: what the run needs by category, the budget, and the changes that would make it fit. */
export function overBudgetMessage(e: EstimateForPlan, plan: MemoryPlan, run: RunShape, where: string): string {
  const c = e.categories;
  const parts = (['weights', 'adapters', 'gradients', 'activations', 'workspace'] as const).map((k) => `${k} ${formatBytes(c[k])}`);
  const head =
    `This run needs at least ${formatBytes(plan.required)} of ${where} memory and its budget is ${formatBytes(plan.budget)}: ` +
    `${parts.join(', ')}, and optimizer state ${formatBytes(c.optimizer)} of which all but one ${formatBytes(e.optimizerPageBytes)} page can move to host memory` +
    (e.offloadableActivationBytes > 0 ? `, as can ${formatBytes(e.offloadableActivationBytes)} of the activations (the checkpointed block inputs).` : '.');
  if (c.weights > plan.budget)
    return `${head} The model's weights alone take ${formatBytes(c.weights)}: choose a smaller model or a device with more memory.`;
  const fixes = [
    `lower the batch size (now ${run.batchSize}) or the sequence length (now ${run.seqLen}): activations grow with both`,
    ...(run.gradientCheckpointing ? [] : ['turn gradient checkpointing on (it keeps one block\'s activations instead of every block\'s)']),
    `lower the LoRA rank (now ${run.rank}): adapters and gradients grow with it`,
    'or raise the memory budget (--gpu-memory-budget, the qlora.gpuMemoryBudget setting)',
  ];
  return `${head} To fit: ${fixes.join('; ')}.`;
}
