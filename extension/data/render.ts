/**
 * Rendering examples to text segments marked trained or not, before tokenization.
 *
 * Chat examples go through the model's chat template. Which characters belong to each assistant turn is found by
 * rendering prefixes of the conversation: the turn starts where the rendering of messages[:i] with the generation
 * prompt stops agreeing with the full rendering (so whatever the template makes the model produce after the
 * prompt, such as Qwen3's empty think block, is trained), and it ends after the assistant's content and the
 * end-of-turn special token the template writes after it (<|eot_id|>, <|im_end|>, ...). Whitespace the template
 * adds after that token belongs to the next turn and is not trained. A template without a generation prompt thus
 * trains the assistant header too, which is right: at inference the model would have to write it.
 *
 * BOS: when the template writes bos_token itself (Llama 3), no other is added; when it does not and the tokenizer
 * adds one to plain text (add_bos_token), it is prepended, untrained. Completions and texts get BOS the same way.
 */
import { ChatMessage, ExampleBody } from './shapes';
import { ModelTokenizer } from './modelTokenizer';

export interface Segment {
  text: string;
  trained: boolean;
}

/** Which template rendered chat examples: the model's own, or the Alpaca-style fallback for models without one. */
export type TemplateKind = 'chat_template' | 'alpaca-fallback';

export interface RenderOptions {
  /** Label every token (prompt included), not only the responses. */
  trainOnPrompt?: boolean;
  /** Extra variables for the chat template (e.g. enable_thinking: false for Qwen3, date_string for Llama 3.x). */
  templateVars?: Record<string, unknown>;
}

/** A chat example the template cannot render (raise_exception, unsupported role order, ...); a row error. */
export class TemplateRenderError extends Error {
  override name = 'TemplateRenderError';
}

/**
 * The date Llama 3.x templates print as "Today Date" when none is passed. Fixed rather than today's date so a
 * dataset tokenizes the same on every day (a resumed run packs the same sequences).
 */
const DEFAULT_DATE_STRING = '26 Jul 2024';

/** Renders one example into segments whose concatenation is the full text of the example. */
export function renderExample(
  example: ExampleBody,
  tok: ModelTokenizer,
  options: RenderOptions = {},
): { segments: Segment[]; template: TemplateKind | null; systemLeftOut: boolean } {
  let segments: Segment[];
  let template: TemplateKind | null = null;
  let systemLeftOut = false;
  switch (example.kind) {
    case 'chat':
      template = tok.template ? 'chat_template' : 'alpaca-fallback';
      if (tok.template) {
        const rendered = templateSegments(example.messages, tok, { ...options.templateVars, ...(example.tools ? { tools: example.tools } : {}) });
        segments = rendered.segments;
        systemLeftOut = rendered.systemLeftOut;
      } else {
        segments = fallbackSegments(example.messages, tok);
      }
      break;
    case 'completion':
      segments = withBos(tok, [
        { text: example.prompt, trained: false },
        { text: example.completion + tok.eosToken, trained: true },
      ]);
      break;
    case 'text':
      segments = withBos(tok, [{ text: example.text + tok.eosToken, trained: true }]);
      break;
  }
  if (options.trainOnPrompt) segments = segments.map((s) => ({ text: s.text, trained: true }));
  return { segments: segments.filter((s) => s.text !== ''), template, systemLeftOut };
}

/** Prepends BOS (untrained) when the tokenizer adds one and the text does not already start with it. */
function withBos(tok: ModelTokenizer, segments: Segment[]): Segment[] {
  if (!tok.addsBos || tok.bosToken === null) return segments;
  if (segments.length > 0 && segments[0].text.startsWith(tok.bosToken)) return segments;
  return [{ text: tok.bosToken, trained: false }, ...segments];
}

/**
 * Alpaca-style prompt for models without a chat template: "### Instruction:\n...\n\n### Response:\n" before each
 * answer; each answer is followed by EOS, and both are trained.
 */
