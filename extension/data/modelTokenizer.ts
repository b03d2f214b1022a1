/**
 * A model's tokenizer and chat template, loaded from its folder the way transformers does: tokenizer.json,
 * tokenizer_config.json (special tokens, chat template), chat_template.jinja / chat_template.json when present,
 * and config.json's token ids as a fallback.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { Environment, Template } from '@huggingface/jinja';
import { Tokenizer } from '@huggingface/tokenizers';
import { DataFileError } from './errors';

export class ModelTokenizer {
  /** Special-token strings (added tokens marked special), longest first so the longest match wins. */
  readonly specialTokens: readonly string[];
  private compiledTemplate: Template | null | undefined;

  constructor(
    readonly modelDir: string,
    private readonly tokenizer: Tokenizer,
    /** The model's chat template (Jinja source), or null when it has none (base models). */
    readonly chatTemplate: string | null,
    readonly bosToken: string | null,
    readonly bosId: number | null,
    readonly eosToken: string,
    readonly eosId: number,
    /** Whether plain encoding of text starts with BOS (transformers' add_bos_token / the post-processor). */
    readonly addsBos: boolean,
    /** The file the chat template came from, for messages. */
    readonly chatTemplateFile = 'tokenizer_config.json',
    /** For a SentencePiece-style tokenizer that starts every text with "▁": the same tokenizer without that prefix. */
    private readonly makeContinuationTokenizer: (() => Tokenizer) | null = null,
    /** The named template "tool_use" of a model that has several (Hermes): transformers renders rows with tools with it. */
    readonly toolUseTemplate: { source: string; file: string } | null = null,
  ) {
    const added = [...tokenizer.get_added_tokens_decoder().values()];
    this.specialTokens = added
      .filter((t) => t.special)
      .map((t) => t.content)
      .sort((a, b) => b.length - a.length);
    this.addedTokens = added.map((t) => t.content).filter((t) => t !== '');
  }

  /** Every added token's text (special or not): the tokenizer splits text at them before anything else. */
  private readonly addedTokens: readonly string[];
  private continuationTokenizer: Tokenizer | undefined;

  /** Token ids of `text`, adding no BOS/EOS; special-token strings in the text become their ids, as in transformers. */
  encode(text: string): number[] {
    if (text === '') return [];
    return this.tokenizer.encode(text, { add_special_tokens: false }).ids;
  }

  /**
   * Token ids of `text` as the tokenizer would make them where `text` continues `before` inside one run of text,
   * i.e. without the "▁" a SentencePiece-style tokenizer (Llama 2, Mistral, TinyLlama) puts at the start of every
   * text it encodes, and at the start of the text after each added token. Equal to encode(text) for other tokenizers
   * and where `before` is empty or ends with an added token. What encode(before + text) gives for text's part when
   * no token spans the join (the caller checks).
   */
  encodeContinuation(before: string, text: string): number[] {
    if (text === '') return [];
    if (this.makeContinuationTokenizer === null || before === '' || this.addedTokens.some((t) => before.endsWith(t))) return this.encode(text);
    this.continuationTokenizer ??= this.makeContinuationTokenizer();
    return this.continuationTokenizer.encode(text, { add_special_tokens: false }).ids;
  }

  /** Text of `ids`, special tokens included and spacing untouched. */
  decode(ids: ArrayLike<number>): string {
    return this.tokenizer.decode(Array.from(ids), { skip_special_tokens: false, clean_up_tokenization_spaces: false });
  }

  /** The token string of an id (e.g. "Ġthe", "<|eot_id|>"). */
  idToToken(id: number): string | undefined {
    return this.tokenizer.id_to_token(id);
  }

  /** Whether the chat template for rows with tools reads `tools` (their definitions are otherwise left out of the text). */
  get templateUsesTools(): boolean {
    const source = this.toolUseTemplate?.source ?? this.chatTemplate;
    return source !== null && /\btools\b/.test(source);
  }

  /**
   * The parsed template for a conversation with tools or without, as transformers' apply_chat_template picks it: the
   * named "tool_use" template where the model has one and tools are given, else the chat template (null: none).
   */
  templateFor(withTools: boolean): Template | null {
    if (!withTools || this.toolUseTemplate === null) return this.template;
    if (this.compiledToolUseTemplate === undefined) this.compiledToolUseTemplate = this.parse(this.toolUseTemplate.source, this.toolUseTemplate.file);
    return this.compiledToolUseTemplate;
  }

  private compiledToolUseTemplate: Template | undefined;

  private parse(source: string, file: string): Template {
    try {
      return new Template(source);
    } catch (err) {
      throw new DataFileError(path.join(this.modelDir, file), `the chat template cannot be parsed (${(err as Error).message})`);
    }
  }

  /**
   * The parsed chat template, or null. Parsed on first use, so a model whose template @huggingface/jinja cannot
   * parse still tokenizes completion and text datasets.
   */
  get template(): Template | null {
    if (this.compiledTemplate === undefined) this.compiledTemplate = this.chatTemplate === null ? null : this.parse(this.chatTemplate, this.chatTemplateFile);
    return this.compiledTemplate;
  }
}

