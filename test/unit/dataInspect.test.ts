// inspectDataset's JSON-safe report, and the sample datasets in examples/ (valid, small, tokenizable).
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { inspectDataset, loadDataset, loadModelTokenizer, tokenizeDataset } from '../../extension/data';
import { examplesDir, tinyModelDir, writeTemp } from '../fixtures/data/helpers';

const SAMPLES = [
  { name: 'chat-sample.jsonl', format: 'jsonl', shape: 'messages', rows: 60 },
  { name: 'alpaca-sample.json', format: 'json', shape: 'alpaca', rows: 40 },
  { name: 'text-sample.csv', format: 'csv', shape: 'text', rows: 30 },
] as const;

test('the sample datasets are valid, small, and of the documented shapes', async () => {
  for (const sample of SAMPLES) {
    const file = path.join(examplesDir, sample.name);
    assert.ok(fs.statSync(file).size < 30 * 1024, `${sample.name} stays under 30 KB`);
    const report = await inspectDataset(file);
    assert.deepEqual(
      [report.format, report.shape, report.rowCount, report.validRows, report.invalidRows, report.errors],
      [sample.format, sample.shape, sample.rows, sample.rows, 0, []],
      sample.name,
    );
    assert.equal(report.tokenization, undefined, 'no model, no tokenization');
  }
  const chat = await loadDataset(path.join(examplesDir, 'chat-sample.jsonl'));
  const withSystem = chat.examples.filter((e) => e.kind === 'chat' && e.messages[0].role === 'system');
  assert.ok(withSystem.length >= 3, 'a few conversations have a system prompt');
});

test('inspect with a model: template, token statistics and the first examples split into trained segments', async () => {
  const report = await inspectDataset(path.join(examplesDir, 'chat-sample.jsonl'), { modelDir: tinyModelDir('llama'), maxLength: 64 });
  assert.deepEqual(JSON.parse(JSON.stringify(report)), report, 'JSON-safe');
  const t = report.tokenization;
  assert.ok(t);
  assert.equal(t.template, 'chat_template');
  assert.equal(t.stats.examples + t.stats.droppedNoTrainable, 60);
  assert.equal(t.stats.lengths.count, 60);
  assert.ok(t.stats.lengths.min > 10 && t.stats.lengths.max > t.stats.lengths.min && t.stats.lengths.p95 <= t.stats.lengths.max);
  // With the tiny tokenizer's small vocabulary, 64 tokens cut the longer conversations, and the system-prompt
  // ones lose every answer token (dropped, counted).
  assert.ok(t.stats.lengths.truncated > 0 && t.stats.droppedNoTrainable > 0);
  assert.ok(t.stats.totalTokens <= t.stats.examples * 64 && t.stats.trainedTokens < t.stats.totalTokens);
  assert.equal(t.examples.length, 3);
  assert.deepEqual(t.examples[0].segments, [
    {
      text: '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
      trained: false,
    },
    { text: 'The capital of France is Paris.<|eot_id|>', trained: true },
  ]);
  assert.equal(t.examples[0].source, 'chat-sample.jsonl line 1');
  const tok = await loadModelTokenizer(tinyModelDir('llama'));
  assert.equal(t.examples[0].trainedTokens, tok.encode('The capital of France is Paris.<|eot_id|>').length);
});

test('inspect: invalid rows are listed (first 50) and counted; template errors join them', async () => {
  const rows = [
    ...Array.from({ length: 60 }, (_, i) => JSON.stringify({ text: i })),
    JSON.stringify({ text: 'fine' }),
  ];
  const report = await inspectDataset(writeTemp('many.jsonl', rows.join('\n')));
  assert.deepEqual([report.rowCount, report.validRows, report.invalidRows, report.errors.length], [61, 1, 60, 50]);
  assert.equal(report.errors[0], 'many.jsonl line 1: field "text" must be a string, got number');

  const refuse = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m['content'] + '<|im_end|>' }}{% endfor %}";
  const chat = writeTemp('chat.jsonl', [
    JSON.stringify({ messages: [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello' }] }),
    JSON.stringify({ messages: [{ role: 'system', content: 'S' }, { role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello' }] }),
    JSON.stringify({ messages: [{ role: 'user', content: 'Hi' }] }),
  ].join('\n'));
  const withModel = await inspectDataset(chat, { modelDir: tinyModelDir('qwen2', { chat_template: refuse }) });
  assert.deepEqual(withModel.errors, [
    'chat.jsonl line 2: chat template error: no system role',
    'chat.jsonl line 3: conversation has no assistant message',
  ]);
  assert.deepEqual([withModel.validRows, withModel.invalidRows, withModel.tokenization?.stats.examples], [1, 2, 1]);
  // with the token statistics from a sample, the rows past it still go through the template
  const many = writeTemp('sampled.jsonl', Array.from({ length: 30 }, (_, i) => JSON.stringify({
    messages: [...(i === 24 ? [{ role: 'system', content: 'S' }] : []), { role: 'user', content: `Hi ${i}` }, { role: 'assistant', content: 'Hello' }],
  })).join('\n'));
  const sampled = await inspectDataset(many, { modelDir: tinyModelDir('qwen2', { chat_template: refuse }), tokenizeAtMost: 10 });
  assert.deepEqual([sampled.validRows, sampled.invalidRows, sampled.errors, sampled.tokenization?.stats.examples, sampled.tokenization?.sample],
    [29, 1, ['sampled.jsonl line 25: chat template error: no system role'], 10, { tokenized: 10, of: 30 }]);
});

test('inspect: a base model without a chat template reports the Alpaca fallback; shape override is honoured', async () => {
  const base = tinyModelDir('llama', { chat_template: undefined });
  const report = await inspectDataset(path.join(examplesDir, 'alpaca-sample.json'), { modelDir: base });
  assert.equal(report.tokenization?.template, 'alpaca-fallback');
  assert.deepEqual(report.tokenization?.examples[0].segments, [
    { text: '<|begin_of_text|>### Instruction:\nGive the opposite of the word.\n\nhot\n\n### Response:\n', trained: false },
    { text: 'The opposite of "hot" is "cold".<|eot_id|>', trained: true },
  ]);
  const text = await inspectDataset(path.join(examplesDir, 'text-sample.csv'), { modelDir: base, shape: 'text' });
  assert.equal(text.tokenization?.template, null);
  assert.equal(text.tokenization?.examples[0].segments[0].text, '<|begin_of_text|>');
  assert.equal(text.tokenization?.examples[0].segments[1].trained, true);
});

test('the samples tokenize quickly with both tiny tokenizers', async () => {
  for (const arch of ['llama', 'qwen2'] as const) {
    const tok = await loadModelTokenizer(tinyModelDir(arch));
    for (const sample of SAMPLES) {
      const { examples } = await loadDataset(path.join(examplesDir, sample.name));
      const result = tokenizeDataset(examples, tok);
      assert.equal(result.examples.length, sample.rows, `${arch} ${sample.name}`);
      assert.ok(result.stats.trainedTokens > 0);
    }
  }
});
