// Rendering and tokenization on the tiny byte-level BPE tokenizers (Llama 3 and Qwen2 layouts): exactly the
// assistant content and its end-of-turn token are trained; BOS once; EOS labelled by position; the Alpaca
// fallback for models without a chat template; truncation, dropping and the tokenizer files' variants.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import {
  ChatMessage,
  DatasetInvalidError,
  IGNORE_INDEX,
  loadModelTokenizer,
  MAX_TEMPLATE_RANGE,
  ModelTokenizer,
  NormalizedExample,
  renderExample,
  tokenizeDataset,
  tokenizeDatasetAsync,
  tokenizeDatasetInWorkers,
  TokenizationStopped,
  tokenizeExample,
  TokenizedExample,
} from '../../extension/data';
import { tinyModelDir } from '../fixtures/data/helpers';
import { tempDir } from '../helpers/paths';

const at = (line: number) => ({ file: 'train.jsonl', line });
const chat = (messages: ChatMessage[], line = 1): NormalizedExample => ({ kind: 'chat', messages, at: at(line) });

const CONVERSATION: ChatMessage[] = [
  { role: 'system', content: 'Be brief.' },
  { role: 'user', content: 'What is the capital of France?' },
  { role: 'assistant', content: 'The capital of France is Paris.' },
  { role: 'user', content: 'And of Italy?' },
  { role: 'assistant', content: 'Rome.' },
];

/** Decoded text of each maximal run of trained tokens. */
function trainedRuns(tok: ModelTokenizer, ex: TokenizedExample): string[] {
  const runs: string[] = [];
  let run: number[] = [];
  ex.labels.forEach((label, t) => {
    if (label !== IGNORE_INDEX) {
      assert.equal(label, ex.ids[t], 'a trained label is the token itself');
      run.push(ex.ids[t]);
    } else if (run.length > 0) {
      runs.push(tok.decode(run));
      run = [];
    }
  });
  if (run.length > 0) runs.push(tok.decode(run));
  return runs;
}

function count(ids: Int32Array, id: number): number {
  return ids.filter((x) => x === id).length;
}

const ARCHES = [
  { arch: 'llama' as const, eot: '<|eot_id|>', header: '<|start_header_id|>assistant<|end_header_id|>\n\n' },
  { arch: 'qwen2' as const, eot: '<|im_end|>', header: '<|im_start|>assistant\n' },
];

