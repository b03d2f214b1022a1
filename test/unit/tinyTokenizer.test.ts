import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Tokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';
import { buildTinyTokenizer, preTokenize, ByteLevelArch as TinyArch, TinyTokenizer } from '../../extension/trainer/tinyModel/tokenizer';

const ARCHES: TinyArch[] = ['llama', 'qwen2'];

/** Loads the tokenizer the way a consumer would: from the serialized JSON files. */
function load(tiny: TinyTokenizer): Tokenizer {
  const tokenizerJson = JSON.parse(JSON.stringify(tiny.tokenizerJson)) as object;
  const tokenizerConfig = JSON.parse(JSON.stringify(tiny.tokenizerConfig)) as object;
  return new Tokenizer(tokenizerJson, tokenizerConfig);
}

function model(tiny: TinyTokenizer): { vocab: Record<string, number>; merges: string[] } {
  return tiny.tokenizerJson.model as { vocab: Record<string, number>; merges: string[] };
}

function addedTokens(tiny: TinyTokenizer): { id: number; content: string; special: boolean }[] {
  return tiny.tokenizerJson.added_tokens as { id: number; content: string; special: boolean }[];
}

const ROUND_TRIP_TEXTS = [
  'Hello world',
  'The quick brown fox jumps over the lazy dog.',
  "Wait -- what?! (It's 100% fine; really...) I'LL see, we've got [brackets] & {braces}.",
  'Numbers: 0 7 42 123 4567 89012 3.14159 -273.15 1,000,000',
  'line one\nline two\r\n\n\n  indented\tTabbed   spaces   ',
  '   leading and trailing   ',
  'café 日本 🚀 naïve Ünïcödé — “quotes” ½ €5',
  'def add(a, b):\n    return a + b  # comment\n',
  ' ',
  '\n',
];

