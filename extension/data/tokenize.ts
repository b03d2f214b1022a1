/**
 * Tokenizing rendered examples into ids and labels (labels aligned with ids, transformers' convention: the
 * engine shifts them; -100 = not trained).
 *
 * Ids are the tokenization of the whole rendered text, exactly what transformers' apply_chat_template(tokenize=True)
 * gives and what the model sees at inference for a conversation so far. Tokenizing segment by segment and
 * concatenating would be cheaper but wrong where a token spans a boundary. So the segments are tokenized one by one
 * only to find the token boundaries (SentencePiece tokenizers without the "▁" they put at the start of every encode
 * call, where a segment continues a run of text: ModelTokenizer.encodeContinuation): when their concatenation equals
 * the whole tokenization (the usual case, since turns end on special tokens) the boundaries are read off directly;
 * otherwise each boundary is where the tokenization of the text before it stops agreeing with the whole, and a token
 * that straddles a boundary belongs to the later segment (a tokenization of the text up to each boundary: slower).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import { DataError, DatasetInvalidError, formatLocation } from './errors';
import { ModelTokenizer } from './modelTokenizer';
import { RenderOptions, renderExample, Segment, TemplateKind, TemplateRenderError } from './render';
import { tokenizeInWorkers } from './tokenizeWorkers';
import { NormalizedExample } from './shapes';
import { lengthHistogram, type LengthHistogram, TokenLengthStats, tokenLengthStats } from './stats';

export const IGNORE_INDEX = -100;

/**
 * The version of what rendering and tokenizing make of an example. Bump it with any change that makes some example
 * tokenize differently (templates, shapes, truncation, the tokenizers library): runs key their tokenized-data caches
 * on it, and a resume would otherwise go on with the old tokens.
 */
export const TOKENIZATION_VERSION = 1;

export interface TokenizedExample {
  ids: Int32Array;
  /** Same length as ids; the token id where trained, IGNORE_INDEX (-100) elsewhere. */
  labels: Int32Array;
  /** "train.jsonl line 7". */
  source: string;
}

export interface TokenizeOptions extends RenderOptions {
  /** Cut examples to this many tokens (keeping the start). */
  maxLength?: number;
}

export interface TokenizeDatasetOptions extends TokenizeOptions {
  /** Drop examples the chat template cannot render instead of throwing DatasetInvalidError. */
  skipInvalid?: boolean;
  /** Called after each example with how many are done of how many. */
  onProgress?: (done: number, total: number) => void;
  /** tokenizeDatasetAsync only: aborting it ends the work early with TokenizationStopped (a stop asked for meanwhile). */
  signal?: AbortSignal;
}

/** What tokenizeDatasetAsync throws when its signal was aborted. */
export class TokenizationStopped extends Error {
  override readonly name = 'TokenizationStopped';
  constructor() {
    super('tokenization stopped');
  }
}

export interface TokenizationStats {
  /** Which template rendered chat examples; null when the dataset has none. */
  template: TemplateKind | null;
  /** Examples kept. */
  examples: number;
  /** Lengths of every rendered example before truncation; `truncated` counts those cut to maxLength. */
  lengths: TokenLengthStats;
  /** The same lengths binned, with maxLength inside the range. */
  histogram: LengthHistogram;
  /** Dropped because no token was left to train after truncation (a warning, not an error). */
  droppedNoTrainable: number;
  /** Dropped because the chat template could not render them (only with skipInvalid). */
  invalid: number;
  /** Kept examples whose row has tools the chat template does not read (no template, or one without tools). */
  toolsUnused: number;
  /** Kept examples with a system message the chat template leaves out of their text. */
  systemLeftOut: number;
  /** Tokens and trained tokens in the kept examples, after truncation. */
  totalTokens: number;
  trainedTokens: number;
}

export interface TokenizedDataset {
  examples: TokenizedExample[];
  stats: TokenizationStats;
  /** Examples the template could not render, one error each. */
  errors: DataError[];
}

