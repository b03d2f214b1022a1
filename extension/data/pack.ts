/**
 * Packing: concatenating tokenized examples into sequences of exactly seqLen tokens, as TRL's classic
 * (ConstantLengthDataset-style) packing does, so no compute is spent on padding.
 *
 * Attention is NOT reset between packed examples: a token may attend to the end of the previous example in the
 * same sequence, as in TRL's classic packing. Examples are cut at sequence boundaries and continue in the next
 * sequence; the first label of each sequence is never a prediction target (labels are shifted by one inside the
 * engine), so a cut costs at most one trained token.
 */
import { IGNORE_INDEX } from './tokenize';

export interface PackedSequence {
  ids: Int32Array;
  labels: Int32Array;
  /** Sources of the examples with tokens in this sequence, in order. */
  sources: string[];
}

export interface PackableExample {
  ids: Int32Array;
  labels: Int32Array;
  source: string;
}

/**
 * Packs examples in the given order. Every sequence has exactly seqLen tokens except the last, which holds what
 * is left (the caller pads it, labelling the padding IGNORE_INDEX).
 */
export function packExamples(examples: readonly PackableExample[], seqLen: number): PackedSequence[] {
  if (!Number.isInteger(seqLen) || seqLen < 2) throw new RangeError(`seqLen must be an integer >= 2, got ${seqLen}`);
  const total = examples.reduce((n, e) => n + e.ids.length, 0);
  const sequences: PackedSequence[] = [];
  let current: PackedSequence | null = null;
  let fill = 0;
  let remaining = total;
  for (const example of examples) {
    if (example.labels.length !== example.ids.length) throw new RangeError(`${example.source}: labels and ids differ in length`);
    let from = 0;
    while (from < example.ids.length) {
      if (current === null) {
        const size = Math.min(seqLen, remaining);
        current = { ids: new Int32Array(size), labels: new Int32Array(size).fill(IGNORE_INDEX), sources: [] };
        fill = 0;
      }
      const take = Math.min(example.ids.length - from, current.ids.length - fill);
      current.ids.set(example.ids.subarray(from, from + take), fill);
      current.labels.set(example.labels.subarray(from, from + take), fill);
      if (current.sources[current.sources.length - 1] !== example.source) current.sources.push(example.source);
      fill += take;
      from += take;
      remaining -= take;
      if (fill === current.ids.length) {
        sequences.push(current);
        current = null;
      }
    }
  }
  return sequences;
}
