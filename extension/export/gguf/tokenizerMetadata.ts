// The tokenizer part of a GGUF: llama.cpp's tokenizer.ggml.* keys from a Hugging Face tokenizer.json. Byte-level
// BPE vocabularies (Llama 3, Qwen2, SmolLM, GPT-2 style) become the "gpt2" tokenizer model with tokens, token
// types and merges, and the pre-tokenizer name llama.cpp knows for the split regex. SentencePiece BPE vocabularies
// (Llama 2, Mistral, TinyLlama: BPE with byte fallback and "▁" for spaces) become the "llama" tokenizer model,
// which merges by score: each piece's score is minus the rank of the first merge that makes it, so llama.cpp's
// highest-score-first merging follows the merge list. Special token ids and the chat template come from the same
// loader training uses (extension/data's loadModelTokenizer), so the GGUF stops and renders prompts as the
// finetune saw them.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { exportedChatTemplate, loadModelTokenizer } from '../../data';
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
  model?: {
    type?: string;
    vocab?: Record<string, number>;
    merges?: (string | [string, string])[];
    byte_fallback?: boolean;
    unk_token?: string | null;
  };
  added_tokens?: { id: number; content: string; special?: boolean }[];
  normalizer?: Normalizer | null;
  pre_tokenizer?: PreTokenizer | null;
}

interface Normalizer {
  type: string;
  normalizers?: Normalizer[];
  prepend?: string;
  pattern?: { String?: string; Regex?: string };
  content?: string;
}

interface PreTokenizer {
  type: string;
  pattern?: { Regex?: string; String?: string };
  pretokenizers?: PreTokenizer[];
  use_regex?: boolean;
  replacement?: string;
  prepend_scheme?: string;
  add_prefix_space?: boolean;
}

const SPACE_MARK = '\u2581'; // SentencePiece's "▁"

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
 * converter does. `finetuned`: the file holds a finetune, which carries the fallback chat template it was trained with
 * where the model has none (exportedChatTemplate).
 */
export async function tokenizerMetadata(modelDir: string, vocabSize: number, finetuned = false): Promise<TokenizerMetadata> {
  const file = path.join(modelDir, 'tokenizer.json');
  if (!fs.existsSync(file)) throw new Error(`${modelDir}: no tokenizer.json (GGUF export needs the Hugging Face tokenizer file)`);
  const tok = JSON.parse(fs.readFileSync(file, 'utf8')) as TokenizerJson;
  const model = tok.model;
  if (model?.type !== 'BPE' || !model.vocab || !model.merges) {
    throw new Error(`${file}: tokenizer model ${model?.type ?? 'missing'} is not supported for GGUF export (byte-level BPE and SentencePiece BPE are)`);
  }
  const merges = model.merges.map((m) => (Array.isArray(m) ? `${m[0]} ${m[1]}` : m));
  const vocab = vocabularyTable(tok, model.vocab, vocabSize, file);

  const entries: [string, GgufValue][] = [];
  if (model.byte_fallback) {
    const addSpacePrefix = sentencePieceSpacePrefix(tok, file);
    entries.push(
      ['tokenizer.ggml.model', gguf.str('llama')],
      ['tokenizer.ggml.pre', gguf.str('default')],
      ['tokenizer.ggml.tokens', gguf.strings(vocab.tokens)],
      ['tokenizer.ggml.scores', gguf.f32s(pieceScores(vocab.tokens, merges))],
      ['tokenizer.ggml.token_type', gguf.i32s(sentencePieceTypes(vocab, model.unk_token ?? null))],
      ['tokenizer.ggml.add_space_prefix', gguf.bool(addSpacePrefix)],
    );
    const unk = model.unk_token ? vocab.tokens.indexOf(model.unk_token) : -1;
    if (unk >= 0) entries.push(['tokenizer.ggml.unknown_token_id', gguf.u32(unk)]);
  } else {
    entries.push(
      ['tokenizer.ggml.model', gguf.str('gpt2')],
      ['tokenizer.ggml.pre', gguf.str(preTokenizerName(tok, file))],
      ['tokenizer.ggml.tokens', gguf.strings(vocab.tokens)],
      ['tokenizer.ggml.token_type', gguf.i32s(vocab.types)],
      ['tokenizer.ggml.merges', gguf.strings(merges)],
    );
  }

  const t = await loadModelTokenizer(modelDir);
  entries.push(['tokenizer.ggml.eos_token_id', gguf.u32(t.eosId)]);
  if (t.bosId !== null) entries.push(['tokenizer.ggml.bos_token_id', gguf.u32(t.bosId)]);
  entries.push(['tokenizer.ggml.add_bos_token', gguf.bool(t.addsBos)], ['tokenizer.ggml.add_eos_token', gguf.bool(false)]);
  const padId = padTokenId(modelDir, tok);
  if (padId !== null) entries.push(['tokenizer.ggml.padding_token_id', gguf.u32(padId)]);
  const template = exportedChatTemplate(t, finetuned);
  if (template !== null) entries.push(['tokenizer.chat_template', gguf.str(template)]);
  // the named template for conversations with tools, as llama.cpp's converter writes it (llama-server renders a
  // request with tools with it)
  if (template !== null && t.toolUseTemplate !== null)
    entries.push(['tokenizer.chat_template.tool_use', gguf.str(t.toolUseTemplate.source)], ['tokenizer.chat_templates', gguf.strings(['tool_use'])]);
  return { entries, vocabSize, eosId: t.eosId };
}

