// Choosing the next token from the engine's raw logits, with the logits processors transformers applies and in its
// order: repetition penalty, temperature, top-k, top-p, min-p, then a draw. Temperature 0 is greedy (argmax, the
// lowest id on a tie). Draws come from the engine's Philox generator keyed by the seed and counted by the token's
// index, so a seed reproduces an answer exactly, whatever was generated before with other seeds.
import { Philox, RngStream } from '../data/philox';

export interface SamplingOptions {
  /** 0 = greedy. */
  temperature: number;
  /** Keep the k most likely tokens; 0 = off. */
  topK: number;
  /** Keep the smallest set of most likely tokens whose probabilities reach p; 1 = off. */
  topP: number;
  /** Drop tokens less likely than minP times the most likely one; 0 = off. */
  minP: number;
  /** transformers' repetition_penalty over every token so far (prompt included); 1 = off. */
  repetitionPenalty: number;
  seed: number;
}

export const DEFAULT_SAMPLING: SamplingOptions = { temperature: 0.7, topK: 0, topP: 0.9, minP: 0, repetitionPenalty: 1, seed: 0 };
export const GREEDY: SamplingOptions = { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, seed: 0 };

/** A sentence naming the first sampling option that is out of range, or null. */
export function samplingProblem(o: SamplingOptions): string | null {
  if (!(o.temperature >= 0 && o.temperature <= 100)) return `temperature must be between 0 and 100, got ${o.temperature}`;
  if (!(Number.isInteger(o.topK) && o.topK >= 0)) return `top-k must be a whole number >= 0, got ${o.topK}`;
  if (!(o.topP > 0 && o.topP <= 1)) return `top-p must be in (0, 1], got ${o.topP}`;
  if (!(o.minP >= 0 && o.minP < 1)) return `min-p must be in [0, 1), got ${o.minP}`;
  if (!(o.repetitionPenalty > 0 && o.repetitionPenalty <= 10)) return `repetition penalty must be in (0, 10], got ${o.repetitionPenalty}`;
  if (!(Number.isInteger(o.seed) && o.seed >= 0)) return `seed must be a whole number >= 0, got ${o.seed}`;
  return null;
}

/** Picks tokens for one answer; `index` counts the tokens drawn so far (the Philox counter). */
export class Sampler {
  private readonly rng: Philox;
  private index = 0;

  constructor(private readonly options: SamplingOptions) {
    const problem = samplingProblem(options);
    if (problem) throw new RangeError(problem);
    this.rng = new Philox(options.seed, RngStream.Sampling);
  }

  /** The next token for `logits` (not modified) given every token so far. */
  next(logits: Float32Array, history: readonly number[]): number {
    const o = this.options;
    const x = Float32Array.from(logits);
    if (o.repetitionPenalty !== 1) {
      for (const id of new Set(history)) {
        if (id >= 0 && id < x.length) x[id] = x[id] > 0 ? x[id] / o.repetitionPenalty : x[id] * o.repetitionPenalty;
      }
    }
    let max = -Infinity;
    for (let i = 0; i < x.length; i++) if (x[i] > max) max = x[i];
    // a model that has gone wrong (an overflow in fp16, a broken adapter) would otherwise answer token 0, or nothing
    if (!Number.isFinite(max)) throw new Error(`the model's next-token scores are not finite numbers (the largest is ${max}); it cannot answer`);
    const draw = this.rng.uniform(this.index++);
    if (o.temperature === 0) return argmax(x);
    return drawFrom(candidates(x, o), draw);
  }
}

export function argmax(x: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

interface Candidates {
  ids: number[];
  probs: number[];
}

/**
 * The tokens left after temperature, top-k, top-p and min-p, most likely first (ties: lower id first), with their
 * probabilities; with none of these filters, every token in id order. Only tokens that can survive are sorted, so a
 * token costs O(vocab) and not a sort of the whole vocabulary: top-k keeps the tokens at least as likely as the k-th
 * (ties with it survive, as in transformers' TopKLogitsWarper), min-p those at least min-p times the most likely,
 * and top-p alone those at least 1e-9 of it where they hold the mass asked for.
 */
export function candidates(logits: Float32Array, o: SamplingOptions): Candidates {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i] > max) max = logits[i];
  const weights = new Float64Array(logits.length);
  let total = 0;
  let best = 0;
  for (let i = 0; i < logits.length; i++) {
    const w = Math.exp((logits[i] - max) / o.temperature);
    weights[i] = w;
    total += w;
    if (w > best) best = w;
  }
  const byWeight = (a: number, b: number) => weights[b] - weights[a] || a - b;
  const atLeast = (floor: number) => {
    const ids: number[] = [];
    for (let i = 0; i < weights.length; i++) if (weights[i] >= floor) ids.push(i);
    return ids;
  };
  const sum = (ids: readonly number[]) => ids.reduce((s, id) => s + weights[id], 0);

  let ids: number[];
  let mass = total;  // what top-p's share is of: every token, or what top-k kept (transformers renormalizes)
  if (o.topK > 0 && o.topK < weights.length) {
    ids = atLeast(kthLargest(weights, o.topK)).sort(byWeight);
    mass = sum(ids);
  } else if (o.minP > 0) {
    ids = atLeast(o.minP * best).sort(byWeight);  // top-p can only keep a prefix of these before min-p filters
  } else if (o.topP < 1) {
    ids = atLeast(1e-9 * best).sort(byWeight);
    if (sum(ids) < o.topP * total) ids = Array.from(weights.keys()).sort(byWeight);
  } else {
    const all: Candidates = { ids: new Array<number>(weights.length), probs: new Array<number>(weights.length) };
    for (let i = 0; i < weights.length; i++) {
      all.ids[i] = i;
      all.probs[i] = weights[i] / total;
    }
    return all;
  }
  if (o.topP < 1) {
    let cumulative = 0;
    let keep = 0;
    while (keep < ids.length && (keep === 0 || cumulative < o.topP * mass)) cumulative += weights[ids[keep++]];
    ids = ids.slice(0, keep);
  }
  if (o.minP > 0) {
    const floor = o.minP * weights[ids[0]];
    ids = ids.filter((id, i) => i === 0 || weights[id] >= floor);
  }
  const kept = sum(ids);
  return { ids, probs: ids.map((id) => weights[id] / kept) };
}

/** The k-th largest of `values` (1-based), by selection on a copy: O(n) on average. */
function kthLargest(values: Float64Array, k: number): number {
  const a = Float64Array.from(values);
  let lo = 0;
  let hi = a.length - 1;
  const target = k - 1;  // index in descending order
  while (lo < hi) {
    const pivot = a[(lo + hi) >> 1];
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (a[i] > pivot) i++;
      while (a[j] < pivot) j--;
      if (i <= j) {
        const t = a[i];
        a[i] = a[j];
        a[j] = t;
        i++;
        j--;
      }
    }
    if (target <= j) hi = j;
    else if (target >= i) lo = i;
    else return a[target];
  }
  return a[target];
}

function drawFrom(c: Candidates, u: number): number {
  let cumulative = 0;
  for (let i = 0; i < c.ids.length; i++) {
    cumulative += c.probs[i];
    if (u < cumulative) return c.ids[i];
  }
  return c.ids[c.ids.length - 1];
}