/** Most items a chat template's range() makes: far more than any conversation has turns. */
export const MAX_TEMPLATE_RANGE = 1_000_000;

/**
 * Bounds every chat template's range(), once for the process. A model's template is code from whoever published the
 * model, and `range(1000000000)` builds a list until the process dies of it (V8's fatal error, not anything a catch
 * sees); past the bound it is the template's error, as any other. The library declares its range() in each render's
 * global environment through Environment.set; that one declaration is given ours. Renaming the template's references
 * instead missed some (a dict literal's values, a macro parameter of that name); this has one binding to replace.
 */
function boundTemplateRange(): void {
  const proto = Environment.prototype as unknown as { set(this: Environment, name: string, value: unknown): unknown };
  const set = proto.set;
  proto.set = function (name, value) {
    const isLibraryRange = name === 'range' && this.parent === undefined && typeof value === 'function' && value !== boundedRange;
    return set.call(this, name, isLibraryRange ? boundedRange : value);
  };
}

function boundedRange(start: number, stop?: number, step = 1): number[] {
  if (stop === undefined) [start, stop] = [0, start];
  if (step === 0) throw new Error('range() step must not be zero');
  const count = Math.max(0, Math.ceil((stop - start) / step));
  if (count > MAX_TEMPLATE_RANGE) throw new Error(`range() of ${count} items, more than a chat template is allowed (${MAX_TEMPLATE_RANGE})`);
  return Array.from({ length: count }, (_, i) => start + i * step);
}

boundTemplateRange();

async function readJson(file: string, required: boolean): Promise<Record<string, unknown> | null> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' && !required) return null;
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new DataFileError(file, `file not found (${file})`);
    throw new DataFileError(file, `cannot read the file (${(err as Error).message})`);
  }
  try {
    return JSON.parse(text) as Record<string, unknown>;
  } catch (err) {
    throw new DataFileError(file, `not valid JSON (${(err as Error).message})`);
  }
}

