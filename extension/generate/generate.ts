// One answer from a generation session: prefill of the prompt, then token by token until an end-of-turn/EOS token,
// a stop string, the token limit or cancellation, streaming the text as it grows. The engine runs each step
// synchronously; between steps the event loop gets a turn, so a cancel message (IPC, Ctrl+C) lands between tokens.
import type { GenerationSession } from '../engine';
import { Sampler, type SamplingOptions } from './sampling';

/** What the text needs to turn ids into text: the model's tokenizer. */
export interface Detokenizer {
  decode(ids: ArrayLike<number>): string;
}

export interface GenerateOptions {
  sampling: SamplingOptions;
  maxNewTokens: number;
  /** Token ids that end the answer (the model's EOS and end-of-turn tokens); not part of the text. */
  stopTokenIds: readonly number[];
  /** Strings that end the answer; the text stops before the first one. */
  stopStrings?: readonly string[];
  signal?: AbortSignal;
  /** Called with each new piece of text, as soon as it can no longer turn out to be part of a stop string. */
  onText?: (delta: string) => void;
  /**
   * The model's context (config.json's max_position_embeddings; 0 or absent: none known). A conversation longer than
   * it is refused, and an answer ends where the conversation reaches it: past it the model's positions are ones it
   * never saw in training, and what it writes there is noise (transformers only warns).
   */
  contextLength?: number;
}

export type FinishReason = 'stop-token' | 'stop-string' | 'length' | 'context' | 'cancelled';

/** A conversation that does not fit the model's context; its message says so and what to do. */
export class ContextLengthError extends Error {
  override readonly name = 'ContextLengthError';
}

export interface GenerateResult {
  text: string;
  /** Generated ids, the stop token excluded. */
  ids: number[];
  finishReason: FinishReason;
  promptTokens: number;
  /** Wall time of the prompt's forward pass, and of the token-by-token part. */
  prefillMs: number;
  decodeMs: number;
  /** Generated tokens per second of decode time (the first token comes from the prefill). */
  decodeTokensPerSecond: number;
}

const yieldToEventLoop = () => new Promise<void>((resolve) => setImmediate(resolve));

/**
 * Generates after `promptIds`, which are appended to `session` (which may already hold earlier tokens of the same
 * conversation: `history` then lists all of them, for the repetition penalty).
 */
export async function generate(
  session: GenerationSession,
  tok: Detokenizer,
  promptIds: readonly number[],
  options: GenerateOptions,
  history: readonly number[] = promptIds,
): Promise<GenerateResult> {
  if (promptIds.length === 0) throw new Error('generation needs a prompt of at least one token');
  if (!(Number.isInteger(options.maxNewTokens) && options.maxNewTokens >= 1)) throw new RangeError(`max new tokens must be a whole number >= 1, got ${options.maxNewTokens}`);
  const contextLength = options.contextLength ?? 0;
  if (contextLength > 0 && history.length >= contextLength) {
    throw new ContextLengthError(
      `the conversation is ${history.length} tokens, and the model's context is ${contextLength} (max_position_embeddings in its config.json): ` +
        'start a new conversation, or shorten the prompt',
    );
  }
  const sampler = new Sampler(options.sampling);
  const stops = new Set(options.stopTokenIds);
  const stopStrings = (options.stopStrings ?? []).filter((s) => s !== '');
  const context = [...history];
  const ids: number[] = [];
  let emitted = 0;
  let text = '';
  let finishReason: FinishReason = 'length';

  const t0 = performance.now();
  let logits = session.append(promptIds);
  const prefillMs = performance.now() - t0;
  const t1 = performance.now();
  while (ids.length < options.maxNewTokens) {
    if (options.signal?.aborted) {
      finishReason = 'cancelled';
      break;
    }
    const next = sampler.next(logits, context);
    if (stops.has(next)) {
      finishReason = 'stop-token';
      break;
    }
    ids.push(next);
    context.push(next);
    text = tok.decode(ids);
    const cut = firstStop(text, stopStrings);
    if (cut !== null) {
      text = text.slice(0, cut);
      finishReason = 'stop-string';
      break;
    }
    const safe = safeLength(text, stopStrings);
    if (safe > emitted) {
      options.onText?.(text.slice(emitted, safe));
      emitted = safe;
    }
    if (contextLength > 0 && context.length >= contextLength) {
      finishReason = 'context';
      break;
    }
    if (ids.length === options.maxNewTokens) break;
    logits = session.append([next]);
    await yieldToEventLoop();
  }
  const decodeMs = performance.now() - t1;
  // whatever was held back (a possible stop-string start, an unfinished character) is final now
  if (text.length > emitted) options.onText?.(text.slice(emitted));
  return {
    text,
    ids,
    finishReason,
    promptTokens: promptIds.length,
    prefillMs,
    decodeMs,
    decodeTokensPerSecond: ids.length > 1 ? ((ids.length - 1) * 1000) / decodeMs : 0,
  };
}

/** Where the first stop string starts in `text`, or null. */
function firstStop(text: string, stopStrings: readonly string[]): number | null {
  let best: number | null = null;
  for (const s of stopStrings) {
    const at = text.indexOf(s);
    if (at >= 0 && (best === null || at < best)) best = at;
  }
  return best;
}

/**
 * How much of `text` can be shown: all of it but an unfinished UTF-8 character (decoded as U+FFFD at the end) and
 * a tail that could still grow into a stop string.
 */
export function safeLength(text: string, stopStrings: readonly string[]): number {
  let end = text.length;
  while (end > 0 && text[end - 1] === '\uFFFD') end--;
  let hold = 0;
  for (const s of stopStrings) {
    for (let k = Math.min(s.length - 1, end); k > hold; k--) {
      if (text.endsWith(s.slice(0, k), end)) {
        hold = k;
        break;
      }
    }
  }
  return end - hold;
}
