// The llama.cpp check of a GGUF export passed: verified, enough tokens scored, the chat prompt tokenized alike.
import assert from 'node:assert/strict';
import type { exportGguf } from '../../extension/export/exportGguf';

export function assertVerified(r: Awaited<ReturnType<typeof exportGguf>>, label: string, minTokens = 60): void {
  const v = r.verification!;
  assert.ok(v.verified, `${label}: ${v.problems.join('; ')}`);
  assert.ok(v.tokens >= minTokens, `${label}: scored ${v.tokens} tokens`);
  assert.ok(v.promptTokensMatch, `${label}: chat prompt tokens`);
}
