// Row validation: every invalid row is reported with its position and an exact sentence; invalid rows either
// fail the load together (DatasetInvalidError) or are skipped and counted; shape detection and override.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DataError, DatasetInvalidError, detectShape, loadDataset, readDataset } from '../../extension/data';
import { bodies, writeTemp } from '../fixtures/data/helpers';

const jsonl = (rows: unknown[]) => rows.map((r) => (typeof r === 'string' ? r : JSON.stringify(r))).join('\n') + '\n';
const user = (content: string) => ({ role: 'user', content });
const assistant = (content: string) => ({ role: 'assistant', content });

test('alpaca rows: exact error sentences with the JSONL line', async () => {
  const file = writeTemp('train.jsonl', jsonl([
    { instruction: 'Say hi.', input: '', output: 'Hi.' },
    '{"instruction": "Say hi.", "output": ',
    { instruction: 'Count.', output: 5 },
    { input: 'x', output: 'y' },
    '[1, 2]',
    { instruction: 'Say hi.', output: '  ' },
    { instruction: 'Say hi.', input: 3, output: 'Hi.' },
    { instruction: 'Say hi.', input: null, output: 'Hi.' },
  ]));
  const read = await readDataset(file);
  assert.equal(read.shape, 'alpaca');
  assert.equal(read.rowCount, 8);
  assert.deepEqual(read.errors.map(String), [
    'train.jsonl line 2: not valid JSON (unexpected end of input)',
    'train.jsonl line 3: field "output" must be a string, got number',
    'train.jsonl line 4: field "instruction" is missing',
    'train.jsonl line 5: expected a JSON object, got array',
    'train.jsonl line 6: field "output" is empty',
    'train.jsonl line 7: field "input" must be a string, got number',
  ]);
  assert.deepEqual(read.errors.map((e) => [e.file, e.line, e.row, e.field]), [
    ['train.jsonl', 2, undefined, undefined],
    ['train.jsonl', 3, undefined, 'output'],
    ['train.jsonl', 4, undefined, 'instruction'],
    ['train.jsonl', 5, undefined, undefined],
    ['train.jsonl', 6, undefined, 'output'],
    ['train.jsonl', 7, undefined, 'input'],
  ]);
  assert.equal(read.examples.length, 2, 'a null input counts as no input');
});

test('chat rows: roles, message structure and the assistant turn, with the JSON row index', async () => {
  const file = writeTemp('chat.json', JSON.stringify([
    { messages: [user('Hi'), assistant('Hello')] },
    { messages: [user('Hi'), user('Anyone?')] },
    { messages: 'Hi' },
    { messages: [] },
    { messages: [user('Hi'), { role: 'robot', content: 'Beep' }] },
    { messages: ['Hi', assistant('Hello')] },
    { messages: [{ content: 'Hi' }, assistant('Hello')] },
    { messages: [user('Hi'), { role: 'assistant', content: null }] },
    { messages: [user('Hi'), { role: 'assistant' }] },
    { messages: [user('Hi'), assistant(' ')] },
    { messages: [{ role: 7, content: 'Hi' }, assistant('Hello')] },
    { messages: [{ role: 'User', content: 'Hi' }, { role: 'ASSISTANT', content: 'Hello' }] },
  ]));
  const read = await readDataset(file);
  assert.equal(read.shape, 'messages');
  assert.deepEqual(read.errors.map(String), [
    'chat.json row 2: conversation has no assistant message',
    'chat.json row 3: field "messages" must be an array, got string',
    'chat.json row 4: field "messages" is empty',
    'chat.json row 5: message 2 has role "robot" (allowed: system, user, assistant)',
    'chat.json row 6: message 1 must be an object, got string',
    'chat.json row 7: message 1: field "role" is missing',
    'chat.json row 8: message 2: field "content" must be a string, got null',
    'chat.json row 9: message 2: field "content" is missing',
    'chat.json row 10: message 2 (assistant) is empty',
    'chat.json row 11: message 1: field "role" must be a string, got number',
  ]);
  assert.ok(read.errors.every((e) => e.field === 'messages' && e.row !== undefined && e.line === undefined));
  // Role names are matched case-insensitively.
  assert.deepEqual(bodies(read.examples)[1], { kind: 'chat', messages: [user('Hi'), assistant('Hello')] });
});

