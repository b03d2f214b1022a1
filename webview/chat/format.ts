// Pure helpers of the chat panel (unit-tested under node): the line under an answer, its announcement when done,
// and the stop-strings field.
import type { AnswerStats } from '../../extension/protocol/chat';

const FINISH: Record<AnswerStats['finishReason'], string> = {
  'stop-token': 'ended its turn',
  'stop-string': 'reached a stop string',
  length: 'reached the token limit',
  context: "reached the model's context length",
  cancelled: 'stopped',
};

/** "42 tokens · 35.2 tokens/s · ended its turn". */
export function describeStats(s: AnswerStats): string {
  const parts = [`${s.tokens} token${s.tokens === 1 ? '' : 's'}`];
  if (s.tokensPerSecond > 0) parts.push(`${s.tokensPerSecond.toFixed(1)} tokens/s`);
  parts.push(FINISH[s.finishReason]);
  return parts.join(' · ');
}

const DONE: Record<AnswerStats['finishReason'], string> = {
  'stop-token': 'finished',
  'stop-string': 'finished at a stop string',
  length: 'finished at the token limit',
  context: "finished at the model's context length",
  cancelled: 'stopped',
};

/** The one polite announcement of a finished answer: "Finetuned answer finished, 42 tokens". */
export function answerDoneMessage(columnTitle: string, s: AnswerStats): string {
  return `${columnTitle} answer ${DONE[s.finishReason]}, ${s.tokens} token${s.tokens === 1 ? '' : 's'}`;
}

/**
 * Stop strings typed as a comma-separated list; an entry may be a JSON string ("a, b" keeps its comma, "\n" is a
 * newline). Returns the strings, or a sentence saying what is wrong.
 */
export function parseStopStrings(text: string): string[] | string {
  const out: string[] = [];
  let i = 0;
  const s = text.trim();
  while (i < s.length) {
    while (i < s.length && /[\s,]/.test(s[i])) i++;
    if (i >= s.length) break;
    if (s[i] === '"') {
      let j = i + 1;
      while (j < s.length && s[j] !== '"') j += s[j] === '\\' ? 2 : 1;
      if (j >= s.length) return 'A quoted stop string is not closed.';
      try {
        out.push(JSON.parse(s.slice(i, j + 1)) as string);
      } catch {
        return `The stop string ${s.slice(i, j + 1)} is not a valid quoted string.`;
      }
      i = j + 1;
    } else {
      let j = i;
      while (j < s.length && s[j] !== ',') j++;
      out.push(s.slice(i, j).trim());
      i = j;
    }
  }
  const kept = out.filter((x) => x !== '');
  if (kept.length > 16) return 'Give at most 16 stop strings.';
  if (kept.some((x) => x.length > 200)) return 'A stop string can have at most 200 characters.';
  return kept;
}