for (const arch of ARCHES) {
  test(`${arch}: vocabulary layout is contiguous and exactly vocabSize ids`, () => {
    const tiny = buildTinyTokenizer(arch);
    const { vocab, merges } = model(tiny);
    const specials = addedTokens(tiny);

    assert.equal(tiny.vocabSize, 512);
    const modelIds = Object.values(vocab).sort((a, b) => a - b);
    assert.deepEqual(modelIds, modelIds.map((_, i) => i), 'model ids are 0..n-1 without gaps or duplicates');
    const specialIds = specials.map((t) => t.id);
    assert.deepEqual(specialIds, specialIds.map((_, i) => modelIds.length + i), 'specials follow the model vocab');
    const allIds = [...modelIds, ...specialIds];
    assert.equal(Math.max(...allIds) + 1, tiny.vocabSize);
    assert.equal(allIds.length, tiny.vocabSize);
    assert.ok(specials.every((t) => t.special));

    // The first 256 ids are the single byte symbols; every merge builds a known token.
    const byId = new Map(Object.entries(vocab).map(([token, id]) => [id, token]));
    for (let id = 0; id < 256; id++) assert.equal([...(byId.get(id) as string)].length, 1);
    assert.ok(merges.length >= 250, `expected ~250 merges, got ${merges.length}`);
    for (const merge of merges) {
      const parts = merge.split(' ');
      assert.equal(parts.length, 2, `merge "${merge}" is a pair`);
      assert.ok(parts[0] in vocab && parts[1] in vocab && parts[0] + parts[1] in vocab, `merge "${merge}" uses known tokens`);
    }

    const tokenizer = load(tiny);
    assert.equal(tokenizer.get_vocab(true).size, tiny.vocabSize);
  });

  test(`${arch}: special token ids and config agree`, () => {
    const tiny = buildTinyTokenizer(arch);
    const tokenizer = load(tiny);
    const config = tiny.tokenizerConfig;

    assert.equal(tokenizer.id_to_token(tiny.eosTokenId), config.eos_token);
    assert.equal(tokenizer.id_to_token(tiny.padTokenId), config.pad_token);
    assert.equal(tiny.eosTokenIds[0], tiny.eosTokenId);
    assert.equal(config.model_max_length, 2048);
    assert.equal(config.tokenizer_class, 'PreTrainedTokenizerFast');
    assert.equal(config.clean_up_tokenization_spaces, false);
    assert.equal(typeof config.chat_template, 'string');

    const decoder = config.added_tokens_decoder as Record<string, { content: string }>;
    for (const t of addedTokens(tiny)) assert.equal(decoder[String(t.id)].content, t.content);

    if (arch === 'llama') {
      assert.equal(tiny.bosTokenId, 506);
      assert.equal(tokenizer.id_to_token(506), '<|begin_of_text|>');
      assert.equal(config.bos_token, '<|begin_of_text|>');
      assert.equal(config.add_bos_token, true);
      assert.equal(tokenizer.id_to_token(tiny.eosTokenId), '<|eot_id|>');
      assert.equal(tokenizer.id_to_token(tiny.eosTokenIds[1]), '<|end_of_text|>');
      assert.equal(tokenizer.id_to_token(tiny.padTokenId), '<|finetune_right_pad_id|>');
    } else {
      assert.equal(tiny.bosTokenId, null);
      assert.equal(config.bos_token, null);
      assert.equal(tokenizer.id_to_token(tiny.eosTokenId), '<|im_end|>');
      assert.equal(tokenizer.id_to_token(tiny.eosTokenIds[1]), '<|endoftext|>');
      assert.equal(tokenizer.id_to_token(tiny.padTokenId), '<|endoftext|>');
    }
  });

  test(`${arch}: encode/decode round-trips exactly, ids stay in range`, () => {
    const tiny = buildTinyTokenizer(arch);
    const tokenizer = load(tiny);
    for (const text of ROUND_TRIP_TEXTS) {
      const plain = tokenizer.encode(text, { add_special_tokens: false }).ids;
      assert.ok(plain.length > 0);
      assert.ok(plain.every((id) => Number.isInteger(id) && id >= 0 && id < tiny.vocabSize), `ids in range for ${JSON.stringify(text)}`);
      assert.equal(tokenizer.decode(plain), text);

      // With special tokens: Llama prepends BOS (post-processor), Qwen adds nothing.
      const withSpecials = tokenizer.encode(text).ids;
      if (tiny.bosTokenId !== null) {
        assert.deepEqual(withSpecials, [tiny.bosTokenId, ...plain]);
      } else {
        assert.deepEqual(withSpecials, plain);
      }
      assert.equal(tokenizer.decode(withSpecials, { skip_special_tokens: true }), text);
    }
  });

  test(`${arch}: pre-tokenizer used for training matches tokenizer.json's`, () => {
    const tokenizer = load(buildTinyTokenizer(arch));
    const preTokenizer = tokenizer.pre_tokenizer;
    assert.ok(preTokenizer);
    for (const text of ROUND_TRIP_TEXTS) {
      assert.deepEqual(preTokenize(arch, text), preTokenizer.pre_tokenize(text), JSON.stringify(text));
    }
    // Llama 3 groups up to three digits; Qwen2 splits every digit.
    assert.deepEqual(preTokenize(arch, '12345'), arch === 'llama' ? ['123', '45'] : ['1', '2', '3', '4', '5']);
  });

  test(`${arch}: learned merges compress common English`, () => {
    const tokenizer = load(buildTinyTokenizer(arch));
    for (const word of [' the', ' and', ' is', ' of', 'ing']) {
      assert.equal(tokenizer.encode(word, { add_special_tokens: false }).ids.length, 1, `${JSON.stringify(word)} is one token`);
    }
    assert.deepEqual(tokenizer.tokenize(' the'), ['Ġthe']);
    const sentence = 'The weather is warm, so we will cook the pasta outside in the garden.';
    const ids = tokenizer.encode(sentence, { add_special_tokens: false }).ids;
    assert.ok(ids.length * 2 < Buffer.byteLength(sentence), `${ids.length} tokens for ${Buffer.byteLength(sentence)} bytes`);
  });

  test(`${arch}: chat template renders the expected text and its specials are single ids`, () => {
    const tiny = buildTinyTokenizer(arch);
    const tokenizer = load(tiny);
    const config = tiny.tokenizerConfig;
    const template = new Template(config.chat_template as string);
    const messages = [
      { role: 'user', content: 'What is the capital of France?' },
      { role: 'assistant', content: ' Paris.\n' },
    ];
    const render = (add_generation_prompt: boolean): string =>
      template.render({ messages, add_generation_prompt, bos_token: config.bos_token, eos_token: config.eos_token });

    let expected: string;
    let generationPrompt: string;
    let specials: string[];
    if (arch === 'llama') {
      // Llama 3 trims message content.
      expected =
        '<|begin_of_text|>' +
        '<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>' +
        '<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>';
      generationPrompt = '<|start_header_id|>assistant<|end_header_id|>\n\n';
      specials = ['<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'];
    } else {
      // ChatML keeps content verbatim and adds the default system turn.
      expected =
        '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' +
        '<|im_start|>user\nWhat is the capital of France?<|im_end|>\n' +
        '<|im_start|>assistant\n Paris.\n<|im_end|>\n';
      generationPrompt = '<|im_start|>assistant\n';
      specials = ['<|im_start|>', '<|im_end|>'];
    }
    const rendered = render(false);
    assert.equal(rendered, expected);
    assert.equal(render(true), expected + generationPrompt);

    // Templated text already holds its specials, so it is encoded without adding more.
    const ids = tokenizer.encode(rendered, { add_special_tokens: false }).ids;
    for (const special of specials) {
      const id = tokenizer.token_to_id(special);
      assert.ok(id !== undefined && id >= tiny.vocabSize - addedTokens(tiny).length, `${special} is an added token`);
      assert.equal(tokenizer.encode(special, { add_special_tokens: false }).ids.length, 1);
      assert.equal(ids.filter((x) => x === id).length, rendered.split(special).length - 1, `${special} encodes as one id each time`);
    }
    assert.equal(tokenizer.decode(ids), rendered);
    if (tiny.bosTokenId !== null) assert.equal(ids[0], tiny.bosTokenId);
    assert.equal(ids[ids.length - 1], arch === 'llama' ? tiny.eosTokenId : tokenizer.token_to_id('Ċ'), 'ends with the newline byte symbol');

    // A system message replaces ChatML's default one.
    if (arch === 'qwen2') {
      const withSystem = template.render({ messages: [{ role: 'system', content: 'Be brief.' }, messages[0]], add_generation_prompt: true });
      assert.equal(withSystem, '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n');
    }
  });

  test(`${arch}: buildTinyTokenizer is deterministic`, () => {
    const a = buildTinyTokenizer(arch);
    const b = buildTinyTokenizer(arch);
    assert.deepEqual(a, b);
    assert.equal(JSON.stringify(a), JSON.stringify(b));
  });
}

test('llama and qwen2 share merges except where their digit handling differs', () => {
  const llama = model(buildTinyTokenizer('llama')).merges;
  const qwen = model(buildTinyTokenizer('qwen2')).merges;
  // Both learn from the same corpus; only Llama can merge digit pairs.
  assert.ok(llama.some((m) => /^\d+ \d+$/.test(m)));
  assert.ok(!qwen.some((m) => /^\d+ \d+$/.test(m)));
  assert.equal(llama[0], qwen[0]);
});