test('ShareGPT rows: speaker names map to roles; unknown ones list the allowed names', async () => {
  const file = writeTemp('sg.jsonl', jsonl([
    { conversations: [{ from: 'system', value: 'Be brief.' }, { from: 'human', value: 'Hi' }, { from: 'gpt', value: 'Hello' }] },
    { conversations: [{ from: 'human', value: 'Hi' }, { from: 'robot', value: 'Beep' }] },
    { conversations: [{ from: 'human', value: 'Hi' }, { from: 'gpt', value: 3 }] },
  ]));
  const read = await readDataset(file);
  assert.deepEqual(read.errors.map(String), [
    'sg.jsonl line 2: message 2 has from "robot" (allowed: system, human, user, gpt, assistant, model)',
    'sg.jsonl line 3: message 2: field "value" must be a string, got number',
  ]);
  assert.deepEqual(bodies(read.examples), [
    { kind: 'chat', messages: [{ role: 'system', content: 'Be brief.' }, user('Hi'), assistant('Hello')] },
  ]);
});

test('tools: an array of definitions or a JSON string of one is kept for the chat template; other forms are row errors', async () => {
  const weather = { type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { type: 'string' } } } } };
  const messages = [user('Weather in Paris?'), assistant('{"name": "get_weather"}')];
  const file = writeTemp('tools.jsonl', jsonl([
    { messages, tools: [weather] },
    { messages, tools: JSON.stringify([weather]) },
    { messages, tools: null },
    { messages, tools: [] },
    { messages, tools: '' },
    { messages, tools: 'null' },
    { conversations: [{ from: 'human', value: 'Weather?' }, { from: 'gpt', value: 'Sunny.' }], tools: [weather] },
    { messages, tools: '[{"type": ' },
    { messages, tools: { type: 'function' } },
    { messages, tools: [weather, 'get_time'] },
  ]));
  const read = await readDataset(file, { shape: 'messages' });
  assert.deepEqual(read.errors.map(String), [
    'tools.jsonl line 7: field "messages" is missing (this row has ShareGPT conversations [{from, value}] fields, but the file\'s shape is messages [{role, content}])',
    'tools.jsonl line 8: field "tools" is a string but not JSON (expected an array of tool definitions)',
    'tools.jsonl line 9: field "tools" must be an array of tool definitions, got object',
    'tools.jsonl line 10: tool 2 in field "tools" must be an object, got string',
  ]);
  assert.deepEqual(read.examples.map((e) => (e.kind === 'chat' ? e.tools : 'not chat')), [[weather], [weather], undefined, undefined, undefined, undefined]);
  const sharegpt = await readDataset(writeTemp('tools-sharegpt.jsonl', jsonl([{ conversations: [{ from: 'human', value: 'Weather?' }, { from: 'gpt', value: 'Sunny.' }], tools: [weather] }])));
  assert.deepEqual(sharegpt.examples[0].kind === 'chat' && sharegpt.examples[0].tools, [weather]);
});

test('half a UTF-16 surrogate pair (a JSON escape such as \\ud800) is a row error naming the field; whole pairs are text', async () => {
  const file = writeTemp('surrogates.jsonl', [
    '{"text": "x\\ud800y"}',
    '{"text": "ok \\ud83d\\ude00"}',
    '{"text": "\\ude00"}',
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a\\udbffb"}]}',
  ].join('\n') + '\n');
  const read = await readDataset(file, { shape: 'text' });
  assert.deepEqual(read.errors.map(String), [
    'surrogates.jsonl line 1: field "text" holds half a UTF-16 surrogate pair (\\ud800 at character 2), which is not text',
    'surrogates.jsonl line 3: field "text" holds half a UTF-16 surrogate pair (\\ude00 at character 1), which is not text',
    'surrogates.jsonl line 4: field "text" is missing (this row has messages [{role, content}] fields, but the file\'s shape is text)',
  ]);
  assert.deepEqual(bodies(read.examples), [{ kind: 'text', text: 'ok 😀' }]);
  const chat = await readDataset(file, { shape: 'messages' });
  assert.equal(String(chat.errors.at(-1)), 'surrogates.jsonl line 4: message 2 holds half a UTF-16 surrogate pair (\\udbff at character 2), which is not text');
});

test('prompt/completion and text rows', async () => {
  const completion = await readDataset(writeTemp('pc.jsonl', jsonl([
    { prompt: '', completion: 'Once upon a time.' },
    { prompt: 'Q', completion: '' },
    { prompt: ['Q'], completion: 'A' },
  ])));
  assert.deepEqual(completion.errors.map(String), [
    'pc.jsonl line 2: field "completion" is empty',
    'pc.jsonl line 3: field "prompt" must be a string, got array',
  ]);
  assert.equal(completion.examples.length, 1, 'an empty prompt is allowed (unconditional text)');
  const text = await readDataset(writeTemp('t.jsonl', jsonl([{ text: 'ok' }, { text: { a: 1 } }, { text: '' }])));
  assert.deepEqual(text.errors.map(String), [
    't.jsonl line 2: field "text" must be a string, got object',
    't.jsonl line 3: field "text" is empty',
  ]);
});