/** Ids and labels of rendered segments (see the module comment for how the boundaries are found). */
export function tokenizeSegments(tok: ModelTokenizer, segments: readonly Segment[]): { ids: Int32Array; labels: Int32Array } {
  const full = segments.map((s) => s.text).join('');
  const whole = tok.encode(full);
  let before = '';
  const pieces = segments.map((s) => {
    const ids = tok.encodeContinuation(before, s.text);
    before += s.text;
    return ids;
  });
  const bounds = [0];
  if (sameIds(pieces.flat(), whole)) {
    for (const p of pieces) bounds.push(bounds[bounds.length - 1] + p.length);
  } else {
    let offset = 0;
    for (let k = 0; k < segments.length - 1; k++) {
      offset += segments[k].text.length;
      const prefix = tok.encode(full.slice(0, offset));
      let agree = 0;
      while (agree < prefix.length && agree < whole.length && prefix[agree] === whole[agree]) agree++;
      bounds.push(Math.max(agree, bounds[bounds.length - 1]));
    }
    bounds.push(whole.length);
  }
  const ids = Int32Array.from(whole);
  const labels = new Int32Array(whole.length).fill(IGNORE_INDEX);
  segments.forEach((s, k) => {
    if (!s.trained) return;
    for (let t = bounds[k]; t < bounds[k + 1]; t++) labels[t] = ids[t];
  });
  return { ids, labels };
}

