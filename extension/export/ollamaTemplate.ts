// The Ollama (Go text/template) form of a model's chat template, for export-ollama's Modelfile.
//
// Jinja cannot be translated to Go templates in general, so the chat format is read off the model's own renderings:
// probe conversations with marker contents are rendered through the same renderer training used (the model's Jinja
// chat template, or the Alpaca-style fallback for models without one), and the text around the markers gives the
// turn format: what opens and closes user and assistant turns, what separates turns, the assistant header that asks
// for a reply, and how a system message is placed (its own turn, or folded into the first user turn) or what stands
// in its place when there is none (Qwen2's default system turn, Llama 3.1's dated preamble). From that one Go
// template is emitted in the forms Ollama's own templates use (ollama/ollama template/*.gotmpl, docs/template.mdx):
// `.System`, `range $i, $_ := .Messages` with `.Role` / `.Content`, and `$last := eq (len (slice $.Messages $i)) 1`.
// The emitted template is then rendered with this module's Go-template evaluator on more conversations (with and
// without a system message, one to three turns, multi-line contents) exactly as Ollama feeds it (template.go's
// Execute: system messages collated into .System, consecutive turns of one role merged) and must reproduce the
// model's rendering character for character; otherwise the template is refused, naming the difference.
//
// Two differences from the Jinja rendering are by design, as in Ollama's templates: the leading BOS is left out
// when the tokenizer adds it (llama.cpp adds it when tokenizing, as Ollama does), and a conversation that ends with
// an assistant message leaves that turn open (no end-of-turn token), so Ollama continues the message.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { renderExample, TemplateRenderError, type ChatMessage, type ModelTokenizer } from '../data';
import { parseGoTemplate, quoteGo, type GoTemplate, type GoValue } from './goTemplate';

export type ChatFamily = 'llama3' | 'chatml' | 'gemma' | 'inst' | 'alpaca' | 'other';

/** How a model renders a conversation, as plain text pieces around the message contents. */
export interface TurnFormat {
  /** Text before the first turn when there is no system message (a default system turn, a preamble, or ""). */
  start: string;
  /**
   * A system message as its own turn (`open` + content + `close` instead of `start`), inside the first user turn
   * (Gemma 3) or the last one (Mistral v0.3), or dropped.
   */
  system: { placement: 'turn' | 'first-user' | 'last-user'; open: string; close: string } | { placement: 'none' };
  userOpen: string;
  userClose: string;
  assistantOpen: string;
  /** Ends an assistant turn; starts with the end-of-turn token. */
  assistantClose: string;
  /** Between an assistant turn's close and the next turn. */
  separator: string;
  /** After the last user turn: what makes the model answer (the assistant header). */
  generation: string;
}

export interface OllamaTemplate {
  family: ChatFamily;
  /** 'chat_template' (the model's Jinja template) or 'alpaca-fallback' (the model has none). */
  source: 'chat_template' | 'alpaca-fallback';
  format: TurnFormat;
  /** The Go template for the Modelfile's TEMPLATE. */
  template: string;
  /** The token that ends an assistant turn (e.g. <|eot_id|>, <|im_end|>). */
  endOfTurn: string;
  /** PARAMETER stop values: the end-of-turn token, the EOS tokens, and the token that opens a new turn. */
  stops: string[];
  /** Whether the model's template writes a system message (false: it drops or refuses one). */
  supportsSystem: boolean;
}

/** A message as Ollama's template.Execute sees it. */
export interface OllamaMessage {
  role: string;
  content: string;
}

/** Thrown when a chat template cannot be expressed as an Ollama template; the message says why and what to use instead. */
export class UnsupportedTemplateError extends Error {
  override name = 'UnsupportedTemplateError';
}

/**
 * The date Llama 3.x templates print as "Today Date". It must be the one extension/data/render.ts passes when
 * training (its DEFAULT_DATE_STRING); referenceRenderer checks that its rendering equals renderExample's.
 */
const TRAINING_DATE_STRING = '26 Jul 2024';

type Renderer = (messages: ChatMessage[], addGenerationPrompt: boolean) => string;

