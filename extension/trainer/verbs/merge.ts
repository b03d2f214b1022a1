// merge: base model + PEFT LoRA adapter written as a plain Hugging Face model (W + scale * B @ A for every adapted
// linear, a bnb-4bit base dequantized first), sharded like transformers' save_pretrained, with config.json
// (quantization_config dropped, dtype set) and the base's other files (tokenizer, generation config, chat
// template). The folder appears complete or not at all.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { isFile, isFolder } from '../../util/isFolder';
import { print, printWarnings } from '../cliOutput';
import { copyModelSideFiles } from '../modelFiles';
import { copyContained, linkRoot } from '../../util/containedCopy';
import { ADDITIONAL_TEMPLATES_DIR, alpacaFallbackTemplate, loadModelTokenizer } from '../../data';
import { readModelConfig } from '../../engine';
import { mergeWeights, type MergeDtype, type MergeWeightsReport } from '../../engine/tools';
import { writeJsonAtomic } from '../../util/atomicFile';
import { writeFolderAtomic } from '../../util/atomicFolder';
import { requiredString, stringOption, UsageError, type OptionSpec, type ParsedOptions } from '../cliArgs';
import { adapterFlag } from './export';

export interface MergeOptions {
  model: string;
  adapter: string;
  out: string;
  /** Default bfloat16. */
  dtype?: MergeDtype;
  /** Largest shard in tensor bytes; default 5 GB (transformers' "5GB"). */
  maxShardBytes?: number;
  /**
   * Written into tokenizer_config.json as chat_template where the merged folder has no chat template: the format a
   * finetune of a model without one was trained with (alpacaFallbackTemplate), so that apply_chat_template, vLLM and
   * a GGUF made from the folder ask it as it learned.
   */
  chatTemplate?: string;
}

export interface MergeResult extends MergeWeightsReport {
  out: string;
  dtype: MergeDtype;
  /** Files copied from the base model (and tokenizer files from the adapter folder). */
  copied: string[];
  /** Links in the model or adapter folder that lead outside it, not followed (a sentence each). */
  notCopied: string[];
}

export const DEFAULT_MAX_SHARD_BYTES = 5_000_000_000;

// Tokenizer files saved beside an adapter (trainers save the tokenizer they trained with, chat template included)
// take precedence over the base's.
const TOKENIZER_FILES = [
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'added_tokens.json',
  'tokenizer.model',
  'vocab.json',
  'merges.txt',
  'chat_template.jinja',
  'chat_template.json',
];

const DTYPE_ALIASES: Record<string, MergeDtype> = {
  bf16: 'bfloat16',
  bfloat16: 'bfloat16',
  f16: 'float16',
  fp16: 'float16',
  float16: 'float16',
  f32: 'float32',
  fp32: 'float32',
  float32: 'float32',
};

export function parseMergeDtype(text: string): MergeDtype {
  const dtype = DTYPE_ALIASES[text.toLowerCase()];
  if (!dtype) throw new UsageError(`--dtype must be bf16, f16 or f32, got '${text}'`);
  return dtype;
}

const UNITS: Record<string, number> = { '': 1, b: 1, kb: 1e3, mb: 1e6, gb: 1e9, tb: 1e12, kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, tib: 2 ** 40 };

/** "5GB" (10^9, as transformers reads it), "500MiB" (2^20) or a plain byte count. */
export function parseByteSize(text: string, option = 'max-shard-size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$/i.exec(text);
  const bytes = m ? Math.floor(Number(m[1]) * UNITS[(m[2] ?? '').toLowerCase()]) : NaN;
  if (!(bytes >= 1) || !Number.isSafeInteger(bytes)) throw new UsageError(`--${option} must be a size such as 5GB, 500MB or 2GiB, got '${text}'`);
  return bytes;
}

export function merge(options: MergeOptions): MergeResult {
  const { model, adapter, out } = options;
  const dtype = options.dtype ?? 'bfloat16';
  const maxShardBytes = options.maxShardBytes ?? DEFAULT_MAX_SHARD_BYTES;
  for (const [name, dir] of [['--model', model], ['--adapter', adapter]] as const)
    if (path.resolve(dir) === path.resolve(out)) throw new Error(`--out must be a different folder from ${name}`);
  readModelConfig(model); // validates the architecture before any work
  const rawConfig = readRawConfig(model);
  return writeFolderAtomic(out, (tmp) => {
    const report = mergeWeights(model, adapter, tmp, dtype, maxShardBytes);
    const { copied, notCopied } = writeMergedSideFiles(model, adapter, tmp, dtype, options.chatTemplate, rawConfig);
    return { ...report, out, dtype, copied, notCopied };
  });
}

/**
 * Everything of a merged model's folder but its weights, into `dir`: the base model's other files, the adapter's
 * tokenizer files over them, the named chat templates, `chatTemplate` where the folder has none (see MergeOptions),
 * and config.json as a plain model in `dtype`.
 */