function sameIds(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

/** The warnings a tokenization's stats call for, beyond truncation and dropped examples. */
export function tokenizationWarnings(stats: TokenizationStats, tok: ModelTokenizer): string[] {
  const warnings: string[] = [];
  if (stats.toolsUnused > 0) warnings.push(toolsUnusedMessage(stats.toolsUnused, tok));
  if (stats.systemLeftOut > 0) {
    warnings.push(
      `${stats.systemLeftOut} example(s) have a system message that the model's chat template (${tok.chatTemplateFile}) leaves out of their text, ` +
        'as transformers renders them: the model never sees it in training',
    );
  }
  return warnings;
}

/** What a dataset's rows with tools the chat template does not read (TokenizationStats.toolsUnused) means. */
export function toolsUnusedMessage(count: number, tok: ModelTokenizer): string {
  const template = tok.chatTemplate === null ? 'the model has no chat template' : `the model's chat template (${tok.chatTemplateFile}) does not use tools`;
  return `${count} example(s) have a "tools" field, but ${template}: they are trained without the tool definitions`;
}

/** Labels the loss counts: every one but the first position's, which no earlier token predicts. */
export function trainedCount(labels: Int32Array): number {
  let n = 0;
  for (let t = 1; t < labels.length; t++) if (labels[t] !== IGNORE_INDEX) n++;
  return n;
}

/**
 * Renders and tokenizes one example, without truncation. Throws TemplateRenderError when the chat template
 * cannot render it.
 */
export function tokenizeExample(
  example: NormalizedExample,
  tok: ModelTokenizer,
  options: RenderOptions = {},
): TokenizedExample & { template: TemplateKind | null; systemLeftOut: boolean } {
  const { segments, template, systemLeftOut } = renderExample(example, tok, options);
  return { ...tokenizeSegments(tok, segments), source: formatLocation(example.at), template, systemLeftOut };
}

/** One example rendered and tokenized, or the sentence saying why its chat template refused it. */
export type ExampleOutcome = (TokenizedExample & { template: TemplateKind | null; systemLeftOut: boolean }) | { error: string };

/** tokenizeExample, with the template's refusal as an outcome instead of a throw. */
export function tokenizeOutcome(example: NormalizedExample, tok: ModelTokenizer, options: RenderOptions = {}): ExampleOutcome {
  try {
    return tokenizeExample(example, tok, options);
  } catch (err) {
    if (!(err instanceof TemplateRenderError)) throw err;
    return { error: err.message };
  }
}

/**
 * Tokenizes a dataset: render, tokenize, truncate to maxLength, drop examples left with nothing to train.
 * Examples the template cannot render are DataErrors: thrown together as DatasetInvalidError unless skipInvalid.
 */
export function tokenizeDataset(
  examples: readonly NormalizedExample[],
  tok: ModelTokenizer,
  options: TokenizeDatasetOptions = {},
): TokenizedDataset {
  return collectTokenized(examples, tok, options, (example, index) => {
    options.onProgress?.(index, examples.length);
    return tokenizeOutcome(example, tok, options);
  });
}

/**
 * Examples from which a dataset is tokenized in worker threads: each worker loads the tokenizer first (Llama 3.1's:
 * 1.6 s and 180 MiB, measured in review), which a few thousand examples do not repay.
 */
export const WORKER_THRESHOLD = 10_000;

/**
 * tokenizeDataset, in worker threads (one a core the process may use, up to 8) where the dataset is large enough to
 * gain from them and there is more than one core.
 */
export function tokenizeDatasetAsync(examples: readonly NormalizedExample[], tok: ModelTokenizer, options: TokenizeDatasetOptions = {}): Promise<TokenizedDataset> {
  const cores = Math.min(8, usableCores());
  if (examples.length < WORKER_THRESHOLD || cores < 2) return tokenizeDatasetInSlices(examples, tok, options);
  return tokenizeDatasetInWorkers(examples, tok, options, cores);
}

/** Examples tokenized between two turns of the event loop in this thread. */
const SLICE = 256;

/**
 * tokenizeDataset in this thread, a slice at a time with the event loop let through in between: signals, a stop
 * message and progress reports to the host are handled while it works (a whole dataset in one go held them back).
 */
async function tokenizeDatasetInSlices(examples: readonly NormalizedExample[], tok: ModelTokenizer, options: TokenizeDatasetOptions): Promise<TokenizedDataset> {
  const outcomes: ExampleOutcome[] = [];
  for (let start = 0; start < examples.length; start += SLICE) {
    await new Promise<void>((resolve) => setImmediate(resolve));
    if (options.signal?.aborted) throw new TokenizationStopped();
    for (let i = start; i < Math.min(examples.length, start + SLICE); i++) {
      options.onProgress?.(i, examples.length);
      outcomes.push(tokenizeOutcome(examples[i], tok, options));
    }
  }
  return collectTokenized(examples, tok, options, (_, index) => outcomes[index]);
}

/** The cores this process may use: the machine's, or fewer under a container's CPU quota (cgroup v2 cpu.max). */
function usableCores(): number {
  const cores = os.availableParallelism();
  try {
    const [quota, period] = fs.readFileSync('/sys/fs/cgroup/cpu.max', 'utf8').trim().split(/\s+/);
    const limit = quota === 'max' ? Infinity : Math.floor(Number(quota) / Number(period));
    return Number.isFinite(limit) && limit >= 1 ? Math.min(cores, limit) : cores;
  } catch {
    return cores;
  }
}

/**
 * tokenizeDataset with the examples tokenized in `workers` worker threads (each loads the model's tokenizer), for
 * large datasets: the same result, in the same order.
 */
export async function tokenizeDatasetInWorkers(
  examples: readonly NormalizedExample[],
  tok: ModelTokenizer,
  options: TokenizeDatasetOptions,
  workers: number,
): Promise<TokenizedDataset> {
  const render: RenderOptions = { trainOnPrompt: options.trainOnPrompt, templateVars: options.templateVars };
  const outcomes = await tokenizeInWorkers(examples, tok.modelDir, render, workers, options.onProgress, options.signal);
  return collectTokenized(examples, tok, options, (_, index) => outcomes[index]);
}

/** The dataset from each example's outcome: truncation, drops, errors and statistics. */
function collectTokenized(
  examples: readonly NormalizedExample[],
  tok: ModelTokenizer,
  options: TokenizeDatasetOptions,
  outcomeOf: (example: NormalizedExample, index: number) => ExampleOutcome,
): TokenizedDataset {
  const { maxLength } = options;
  if (maxLength !== undefined && (!Number.isInteger(maxLength) || maxLength < 1)) {
    throw new RangeError(`maxLength must be a positive integer, got ${maxLength}`);
  }
  const kept: TokenizedExample[] = [];
  const errors: DataError[] = [];
  const lengths: number[] = [];
  let template: TemplateKind | null = null;
  let truncated = 0;
  let droppedNoTrainable = 0;
  let totalTokens = 0;
  let trainedTokens = 0;
  let toolsUnused = 0;
  let systemLeftOut = 0;

  for (const [index, example] of examples.entries()) {
    const tokenized = outcomeOf(example, index);
    if ('error' in tokenized) {
      errors.push(new DataError(example.at, tokenized.error));
      continue;
    }
    template ??= tokenized.template;
    let { ids, labels } = tokenized;
    lengths.push(ids.length);
    if (maxLength !== undefined && ids.length > maxLength) {
      ids = ids.slice(0, maxLength);
      labels = labels.slice(0, maxLength);
      truncated++;
    }
    const trained = trainedCount(labels);
    if (trained === 0) {
      droppedNoTrainable++;
      continue;
    }
    if (example.kind === 'chat' && example.tools && !tok.templateUsesTools) toolsUnused++;
    if (tokenized.systemLeftOut) systemLeftOut++;
    kept.push({ ids, labels, source: tokenized.source });
    totalTokens += ids.length;
    trainedTokens += trained;
  }
  options.onProgress?.(examples.length, examples.length);
  if (errors.length > 0 && !options.skipInvalid) throw new DatasetInvalidError(errors);
  return {
    examples: kept,
    errors,
    stats: {
      template,
      examples: kept.length,
      lengths: tokenLengthStats(lengths, truncated),
      histogram: lengthHistogram(lengths, maxLength),
      droppedNoTrainable,
      invalid: errors.length,
      toolsUnused,
      systemLeftOut,
      totalTokens,
      trainedTokens,
    },
  };
}