/** The model's rendering of a conversation as llama.cpp (and Ollama) would tokenize it: without a BOS it adds itself. */
export function referenceRenderer(tok: ModelTokenizer): { render: Renderer; source: OllamaTemplate['source'] } {
  const stripBos = (text: string) => (tok.addsBos && tok.bosToken !== null && text.startsWith(tok.bosToken) ? text.slice(tok.bosToken.length) : text);
  const training = (messages: ChatMessage[]) => stripBos(renderExample({ kind: 'chat', messages }, tok).segments.map((s) => s.text).join(''));
  const template = tok.template;
  if (template === null) {
    // The fallback's prompt ends with "### Response:\n" after each user turn: no separate generation prompt.
    return { render: (messages) => training(messages), source: 'alpaca-fallback' };
  }
  const context: Record<string, unknown> = { date_string: TRAINING_DATE_STRING, eos_token: tok.eosToken };
  if (tok.bosToken !== null) context.bos_token = tok.bosToken;
  let checked = false;
  const render: Renderer = (messages, addGenerationPrompt) => {
    let text: string;
    try {
      text = stripBos(template.render({ ...context, messages, add_generation_prompt: addGenerationPrompt }));
    } catch (err) {
      throw new TemplateRenderError(`chat template error: ${(err as Error).message}`);
    }
    if (!checked && !addGenerationPrompt && messages.at(-1)?.role === 'assistant') {
      // the same variables as training: the finished conversation renders as renderExample renders it
      const trained = training(messages);
      if (trained !== text) throw new Error(`internal: the chat template renders differently here than in training (${JSON.stringify(text)} vs ${JSON.stringify(trained)})`);
      checked = true;
    }
    return text;
  };
  return { render, source: 'chat_template' };
}

// Marker contents for reading the format off renderings: plain sentences no template text contains.
const PROBE = {
  system: 'Answer in one short sentence.',
  user1: 'What is the capital of France?',
  assistant1: 'The capital of France is Paris.',
  user2: 'And the capital of Italy?',
};

function after(text: string, prefix: string, what: string): string {
  if (!text.startsWith(prefix)) throw new UnsupportedTemplateError(`adding ${what} changes how the conversation before it renders`);
  return text.slice(prefix.length);
}

function split(text: string, marker: string, what: string): [string, string] {
  const at = text.indexOf(marker);
  if (at < 0) throw new UnsupportedTemplateError(`${what}: the message's content does not appear as written`);
  return [text.slice(0, at), text.slice(at + marker.length)];
}

function commonSuffixLength(a: string, b: string): number {
  let n = 0;
  while (n < a.length && n < b.length && a[a.length - 1 - n] === b[b.length - 1 - n]) n++;
  return n;
}

/** Reads the turn format off the renderer's output for a few probe conversations. */
export function inferTurnFormat(render: Renderer): TurnFormat {
  const { system: S, user1: U1, assistant1: A1, user2: U2 } = PROBE;
  const u1 = render([{ role: 'user', content: U1 }], false);
  const [x0, userClose] = split(u1, U1, 'a user turn');
  const generation = after(render([{ role: 'user', content: U1 }], true), u1, 'the generation prompt');
  const ua = render([{ role: 'user', content: U1 }, { role: 'assistant', content: A1 }], false);
  const [assistantOpen, assistantClose] = split(after(ua, u1, 'an assistant turn'), A1, 'an assistant turn');
  const uau = render([{ role: 'user', content: U1 }, { role: 'assistant', content: A1 }, { role: 'user', content: U2 }], true);
  const [between, tail] = split(after(uau, ua, 'a second user turn'), U2, 'a second user turn');
  if (tail !== userClose + generation) throw new UnsupportedTemplateError('a later user turn ends differently from the first');
  // What opens a user turn is what the first and the later user turns have in common before the content; what the
  // first has beyond it is the start (a default system turn), what the later has beyond it separates the turns.
  const common = commonSuffixLength(x0, between);
  const userOpen = x0.slice(x0.length - common);
  const start = x0.slice(0, x0.length - common);
  const separator = between.slice(0, between.length - common);

  let system: TurnFormat['system'] = { placement: 'none' };
  let su: string | null;
  try {
    su = render([{ role: 'system', content: S }, { role: 'user', content: U1 }], false);
  } catch (err) {
    if (!(err instanceof TemplateRenderError)) throw err;
    su = null; // the template refuses system messages (raise_exception)
  }
  if (su !== null && su !== u1) {
    const turnTail = userOpen + U1 + userClose;
    if (su.endsWith(turnTail) && su.slice(0, su.length - turnTail.length).includes(S)) {
      const [open, close] = split(su.slice(0, su.length - turnTail.length), S, 'a system turn');
      system = { placement: 'turn', open, close };
    } else if (su.startsWith(start + userOpen) && su.endsWith(U1 + userClose) && su.length > (start + userOpen + U1 + userClose).length) {
      const [open, close] = split(su.slice((start + userOpen).length, su.length - (U1 + userClose).length), S, 'a system message in the first user turn');
      system = { placement: 'first-user', open, close }; // or the last user turn: fitTemplate tries both
    } else {
      throw new UnsupportedTemplateError('a system message is placed neither as its own turn nor at the start of the first user turn');
    }
  }
  return { start, system, userOpen, userClose, assistantOpen, assistantClose, separator, generation };
}