interface VocabularyTable {
  tokens: string[];
  types: Int32Array;
}

/**
 * Token texts and types by id, from the model vocabulary and the added tokens. Ids the tokenizer does not define
 * are unused "[PAD<id>]" tokens, as llama.cpp's converter writes them.
 */
function vocabularyTable(tok: TokenizerJson, modelVocab: Record<string, number>, vocabSize: number, file: string): VocabularyTable {
  const tokens = new Array<string | undefined>(vocabSize);
  const types = new Int32Array(vocabSize).fill(TOKEN_TYPE.normal);
  for (const [text, id] of Object.entries(modelVocab)) {
    if (id >= vocabSize) throw new Error(`${file}: token ${JSON.stringify(text)} has id ${id}, beyond the model's vocab_size ${vocabSize}`);
    tokens[id] = text;
  }
  for (const t of tok.added_tokens ?? []) {
    if (t.id >= vocabSize) throw new Error(`${file}: added token ${JSON.stringify(t.content)} has id ${t.id}, beyond the model's vocab_size ${vocabSize}`);
    tokens[t.id] = t.content;
    types[t.id] = t.special || looksLikeControlToken(t.content) ? TOKEN_TYPE.control : TOKEN_TYPE.userDefined;
  }
  for (let id = 0; id < vocabSize; id++) {
    if (tokens[id] === undefined) {
      tokens[id] = `[PAD${id}]`;
      types[id] = TOKEN_TYPE.unused;
    }
  }
  return { tokens: tokens as string[], types };
}

/**
 * Added tokens llama.cpp's converter makes control tokens even where tokenizer.json does not mark them special
 * (its does_token_look_special): "<|...|>" tokens such as Qwen2.5's <|fim_prefix|> and <|file_sep|>, among others.
 * llama.cpp would otherwise retype them when it loads the file, warning that the file is probably wrong.
 */
export function looksLikeControlToken(text: string): boolean {
  return (
    ['<pad>', '<mask>', '<2mass>', '[@BOS@]'].includes(text) ||
    (text.startsWith('<|') && text.endsWith('|>')) ||
    (text.startsWith('<｜') && text.endsWith('｜>')) ||
    (text.startsWith('<unused') && text.endsWith('>'))
  );
}

/** SentencePiece token types: byte tokens "<0xXX>" are bytes (llama.cpp decodes them to that byte), unk unknown. */
function sentencePieceTypes(vocab: VocabularyTable, unkToken: string | null): Int32Array {
  const types = Int32Array.from(vocab.types);
  vocab.tokens.forEach((text, id) => {
    if (text === unkToken) types[id] = TOKEN_TYPE.unknown;
    else if (types[id] === TOKEN_TYPE.normal && /^<0x[0-9A-Fa-f]{2}>$/.test(text)) types[id] = TOKEN_TYPE.byte;
  });
  return types;
}

/**
 * Scores for the "llama" tokenizer model: minus the rank of the first merge that makes each piece (the best score
 * is merged first), 0 for pieces no merge makes (characters, bytes, specials: llama.cpp never looks them up as a
 * merge result).
 */
export function pieceScores(tokens: readonly string[], merges: readonly string[]): Float32Array {
  const idOf = new Map<string, number>();
  tokens.forEach((t, id) => idOf.set(t, id));
  const scores = new Float32Array(tokens.length);
  const scored = new Uint8Array(tokens.length);
  merges.forEach((merge, rank) => {
    const space = merge.indexOf(' ');
    const id = idOf.get(merge.slice(0, space) + merge.slice(space + 1));
    if (id !== undefined && !scored[id]) {
      scored[id] = 1;
      scores[id] = -rank;
    }
  });
  return scores;
}

/**
 * Whether the tokenizer puts a "▁" before each text section (llama.cpp's add_space_prefix), from its normalizer
 * (Llama 2's Prepend + Replace) or pre-tokenizer (Metaspace). Anything else the "llama" tokenizer model cannot
 * reproduce is refused.
 */
function sentencePieceSpacePrefix(tok: TokenizerJson, file: string): boolean {
  const flat = (n: Normalizer | null | undefined): Normalizer[] => (!n ? [] : n.type === 'Sequence' ? (n.normalizers ?? []).flatMap(flat) : [n]);
  let prefix = false;
  for (const n of flat(tok.normalizer)) {
    if (n.type === 'Prepend' && n.prepend === SPACE_MARK) prefix = true;
    else if (n.type === 'Replace' && n.pattern?.String === ' ' && n.content === SPACE_MARK) continue;
    else throw new Error(`${file}: the normalizer step ${n.type} is not supported for a SentencePiece GGUF (llama.cpp would tokenize differently)`);
  }
  for (const p of flatten(tok.pre_tokenizer)) {
    if (p.type !== 'Metaspace') {
      throw new Error(`${file}: pre-tokenizer ${p.type} is not supported for a SentencePiece GGUF (Llama 2 and Mistral use none, or Metaspace)`);
    }
    const scheme = p.prepend_scheme ?? (p.add_prefix_space === false ? 'never' : 'always');
    if (scheme !== 'never') prefix = true;
  }
  return prefix;
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