function fallbackSegments(messages: ChatMessage[], tok: ModelTokenizer): Segment[] {
  const segments: Segment[] = [];
  messages.forEach((m, i) => {
    if (m.role === 'system') segments.push({ text: `${m.content}\n\n`, trained: false });
    else if (m.role === 'user') segments.push({ text: `### Instruction:\n${m.content}\n\n### Response:\n`, trained: false });
    else {
      segments.push({ text: m.content + tok.eosToken, trained: true });
      if (i < messages.length - 1) segments.push({ text: '\n\n', trained: false });
    }
  });
  return withBos(tok, segments);
}

/** What the chat template renders with besides the messages, as training renders it: the special tokens and a date. */
function templateContext(tok: ModelTokenizer, vars: Record<string, unknown>): Record<string, unknown> {
  const context: Record<string, unknown> = { date_string: DEFAULT_DATE_STRING, ...vars, eos_token: tok.eosToken };
  if (tok.bosToken !== null) context.bos_token = tok.bosToken;
  return context;
}

/**
 * The special token the chat template writes after an assistant answer (<|eot_id|>, <|im_end|>, </s>, ...), found by
 * rendering a probe conversation; null without a template, or where the template writes none there. A base model's
 * template may end turns with a token that is not its EOS (Qwen2.5 base: <|im_end|>, EOS <|endoftext|>): training
 * teaches that token, so generation must stop at it too.
 */
export function templateEndOfTurn(tok: ModelTokenizer): string | null {
  const template = tok.template;
  if (template === null) return null;
  const answer = 'The answer is 42.';
  let full: string;
  try {
    full = template.render({
      ...templateContext(tok, {}), add_generation_prompt: false,
      messages: [{ role: 'user', content: 'What is the answer?' }, { role: 'assistant', content: answer }, { role: 'user', content: 'Thanks.' }],
    });
  } catch {
    return null;
  }
  const at = full.indexOf(answer);
  if (at < 0) return null;
  const end = endOfTurnAt(full, at + answer.length, tok.specialTokens);
  return end === null ? null : full.slice(at + answer.length, end).trim();
}

/**
 * fallbackSegments as a Jinja chat template, for files other tools read (a merged finetune's tokenizer_config.json,
 * a finetune's GGUF): the same text, BOS included where the tokenizer adds one (apply_chat_template adds no other;
 * llama.cpp drops the rendered one where it adds its own). Each user turn already ends with "### Response:\n", so
 * add_generation_prompt adds nothing.
 */
export function alpacaFallbackTemplate(tok: ModelTokenizer): string {
  return (tok.addsBos && tok.bosToken !== null ? '{{- bos_token }}' : '') + ALPACA_FALLBACK_TURNS;
}

const ALPACA_FALLBACK_TURNS = [
  '{%- for message in messages %}',
  "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}",
  "{%- elif message['role'] == 'user' %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}",
  "{%- else %}{{- message['content'] + eos_token }}{%- if not loop.last %}{{- '\\n\\n' }}{%- endif %}",
  '{%- endif %}',
  '{%- endfor %}',
].join('');

/** The chat template a model file written from `tok`'s model carries: its own, or for a finetune of a model without one, the fallback it was trained with. */
export function exportedChatTemplate(tok: ModelTokenizer, finetuned: boolean): string | null {
  return tok.chatTemplate ?? (finetuned ? alpacaFallbackTemplate(tok) : null);
}