/** Builds template text: literals, and actions written so that their `{{-` never trims a literal's own whitespace. */
class TemplateBuilder {
  private out = '';
  private endsInSpace = false;

  text(s: string): this {
    if (s === '') return this;
    // a literal a TEMPLATE """...""" cannot hold as written (modelfileTripleQuotedHolds), or a `{{` that would start an action
    if (s.includes('{{') || !modelfileTripleQuotedHolds(s)) return this.action(quoteGo(s));
    this.out += s;
    this.endsInSpace = /\s$/.test(s);
    return this;
  }

  /** An action; after a literal that ends in whitespace it is written inline, else on a line of its own with `{{-`. */
  action(body: string): this {
    this.out += this.out === '' ? `{{- ${body} }}` : this.endsInSpace ? `{{ ${body} }}` : `\n{{- ${body} }}`;
    this.endsInSpace = false;
    return this;
  }

  toString(): string {
    return this.out;
  }
}

/** The Go template for a turn format (see the header comment for where its forms come from). */
export function emitGoTemplate(f: TurnFormat): string {
  const b = new TemplateBuilder();
  const sys = f.system;
  if (sys.placement === 'turn') {
    if (f.start === sys.open + sys.close) {
      b.text(sys.open).action('.System').text(sys.close); // always there, empty or not (Llama 3.1's dated system turn)
    } else {
      b.action('if .System').text(sys.open).action('.System').text(sys.close);
      if (f.start !== '') b.action('else').text(f.start);
      b.action('end');
    }
  } else {
    if (sys.placement === 'first-user') b.action('$system := .System');
    b.text(f.start);
  }
  b.action('range $i, $_ := .Messages');
  b.action('$last := eq (len (slice $.Messages $i)) 1');
  b.action('if eq .Role "user"').text(f.userOpen);
  if (sys.placement === 'first-user') b.action('if $system').text(sys.open).action('$system').text(sys.close).action('$system = ""').action('end');
  if (sys.placement === 'last-user') b.action('if and $last $.System').text(sys.open).action('$.System').text(sys.close).action('end');
  b.action('.Content').text(f.userClose);
  if (f.generation !== '') b.action('if $last').text(f.generation).action('end');
  b.action('else if eq .Role "assistant"').text(f.assistantOpen).action('.Content');
  // the last assistant message stays open: Ollama continues it
  if (f.assistantClose + f.separator !== '') b.action('if not $last').text(f.assistantClose + f.separator).action('end');
  b.action('end');
  b.action('end');
  return b.toString();
}

/**
 * What Ollama passes to a template for a conversation (ollama/ollama template/template.go, Execute and collate): every
 * system message's content joined by blank lines as .System, and the messages with consecutive same-role ones merged.
 */
export function ollamaValues(messages: readonly OllamaMessage[]): { System: string; Messages: { Role: string; Content: string }[] } {
  const system = messages.filter((m) => m.role === 'system').map((m) => m.content);
  const collated: { Role: string; Content: string }[] = [];
  for (const m of messages) {
    const last = collated.at(-1);
    if (last !== undefined && last.Role === m.role && m.role !== 'tool') last.Content += '\n\n' + m.content;
    else collated.push({ Role: m.role, Content: m.content });
  }
  return { System: system.join('\n\n'), Messages: collated };
}