async function readTextIfPresent(file: string): Promise<string | null> {
  try {
    return await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

/** bos_token / eos_token are strings or AddedToken dicts ({content, ...}) in tokenizer_config.json. */
function tokenText(value: unknown): string | null {
  if (typeof value === 'string') return value;
  if (typeof value === 'object' && value !== null && typeof (value as { content?: unknown }).content === 'string') {
    return (value as { content: string }).content;
  }
  return null;
}

/** config.json's bos_token_id / eos_token_id: a number or a list (the first is the primary one). */
function configTokenId(value: unknown): number | null {
  if (typeof value === 'number') return value;
  if (Array.isArray(value) && typeof value[0] === 'number') return value[0];
  return null;
}

interface ChatTemplates {
  /** The template for plain chat ("default"), or null. */
  template: string | null;
  file: string;
  /** The named "tool_use" template, for conversations with tools. */
  toolUse: { source: string; file: string } | null;
}

/**
 * The chat templates as transformers finds them: tokenizer_config.json's chat_template, a string or a list of named
 * templates ({name, template}); chat_template.json's likewise, in its place; chat_template.jinja (newer
 * transformers), which is the default one; and additional_chat_templates/<name>.jinja, more named ones. "default" is
 * for plain chat (a list without one: its first), "tool_use" for conversations with tools.
 */
async function findChatTemplates(modelDir: string, config: Record<string, unknown>): Promise<ChatTemplates> {
  const named = new Map<string, { source: string; file: string }>();
  let firstNamed: { source: string; file: string } | null = null;
  const addConfigValue = (value: unknown, file: string) => {
    if (typeof value === 'string') {
      if (value.trim() !== '') named.set('default', { source: value, file });
      return;
    }
    if (!Array.isArray(value)) return;
    for (const t of value as { name?: unknown; template?: unknown }[]) {
      if (typeof t?.name !== 'string' || typeof t.template !== 'string') continue;
      named.set(t.name, { source: t.template, file });
      firstNamed ??= { source: t.template, file };
    }
  };
  const json = await readJson(path.join(modelDir, 'chat_template.json'), false);
  if (json) addConfigValue(json.chat_template, 'chat_template.json');
  if (named.size === 0) addConfigValue(config.chat_template, 'tokenizer_config.json');
  const jinja = await readTextIfPresent(path.join(modelDir, 'chat_template.jinja'));
  if (jinja !== null && jinja.trim() !== '') named.set('default', { source: jinja, file: 'chat_template.jinja' });
  const extraDir = path.join(modelDir, ADDITIONAL_TEMPLATES_DIR);
  for (const name of (await readdirIfPresent(extraDir)).filter((n) => n.endsWith('.jinja')).sort()) {
    named.set(name.slice(0, -'.jinja'.length), { source: await fs.readFile(path.join(extraDir, name), 'utf8'), file: `${ADDITIONAL_TEMPLATES_DIR}/${name}` });
  }
  const chosen: { source: string; file: string } | null = named.get('default') ?? firstNamed;
  return { template: chosen?.source ?? null, file: chosen?.file ?? 'tokenizer_config.json', toolUse: named.get('tool_use') ?? null };
}

/** The folder of a model's named chat templates besides the default one (transformers' additional_chat_templates). */
export const ADDITIONAL_TEMPLATES_DIR = 'additional_chat_templates';

async function readdirIfPresent(dir: string): Promise<string[]> {
  try {
    return await fs.readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'ENOTDIR') return [];
    throw err;
  }
}

/**
 * The files of `modelDir` that loadModelTokenizer reads, those present: what a model's tokenization of a dataset
 * depends on (the tokenized-data cache of a run keys on their contents).
 */
export async function tokenizerSourceFiles(modelDir: string): Promise<string[]> {
  const names = ['tokenizer.json', 'tokenizer_config.json', 'config.json', 'chat_template.json', 'chat_template.jinja'];
  const extra = (await readdirIfPresent(path.join(modelDir, ADDITIONAL_TEMPLATES_DIR))).filter((n) => n.endsWith('.jinja')).sort();
  const files = [...names.map((n) => path.join(modelDir, n)), ...extra.map((n) => path.join(modelDir, ADDITIONAL_TEMPLATES_DIR, n))];
  const present = await Promise.all(files.map((f) => fs.stat(f).then((st) => st.isFile(), () => false)));
  return files.filter((_, i) => present[i]);
}

/** Loads the tokenizer of the model in `modelDir` (tokenizer.json required; the other files optional). */
export async function loadModelTokenizer(modelDir: string): Promise<ModelTokenizer> {
  const tokenizerFile = path.join(modelDir, 'tokenizer.json');
  const tokenizerJson = await readJson(tokenizerFile, false);
  if (tokenizerJson === null) {
    // older Llama/Mistral releases: transformers converts the SentencePiece model to tokenizer.json on load
    const sentencePiece = await fs.stat(path.join(modelDir, 'tokenizer.model')).then((st) => st.isFile(), () => false);
    if (sentencePiece)
      throw new DataFileError(tokenizerFile, `file not found; ${modelDir} has only tokenizer.model (SentencePiece), which transformers converts when it loads it: write tokenizer.json once with transformers (AutoTokenizer.from_pretrained(folder).save_pretrained(folder))`);
    await readJson(tokenizerFile, true); // the usual "file not found" error
  }
  const config = (await readJson(path.join(modelDir, 'tokenizer_config.json'), false)) ?? {};
  const modelConfig = (await readJson(path.join(modelDir, 'config.json'), false)) ?? {};
  let tokenizer: Tokenizer;
  try {
    tokenizer = new Tokenizer(tokenizerJson!, config);
  } catch (err) {
    // the library's message ("Tokenizer must contain a "model" property") does not say which file
    throw new DataFileError(path.join(modelDir, 'tokenizer.json'), `is not a tokenizer the tokenizers library can load (${(err as Error).message}; in ${modelDir})`);
  }
  const where = path.join(modelDir, 'tokenizer_config.json');

  const resolve = (name: 'bos' | 'eos'): { token: string | null; id: number | null } => {
    const text = tokenText(config[`${name}_token`]);
    if (text !== null) {
      const id = tokenizer.token_to_id(text);
      if (id === undefined) throw new DataFileError(where, `${name}_token "${text}" is not in the tokenizer's vocabulary`);
      return { token: text, id };
    }
    const id = configTokenId(modelConfig[`${name}_token_id`]);
    const token = id === null ? undefined : tokenizer.id_to_token(id);
    return token === undefined || id === null ? { token: null, id: null } : { token, id };
  };
  const bos = resolve('bos');
  const eos = resolve('eos');
  if (eos.token === null || eos.id === null) {
    throw new DataFileError(where, 'the model defines no EOS token (eos_token in tokenizer_config.json or eos_token_id in config.json)');
  }
  // EOS and BOS are written into rendered text and labelled by position, so each must encode to exactly its id.
  for (const [name, t] of [['eos', eos], ['bos', bos]] as const) {
    if (t.token === null) continue;
    const ids = tokenizer.encode(t.token, { add_special_tokens: false }).ids;
    if (ids.length !== 1 || ids[0] !== t.id) {
      throw new DataFileError(where, `${name} token "${t.token}" does not encode to its single id ${t.id} (got ${JSON.stringify(ids)})`);
    }
  }

  let addsBos = false;
  if (bos.id !== null) {
    if (typeof config.add_bos_token === 'boolean') addsBos = config.add_bos_token;
    else addsBos = tokenizer.encode('a', { add_special_tokens: true }).ids[0] === bos.id;
  }

  const chat = await findChatTemplates(modelDir, config);
  const withoutPrefix = withoutDummyPrefix(tokenizerJson as Record<string, unknown>);
  const continuation = withoutPrefix === null ? null : () => new Tokenizer(withoutPrefix, config);
  return new ModelTokenizer(modelDir, tokenizer, chat.template, bos.token, bos.id, eos.token, eos.id, addsBos, chat.file, continuation, chat.toolUse);
}

type JsonObject = Record<string, unknown>;
const isObject = (v: unknown): v is JsonObject => typeof v === 'object' && v !== null && !Array.isArray(v);

/**
 * tokenizer.json without the dummy prefix SentencePiece-style tokenizers put before each text they encode: a
 * Prepend("▁") normalizer (Llama 2's layout), or a Metaspace pre-tokenizer's prepend_scheme / add_prefix_space
 * (newer files). Null when the tokenizer has none (byte-level BPE: Llama 3, Qwen2).
 */
export function withoutDummyPrefix(json: JsonObject): JsonObject | null {
  // Only the two parts it edits are copied: the vocabulary and merges (most of a 9 MB tokenizer.json, 0.2 s of the
  // load to clone) are shared, and the tokenizers library only reads them.
  const copy: JsonObject = { ...json, normalizer: structuredClone(json.normalizer), pre_tokenizer: structuredClone(json.pre_tokenizer) };
  let changed = false;
  const normalizer = (n: unknown): unknown => {
    if (!isObject(n)) return n;
    if (n.type === 'Prepend') {
      changed = true;
      return null;
    }
    if (n.type === 'Sequence' && Array.isArray(n.normalizers)) n.normalizers = n.normalizers.map(normalizer).filter((x) => x !== null);
    return n;
  };
  const preTokenizer = (p: unknown): void => {
    if (!isObject(p)) return;
    if (p.type === 'Sequence' && Array.isArray(p.pretokenizers)) p.pretokenizers.forEach(preTokenizer);
    if (p.type === 'Metaspace' && (p.prepend_scheme !== 'never' || p.add_prefix_space === true)) {
      p.prepend_scheme = 'never';
      p.add_prefix_space = false;
      changed = true;
    }
  };
  copy.normalizer = normalizer(copy.normalizer);
  preTokenizer(copy.pre_tokenizer);
  return changed ? copy : null;
}