export function writeMergedSideFiles(
  model: string,
  adapter: string,
  dir: string,
  dtype: MergeDtype,
  chatTemplate?: string,
  rawConfig: Record<string, unknown> = readRawConfig(model),
): { copied: string[]; notCopied: string[] } {
  const { copied, notCopied } = copyModelSideFiles(model, dir);
  const adapterRoot = linkRoot(adapter);
  for (const name of TOKENIZER_FILES) {
    const source = path.join(adapter, name);
    if (!isFile(source)) continue;
    const skipped = copyContained(source, path.join(dir, name), adapterRoot);
    if (skipped.length === 0 && !copied.includes(name)) copied.push(name);
    notCopied.push(...skipped);
  }
  // the named chat templates besides the default one (tool_use), the adapter's where it carries them
  const owner = [adapter, model].find((d) => isFolder(path.join(d, ADDITIONAL_TEMPLATES_DIR)));
  if (owner !== undefined) {
    notCopied.push(...copyContained(path.join(owner, ADDITIONAL_TEMPLATES_DIR), path.join(dir, ADDITIONAL_TEMPLATES_DIR), linkRoot(owner)));
    copied.push(ADDITIONAL_TEMPLATES_DIR);
  }
  if (chatTemplate !== undefined) addChatTemplate(dir, chatTemplate);
  // A plain model now: no quantization_config, and the dtype the weights are in, under whichever key the config
  // uses (transformers 5: dtype; older: torch_dtype).
  delete rawConfig.quantization_config;
  const hasDtype = 'dtype' in rawConfig, hasTorchDtype = 'torch_dtype' in rawConfig;
  if (hasDtype || !hasTorchDtype) rawConfig.dtype = dtype;
  if (hasTorchDtype) rawConfig.torch_dtype = dtype;
  writeJsonAtomic(path.join(dir, 'config.json'), rawConfig);
  return { copied, notCopied };
}

/** The model's config.json as JSON (the engine's reader, which checked it, also takes a few things JSON does not). */
function readRawConfig(model: string): Record<string, unknown> {
  const file = path.join(model, 'config.json');
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>;
  } catch (err) {
    throw new Error(`${file}: not valid JSON (${(err as Error).message})`);
  }
}

/** chat_template into `dir`'s tokenizer_config.json, unless the folder has a chat template already. */
function addChatTemplate(dir: string, template: string): void {
  if (['chat_template.jinja', 'chat_template.json'].some((f) => fs.existsSync(path.join(dir, f)))) return;
  const file = path.join(dir, 'tokenizer_config.json');
  const config = fs.existsSync(file) ? (JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>) : {};
  if (config.chat_template !== undefined && config.chat_template !== null && config.chat_template !== '') return;
  writeJsonAtomic(file, { ...config, chat_template: template });
}

/**
 * The chat template a merge of `adapter` into `model` adds: the fallback, where neither carries a template. None for
 * a model without a tokenizer (a merge needs none) or one the tokenizers library cannot read.
 */
export async function mergedChatTemplate(model: string, adapter: string): Promise<string | undefined> {
  const dir = [adapter, model].find((d) => fs.existsSync(path.join(d, 'tokenizer.json')));
  if (dir === undefined) return undefined;
  try {
    const tok = await loadModelTokenizer(dir);
    return tok.chatTemplate === null ? alpacaFallbackTemplate(tok) : undefined;
  } catch {
    return undefined;
  }
}

export const mergeVerb = {
  summary: 'merge a LoRA adapter into its base model and write a plain Hugging Face model (bf16 by default)',
  options: {
    model: { type: 'string', required: true, description: 'base model folder (plain or bnb-4bit)' },
    adapter: { type: 'string', required: true, description: 'PEFT LoRA adapter folder' },
    out: { type: 'string', required: true, description: 'folder for the merged model (must not exist or be empty)' },
    dtype: { type: 'string', description: 'bf16 (default), f16 or f32' },
    'max-shard-size': { type: 'string', description: 'largest weight file, e.g. 5GB (default), 500MB, 2GiB' },
    json: { type: 'boolean', description: 'print a JSON report' },
  } satisfies Record<string, OptionSpec>,
  async run(o: ParsedOptions): Promise<void> {
    const dtypeText = stringOption(o, 'dtype');
    const shardText = stringOption(o, 'max-shard-size');
    const model = requiredString(o, 'model');
    const adapter = adapterFlag(o, { required: true });
    const result = merge({
      model,
      adapter,
      out: requiredString(o, 'out'),
      dtype: dtypeText === undefined ? undefined : parseMergeDtype(dtypeText),
      maxShardBytes: shardText === undefined ? undefined : parseByteSize(shardText),
      chatTemplate: await mergedChatTemplate(model, adapter),
    });
    printWarnings(result.notCopied);
    if (o.json) return print(JSON.stringify(result));
    const files = result.shards === 1 ? 'model.safetensors' : `${result.shards} shards`;
    print(`merged ${result.tensors} tensors (${(result.bytes / 1048576).toFixed(2)} MiB, ${result.dtype}) into ${files} in ${result.out}`);
  },
};