/** Renders a parsed Ollama template for a conversation as Ollama would. */
export function renderOllama(template: GoTemplate, messages: readonly OllamaMessage[]): string {
  return template.execute(ollamaValues(messages) as unknown as { [key: string]: GoValue });
}

// Conversations the emitted template must render exactly as the model does: each shape with and without a system
// message, contents with inner newlines, quotes and braces.
const CHECK_CONTENTS = {
  system: 'You are a careful assistant.\nKeep answers short.',
  user: ['Name two rivers in Europe.', 'Which one is longer?\nAnswer with "Danube" or "Rhine".', 'Thanks {for} that.'],
  assistant: ['The Danube and the Rhine.', 'The Danube is longer:\n2850 km against 1230 km.', "You're welcome."],
};

function checkConversations(withSystem: boolean): ChatMessage[][] {
  const conversations: ChatMessage[][] = [];
  for (let turns = 1; turns <= 3; turns++) {
    const base: ChatMessage[] = withSystem ? [{ role: 'system', content: CHECK_CONTENTS.system }] : [];
    const c = [...base];
    for (let t = 0; t < turns; t++) {
      c.push({ role: 'user', content: CHECK_CONTENTS.user[t] });
      conversations.push([...c]);
      c.push({ role: 'assistant', content: CHECK_CONTENTS.assistant[t] });
      conversations.push([...c]);
    }
  }
  return conversations;
}

function describeDifference(expected: string, got: string): string {
  let i = 0;
  while (i < expected.length && i < got.length && expected[i] === got[i]) i++;
  const clip = (s: string) => JSON.stringify(s.slice(Math.max(0, i - 20), i + 30));
  return `the model's template gives ${clip(expected)}, the Ollama template ${clip(got)} (at character ${i})`;
}

/**
 * Renders the emitted template on the check conversations and compares with the model's rendering; the first
 * difference is thrown as an UnsupportedTemplateError.
 */
export function checkAgainstModel(template: string, format: TurnFormat, render: Renderer): void {
  const parsed = parseGoTemplate(template);
  for (const withSystem of [false, true]) {
    for (const c of checkConversations(withSystem)) {
      const endsWithUser = c.at(-1)!.role === 'user';
      let expected: string;
      try {
        expected = render(c, endsWithUser);
      } catch (err) {
        if (withSystem && format.system.placement === 'none' && err instanceof TemplateRenderError) continue;
        throw new UnsupportedTemplateError(`it fails on a ${c.length}-message conversation (${(err as Error).message})`);
      }
      const got = renderOllama(parsed, c) + (endsWithUser ? '' : format.assistantClose);
      if (got !== expected) {
        const shape = c.map((m) => m.role).join(', ');
        throw new UnsupportedTemplateError(`for the conversation (${shape}) ${describeDifference(expected, got)}`);
      }
    }
  }
}

function familyOf(f: TurnFormat, source: OllamaTemplate['source']): ChatFamily {
  if (source === 'alpaca-fallback') return 'alpaca';
  const turnText = f.userOpen + f.assistantOpen + f.assistantClose;
  if (turnText.includes('<|start_header_id|>')) return 'llama3';
  if (turnText.includes('<|im_start|>')) return 'chatml';
  if (turnText.includes('<start_of_turn>')) return 'gemma';
  if (turnText.includes('[INST]')) return 'inst';
  return 'other';
}

/** The special token `text` starts with (after whitespace), if any. */
function leadingSpecial(text: string, tok: ModelTokenizer): string | null {
  const t = text.trimStart();
  return tok.specialTokens.find((s) => t.startsWith(s)) ?? null;
}

/** Token ids config.json and generation_config.json list as eos_token_id (a number or a list). */
function configEosIds(modelDir: string): number[] {
  const ids: number[] = [];
  for (const file of ['config.json', 'generation_config.json']) {
    const p = path.join(modelDir, file);
    if (!fs.existsSync(p)) continue;
    const v = (JSON.parse(fs.readFileSync(p, 'utf8')) as { eos_token_id?: unknown }).eos_token_id;
    for (const id of Array.isArray(v) ? v : [v]) if (typeof id === 'number') ids.push(id);
  }
  return ids;
}

/**
 * The stop strings: the end-of-turn token, every EOS token the model lists, and what opens the next turn (as
 * Ollama's own templates stop on <|start_header_id|> / <|im_start|>: template/llama3-instruct.json, chatml.json).
 */
