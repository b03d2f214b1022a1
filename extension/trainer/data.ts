// From the run's config to training examples: read and validate the dataset(s), render and tokenize them with the
// model's own tokenizer and chat template, hold out an eval split, optionally pack. Everything that can be wrong
// with the data is found here, before the run folder is written.
import * as path from 'node:path';
import { formatLocation, loadDataset, loadModelTokenizer, packExamples, shuffleIndices, splitEval, tokenizeDatasetAsync, tokenizationWarnings, type ModelTokenizer, type NormalizedExample, type TokenizedExample } from '../data';
import type { DatasetStats } from '../protocol/events';
import type { TrainExample } from './batches';
import type { TrainConfig } from './config';

export interface PreparedData {
  train: TrainExample[];
  eval: TrainExample[];
  /** The dataset rows the eval examples were made from, in the same order (the chat panel offers their prompts). */
  heldOut: NormalizedExample[];
  /** Padding fills batches after each sequence's end; it is never a label and never attended to by real tokens. */
  padId: number;
  /** The model's tokenizer and chat template, as the data was rendered with them (sample prompts use them too). */
  tokenizer: ModelTokenizer;
  stats: DatasetStats;
  warnings: string[];
}

/** Examples tokenized so far of how many, now and then while data is prepared. */
export type DataProgress = (done: number, total: number) => void;

/** At most one report every PROGRESS_MS, and the last one. */
const PROGRESS_MS = 500;
function throttled(report: DataProgress): DataProgress {
  let last = 0;
  return (done, total) => {
    const now = Date.now();
    if (done < total && now - last < PROGRESS_MS) return;
    last = now;
    report(done, total);
  };
}

async function tokenizedFile(file: string, tok: ModelTokenizer, config: TrainConfig, warnings: string[], onProgress?: DataProgress, signal?: AbortSignal) {
  const ds = await loadDataset(file, { shape: config.shape ?? undefined, skipInvalid: config.skipInvalid });
  const name = path.basename(file);
  if (ds.skipped > 0) warnings.push(`${name}: skipped ${ds.skipped} invalid row${ds.skipped === 1 ? '' : 's'} (the first: ${String(ds.errors[0])})`);
  const t = await tokenizeDatasetAsync(ds.examples, tok, { maxLength: config.seqLen, trainOnPrompt: config.trainOnPrompt, skipInvalid: config.skipInvalid, onProgress, signal });
  if (t.stats.invalid > 0) warnings.push(`${name}: skipped ${t.stats.invalid} example(s) the chat template could not render`);
  for (const w of tokenizationWarnings(t.stats, tok)) warnings.push(`${name}: ${w}`);
  if (t.stats.lengths.truncated > 0)
    warnings.push(`${name}: ${t.stats.lengths.truncated} example(s) longer than ${config.seqLen} tokens were truncated (longest: ${t.stats.lengths.max})`);
  if (t.stats.droppedNoTrainable > 0)
    warnings.push(`${name}: dropped ${t.stats.droppedNoTrainable} example(s) with nothing left to train after truncation`);
  if (t.examples.length === 0) throw new Error(`${file}: no example has any token to train (all were dropped; raise --seq-len?)`);
  return { ds, t };
}

/** `signal`: aborting it (a stop asked for) ends the tokenizing early with TokenizationStopped. */
export async function prepareData(config: TrainConfig, onProgress?: DataProgress, signal?: AbortSignal): Promise<PreparedData> {
  const tok = await loadModelTokenizer(config.model);
  const warnings: string[] = [];
  const report = onProgress && throttled(onProgress);
  const { ds, t } = await tokenizedFile(config.data, tok, config, warnings, report, signal);
  let train: TokenizedExample[] = t.examples;
  let evalSet: TrainExample[] = [];
  let evalRows = ds.examples;
  if (config.evalData) {
    const e = await tokenizedFile(config.evalData, tok, config, warnings, undefined, signal);
    evalSet = e.t.examples;
    evalRows = e.ds.examples;
  } else if (config.evalFraction > 0 && train.length >= 2) {
    const split = splitEval(train, config.evalFraction, config.evalSeed ?? config.seed);
    train = split.train;
    evalSet = split.eval;
  }
  const trainSet: TrainExample[] = config.packing ? packExamples(train, config.seqLen) : train;
  const rowAt = new Map(evalRows.map((row) => [formatLocation(row.at), row]));
  const heldOut = evalSet.flatMap((e) => (e.source !== undefined && rowAt.has(e.source) ? [rowAt.get(e.source)!] : []));
  const count = (xs: TrainExample[], f: (l: number) => boolean) => xs.reduce((n, e) => n + e.labels.filter(f).length, 0);
  return {
    train: trainSet,
    eval: evalSet,
    heldOut,
    padId: tok.eosId,
    tokenizer: tok,
    warnings,
    stats: {
      file: config.data,
      format: ds.format,
      shape: ds.shape,
      template: t.stats.template ?? 'none',
      trainExamples: trainSet.length,
      evalExamples: evalSet.length,
      trainTokens: trainSet.reduce((n, e) => n + e.ids.length, 0),
      trainedTokens: count(trainSet, (l) => l !== -100),
      truncated: t.stats.lengths.truncated,
      skippedInvalid: ds.skipped + t.stats.invalid,
      droppedEmpty: t.stats.droppedNoTrainable,
      packed: config.packing,
    },
  };
}

/** The order of the training examples in an epoch: a seeded shuffle, the same on every run with that seed. */
export function epochOrder(n: number, seed: number, epoch: number): number[] {
  return Array.from(shuffleIndices(n, seed, epoch));
}
