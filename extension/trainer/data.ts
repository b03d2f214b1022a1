// From the run's config to training examples: read and validate the dataset(s), render and tokenize them with the
// model's own tokenizer and chat template, hold out an eval split, optionally pack. Everything that can be wrong
// with the data is found here, before the run folder is written.
import * as path from 'node:path';
import { formatLocation, loadDataset, loadModelTokenizer, packExamples, shuffleIndices, splitEval, tokenizeDatasetAsync, tokenizationWarnings, type ModelTokenizer, type NormalizedExample, type TokenizedExample } from '../data';
import type { DatasetStats } from '../protocol/events';
import type { TrainExample } from './batches';
import type { TrainConfig } from './config';
import { readTokenCache, tokenCacheKey, unchangedSince, writeTokenCache, type CachedTokenization, type TokenCacheKey, type TokenCacheRole } from './tokenCache';

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
  /** Each data file's tokenization, for the run's cache (saveTokenCache): read from it, or to be written there. */
  tokenized: TokenizedFile[];
}

export interface TokenizedFile {
  role: TokenCacheRole;
  /** tokenCacheKey's digest of the files as they were read. */
  key: string;
  tokenization: CachedTokenization;
  /** Whether to keep it in the run's cache: not when it came from there, nor when a file changed while it was read. */
  keep: boolean;
}

export interface PrepareDataOptions {
  /** Examples tokenized so far of how many, now and then. */
  onProgress?: DataProgress;
  /** Aborting it (a stop asked for) ends the tokenizing early with TokenizationStopped. */
  signal?: AbortSignal;
  /** The run whose tokenized-data cache to read (tokenCache.ts): a file whose key matches is not tokenized again. */
  runDir?: string;
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

async function tokenizedFile(file: string, role: TokenCacheRole, key: TokenCacheKey | null, tok: ModelTokenizer, config: TrainConfig, warnings: string[], options: PrepareDataOptions) {
  const ds = await loadDataset(file, { shape: config.shape ?? undefined, skipInvalid: config.skipInvalid });
  const name = path.basename(file);
  if (ds.skipped > 0) warnings.push(`${name}: skipped ${ds.skipped} invalid row${ds.skipped === 1 ? '' : 's'} (the first: ${String(ds.errors[0])})`);
  const cached = options.runDir !== undefined && key !== null && unchangedSince(key) ? readTokenCache(options.runDir, role, key.digest) : null;
  const t: CachedTokenization =
    cached ??
    (await tokenizeDatasetAsync(ds.examples, tok, { maxLength: config.seqLen, trainOnPrompt: config.trainOnPrompt, skipInvalid: config.skipInvalid, onProgress: options.onProgress, signal: options.signal }));
  if (t.stats.invalid > 0) warnings.push(`${name}: skipped ${t.stats.invalid} example(s) the chat template could not render`);
  for (const w of tokenizationWarnings(t.stats, tok)) warnings.push(`${name}: ${w}`);
  if (t.stats.lengths.truncated > 0)
    warnings.push(`${name}: ${t.stats.lengths.truncated} example(s) longer than ${config.seqLen} tokens were truncated (longest: ${t.stats.lengths.max})`);
  if (t.stats.droppedNoTrainable > 0)
    warnings.push(`${name}: dropped ${t.stats.droppedNoTrainable} example(s) with nothing left to train after truncation`);
  if (t.examples.length === 0) throw new Error(`${file}: no example has any token to train (all were dropped; raise --seq-len?)`);
  const tokenized: TokenizedFile = { role, key: key?.digest ?? '', tokenization: t, keep: cached === null && key !== null && unchangedSince(key) };
  return { ds, t, tokenized };
}

export async function prepareData(config: TrainConfig, options: PrepareDataOptions = {}): Promise<PreparedData> {
  // keyed before the files are read (tokenCacheKey says why)
  const settings = { shape: config.shape, skipInvalid: config.skipInvalid, trainOnPrompt: config.trainOnPrompt, maxLength: config.seqLen };
  const trainKey = await tokenCacheKey(config.data, config.model, settings);
  const evalKey = config.evalData ? await tokenCacheKey(config.evalData, config.model, settings) : null;
  const tok = await loadModelTokenizer(config.model);
  const warnings: string[] = [];
  const onProgress = options.onProgress && throttled(options.onProgress);
  const { ds, t, tokenized } = await tokenizedFile(config.data, 'train', trainKey, tok, config, warnings, { ...options, onProgress });
  const files = [tokenized];
  let train: TokenizedExample[] = t.examples;
  let evalSet: TrainExample[] = [];
  let evalRows = ds.examples;
  if (config.evalData) {
    const e = await tokenizedFile(config.evalData, 'eval', evalKey, tok, config, warnings, { signal: options.signal, runDir: options.runDir });
    files.push(e.tokenized);
    evalSet = e.t.examples;
    evalRows = e.ds.examples;
  } else if (config.evalFraction > 0 && train.length >= 2) {
    // older runs' config.json has no cap (TrainConfig.evalMaxExamples)
    const split = splitEval(train, config.evalFraction, config.evalSeed ?? config.seed, config.evalMaxExamples ?? Infinity);
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
    tokenized: files,
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

/**
 * Keeps the tokenizations prepareData made (not those it read from the cache, nor one of a file that changed while it
 * was read) in the run's folder, for its resumes.
 * A tokenization that the cache's layout cannot hold is not kept; nothing is lost either way.
 */
export function saveTokenCache(runDir: string, data: PreparedData): void {
  for (const f of data.tokenized) if (f.keep) writeTokenCache(runDir, f.role, f.key, f.tokenization);
}

/** The order of the training examples in an epoch: a seeded shuffle, the same on every run with that seed. */
export function epochOrder(n: number, seed: number, epoch: number): number[] {
  return Array.from(shuffleIndices(n, seed, epoch));
}
