// inspect-data: what a dataset file holds, before a run: format and shape, row count, every invalid row, and with
// a model the token-length statistics and the first examples rendered through the chat template with the trained
// part marked. Exits with 2 when some rows are invalid, so that a script can check its data before a run.
import { inspectDataset, isDatasetShape, type DatasetReport } from '../../data';
import { INVALID_ROWS_EXIT_CODE } from '../exitCodes';
import { integerOption, requiredString, stringOption, UsageError, type OptionSpec, type ParsedOptions } from '../cliArgs';

export const inspectDataOptions: Record<string, OptionSpec> = {
  data: { type: 'string', required: true, description: 'dataset file (.jsonl, .json, .csv, .parquet)' },
  model: { type: 'string', description: 'model folder whose tokenizer and chat template to use' },
  'seq-len': { type: 'string', description: 'maximum tokens per example, for the truncation count (with --model)' },
  shape: { type: 'string', description: 'messages, sharegpt, alpaca, completion or text (default: detected)' },
  sample: { type: 'string', description: 'tokenize only the first N examples for the token statistics (with --model; every row is still checked)' },
  json: { type: 'boolean', description: 'print the report as JSON' },
};

// Trained text is shown between ⟦ ⟧ (and in green on a terminal), so the split is visible in plain logs too.
function markTrained(segments: { text: string; trained: boolean }[], color: boolean): string {
  return segments.map((s) => (s.trained ? (color ? `\x1b[32m⟦${s.text}⟧\x1b[0m` : `⟦${s.text}⟧`) : s.text)).join('');
}

export function formatReport(r: DatasetReport, color = false): string {
  const lines = [
    `${r.file}: ${r.format}, shape ${r.shape ?? 'unknown'}, ${r.rowCount} rows (${r.validRows} valid, ${r.invalidRows} invalid)`,
  ];
  for (const e of r.errors) lines.push(`  ${e}`);
  if (r.invalidRows > r.errors.length) lines.push(`  ... and ${r.invalidRows - r.errors.length} more`);
  if (!r.tokenization) lines.push('token lengths and rendered examples: give --model DIR (its tokenizer and chat template)');
  if (r.tokenization) {
    const { stats, template, examples } = r.tokenization;
    const l = stats.lengths;
    lines.push(
      `template: ${template ?? 'none'}; tokens per example${r.tokenization.sample ? ` (the first ${r.tokenization.sample.tokenized} of ${r.tokenization.sample.of})` : ''}: min ${l.min}, mean ${l.mean.toFixed(1)}, p50 ${l.p50}, p95 ${l.p95}, max ${l.max}; ` +
        `${l.truncated} truncated; ${stats.trainedTokens} of ${stats.totalTokens} tokens trained`,
    );
    for (const w of r.tokenization.warnings) lines.push(`warning: ${w}`);
    for (const ex of examples) {
      lines.push('', `--- ${ex.source} (${ex.tokens} tokens, ${ex.trainedTokens} trained; trained text in ⟦ ⟧)`, markTrained(ex.segments, color));
    }
  }
  return lines.join('\n');
}

export async function inspectDataVerb(o: ParsedOptions): Promise<void> {
  const shape = stringOption(o, 'shape');
  if (shape !== undefined && !isDatasetShape(shape)) throw new UsageError(`--shape must be messages, sharegpt, alpaca, completion or text, got '${shape}'`);
  const seqLen = stringOption(o, 'seq-len') === undefined ? undefined : integerOption(o, 'seq-len', 0);
  if (seqLen !== undefined && seqLen < 2) throw new UsageError(`--seq-len must be at least 2, got ${seqLen}`);
  const sample = stringOption(o, 'sample') === undefined ? undefined : integerOption(o, 'sample', 0);
  if (sample !== undefined && sample < 1) throw new UsageError(`--sample must be at least 1, got ${sample}`);
  const report = await inspectDataset(requiredString(o, 'data'), { modelDir: stringOption(o, 'model'), maxLength: seqLen, shape, tokenizeAtMost: sample });
  process.stdout.write((o.json ? JSON.stringify(report) : formatReport(report, Boolean(process.stdout.isTTY))) + '\n');
  // a script can tell "checked, some rows are invalid" (2) from "could not check" (1, with an error sentence)
  if (report.invalidRows > 0) process.exitCode = INVALID_ROWS_EXIT_CODE;
}
