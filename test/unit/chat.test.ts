// The chat panel's machinery below VS Code: the message validation at both boundaries, the host's session (one
// conversation per column, replay after a webview reload, stop and clear, checkpoint switches) against a fake
// server, and the real chat server process: both columns stream at once, cancel, a checkpoint's adapter, a crash
// reported in one sentence, and the model freed when the panel goes.
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { test } from 'node:test';
import { ChatProcess, type ChatAnswer } from '../../extension/host/chat/chatProcess';
import { ChatSession, type ChatBackend } from '../../extension/host/chat/chatSession';
import { chatPlacementArgs } from '../../extension/host/newRun';
import {
  validateChatHostMessage,
  validateChatWebviewMessage,
  validateHostToServer,
  validateServerToHost,
  type AnswerStats as ChatAnswerStats,
  type ChatHostToWebview,
  type ChatMessage,
  type ChatModelInfo,
  type ChatSettings,
} from '../../extension/protocol/chat';
import { makeTinyModel } from '../../extension/trainer/tinyModel/makeTinyModel';
import { answerDoneMessage, describeStats, parseStopStrings } from '../../webview/chat/format';
import { trainBriefly } from '../helpers/briefRun';
import { cliPath, tempDir } from '../helpers/paths';

const GREEDY: ChatSettings = { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, seed: 0, maxNewTokens: 40, stopStrings: [] };

test('messages are validated at every boundary: bad settings, unknown types and bad fields are refused', () => {
  assert.deepEqual(validateChatWebviewMessage({ type: 'ask', prompt: 'hi', system: '', settings: GREEDY }), { type: 'ask', prompt: 'hi', system: '', settings: GREEDY });
  const bad: [unknown, RegExp][] = [
    [{ type: 'ask', prompt: '  ', system: '', settings: GREEDY }, /prompt must be non-empty/],
    [{ type: 'ask', prompt: 'x', system: '', settings: { ...GREEDY, topP: 2 } }, /top-p must be a number from 0.001 to 1/],
    [{ type: 'ask', prompt: 'x', system: '', settings: { ...GREEDY, seed: 1.5 } }, /seed must be a whole number/],
    [{ type: 'ask', prompt: 'x', system: '', settings: { ...GREEDY, stopStrings: [''] } }, /stopStrings/],
    [{ type: 'copy', column: 'other', turn: 0 }, /column must be base or finetuned/],
    [{ type: 'run', command: 'rm -rf /' }, /unknown webview message type "run"/],
    ['ask', /must be an object/],
  ];
  for (const [message, why] of bad) assert.throws(() => validateChatWebviewMessage(message), why, JSON.stringify(message));
  assert.throws(() => validateHostToServer({ type: 'generate', id: 1, column: 'base', messages: [{ role: 'robot', content: 'x' }], settings: GREEDY }), /role/);
  assert.throws(() => validateServerToHost({ type: 'done', id: 1, text: 'x', stats: { tokens: 1 } }), /stats\.promptTokens/);
  assert.throws(() => validateChatHostMessage({ type: 'delta', column: 'base', turn: -1, text: 'x' }), /turn/);
  assert.deepEqual(validateChatHostMessage({ type: 'copied', column: 'finetuned', turn: 2, ok: true }), { type: 'copied', column: 'finetuned', turn: 2, ok: true });
  assert.throws(() => validateChatHostMessage({ type: 'copied', column: 'finetuned', turn: 2 }), /copied needs a column and ok/);
});

test('stop strings field and the answer line', () => {
  assert.deepEqual(parseStopStrings('###, User:'), ['###', 'User:']);
  assert.deepEqual(parseStopStrings('"a, b", "\\n\\nQ:"'), ['a, b', '\n\nQ:']);
  assert.deepEqual(parseStopStrings('  '), []);
  assert.equal(parseStopStrings('"open'), 'A quoted stop string is not closed.');
  assert.equal(describeStats({ tokens: 42, finishReason: 'stop-token', promptTokens: 9, prefillMs: 1, decodeMs: 1, tokensPerSecond: 35.24 }), '42 tokens · 35.2 tokens/s · ended its turn');
});