for (const { arch, eot, header } of ARCHES) {
  test(`${arch}: only assistant contents and their ${eot} are trained, ids are the whole rendering's tokens`, async () => {
    const tok = await loadModelTokenizer(tinyModelDir(arch));
    const ex = tokenizeExample(chat(CONVERSATION, 7), tok);
    assert.equal(ex.source, 'train.jsonl line 7');
    assert.equal(ex.template, 'chat_template');
    assert.equal(ex.ids.length, ex.labels.length);
    assert.deepEqual(trainedRuns(tok, ex), [`The capital of France is Paris.${eot}`, `Rome.${eot}`]);

    // Token by token: the trained tokens are the content's own tokens followed by the end-of-turn token.
    const trainedIds = Array.from(ex.labels).filter((l) => l !== IGNORE_INDEX);
    assert.deepEqual(trainedIds, [
      ...tok.encode('The capital of France is Paris.'), tok.eosId,
      ...tok.encode('Rome.'), tok.eosId,
    ]);
    // Everything else (system, user turns, assistant headers, the turn separators) is not.
    const full = tok.template?.render({ messages: CONVERSATION, add_generation_prompt: false, bos_token: tok.bosToken ?? undefined }) as string;
    assert.deepEqual(Array.from(ex.ids), tok.encode(full));
    const untrained = tok.decode(Array.from(ex.ids).filter((_, t) => ex.labels[t] === IGNORE_INDEX));
    assert.ok(untrained.includes(header) && untrained.includes('What is the capital of France?') && untrained.includes('Be brief.'));
    assert.ok(!untrained.includes('Paris') && !untrained.includes('Rome'));
  });

  test(`${arch}: BOS appears once, from the template or the tokenizer; EOS ends completions and texts, trained`, async () => {
    const tok = await loadModelTokenizer(tinyModelDir(arch));
    const examples: NormalizedExample[] = [
      chat(CONVERSATION),
      { kind: 'completion', prompt: 'The capital of France is', completion: ' Paris.', at: at(2) },
      { kind: 'text', text: 'Paris is the capital of France.', at: at(3) },
    ];
    for (const example of examples) {
      const ex = tokenizeExample(example, tok);
      if (tok.bosId !== null) {
        assert.equal(ex.ids[0], tok.bosId, `${example.kind} starts with BOS`);
        assert.equal(count(ex.ids, tok.bosId), 1, `${example.kind} has one BOS`);
        assert.equal(ex.labels[0], IGNORE_INDEX, 'BOS is not trained');
      }
      if (example.kind === 'chat') continue;
      const last = ex.ids.length - 1;
      assert.equal(ex.ids[last], tok.eosId, `${example.kind} ends with EOS`);
      assert.equal(ex.labels[last], tok.eosId, `${example.kind}'s EOS is trained`);
    }
    const completion = tokenizeExample(examples[1], tok);
    assert.deepEqual(trainedRuns(tok, completion), [` Paris.${tok.eosToken}`]);
    const text = tokenizeExample(examples[2], tok);
    assert.deepEqual(trainedRuns(tok, text), [`Paris is the capital of France.${tok.eosToken}`]);
  });
}

test('a conversation that opens with the assistant trains that turn from its content', async () => {
  for (const { arch, eot } of ARCHES) {
    const tok = await loadModelTokenizer(tinyModelDir(arch));
    const ex = tokenizeExample(chat([
      { role: 'assistant', content: 'Hello! Ask me about capitals.' },
      { role: 'user', content: 'What is the capital of Spain?' },
      { role: 'assistant', content: 'Madrid.' },
    ]), tok);
    assert.deepEqual(trainedRuns(tok, ex), [`Hello! Ask me about capitals.${eot}`, `Madrid.${eot}`], arch);
  }
});

test('llama: BOS is added for completions only where the tokenizer adds it (add_bos_token)', async () => {
  const tok = await loadModelTokenizer(tinyModelDir('llama', { add_bos_token: false }));
  assert.equal(tok.addsBos, false);
  const ex = tokenizeExample({ kind: 'text', text: 'Hi.', at: at(1) }, tok);
  assert.equal(count(ex.ids, tok.bosId as number), 0);
  const withBos = await loadModelTokenizer(tinyModelDir('llama', { add_bos_token: undefined }));
  assert.equal(withBos.addsBos, true, 'without the flag, taken from the tokenizer.json post-processor');
});

