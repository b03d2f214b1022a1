/** Turning V8's JSON.parse messages into short, position-aware reasons for users. */

/**
 * "unexpected end of input", "expected property name or '}' at column 2", "unexpected token '}' at line 3
 * column 12", ... from a JSON.parse error on `text`. V8 gives a character offset for most errors; for
 * "Unexpected token" it quotes the text instead, so the offset is found by bisection (see offendingOffset).
 */
export function describeJsonError(err: unknown, text: string): string {
  const raw = err instanceof Error ? err.message : String(err);
  let reason: string;
  let offset: number | null = null;
  const positioned = /^(.*?)(?: in JSON)? at position (\d+)(?: \(line \d+ column \d+\))?$/s.exec(raw);
  const quoted = /^(Unexpected token .*?), .* is not valid JSON$/s.exec(raw);
  if (positioned) {
    reason = positioned[1];
    offset = Number(positioned[2]);
  } else if (quoted) {
    reason = quoted[1];
    offset = offendingOffset(text);
  } else {
    reason = raw;
  }
  // An error placed at the end of the text is a cut-off document, whatever V8 expected next.
  if (offset !== null && offset >= text.trimEnd().length) {
    reason = 'unexpected end of input';
    offset = null;
  }
  reason = reason.replace('end of JSON input', 'end of input');
  reason = reason.charAt(0).toLowerCase() + reason.slice(1);
  if (offset === null) return reason;
  const before = text.slice(0, offset);
  const line = before.split('\n').length;
  const column = offset - (before.lastIndexOf('\n') + 1) + 1;
  return text.includes('\n') ? `${reason} at line ${line} column ${column}` : `${reason} at column ${column}`;
}

/**
 * Whether JSON.parse fails on `prefix` for a reason other than running out of input: not "end of input", and not
 * an error placed at the very end (a cut number or string, such as "-" or "[1e").
 */
function failsBeforeEnd(prefix: string): boolean {
  try {
    JSON.parse(prefix);
    return false;
  } catch (err) {
    const message = (err as Error).message;
    if (/end of JSON input/.test(message)) return false;
    const at = /at position (\d+)/.exec(message);
    return at === null || Number(at[1]) < prefix.length;
  }
}

/**
 * Offset of the character JSON.parse rejects: every prefix that stops before it parses or fails only for lack of
 * input, and every prefix that includes it fails otherwise, so the shortest failing prefix is found by bisection.
 */
function offendingOffset(text: string): number | null {
  if (!failsBeforeEnd(text)) return null;
  let lo = 0;
  let hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (failsBeforeEnd(text.slice(0, mid + 1))) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}