test('a finished answer is announced once, in one sentence', () => {
  const stats = (tokens: number, finishReason: ChatAnswerStats['finishReason']): ChatAnswerStats => ({ tokens, finishReason, promptTokens: 9, prefillMs: 1, decodeMs: 1, tokensPerSecond: 30 });
  assert.equal(answerDoneMessage('Finetuned', stats(42, 'stop-token')), 'Finetuned answer finished, 42 tokens');
  assert.equal(answerDoneMessage('Base model', stats(1, 'cancelled')), 'Base model answer stopped, 1 token');
  assert.equal(answerDoneMessage('Base model', stats(400, 'length')), 'Base model answer finished at the token limit, 400 tokens');
});

const INFO: ChatModelInfo = {
  title: 'run', modelDir: '/m', adapterDir: '/r/adapter', checkpoint: null, checkpoints: [10, 20], hasFinalAdapter: true,
  defaults: GREEDY, suggestions: ['What is the capital of France?'], system: null, device: 'CPU Test CPU (4 threads)', deviceNote: null,
};

/** A fake server: answers "<column> answer to <last prompt>" in two deltas, or waits to be cancelled. */
class FakeBackend implements ChatBackend {
  loads: unknown[] = [];
  requests: { column: string; messages: ChatMessage[] }[] = [];
  cancelled: number[] = [];
  resets = 0;
  hold = false;
  private next = 1;
  private waiting = new Map<number, (a: ChatAnswer) => void>();
  async load(source: unknown): Promise<ChatModelInfo> {
    this.loads.push(source);
    return { ...INFO, checkpoint: (source as { checkpoint?: number }).checkpoint ?? null };
  }
  generate(column: 'base' | 'finetuned', messages: ChatMessage[], _s: ChatSettings, onDelta: (t: string) => void) {
    const id = this.next++;
    this.requests.push({ column, messages });
    const text = `${column} answer to ${messages[messages.length - 1].content}`;
    const done = new Promise<ChatAnswer>((resolve) => {
      const finish = (finishReason: 'stop-token' | 'cancelled') => resolve({ text: finishReason === 'cancelled' ? text.slice(0, 4) : text, stats: { tokens: 5, finishReason, promptTokens: 3, prefillMs: 1, decodeMs: 2, tokensPerSecond: 100 } });
      if (this.hold) {
        onDelta(text.slice(0, 4));
        this.waiting.set(id, () => finish('cancelled'));
      } else {
        setImmediate(() => {
          onDelta(text.slice(0, 4));
          onDelta(text.slice(4));
          finish('stop-token');
        });
      }
    });
    return { id, done };
  }
  cancel(id: number): void {
    this.cancelled.push(id);
    this.waiting.get(id)?.({} as ChatAnswer);
    this.waiting.delete(id);
  }
  reset(): void {
    this.resets++;
  }
}

test('the session: each column continues its own conversation; replay after a reload; stop, clear and checkpoints', async () => {
  const backend = new FakeBackend();
  const posted: ChatHostToWebview[] = [];
  const session = new ChatSession(backend, (m) => posted.push(m), { run: '/r' });
  await session.start();
  assert.deepEqual(posted.map((m) => m.type), ['loading', 'loaded']);
  await session.handle({ type: 'ask', prompt: 'Hi', system: 'Be brief.', settings: GREEDY });
  await session.handle({ type: 'ask', prompt: 'More', system: 'Be brief.', settings: GREEDY });
  // the second turn of each column carries that column's own first answer
  const second = backend.requests.slice(2);
  for (const r of second) {
    assert.deepEqual(r.messages, [
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'Hi' },
      { role: 'assistant', content: `${r.column} answer to Hi` },
      { role: 'user', content: 'More' },
    ]);
  }
  assert.equal(session.answerText('finetuned', 1), 'finetuned answer to More');

  // a reloaded webview gets the model and the whole conversation, with the answers' stats
  posted.length = 0;
  await session.handle({ type: 'ready' });
  assert.deepEqual(posted.map((m) => m.type), ['loaded', 'turn', 'delta', 'done', 'delta', 'done', 'turn', 'delta', 'done', 'delta', 'done']);

  // stop: cancels both running answers
  backend.hold = true;
  const asking = session.handle({ type: 'ask', prompt: 'Long', system: 'Be brief.', settings: GREEDY });
  await new Promise(setImmediate);
  assert.equal(session.busy, true);
  posted.length = 0;
  await session.handle({ type: 'ask', prompt: 'Another', system: 'Be brief.', settings: GREEDY });
  assert.match((posted[0] as { message: string }).message, /still being written; stop it first/);
  await session.handle({ type: 'stop' });
  await asking;
  assert.equal(backend.cancelled.length, 2);
  assert.equal(session.busy, false);
  backend.hold = false;

  // a changed system prompt starts over
  posted.length = 0;
  await session.handle({ type: 'ask', prompt: 'Hello', system: 'Be verbose.', settings: GREEDY });
  assert.equal(posted[0].type, 'cleared');
  assert.deepEqual(backend.requests.at(-1)!.messages.map((m) => m.role), ['system', 'user']);

  // clear, then a checkpoint: the conversation restarts and the checkpoint's adapter is loaded
  await session.handle({ type: 'clear' });
  assert.equal(backend.resets, 1);
  posted.length = 0;
  await session.handle({ type: 'checkpoint', step: 10 });
  assert.deepEqual(backend.loads.at(-1), { run: '/r', checkpoint: 10 });
  assert.deepEqual(posted.map((m) => m.type), ['cleared', 'loading', 'loaded']);
  await session.handle({ type: 'checkpoint', step: null });
  assert.deepEqual(backend.loads.at(-1), { run: '/r' });
});