test('EOS is labelled by position even when the pad token is the EOS token', async () => {
  for (const arch of ['llama', 'qwen2'] as const) {
    const dir = tinyModelDir(arch, { pad_token: arch === 'llama' ? '<|eot_id|>' : '<|im_end|>' });
    const tok = await loadModelTokenizer(dir);
    const { examples } = tokenizeDataset([
      { kind: 'completion', prompt: 'Q: 2 plus 2?\nA:', completion: ' 4', at: at(1) },
      chat([{ role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello' }], 2),
    ], tok);
    for (const ex of examples) {
      const eosPositions = Array.from(ex.ids.keys()).filter((t) => ex.ids[t] === tok.eosId);
      const lastEos = eosPositions[eosPositions.length - 1];
      assert.equal(ex.labels[lastEos], tok.eosId, `${arch} ${ex.source}: the closing EOS is trained`);
    }
  }
});

test('no chat template: chat examples use the Alpaca fallback, and the stats say so', async () => {
  const tok = await loadModelTokenizer(tinyModelDir('llama', { chat_template: undefined }));
  assert.equal(tok.chatTemplate, null);
  const { segments, template } = renderExample(chat(CONVERSATION), tok);
  assert.equal(template, 'alpaca-fallback');
  assert.deepEqual(segments, [
    { text: '<|begin_of_text|>', trained: false },
    { text: 'Be brief.\n\n', trained: false },
    { text: '### Instruction:\nWhat is the capital of France?\n\n### Response:\n', trained: false },
    { text: 'The capital of France is Paris.<|eot_id|>', trained: true },
    { text: '\n\n', trained: false },
    { text: '### Instruction:\nAnd of Italy?\n\n### Response:\n', trained: false },
    { text: 'Rome.<|eot_id|>', trained: true },
  ]);
  const result = tokenizeDataset([chat(CONVERSATION)], tok);
  assert.equal(result.stats.template, 'alpaca-fallback');
  assert.deepEqual(trainedRuns(tok, result.examples[0]), ['The capital of France is Paris.<|eot_id|>', 'Rome.<|eot_id|>']);
  const withTemplate = tokenizeDataset([chat(CONVERSATION)], await loadModelTokenizer(tinyModelDir('llama')));
  assert.equal(withTemplate.stats.template, 'chat_template');
  const noChat = tokenizeDataset([{ kind: 'text', text: 'x', at: at(1) }], tok);
  assert.equal(noChat.stats.template, null);
});

test('trainOnPrompt labels every token', async () => {
  const tok = await loadModelTokenizer(tinyModelDir('qwen2'));
  const ex = tokenizeExample(chat(CONVERSATION), tok, { trainOnPrompt: true });
  assert.deepEqual(Array.from(ex.labels), Array.from(ex.ids));
});

test('maxLength truncates and counts; examples left with nothing to train are dropped and counted', async () => {
  const tok = await loadModelTokenizer(tinyModelDir('qwen2'));
  const long = chat([{ role: 'user', content: 'Tell me a long story about the weather in winter.' }, { role: 'assistant', content: 'It rained.' }], 1);
  const short = chat([{ role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello' }], 2);
  const longLength = tokenizeExample(long, tok).ids.length;
  const shortLength = tokenizeExample(short, tok).ids.length;
  const firstTrained = tokenizeExample(short, tok).labels.findIndex((l) => l !== IGNORE_INDEX);

  // Cut `short` just after its first trained token, and `long` before any: long is dropped, short kept.
  const maxLength = firstTrained + 1;
  assert.ok(tokenizeExample(long, tok).labels.slice(0, maxLength).every((l) => l === IGNORE_INDEX));
  const result = tokenizeDataset([long, short], tok, { maxLength });
  assert.equal(result.stats.droppedNoTrainable, 1);
  assert.equal(result.stats.lengths.truncated, 2);
  assert.deepEqual([result.stats.lengths.min, result.stats.lengths.max], [shortLength, longLength], 'lengths before truncation');
  assert.equal(result.examples.length, 1);
  assert.equal(result.examples[0].source, 'train.jsonl line 2');
  assert.equal(result.examples[0].ids.length, maxLength);
  assert.equal(result.stats.trainedTokens, 1);
  assert.equal(result.stats.totalTokens, maxLength);
  assert.throws(() => tokenizeDataset([short], tok, { maxLength: 0 }), /maxLength must be a positive integer/);
});

test('a template that refuses an example: a row error, thrown together or skipped and counted', async () => {
  const strict =
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System messages are not supported') }}{% endif %}" +
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}" +
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
  const tok = await loadModelTokenizer(tinyModelDir('qwen2', { chat_template: strict }));
  const examples = [chat(CONVERSATION, 4), chat(CONVERSATION.slice(1), 5)];
  assert.throws(() => tokenizeDataset(examples, tok), (err: Error) => {
    assert.ok(err instanceof DatasetInvalidError);
    assert.equal(err.message, 'train.jsonl line 4: chat template error: System messages are not supported (fix it or pass --skip-invalid)');
    return true;
  });
  const skipped = tokenizeDataset(examples, tok, { skipInvalid: true });
  assert.equal(skipped.stats.invalid, 1);
  assert.equal(skipped.examples.length, 1);
  assert.deepEqual(skipped.errors.map(String), ['train.jsonl line 4: chat template error: System messages are not supported']);
});

test("a template's range() is bounded: a billion items is the template's error, not a process that dies of it", async () => {
  const looping = "{% for i in range(1000000000) %}x{% endfor %}{% for m in messages %}{{ m['content'] }}{% endfor %}";
  const tok = await loadModelTokenizer(tinyModelDir('qwen2', { chat_template: looping }));
  const skipped = tokenizeDataset([chat(CONVERSATION, 3)], tok, { skipInvalid: true });
  assert.deepEqual(skipped.errors.map(String), [`train.jsonl line 3: chat template error: range() of 1000000000 items, more than a chat template is allowed (${MAX_TEMPLATE_RANGE})`]);
  // within the bound, range() is Python's
  const counting = "{{ range(4) | join(',') }};{{ range(2, 5) | join(',') }};{{ range(5, 0, -2) | join(',') }};{{ range(3, 1) | length }}";
  const t = await loadModelTokenizer(tinyModelDir('qwen2', { chat_template: counting }));
  assert.equal(t.template!.render({ messages: [] }), '0,1,2,3;2,3,4;5,3,1;0');
  // the bound holds however the template reaches range() (3,000,000 items: past the bound, yet a list the process
  // survives, so that a way around it fails this test rather than ending it)
  for (const reach of [
    '{% set r = range %}{{ r(3000000) | length }}',
    '{% set d = {"a": range(3000000)} %}{{ d.a | length }}',
    '{% set d = {"a": range} %}{{ d.a(3000000) | length }}',
    '{% macro m(a) %}{{ a(3000000) | length }}{% endmacro %}{{ m(**{"a": range}) }}',
    '{% set ns = namespace(r=range) %}{{ ns.r(3000000) | length }}',
  ]) {
    const t = await loadModelTokenizer(tinyModelDir('qwen2', { chat_template: reach }));
    assert.throws(() => t.template!.render({ messages: [] }), /range\(\) of 3000000 items/, reach);
  }
  // names that are not the function keep working: an attribute, a keyword, a macro parameter
  for (const [source, expected] of [
    ['{% set ns = namespace(range=3) %}{{ ns.range }};{{ range(ns.range) | length }}', '3;3'],
    ['{% macro f(range) %}[{{ range }}]{% endmacro %}{{ f(range=7) }}', '[7]'],
    ['{% macro f(range=5) %}[{{ range }}]{% endmacro %}{{ f() }}', '[5]'],
  ]) {
    const t = await loadModelTokenizer(tinyModelDir('qwen2', { chat_template: source }));
    assert.equal(t.template!.render({ messages: [] }), expected, source);
  }
});

test('tokenizer files: chat_template lists, chat_template.jinja, {content} special tokens, config.json fallback', async () => {
  const marker =
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{% endfor %}" +
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
  const listed = await loadModelTokenizer(tinyModelDir('qwen2', {
    chat_template: [{ name: 'tool_use', template: 'TOOLS' }, { name: 'default', template: marker }],
  }));
  assert.equal(listed.chatTemplate, marker);

  const jinja = await loadModelTokenizer(tinyModelDir('qwen2', {}, { 'chat_template.jinja': marker }));
  assert.equal(jinja.chatTemplate, marker, 'chat_template.jinja takes precedence');
  const ex = tokenizeExample(chat([{ role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello' }]), jinja);
  assert.deepEqual(trainedRuns(jinja, ex), ['Hello<|im_end|>']);

  const dicts = await loadModelTokenizer(tinyModelDir('llama', {
    bos_token: { content: '<|begin_of_text|>', lstrip: false },
    eos_token: { content: '<|eot_id|>', lstrip: false },
  }));
  assert.deepEqual([dicts.bosToken, dicts.eosToken], ['<|begin_of_text|>', '<|eot_id|>']);

  const fromConfig = await loadModelTokenizer(tinyModelDir('llama', { bos_token: undefined, eos_token: undefined }, {
    'config.json': JSON.stringify({ bos_token_id: 506, eos_token_id: [511, 507] }),
  }));
  assert.deepEqual([fromConfig.bosToken, fromConfig.bosId, fromConfig.eosToken, fromConfig.eosId], ['<|begin_of_text|>', 506, '<|eot_id|>', 511]);
});

test('named chat templates: rows with tools take "tool_use", the others "default", from a list or additional_chat_templates/', async () => {
  const turns = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{% endfor %}";
  const plain = turns + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
  const withTools = "{{ '<|im_start|>system\\nTools: ' }}{% for t in tools %}{{ t.name }}{% endfor %}{{ '<|im_end|>' }}" + plain;
  const example = (tools?: Record<string, unknown>[]): NormalizedExample => ({
    kind: 'chat',
    at: at(1),
    messages: [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello' }],
    ...(tools ? { tools } : {}),
  });
  const rendered = (tok: ModelTokenizer, ex: NormalizedExample) => renderExample(ex, tok).segments.map((seg) => seg.text).join('');

  // Hermes' layout: a list in tokenizer_config.json
  const listed = await loadModelTokenizer(tinyModelDir('qwen2', { chat_template: [{ name: 'default', template: plain }, { name: 'tool_use', template: withTools }] }));
  assert.equal(rendered(listed, example([{ name: 'get_weather' }])), '<|im_start|>system\nTools: get_weather<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello<|im_end|>');
  assert.equal(rendered(listed, example()), '<|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello<|im_end|>');
  assert.deepEqual(trainedRuns(listed, tokenizeExample(example([{ name: 'get_weather' }]), listed)), ['Hello<|im_end|>']);
  assert.equal(listed.templateUsesTools, true);
  assert.equal(tokenizeDataset([example([{ name: 'f' }])], listed).stats.toolsUnused, 0);

  // newer transformers: chat_template.jinja is the default one, additional_chat_templates/<name>.jinja the others
  const dir = tinyModelDir('qwen2', { chat_template: undefined }, { 'chat_template.jinja': plain });
  fs.mkdirSync(path.join(dir, 'additional_chat_templates'));
  fs.writeFileSync(path.join(dir, 'additional_chat_templates', 'tool_use.jinja'), withTools);
  const files = await loadModelTokenizer(dir);
  assert.deepEqual([files.chatTemplate, files.chatTemplateFile, files.toolUseTemplate?.file], [plain, 'chat_template.jinja', 'additional_chat_templates/tool_use.jinja']);
  assert.equal(rendered(files, example([{ name: 'search' }])).startsWith('<|im_start|>system\nTools: search<|im_end|>'), true);
  assert.equal(rendered(files, example()).startsWith('<|im_start|>user'), true);
});

test('a chat template that does not parse is a clear error when first needed, not before', async () => {
  const tok = await loadModelTokenizer(tinyModelDir('qwen2', {}, { 'chat_template.jinja': '{% for m in messages %}{{ m.content }}' }));
  assert.deepEqual(trainedRuns(tok, tokenizeExample({ kind: 'text', text: 'Hi', at: at(1) }, tok)), ['Hi<|im_end|>']);
  assert.throws(() => tokenizeExample(chat(CONVERSATION), tok), (err: Error) => {
    assert.equal(err.name, 'DataFileError');
    assert.match(err.message, /^chat_template\.jinja: the chat template cannot be parsed \(.+\)$/);
    return true;
  });
});

test('tokenizer folder errors name the file', async () => {
  const dir = tinyModelDir('qwen2', { eos_token: undefined });
  await assert.rejects(loadModelTokenizer(dir), {
    name: 'DataFileError',
    message: 'tokenizer_config.json: the model defines no EOS token (eos_token in tokenizer_config.json or eos_token_id in config.json)',
  });
  fs.rmSync(path.join(dir, 'tokenizer.json'));
  await assert.rejects(loadModelTokenizer(dir), { message: `tokenizer.json: file not found (${path.join(dir, 'tokenizer.json')})` });
  fs.writeFileSync(path.join(dir, 'tokenizer.model'), '');
  await assert.rejects(loadModelTokenizer(dir), {
    message: `tokenizer.json: file not found; ${dir} has only tokenizer.model (SentencePiece), which transformers converts when it loads it: write tokenizer.json once with transformers (AutoTokenizer.from_pretrained(folder).save_pretrained(folder))`,
  });
  fs.rmSync(path.join(dir, 'tokenizer.model'));
  await assert.rejects(loadModelTokenizer(tinyModelDir('qwen2', { eos_token: '<|nope|>' })), {
    message: 'tokenizer_config.json: eos_token "<|nope|>" is not in the tokenizer\'s vocabulary',
  });
});

test('a large dataset tokenized in worker threads gives what one thread gives, in order, with progress and template errors', async () => {
  const refuse = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m['content'] + '<|im_end|>' }}{% endfor %}";
  const tok = await loadModelTokenizer(tinyModelDir('qwen2', { chat_template: refuse }));
  const examples: NormalizedExample[] = Array.from({ length: 301 }, (_, i) => ({
    kind: 'chat',
    messages: [...(i % 50 === 7 ? [{ role: 'system' as const, content: 'S' }] : []), { role: 'user', content: `Question ${i}?` }, { role: 'assistant', content: `Answer ${'x'.repeat(i % 40)}.` }],
    at: { file: 'big.jsonl', line: i + 1 },
  }));
  const options = { maxLength: 24, skipInvalid: true };
  const one = tokenizeDataset(examples, tok, options);
  const progress: number[] = [];
  const many = await tokenizeDatasetInWorkers(examples, tok, { ...options, onProgress: (done, total) => { assert.equal(total, 301); progress.push(done); } }, 3);
  assert.deepEqual(many.stats, one.stats);
  assert.deepEqual(many.errors.map(String), one.errors.map(String));
  assert.equal(one.errors.length, 6);
  assert.deepEqual(many.examples.map((e) => [e.source, Array.from(e.ids), Array.from(e.labels)]), one.examples.map((e) => [e.source, Array.from(e.ids), Array.from(e.labels)]));
  assert.equal(progress.at(-1), 301);
  // an error other than a template's refusal fails the whole
  await assert.rejects(tokenizeDatasetInWorkers(examples, { ...tok, modelDir: path.join(tempDir('no-tokenizer'), 'none') } as typeof tok, options, 2), /tokenizer\.json/);
  // a stop asked for meanwhile ends the work early, in workers and in this thread (a slice at a time), with the same
  // result as one thread when nobody stops it
  const stop = new AbortController();
  const stopped = tokenizeDatasetInWorkers(examples, tok, { ...options, signal: stop.signal }, 2);
  setImmediate(() => stop.abort()); // the workers are still loading the tokenizer
  await assert.rejects(stopped, TokenizationStopped);
  const sliced = await tokenizeDatasetAsync(examples, tok, options);
  assert.deepEqual(sliced.examples.map((e) => Array.from(e.ids)), one.examples.map((e) => Array.from(e.ids)));
  let seen = 0;
  const halfway = new AbortController();
  await assert.rejects(tokenizeDatasetAsync(examples, tok, { ...options, signal: halfway.signal, onProgress: (done) => { seen = done; if (done === 10) halfway.abort(); } }), TokenizationStopped);
  assert.ok(seen < 301, `it went on to ${seen}`);
});
