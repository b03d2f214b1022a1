// Micro-batches: examples of one batch padded to the longest (pad id for inputs, -100 for labels, so padding is
// never trained and, being at the end of causal sequences, never attended to by real tokens).

export interface TrainExample {
  ids: Int32Array;
  labels: Int32Array;
  /** "train.jsonl line 7" for an example of one row (packed sequences have none). */
  source?: string;
}

export interface MicroBatch {
  ids: Int32Array;
  labels: Int32Array;
  batch: number;
  seq: number;
  /** Positions scored by the loss: labels[t] != -100 for t >= 1 (transformers shifts labels by one). */
  labelled: number;
  /** Real (non-padding) tokens, for tokens/s. */
  tokens: number;
}

export const IGNORE_LABEL = -100;

export function labelledCount(labels: Int32Array): number {
  let n = 0;
  for (let t = 1; t < labels.length; t++) if (labels[t] !== IGNORE_LABEL) n++;
  return n;
}

export function makeMicroBatch(examples: readonly TrainExample[], padId: number): MicroBatch {
  const seq = Math.max(2, ...examples.map((e) => e.ids.length));
  const batch = examples.length;
  const ids = new Int32Array(batch * seq).fill(padId);
  const labels = new Int32Array(batch * seq).fill(IGNORE_LABEL);
  let labelled = 0;
  let tokens = 0;
  examples.forEach((e, b) => {
    ids.set(e.ids, b * seq);
    labels.set(e.labels, b * seq);
    labelled += labelledCount(e.labels);
    tokens += e.ids.length;
  });
  return { ids, labels, batch, seq, labelled, tokens };
}

/**
 * The eval examples in micro-batches of `batchSize`, longest first, so that each pads to a length close to its own
 * (with lengths from 30 to 2,000 tokens, batches in data order are mostly padding) and the largest, which sets the
 * memory peak, comes first. The eval loss is a sum over every labelled token, which the order does not change.
 */
export function evalMicroBatches<T extends TrainExample>(examples: readonly T[], batchSize: number): T[][] {
  const order = examples.map((_, i) => i).sort((a, b) => examples[b].ids.length - examples[a].ids.length || a - b);
  const batches: T[][] = [];
  for (let i = 0; i < order.length; i += batchSize) batches.push(order.slice(i, i + batchSize).map((k) => examples[k]));
  return batches;
}

/**
 * How optimizer steps take micro-batches: 'epochs', gradAccum at a time within one epoch, as transformers' Trainer
 * does (an epoch whose micro-batches do not divide by gradAccum ends with a step of the rest, so `epochs: N` is N
 * passes over the data); 'continuous', gradAccum at a time across epoch ends, as runs checkpointed before 'epochs'
 * did (a resumed one keeps it, so that it goes on as it began).
 */
export type BatchLayout = 'epochs' | 'continuous';

/**
 * The global sequence of micro-batches over epochs: micro-batch g is number g % perEpoch of epoch
 * floor(g / perEpoch), whose order is a seeded shuffle of the examples; optimizer steps take them as `layout` says.
 * Everything follows from (seed, step), so a resumed run sees exactly the batches the uninterrupted run would have.
 */
export class BatchSchedule {
  private cachedEpoch = -1;
  private order: number[] = [];

  constructor(
    private readonly examples: readonly TrainExample[],
    private readonly batchSize: number,
    private readonly epochOrder: (epoch: number) => number[],
    private readonly gradAccum = 1,
    readonly layout: BatchLayout = 'epochs',
  ) {
    if (examples.length === 0) throw new Error('no training examples');
    if (!Number.isInteger(gradAccum) || gradAccum < 1) throw new RangeError(`gradAccum must be a positive integer, got ${gradAccum}`);
  }

  /** Micro-batches in an epoch. */
  get perEpoch(): number {
    return Math.ceil(this.examples.length / this.batchSize);
  }

  /** Optimizer steps in an epoch ('epochs' layout). */
  get stepsPerEpoch(): number {
    return Math.ceil(this.perEpoch / this.gradAccum);
  }

  /** Optimizer steps of `epochs` passes (at least 1). */
  totalSteps(epochs: number): number {
    const steps = this.layout === 'epochs' ? epochs * this.stepsPerEpoch : (epochs * this.perEpoch) / this.gradAccum;
    return Math.max(1, Math.ceil(steps));
  }

  /** The global indices of the micro-batches of optimizer step `step` (0-based): gradAccum of them, or fewer last in an epoch. */
  microBatchesOf(step: number): number[] {
    if (this.layout === 'continuous') return Array.from({ length: this.gradAccum }, (_, i) => step * this.gradAccum + i);
    const epoch = Math.floor(step / this.stepsPerEpoch);
    const first = (step % this.stepsPerEpoch) * this.gradAccum;
    const count = Math.min(this.gradAccum, this.perEpoch - first);
    return Array.from({ length: count }, (_, i) => epoch * this.perEpoch + first + i);
  }

  /** Epochs done after `steps` optimizer steps (fractional within an epoch). */
  epochsAfter(steps: number): number {
    if (this.layout === 'continuous') return (steps * this.gradAccum) / this.perEpoch;
    const whole = Math.floor(steps / this.stepsPerEpoch);
    const within = steps % this.stepsPerEpoch;
    return whole + Math.min(this.perEpoch, within * this.gradAccum) / this.perEpoch;
  }

  /** Micro-batches done after `steps` optimizer steps. */
  microBatchesAfter(steps: number): number {
    if (this.layout === 'continuous') return steps * this.gradAccum;
    const whole = Math.floor(steps / this.stepsPerEpoch);
    return whole * this.perEpoch + Math.min(this.perEpoch, (steps % this.stepsPerEpoch) * this.gradAccum);
  }

  examplesOf(g: number): TrainExample[] {
    const epoch = Math.floor(g / this.perEpoch);
    if (epoch !== this.cachedEpoch) {
      this.order = this.epochOrder(epoch);
      this.cachedEpoch = epoch;
    }
    const k = g % this.perEpoch;
    return this.order.slice(k * this.batchSize, (k + 1) * this.batchSize).map((i) => this.examples[i]);
  }
}
