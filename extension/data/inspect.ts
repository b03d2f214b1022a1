/**
 * A JSON-safe report on a dataset file, for the CLI's `inspect` and the editor: what the file holds, which rows are
 * invalid, and, given a model, how it tokenizes and which parts of the first examples are trained.
 */
import * as path from 'node:path';
import { DataError } from './errors';
import { readDataset } from './dataset';
import { loadModelTokenizer, ModelTokenizer } from './modelTokenizer';
import { DataFormat } from './readers';
import { renderExample, TemplateKind, TemplateRenderError } from './render';
import { DatasetShape } from './shapes';
import { IGNORE_INDEX, TokenizationStats, tokenizeDatasetAsync, TokenizedExample, tokenizationWarnings, trainedCount } from './tokenize';

/** Errors listed in a report; the count of all of them is `invalidRows`. */
const MAX_REPORTED_ERRORS = 50;
/** Examples shown rendered. */
const SHOWN_EXAMPLES = 3;

export interface InspectOptions {
  /** A model folder (tokenizer.json, tokenizer_config.json) to tokenize with. */
  modelDir?: string;
  maxLength?: number;
  shape?: DatasetShape;
  trainOnPrompt?: boolean;
  templateVars?: Record<string, unknown>;
  /**
   * Tokenize at most this many examples (the first ones): a large dataset's rows are all checked, but its token
   * statistics come from a sample, so that the preview takes seconds, not the minutes training spends on all of it.
   */
  tokenizeAtMost?: number;
}

export interface InspectedExample {
  source: string;
  tokens: number;
  trainedTokens: number;
  /** The example's text in order, split where training starts or stops. */
  segments: { text: string; trained: boolean }[];
}

export interface DatasetReport {
  file: string;
  format: DataFormat;
  shape: DatasetShape | null;
  rowCount: number;
  validRows: number;
  invalidRows: number;
  /** The first 50 errors, as sentences ("train.jsonl line 3: ..."). */
  errors: string[];
  /** Present when a model was given. */
  tokenization?: {
    template: TemplateKind | null;
    stats: TokenizationStats;
    /** When the statistics come from the first examples only: how many, of how many. */
    sample: { tokenized: number; of: number } | null;
    /** What training would warn about this tokenization (beyond truncation, which stats count). */
    warnings: string[];
    examples: InspectedExample[];
  };
}

/** Decodes an example's tokens in runs of equal trainedness. */
function segmentsOf(tok: ModelTokenizer, example: TokenizedExample): InspectedExample['segments'] {
  const segments: InspectedExample['segments'] = [];
  let start = 0;
  for (let t = 1; t <= example.ids.length; t++) {
    const trained = example.labels[start] !== IGNORE_INDEX;
    if (t === example.ids.length || (example.labels[t] !== IGNORE_INDEX) !== trained) {
      segments.push({ text: tok.decode(example.ids.subarray(start, t)), trained });
      start = t;
    }
  }
  return segments;
}

/**
 * Reports on a dataset without failing on invalid rows (they are listed). Whole-file problems (missing, empty,
 * binary, unsupported type) still throw DataFileError, as there is nothing to report on.
 */
export async function inspectDataset(file: string, options: InspectOptions = {}): Promise<DatasetReport> {
  const read = await readDataset(file, { shape: options.shape });
  const errors: DataError[] = [...read.errors];
  let tokenization: DatasetReport['tokenization'];
  let validRows = read.examples.length;

  if (options.modelDir !== undefined) {
    const tok = await loadModelTokenizer(options.modelDir);
    const limit = options.tokenizeAtMost;
    const sampled = limit !== undefined && read.examples.length > limit;
    const result = await tokenizeDatasetAsync(sampled ? read.examples.slice(0, limit) : read.examples, tok, {
      maxLength: options.maxLength,
      trainOnPrompt: options.trainOnPrompt,
      templateVars: options.templateVars,
      skipInvalid: true,
    });
    errors.push(...result.errors);
    validRows -= result.errors.length;
    // the rows past the sample still go through the chat template (without tokenizing), for its refusals
    if (sampled) {
      for (const example of read.examples.slice(limit)) {
        try {
          renderExample(example, tok, { trainOnPrompt: options.trainOnPrompt, templateVars: options.templateVars });
        } catch (err) {
          if (!(err instanceof TemplateRenderError)) throw err;
          errors.push(new DataError(example.at, err.message));
          validRows--;
        }
      }
    }
    tokenization = {
      template: result.stats.template,
      stats: result.stats,
      sample: sampled ? { tokenized: limit, of: read.examples.length } : null,
      warnings: tokenizationWarnings(result.stats, tok),
      examples: result.examples.slice(0, SHOWN_EXAMPLES).map((e) => ({
        source: e.source,
        tokens: e.ids.length,
        trainedTokens: trainedCount(e.labels),
        segments: segmentsOf(tok, e),
      })),
    };
  }

  errors.sort((a, b) => (a.line ?? a.row ?? 0) - (b.line ?? b.row ?? 0));
  return {
    file: path.basename(file),
    format: read.format,
    shape: read.shape,
    rowCount: read.rowCount,
    validRows,
    invalidRows: errors.length,
    errors: errors.slice(0, MAX_REPORTED_ERRORS).map(String),
    ...(tokenization ? { tokenization } : {}),
  };
}