function stopStrings(f: TurnFormat, endOfTurn: string, tok: ModelTokenizer): string[] {
  const eos = [tok.eosToken, ...configEosIds(tok.modelDir).map((id) => tok.idToToken(id)).filter((t): t is string => t !== undefined)];
  const opener = leadingSpecial(f.userOpen, tok) ?? f.userOpen.trim().split('\n')[0].trim();
  // a token's text comes from the model's files: one a PARAMETER cannot hold is left out (llama.cpp still stops at
  // the end-of-generation tokens the GGUF names), never written so that it ends the quote and adds directives
  return [...new Set([endOfTurn, ...eos, opener].filter((s) => s !== '' && modelfileParameterHolds(s)))];
}

/**
 * Whether Ollama's Modelfile parser (parser/parser.go) reads `value` back as written between """ quotes (TEMPLATE,
 * SYSTEM, a PARAMETER with a quote in it): it ends a value at the first line end where what it has read unquotes, so
 * a """ inside would end it early (and what follows would be read as directives); it drops non-printable
 * characters (newlines and tabs are kept). A value may end in a quote: `"""Say "yes""""` unquotes to `Say "yes"`.
 */
export function modelfileTripleQuotedHolds(value: string): boolean {
  return !value.includes('"""') && !/[^\p{L}\p{M}\p{N}\p{P}\p{S} \n\t]/u.test(value);
}

/** Whether a Modelfile PARAMETER value can hold `value` exactly: one line, and what a quoted value can hold. */
export function modelfileParameterHolds(value: string): boolean {
  return !/[\n\t]/.test(value) && modelfileTripleQuotedHolds(value);
}

/**
 * The turn format read off `render` and its Go template, checked on the check conversations. A system message inside
 * a user turn reads the same from a one-turn probe whether it goes into the first or the last user turn, so both are
 * tried. Throws UnsupportedTemplateError with the reason when nothing fits.
 */
export function fitTemplate(render: Renderer): { format: TurnFormat; template: string } {
  let format: TurnFormat;
  try {
    format = inferTurnFormat(render);
  } catch (err) {
    if (err instanceof TemplateRenderError) throw new UnsupportedTemplateError(err.message);
    throw err;
  }
  const sys = format.system;
  const candidates = sys.placement === 'first-user' ? [format, { ...format, system: { ...sys, placement: 'last-user' as const } }] : [format];
  let firstError: unknown;
  for (const candidate of candidates) {
    const template = emitGoTemplate(candidate);
    try {
      checkAgainstModel(template, candidate, render);
      return { format: candidate, template };
    } catch (err) {
      if (!(err instanceof UnsupportedTemplateError)) throw err;
      firstError ??= err;
    }
  }
  throw firstError;
}

const INSTEAD = "export-gguf writes the GGUF with the model's own Jinja template, which llama.cpp and LM Studio apply as is";

/** The Ollama template of the model whose tokenizer is `tok`, checked against its own rendering; refuses what it cannot express. */
export function ollamaTemplate(tok: ModelTokenizer): OllamaTemplate {
  const { render, source } = referenceRenderer(tok);
  const refuse = (reason: string): never => {
    const what = source === 'chat_template' ? `the chat template of ${tok.modelDir} (${tok.chatTemplateFile})` : `the Alpaca-style fallback format of ${tok.modelDir}`;
    throw new UnsupportedTemplateError(`${what} cannot be written as an Ollama template: ${reason}. ${INSTEAD}`);
  };
  let fitted: { format: TurnFormat; template: string };
  try {
    fitted = fitTemplate(render);
  } catch (err) {
    if (err instanceof UnsupportedTemplateError) return refuse(err.message);
    throw err;
  }
  const { format, template } = fitted;
  const endOfTurn = leadingSpecial(format.assistantClose, tok);
  if (endOfTurn === null) return refuse(`its assistant turns end with ${JSON.stringify(format.assistantClose)}, not with a special token, so nothing marks where an answer ends`);
  return {
    family: familyOf(format, source),
    source,
    format,
    template,
    endOfTurn,
    stops: stopStrings(format, endOfTurn, tok),
    supportsSystem: format.system.placement !== 'none',
  };
}
