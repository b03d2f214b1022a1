/**
 * A model's tokenizer and chat template, loaded from its folder the way transformers does: tokenizer.json,
 * tokenizer_config.json (special tokens, chat template), chat_template.jinja / chat_template.json when present,
 * and config.json's token ids as a fallback.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { Template } from '@huggingface/jinja';
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
  ) {
    this.specialTokens = [...tokenizer.get_added_tokens_decoder().values()]
      .filter((t) => t.special)
      .map((t) => t.content)
      .sort((a, b) => b.length - a.length);
  }

  /** Token ids of `text`, adding no BOS/EOS; special-token strings in the text become their ids, as in transformers. */
  encode(text: string): number[] {
    if (text === '') return [];
    return this.tokenizer.encode(text, { add_special_tokens: false }).ids;
  }

  /** Text of `ids`, special tokens included and spacing untouched. */
  decode(ids: ArrayLike<number>): string {
    return this.tokenizer.decode(Array.from(ids), { skip_special_tokens: false, clean_up_tokenization_spaces: false });
  }

  /** The token string of an id (e.g. "Ġthe", "<|eot_id|>"). */
  idToToken(id: number): string | undefined {
    return this.tokenizer.id_to_token(id);
  }

  /**
   * The parsed chat template, or null. Parsed on first use, so a model whose template @huggingface/jinja cannot
   * parse still tokenizes completion and text datasets.
   */
  get template(): Template | null {
    if (this.compiledTemplate === undefined) {
      try {
        this.compiledTemplate = this.chatTemplate === null ? null : new Template(this.chatTemplate);
      } catch (err) {
        const file = path.join(this.modelDir, this.chatTemplateFile);
        throw new DataFileError(file, `the chat template cannot be parsed (${(err as Error).message})`);
      }
    }
    return this.compiledTemplate;
  }
}

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

/**
 * chat_template is a string, or a list of named templates ({name, template}) of which "default" is the one used
 * for plain chat. A separate chat_template.jinja (newer transformers) or chat_template.json takes precedence.
 */
async function findChatTemplate(modelDir: string, config: Record<string, unknown>): Promise<{ template: string | null; file: string }> {
  const jinja = await readTextIfPresent(path.join(modelDir, 'chat_template.jinja'));
  if (jinja !== null && jinja.trim() !== '') return { template: jinja, file: 'chat_template.jinja' };
  const json = await readJson(path.join(modelDir, 'chat_template.json'), false);
  const fromJson = json ? templateFromConfigValue(json.chat_template) : null;
  if (fromJson !== null) return { template: fromJson, file: 'chat_template.json' };
  return { template: templateFromConfigValue(config.chat_template), file: 'tokenizer_config.json' };
}

function templateFromConfigValue(value: unknown): string | null {
  if (typeof value === 'string') return value.trim() === '' ? null : value;
  if (Array.isArray(value)) {
    const named = value as { name?: unknown; template?: unknown }[];
    const chosen = named.find((t) => t.name === 'default') ?? named[0];
    return chosen && typeof chosen.template === 'string' ? chosen.template : null;
  }
  return null;
}

/** Loads the tokenizer of the model in `modelDir` (tokenizer.json required; the other files optional). */
export async function loadModelTokenizer(modelDir: string): Promise<ModelTokenizer> {
  const tokenizerJson = await readJson(path.join(modelDir, 'tokenizer.json'), true);
  const config = (await readJson(path.join(modelDir, 'tokenizer_config.json'), false)) ?? {};
  const modelConfig = (await readJson(path.join(modelDir, 'config.json'), false)) ?? {};
  let tokenizer: Tokenizer;
  try {
    tokenizer = new Tokenizer(tokenizerJson as object, config);
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

  const chat = await findChatTemplate(modelDir, config);
  return new ModelTokenizer(modelDir, tokenizer, chat.template, bos.token, bos.id, eos.token, eos.id, addsBos, chat.file);
}