test('a file mixing shapes: the shape of most rows wins and the other rows are reported', async () => {
  const file = writeTemp('mixed.jsonl', jsonl([
    { instruction: 'Say hi.', output: 'Hi.' },
    { messages: [user('Hi'), assistant('Hello')] },
    { messages: [user('Hi'), assistant('Hello')] },
    { text: 'plain' },
    { messages: [user('Hi'), assistant('Hello')] },
  ]));
  const read = await readDataset(file);
  assert.equal(read.shape, 'messages');
  assert.deepEqual(read.errors.map(String), [
    `mixed.jsonl line 1: field "messages" is missing (this row has alpaca instruction/input/output fields, but the file's shape is messages [{role, content}])`,
    `mixed.jsonl line 4: field "messages" is missing (this row has text fields, but the file's shape is messages [{role, content}])`,
  ]);
});

test('shape detection: full signatures first, then the first signature field; override by option', async () => {
  assert.equal(detectShape([{ prompt: 'a', completion: 'b', text: 'c' }]), 'completion');
  assert.equal(detectShape([{ messages: [], text: 'c' }]), 'messages');
  assert.equal(detectShape([{ instruction: 'a' }, { instruction: 'b', input: 'c' }]), 'alpaca');
  assert.equal(detectShape([{ colour: 'red' }]), null);

  const file = writeTemp('both.jsonl', jsonl([{ prompt: 'P', completion: 'C', text: 'T' }]));
  assert.deepEqual(bodies((await readDataset(file)).examples), [{ kind: 'completion', prompt: 'P', completion: 'C' }]);
  assert.deepEqual(bodies((await readDataset(file, { shape: 'text' })).examples), [{ kind: 'text', text: 'T' }]);
  const forced = await readDataset(file, { shape: 'alpaca' });
  assert.deepEqual(forced.errors.map(String), [
    `both.jsonl line 1: field "instruction" is missing (this row has prompt/completion fields, but the file's shape is alpaca instruction/input/output)`,
  ]);
});

test('loadDataset: invalid rows fail together unless skipped; skipped rows are counted', async () => {
  const rows = [
    { text: 'one' },
    { text: 1 },
    { text: 'three' },
    '{"text": ',
    { text: null },
  ];
  const file = writeTemp('train.jsonl', jsonl(rows));
  await assert.rejects(loadDataset(file), (err: Error) => {
    assert.ok(err instanceof DatasetInvalidError);
    assert.equal(err.message, 'train.jsonl line 2: field "text" must be a string, got number (and 2 more invalid rows; fix them or pass --skip-invalid)');
    assert.equal(err.errors.length, 3);
    assert.ok(err.errors[0] instanceof DataError);
    return true;
  });
  const loaded = await loadDataset(file, { skipInvalid: true });
  assert.equal(loaded.skipped, 3);
  assert.equal(loaded.rowCount, 5);
  assert.deepEqual(bodies(loaded.examples), [{ kind: 'text', text: 'one' }, { kind: 'text', text: 'three' }]);

  const one = writeTemp('one.jsonl', jsonl([{ text: 'ok' }, { text: 2 }]));
  await assert.rejects(loadDataset(one), {
    message: 'one.jsonl line 2: field "text" must be a string, got number (fix it or pass --skip-invalid)',
  });
  const none = writeTemp('none.jsonl', jsonl([{ text: 1 }, { text: 2 }]));
  await assert.rejects(loadDataset(none, { skipInvalid: true }), {
    name: 'DataFileError',
    message: 'none.jsonl: has no valid rows (all 2 are invalid; the first: none.jsonl line 1: field "text" must be a string, got number)',
  });
  const clean = await loadDataset(writeTemp('ok.jsonl', jsonl([{ text: 'a' }])));
  assert.equal(clean.skipped, 0);
});

test('DataError: fields and toString', () => {
  const byLine = new DataError({ file: 'train.jsonl', line: 3 }, 'field "output" must be a string, got number', 'output');
  assert.equal(String(byLine), 'train.jsonl line 3: field "output" must be a string, got number');
  assert.deepEqual([byLine.file, byLine.line, byLine.row, byLine.field], ['train.jsonl', 3, undefined, 'output']);
  const byRow = new DataError({ file: 'chat.json', row: 5 }, 'message 2 has role "robot" (allowed: system, user, assistant)');
  assert.equal(`${byRow}`, 'chat.json row 5: message 2 has role "robot" (allowed: system, user, assistant)');
});