function templateSegments(messages: ChatMessage[], tok: ModelTokenizer, vars: Record<string, unknown>): { segments: Segment[]; systemLeftOut: boolean } {
  const template = tok.templateFor(vars.tools !== undefined);
  if (template === null) throw new Error('templateSegments needs a chat template');
  const context = templateContext(tok, vars);
  // @huggingface/jinja defines raise_exception (and strftime_now) itself; they throw or format as in transformers.
  const render = (msgs: ChatMessage[], addGenerationPrompt: boolean): string => {
    try {
      return template.render({ ...context, messages: msgs, add_generation_prompt: addGenerationPrompt });
    } catch (err) {
      throw new TemplateRenderError(`chat template error: ${(err as Error).message}`);
    }
  };

  const full = render(messages, false);
  const spans: [number, number][] = [];
  let cursor = 0;
  messages.forEach((m, i) => {
    if (m.role !== 'assistant') return;
    // The prompt before this turn; templates may refuse a prefix (e.g. one that must end with a user turn).
    let promptEnd: number | null = null;
    if (i > 0) {
      try {
        const prompt = render(messages.slice(0, i), true);
        const shared = commonPrefixLength(prompt, full);
        // A prompt that is not a prefix of the full rendering (Mistral v0.3's template writes the system message into
        // the last user turn only) may part from it before the previous message's content: the turn then starts after
        // that content and what the prompt writes after it ("[/INST]"), found past a marker (turnStartPastMarker).
        const start = shared === prompt.length ? shared : (turnStartPastMarker(messages, i, render, full) ?? shared);
        promptEnd = Math.max(cursor, start);
      } catch {
        promptEnd = null;
      }
    }
    const turn = locateTurn(full, m.content, promptEnd ?? cursor, tok.specialTokens);
    // Without a prompt to compare with (a conversation that opens with the assistant), the turn starts at its content.
    const start = promptEnd ?? turn?.contentStart ?? null;
    if (turn === null || start === null) {
      throw new TemplateRenderError(`the chat template does not render message ${i + 1} (assistant) so that its tokens can be found`);
    }
    spans.push([start, turn.end]);
    cursor = turn.end;
  });

  const segments: Segment[] = [];
  let at = 0;
  for (const [start, end] of spans) {
    segments.push({ text: full.slice(at, start), trained: false }, { text: full.slice(start, end), trained: true });
    at = end;
  }
  segments.push({ text: full.slice(at), trained: false });
  return { segments: withBos(tok, segments.filter((s) => s.text !== '')), systemLeftOut: leavesOutSystem(messages, render) };
}

/**
 * Whether the template leaves a conversation's system message out of its text (Mistral v0.3's writes it into the
 * last user turn only, so a conversation ending with the assistant has none, as apply_chat_template renders it too):
 * rendered again with a marker for the system content, which is then nowhere.
 */
function leavesOutSystem(messages: ChatMessage[], render: (msgs: ChatMessage[], addGenerationPrompt: boolean) => string): boolean {
  const system = messages.findIndex((m) => m.role === 'system');
  if (system < 0 || messages[system].content.trim() === '') return false;
  try {
    return !render(messages.map((m, k) => (k === system ? { ...m, content: SYSTEM_CONTENT_MARKER } : m)), false).includes(SYSTEM_CONTENT_MARKER);
  } catch {
    return false;
  }
}

/**
 * The text a model continues to answer `messages` (ending with a user turn): the chat template with
 * add_generation_prompt, or the Alpaca-style fallback up to "### Response:\n", with BOS as training adds it. The
 * same rendering as training, so the model is asked in the format it learned.
 */
export function renderGenerationPrompt(messages: ChatMessage[], tok: ModelTokenizer, templateVars: Record<string, unknown> = {}): string {
  const template = tok.template;
  if (template === null) {
    return fallbackSegments(messages, tok).map((s) => s.text).join('');
  }
  const context = templateContext(tok, templateVars);
  let text: string;
  try {
    text = template.render({ ...context, messages, add_generation_prompt: true });
  } catch (err) {
    throw new TemplateRenderError(`chat template error: ${(err as Error).message}`);
  }
  return withBos(tok, [{ text, trained: false }]).map((s) => s.text).join('');
}

/** Stand in for the content of a message: text no template writes and no trim changes. */
const PREVIOUS_CONTENT_MARKER = 'qlora-studio-previous-message-9f41c7';
const SYSTEM_CONTENT_MARKER = 'qlora-studio-system-message-3b8e52';