test('the chat server process: both columns stream at once, the base equals greedy without an adapter, checkpoints, cancel, and the model freed on close', async () => {
  const model = path.join(tempDir('chat'), 'model');
  makeTinyModel({ out: model, arch: 'llama', seed: 21 });
  const run = await trainBriefly(model);
  const lines: string[] = [];
  const proc = new ChatProcess({ cliPath, execPath: process.execPath }, { appendLine: (l) => lines.push(l) }, undefined, chatPlacementArgs({ device: 'cpu', cudaLibraryPath: '' }));
  try {
    const info = await proc.load({ run });
    assert.match(info.device, /^CPU .*\(\d+ threads\)$/);
    assert.equal(info.deviceNote, null);
    assert.equal(info.adapterDir, path.join(run, 'adapter'));
    assert.equal(info.hasFinalAdapter, true);
    assert.ok(info.suggestions.length >= 1, 'the eval split offers prompts');
    const messages: ChatMessage[] = [{ role: 'user', content: info.suggestions[0] }];
    const order: string[] = [];
    const base = proc.generate('base', messages, GREEDY, () => order.push('b'));
    const tuned = proc.generate('finetuned', messages, GREEDY, () => order.push('f'));
    const [b, f] = await Promise.all([base.done, tuned.done]);
    assert.notEqual(b.text, f.text);
    // interleaved: the finetuned column started streaming before the base one finished
    assert.ok(order.indexOf('f') < order.lastIndexOf('b'), order.join(''));

    // the base column is the model without an adapter: the same answer as a server loaded without one (NF4, as
    // the run trained)
    const bare = new ChatProcess({ cliPath, execPath: process.execPath }, { appendLine: () => undefined });
    await bare.load({ model, quantize: true });
    const alone = await bare.generate('base', messages, GREEDY, () => undefined).done;
    assert.equal(alone.text, b.text);
    await assert.rejects(bare.generate('finetuned', messages, GREEDY, () => undefined).done, /needs an adapter/);
    await bare.dispose();

    // cancel mid-answer
    const long = proc.generate('base', messages, { ...GREEDY, maxNewTokens: 2000 }, () => undefined);
    setTimeout(() => proc.cancel(long.id), 30);
    const cancelled = await long.done;
    assert.equal(cancelled.stats.finishReason, 'cancelled');

    // a checkpoint's adapter
    assert.deepEqual(info.checkpoints, [60]);
    const at60 = await proc.load({ run, checkpoint: 60 });
    assert.equal(at60.checkpoint, 60);
    assert.equal(at60.adapterDir, path.join(run, 'checkpoints', 'step-60', 'adapter'));
    await assert.rejects(proc.load({ run, checkpoint: 7 }), /has no complete checkpoint at step 7/);
  } finally {
    const pid = proc.pid!;
    await proc.dispose();
    assert.throws(() => process.kill(pid, 0), 'the server exited when the panel closed');
  }
});

test('a chat server that dies fails what waits on it with one sentence, and the host carries on', async () => {
  const proc = new ChatProcess({ cliPath, execPath: process.execPath }, { appendLine: () => undefined });
  const loading = proc.load({ model: path.join(tempDir('chat-missing'), 'nothing-here') });
  await assert.rejects(loading, /config\.json/);
  process.kill(proc.pid!, 'SIGKILL');
  await proc.exited;
  await assert.rejects(proc.generate('base', [{ role: 'user', content: 'x' }], GREEDY, () => undefined).done, /killed \(SIGKILL\)/);
});
