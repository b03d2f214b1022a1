// The tokenizer part of a GGUF: llama.cpp's tokenizer.ggml.* keys from a Hugging Face tokenizer.json. Byte-level
// BPE vocabularies (Llama 3, Qwen2, SmolLM, GPT-2 style) become the "gpt2" tokenizer model with tokens, token
// types and merges, and the pre-tokenizer name llama.cpp knows for the split regex. Special token ids and the chat
// template come from the same loader training uses (extension/data's loadModelTokenizer), so the GGUF stops and
// renders prompts as the finetune saw them.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { loadModelTokenizer } from '../../data';
import { gguf, type GgufValue } from './writer';

/** llama_token_type (llama.cpp's llama-vocab.h). */
const TOKEN_TYPE = { normal: 1, unknown: 2, control: 3, userDefined: 4, unused: 5, byte: 6 } as const;

/** Split regexes of tokenizer.json's pre_tokenizer, by the name llama.cpp's tokenizer.ggml.pre gives them. */
const KNOWN_PRE_TOKENIZERS: Record<string, string> = {
  // Llama 3 / 3.1 / 3.2
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": 'llama-bpe',
  // Qwen2 / 2.5: digits one by one
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": 'qwen2',
};

interface TokenizerJson {
  model?: { type?: string; vocab?: Record<string, number>; merges?: (string | [string, string])[]; byte_fallback?: boolean };
  added_tokens?: { id: number; content: string; special?: boolean }[];
  pre_tokenizer?: PreTokenizer | null;
}

interface PreTokenizer {
  type: string;
  pattern?: { Regex?: string; String?: string };
  pretokenizers?: PreTokenizer[];
  use_regex?: boolean;
}

function flatten(p: PreTokenizer | null | undefined): PreTokenizer[] {
  if (!p) return [];
  return p.type === 'Sequence' ? (p.pretokenizers ?? []).flatMap(flatten) : [p];
}

/** llama.cpp's pre-tokenizer name for this tokenizer.json, or an error naming what is not supported. */
export function preTokenizerName(tok: TokenizerJson, where: string): string {
  const parts = flatten(tok.pre_tokenizer);
  const split = parts.find((p) => p.type === 'Split' && p.pattern?.Regex !== undefined);
  if (split) {
    const name = KNOWN_PRE_TOKENIZERS[split.pattern!.Regex!];
    if (name) return name;
    throw new Error(`${where}: the pre-tokenizer's split pattern is not one llama.cpp knows by name, so a GGUF of it would tokenize differently (pattern ${JSON.stringify(split.pattern!.Regex)})`);
  }
  // GPT-2's own ByteLevel regex (no Split step): llama.cpp's "gpt-2"
  if (parts.length === 1 && parts[0].type === 'ByteLevel' && parts[0].use_regex !== false) return 'gpt-2';
  throw new Error(`${where}: pre-tokenizer ${JSON.stringify(parts.map((p) => p.type))} is not supported for GGUF export`);
}

export interface TokenizerMetadata {
  entries: [string, GgufValue][];
  /** The vocabulary size written (the model's embedding rows). */
  vocabSize: number;
  eosId: number;
}

/**
 * tokenizer.ggml.* for the model in `modelDir`. `vocabSize` is the model's (config.json's vocab_size, the
 * embedding's rows): ids the tokenizer does not define are written as unused "[PAD<id>]" tokens, as llama.cpp's
 * converter does.
 */
export async function tokenizerMetadata(modelDir: string, vocabSize: number): Promise<TokenizerMetadata> {
  const file = path.join(modelDir, 'tokenizer.json');
  if (!fs.existsSync(file)) throw new Error(`${modelDir}: no tokenizer.json (GGUF export needs the Hugging Face tokenizer file)`);
  const tok = JSON.parse(fs.readFileSync(file, 'utf8')) as TokenizerJson;
  const model = tok.model;
  if (model?.type !== 'BPE' || !model.vocab || !model.merges) throw new Error(`${file}: tokenizer model ${model?.type ?? 'missing'} is not supported for GGUF export (byte-level BPE is)`);
  if (model.byte_fallback) throw new Error(`${file}: SentencePiece-style BPE with byte fallback is not supported for GGUF export yet`);
  const pre = preTokenizerName(tok, file);

  const tokens = new Array<string | undefined>(vocabSize);
  const types = new Int32Array(vocabSize).fill(TOKEN_TYPE.normal);
  for (const [text, id] of Object.entries(model.vocab)) {
    if (id >= vocabSize) throw new Error(`${file}: token ${JSON.stringify(text)} has id ${id}, beyond the model's vocab_size ${vocabSize}`);
    tokens[id] = text;
  }
  for (const t of tok.added_tokens ?? []) {
    if (t.id >= vocabSize) throw new Error(`${file}: added token ${JSON.stringify(t.content)} has id ${t.id}, beyond the model's vocab_size ${vocabSize}`);
    tokens[t.id] = t.content;
    types[t.id] = t.special ? TOKEN_TYPE.control : TOKEN_TYPE.userDefined;
  }
  for (let id = 0; id < vocabSize; id++) {
    if (tokens[id] === undefined) {
      tokens[id] = `[PAD${id}]`;
      types[id] = TOKEN_TYPE.unused;
    }
  }
  const merges = model.merges.map((m) => (Array.isArray(m) ? `${m[0]} ${m[1]}` : m));

  const t = await loadModelTokenizer(modelDir);
  const entries: [string, GgufValue][] = [
    ['tokenizer.ggml.model', gguf.str('gpt2')],
    ['tokenizer.ggml.pre', gguf.str(pre)],
    ['tokenizer.ggml.tokens', gguf.strings(tokens as string[])],
    ['tokenizer.ggml.token_type', gguf.i32s(types)],
    ['tokenizer.ggml.merges', gguf.strings(merges)],
    ['tokenizer.ggml.eos_token_id', gguf.u32(t.eosId)],
  ];
  if (t.bosId !== null) entries.push(['tokenizer.ggml.bos_token_id', gguf.u32(t.bosId)]);
  entries.push(['tokenizer.ggml.add_bos_token', gguf.bool(t.addsBos)], ['tokenizer.ggml.add_eos_token', gguf.bool(false)]);
  const padId = padTokenId(modelDir, tok);
  if (padId !== null) entries.push(['tokenizer.ggml.padding_token_id', gguf.u32(padId)]);
  if (t.chatTemplate !== null) entries.push(['tokenizer.chat_template', gguf.str(t.chatTemplate)]);
  return { entries, vocabSize, eosId: t.eosId };
}

/** tokenizer_config.json's pad_token, as an id, when it names a token of the vocabulary. */
function padTokenId(modelDir: string, tok: TokenizerJson): number | null {
  const configFile = path.join(modelDir, 'tokenizer_config.json');
  if (!fs.existsSync(configFile)) return null;
  const config = JSON.parse(fs.readFileSync(configFile, 'utf8')) as { pad_token?: unknown };
  const text = typeof config.pad_token === 'string' ? config.pad_token : (config.pad_token as { content?: string } | undefined)?.content;
  if (text === undefined) return null;
  const added = tok.added_tokens?.find((a) => a.content === text);
  if (added) return added.id;
  return tok.model?.vocab?.[text] ?? null;
}