/**
 * Where assistant turn `i` starts in `full` when the prompt (messages[:i] with the generation prompt) is not a prefix
 * of it: both rendered again with the previous message's content replaced by a marker, the turn starts after the
 * marker and as much of what the prompt writes after it as the full rendering writes there too ("[/INST]" for
 * Mistral v0.3, "<|im_start|>assistant\n" where only the generation prompt differs). What follows the marker renders
 * alike with the real content, so the place maps back from the end. Null where the marker is not there once.
 */
function turnStartPastMarker(
  messages: ChatMessage[],
  i: number,
  render: (msgs: ChatMessage[], addGenerationPrompt: boolean) => string,
  full: string,
): number | null {
  const marked = messages.map((m, k) => (k === i - 1 ? { ...m, content: PREVIOUS_CONTENT_MARKER } : m));
  let prompt: string;
  let markedFull: string;
  try {
    prompt = render(marked.slice(0, i), true);
    markedFull = render(marked, false);
  } catch {
    return null;
  }
  const once = (text: string) => text.indexOf(PREVIOUS_CONTENT_MARKER) >= 0 && text.indexOf(PREVIOUS_CONTENT_MARKER) === text.lastIndexOf(PREVIOUS_CONTENT_MARKER);
  if (!once(prompt) || !once(markedFull)) return null;
  const tail = prompt.slice(prompt.indexOf(PREVIOUS_CONTENT_MARKER) + PREVIOUS_CONTENT_MARKER.length);
  const afterMarker = markedFull.indexOf(PREVIOUS_CONTENT_MARKER) + PREVIOUS_CONTENT_MARKER.length;
  const rest = markedFull.slice(afterMarker);
  if (!full.endsWith(rest)) return null;
  return full.length - rest.length + commonPrefixLength(tail, rest);
}

function commonPrefixLength(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a.charCodeAt(i) === b.charCodeAt(i)) i++;
  return i;
}

/** End of an end-of-turn special token at `pos`, after optional whitespace; null if none is there. */
function endOfTurnAt(text: string, pos: number, specials: readonly string[]): number | null {
  let p = pos;
  while (p < text.length && /\s/.test(text[p])) p++;
  const token = specials.find((s) => text.startsWith(s, p));
  return token === undefined ? null : p + token.length;
}

/**
 * Where an assistant turn is in the full rendering, searching from `from`. It ends after the first occurrence of
 * its content (as is, or trimmed, as many templates trim) that is followed by an end-of-turn special token,
 * including that token; else after the content itself (a template that writes no end-of-turn token). When the
 * content is not there at all (a template that rewrites it, as Qwen3's does with think blocks), the turn ends after
 * the first special token following `from`, and its content start is unknown.
 */
function locateTurn(
  full: string,
  content: string,
  from: number,
  specials: readonly string[],
): { contentStart: number | null; end: number } | null {
  const candidates = [...new Set([content, content.trim()])].filter((c) => c !== '');
  let bare: { contentStart: number; end: number } | null = null;
  for (const candidate of candidates) {
    for (let at = full.indexOf(candidate, from); at >= 0; at = full.indexOf(candidate, at + 1)) {
      const end = endOfTurnAt(full, at + candidate.length, specials);
      if (end !== null) return { contentStart: at, end };
      bare ??= { contentStart: at, end: at + candidate.length };
    }
  }
  if (bare !== null) return bare;
  let firstSpecial: number | null = null;
  for (const s of specials) {
    const at = full.indexOf(s, from);
    if (at >= 0 && (firstSpecial === null || at < firstSpecial)) firstSpecial = at;
  }
  if (firstSpecial === null) return null;
  const token = specials.find((s) => full.startsWith(s, firstSpecial as number)) as string;
  return { contentStart: null, end: firstSpecial + token.length };
}
